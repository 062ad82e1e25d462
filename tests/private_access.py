"""Finds where Plexus source touches a private name of the `mcp` SDK or of Jupyter Server (and its tornado).

Used by tests/test_compat_contracts.py: outside the two adapter modules (endpoint/sdk_compat.py and
handlers/jupyter_compat.py) no module may
- read or set `obj._name` where `_name` is a private name of those packages and not one of ours,
- define or set on `self` a private name that a foreign base class of the class already has (an override
  of, or a write into, the base's internals),
- name a private attribute in `getattr`/`setattr`/`hasattr`, or import a private module or name from them.

A private name that foreign code uses too (`_send`, `_subscriptions`...) read on an object of ours, or set on
`self` in a class built on a foreign one, must be listed in OWN_SHARED_NAMES: each such use is a decision
made once, in review.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FOREIGN_PACKAGES = ("mcp", "mcp_types", "jupyter_server", "tornado")
ADAPTERS = ("endpoint/sdk_compat.py", "handlers/jupyter_compat.py")

# Private names of our own that foreign code happens to use too, on objects of ours. Each is checked by hand:
# the object it is read on (or the class it is set in) is ours, not a foreign one.
OWN_SHARED_NAMES: frozenset[str] = frozenset(
    {
        "_subscriptions",  # core/events.py: EventBus's own subscription table
        "_send",  # handlers/events.py: EventsSocket's own sender (tornado's WebSocketHandler has none)
    }
)
# Names foreign packages document as hooks for extensions to define, underscore and all.
DOCUMENTED_HOOKS = frozenset(
    {
        "_start_jupyter_server_extension",  # ExtensionApp: "Override this method (no need to call super())"
        "_load_jupyter_server_extension",
        "_jupyter_server_extension_points",
        "_jupyter_labextension_paths",
    }
)

_FOREIGN_NAME = re.compile(r"\.(_[A-Za-z]\w*)|def (_[A-Za-z]\w*)|^\s+(_[A-Za-z]\w*)\s*[:=]", re.M)
_SELF_NAME = re.compile(r"\bself\.(_[A-Za-z]\w*)")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_foreign_module(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in FOREIGN_PACKAGES  # type: ignore[union-attr]


@functools.cache
def foreign_private_names() -> frozenset[str]:
    """Every private attribute, method or class attribute name the foreign packages use."""
    names: set[str] = set()
    for package in FOREIGN_PACKAGES:
        module = __import__(package)
        root = Path(module.__file__).parent
        for path in root.rglob("*.py"):
            for match in _FOREIGN_NAME.finditer(path.read_text(encoding="utf-8", errors="replace")):
                names.add(next(group for group in match.groups() if group))
    return frozenset(names)


@functools.cache
def _foreign_attributes(cls: type) -> frozenset[str]:
    """The private names a foreign class defines or sets on its instances."""
    names = {name for name in vars(cls) if _private(name)}
    with contextlib.suppress(OSError, TypeError):  # no source (a builtin): its __dict__ is all there is
        names.update(_SELF_NAME.findall(inspect.getsource(cls)))
    return frozenset(names)


def foreign_attributes_of(bases: list[type]) -> frozenset[str]:
    """The private names the foreign classes among `bases` (and their ancestors) own."""
    names: set[str] = set()
    for base in bases:
        for cls in inspect.getmro(base):
            if _is_foreign_module(getattr(cls, "__module__", None)):
                names |= _foreign_attributes(cls)
    return frozenset(names)


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, namespace: dict[str, Any]) -> None:
        self.path = path
        self.namespace = namespace
        self.foreign = foreign_private_names()
        self.classes: list[frozenset[str]] = []  # foreign attributes of the enclosing classes' bases
        self.found: list[Violation] = []

    def report(self, node: ast.AST, text: str) -> None:
        self.found.append(Violation(self.path, getattr(node, "lineno", 0), text))

    def _bases(self, node: ast.ClassDef) -> list[type]:
        bases = []
        for base in node.bases:
            try:
                value = eval(compile(ast.Expression(base), self.path, "eval"), self.namespace)
            except Exception:  # a base that cannot be evaluated here (a generic alias...) is not a class we know
                continue
            if isinstance(value, type):
                bases.append(value)
        return bases

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        foreign = foreign_attributes_of(self._bases(node))
        for item in node.body:
            names = []
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [item.name]
            elif isinstance(item, ast.Assign):
                names = [t.id for t in item.targets if isinstance(t, ast.Name)]
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names = [item.target.id]
            for name in names:
                if _private(name) and name in foreign and name not in DOCUMENTED_HOOKS:
                    self.report(item, f"class {node.name} redefines {name}, private to a base class")
        self.classes.append(foreign)
        self.generic_visit(node)
        self.classes.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = node.attr
        receiver = node.value
        on_self = (isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")) or (
            isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super"
        )
        if not _private(name) or name in DOCUMENTED_HOOKS:
            pass
        elif on_self and self.classes:
            if name in self.classes[-1]:
                self.report(node, f"{ast.unparse(node)}: {name} is private to a base class")
            elif self.classes[-1] and name in self.foreign and name not in OWN_SHARED_NAMES:
                # A class built on a foreign one must not use a name foreign code reads on its objects
                # (Jupyter's identity provider reads handler._token_authenticated, for one).
                self.report(node, f"{ast.unparse(node)}: {name} is a private name mcp/jupyter_server/tornado use")
        elif self._module_receiver(receiver):
            pass
        elif name in self.foreign and name not in OWN_SHARED_NAMES:
            self.report(node, f"{ast.unparse(node)}: {name} is private to mcp/jupyter_server/tornado")
        self.generic_visit(node)

    def _module_receiver(self, receiver: ast.expr) -> bool:
        """A module other than the foreign ones (`os._exit`, `sys._getframe`): not this check's business."""
        if not isinstance(receiver, ast.Name):
            return False
        value = self.namespace.get(receiver.id)
        return isinstance(value, types.ModuleType) and not _is_foreign_module(value.__name__)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Name)
            and func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and node.args[1].value in self.foreign
            and node.args[1].value not in OWN_SHARED_NAMES
        ):
            self.report(node, f"{func.id}(..., {node.args[1].value!r}): private to mcp/jupyter_server/tornado")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if _is_foreign_module(node.module):
            module = node.module or ""
            if any(_private(part) for part in module.split(".")):
                self.report(node, f"imports from the private module {module}")
            for alias in node.names:
                if _private(alias.name):
                    self.report(node, f"imports the private name {alias.name} from {module}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _is_foreign_module(alias.name) and any(_private(part) for part in alias.name.split(".")):
                self.report(node, f"imports the private module {alias.name}")


def check_source(source: str, path: str, namespace: dict[str, Any]) -> list[Violation]:
    """The private accesses of one module's source (`namespace`: the module's globals, to resolve base classes)."""
    checker = _Checker(path, namespace)
    checker.visit(ast.parse(source))
    return checker.found
