"""Scorers: what turns a chunk of a dataset into predictions.

A scorer is built from a *spec*, a string or a mapping (JSON / YAML), by :func:`scorer_from_spec`:

=========  ======================================  ============================================================
kind       string shorthand                        mapping fields (besides ``kind``; ``name`` is optional)
=========  ======================================  ============================================================
column     ``column:<column>``                     ``column``: an existing column holding the predictions
rules      (none: rules need a mapping)            ``rules``: ordered list of ``{pattern: <regex>, label}`` or
                                                   ``{keywords: [<word>, ...], label}``; ``default`` (label when
                                                   no rule matches; null = no prediction); ``case_sensitive``
                                                   (false); ``input_column``
python     ``python:<package.module>:<function>``  ``function``: the import path; ``vectorized`` (true/false;
                                                   omitted = decided as below); ``input_column``
kernel     ``kernel:<name>``                       ``function``: the name the kernel registered it under;
                                                   ``kernel_id`` (optional); ``vectorized``; ``input_column``
=========  ======================================  ============================================================

``input_column`` defaults to the ``input_column`` argument of :func:`scorer_from_spec` (a scorecard's
``input_column``), else ``text``. Rules match with ``re.search`` semantics, first matching rule wins,
case-insensitive unless ``case_sensitive``; keywords are literal (escaped) alternatives.

A **python** function is *vectorised* when the spec says ``vectorized: true``, when it carries
``plexus_vectorized = True`` (the :func:`vectorized` decorator sets it), or when its first parameter is
annotated ``pd.Series`` or ``pa.Array`` / ``pa.ChunkedArray``; it is then called once per chunk with the
input column (a Series, or one Arrow array when the annotation is Arrow's) and returns a Series / list /
array / Arrow array of the chunk's length, or a DataFrame with a ``prediction`` column and an optional
``explanation`` column. Otherwise it is called once per item with the input value (None when missing).
Either way an element may be a label or a ``(label, explanation)`` pair. Calling a function with a Series
just to see whether it copes was rejected: a per-item function such as ``str(x).lower()`` "works" on a
Series and returns nonsense. An item whose call raises gets ``"<ExceptionType>: <message>"`` in
``ScoreBatch.errors`` and no prediction, and scoring goes on; if a vectorised call raises, every item of
that chunk gets the error.

A **kernel** scorer is a callable a user registered in a running Jupyter kernel (for instance
``plexus.register_scorer("my_scorer", fn)`` in a notebook); it runs in that kernel, so it is executed by
the evaluation service, not here. The contract the service implements: for each chunk it sends the
kernel ``{"function": <name>, "vectorized": bool, "ids": [...], "inputs": [...]}`` and gets back
``{"predictions": [...], "explanations": [... or null], "errors": [... or null]}`` of the same length,
with the same per-item and per-chunk error rules as python scorers. :func:`scorer_from_spec` refuses a
kernel spec with a clear InvalidArgument; :func:`kernel_scorer_spec` checks one and returns a
:class:`KernelScorerSpec` for the service.

Predictions are strings or None (missing); a label that is not a string is converted with ``str``.
Label normalisation (case, blanks) is the metrics' job, not the scorer's.
"""

from __future__ import annotations

import importlib
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from annotated_types import MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from ..core.errors import InvalidArgument, one_line
from .datasets import require_columns

DEFAULT_INPUT_COLUMN = "text"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class SpecError(InvalidArgument):
    """A scorer spec is malformed; `field` is the path of the offending field inside the spec, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        message = one_line(message)  # it quotes what the client sent, which may be megabytes
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.detail = message


# --- the spec models: one per kind, discriminated on `kind` --------------------------------------------------
# They are the one declaration of a spec's shape: SCORER_SPEC_SCHEMA is their JSON schema, and normalize_spec
# validates with them, turning pydantic's errors into SpecErrors that name the field inside the spec and say
# what it must be ("rules[0].pattern: invalid regular expression ...").

_SPEC_ERROR = "scorer_spec"  # the pydantic error type of the messages below, passed on as they are


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError(_SPEC_ERROR, "{message}", {"message": message})


def _expect(what: str, *, null: bool = False) -> WrapValidator:
    """A field's check in the spec's own words: any value the inner type refuses (or null, unless `null`) is
    'must be <what>, not <value>'; absent fields are not validated (their default)."""

    def check(value: Any, inner: ValidatorFunctionWrapHandler) -> Any:
        if value is None and not null:
            raise _refuse(f"must be {what}, not None")
        try:
            return inner(value)
        except ValidationError:
            raise _refuse(f"must be {what}, not {value!r}") from None

    return WrapValidator(check)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank")
    return value


def _compiles(pattern: str | None) -> str | None:
    try:
        re.compile(pattern or "", re.IGNORECASE)  # a flag changes no pattern's validity
    except re.error as error:
        raise _refuse(f"invalid regular expression {pattern!r}: {error}") from None
    return pattern


def _import_path(path: str) -> str:
    if not _IMPORT_PATH.fullmatch(path):
        raise _refuse(f"{path!r} is not an import path; expected 'package.module:function'")
    return path


_Absent = SkipJsonSchema[None]  # an optional field is given or left out; null is not published (nor taken)
_Text = Annotated[str, StringConstraints(min_length=1), AfterValidator(_not_blank)]
Text = Annotated[_Text, _expect("a non-empty string")]
OptionalText = Annotated[_Text | _Absent, _expect("a non-empty string")]
OptionalFlag = Annotated[bool | _Absent, _expect("true or false")]
OptionalRegex = Annotated[  # the checks outside the union, so that an error is at the field, not at a branch
    Annotated[str, StringConstraints(min_length=1)] | _Absent,
    _expect("a non-empty regular expression"),
    AfterValidator(_compiles),
]
Keywords = Annotated[list[Annotated[str, StringConstraints(min_length=1)]], MinLen(1)]
ImportPath = Annotated[
    Text,
    AfterValidator(_import_path),
    Field(json_schema_extra={"pattern": f"^{_IMPORT_PATH.pattern}$"}),
]


class _SpecModel(BaseModel):
    """A part of a scorer spec: strict (a string is not a number, "yes" is not true) and closed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RuleSpec(_SpecModel):
    """One rule of a rules scorer: inputs matching `pattern` (or containing one of `keywords`) get `label`."""

    pattern: Annotated[OptionalRegex, Field(description="a regular expression")] = None
    keywords: Annotated[Keywords | _Absent, _expect("a non-empty list of non-empty strings")] = None
    label: Text

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, rule: Any) -> Any:
        if not isinstance(rule, Mapping):
            raise _refuse(f"must be a mapping with 'pattern' or 'keywords' and 'label', not {rule!r}")
        return {"label": None, **rule}  # no label is a missing label: "label: must be a non-empty string"

    @model_validator(mode="after")
    def _one_matcher(self) -> RuleSpec:
        if ("pattern" in self.model_fields_set) == ("keywords" in self.model_fields_set):
            raise _refuse("give exactly one of 'pattern' (a regex) and 'keywords' (a list of words)")
        return self

    def regex(self) -> str:
        """The rule as one regular expression: keywords are literal (escaped) alternatives."""
        return self.pattern if self.pattern is not None else "|".join(re.escape(k) for k in self.keywords or ())


def _rules_list(value: Any, inner: ValidatorFunctionWrapHandler) -> Any:
    if not isinstance(value, list) or not value:
        raise _refuse("must be a non-empty list of {pattern, label} or {keywords, label}")
    return inner(value)  # each rule's own errors, at rules[i]


class ColumnSpec(_SpecModel):
    """Predictions already in the dataset."""

    kind: Literal["column"]
    name: OptionalText = None
    column: Annotated[Text, Field(description="an existing column holding the predictions")]


class RulesSpec(_SpecModel):
    """Ordered rules; the first that matches gives the label."""

    kind: Literal["rules"]
    name: OptionalText = None
    input_column: OptionalText = None
    rules: Annotated[list[RuleSpec], MinLen(1), WrapValidator(_rules_list)]
    default: Annotated[
        str | None, _expect("a label (a string) or null", null=True), Field(description="label when no rule matches")
    ] = None
    case_sensitive: Annotated[bool, _expect("true or false")] = False


class PythonSpec(_SpecModel):
    """A Python function found by import path."""

    kind: Literal["python"]
    name: OptionalText = None
    input_column: OptionalText = None
    function: Annotated[ImportPath, Field(description="package.module:function")]
    vectorized: Annotated[
        OptionalFlag, Field(description="called once per chunk; omitted: decided by the function")
    ] = None


class KernelSpec(_SpecModel):
    """A callable a notebook kernel registered (plexus.register_scorer), run in that kernel."""

    kind: Literal["kernel"]
    name: OptionalText = None
    input_column: OptionalText = None
    function: Annotated[Text, Field(description="the name the kernel registered it under")]
    kernel_id: OptionalText = None
    vectorized: OptionalFlag = None


ScorerSpec = Annotated[ColumnSpec | RulesSpec | PythonSpec | KernelSpec, Field(discriminator="kind")]
_SPEC = TypeAdapter(ScorerSpec)
_KINDS: dict[str, type[_SpecModel]] = {
    model.model_fields["kind"].annotation.__args__[0]: model  # type: ignore[union-attr]
    for model in (ColumnSpec, RulesSpec, PythonSpec, KernelSpec)
}
SCORER_KINDS = tuple(_KINDS)  # column, rules, python, kernel
SPEC_HELP = (
    "a scorer spec is 'column:<column>', 'python:<module>:<function>', 'kernel:<name>' or a mapping "
    f"with 'kind' ({', '.join(SCORER_KINDS)})"
)


def _inline(node: Any, defs: dict[str, Any], *, properties: bool = False) -> Any:
    """A pydantic JSON schema with its $refs replaced by their definitions and without titles: published
    inside other schemas (a tool's inputSchema, the scorecard's), where no $defs travel along."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node and not properties:
        return _inline(defs[node["$ref"].rsplit("/", 1)[1]], defs)
    return {
        key: _inline(value, defs, properties=key == "properties" and not properties)
        for key, value in node.items()
        if properties
        or (key not in ("title", "discriminator") and not (key == "default" and value is None and "type" in node))
    }  # an optional field's default None means "left out": null is published only where it is taken


def _published() -> dict[str, Any]:
    generated = _SPEC.json_schema()
    kinds = _inline(generated["oneOf"], generated.get("$defs", {}))
    shorthand = {
        "type": "string",
        "pattern": r"^(column:.+|python:[\w.]+:[\w.]+|kernel:.+)$",
        "examples": ["column:prediction", "python:plexus_mcp_jupyter.evaluations.examples.scorers:keyword_sentiment"],
    }
    return {"description": "A scorer: a string shorthand or a mapping with 'kind'.", "oneOf": [shorthand, *kinds]}


SCORER_SPEC_SCHEMA: dict[str, Any] = _published()  # what create_evaluation, REST, batches and scorecards publish


@dataclass(frozen=True)
class ScoreBatch:
    """The result of scoring one chunk; every Series is aligned to the chunk's index.

    `predictions` holds str or None (or a text column's missing value, when it is pandas' str dtype).
    `explanations` is None when the scorer gives none. `errors` is None when no item failed, else holds
    "<ExceptionType>: <message>" for failed items and None for the others.
    """

    predictions: pd.Series
    explanations: pd.Series | None = None
    errors: pd.Series | None = None


class Scorer(ABC):
    """Turns a DataFrame chunk into a ScoreBatch. Instances hold no per-run state and may be reused."""

    kind: ClassVar[str]
    name: str

    @property
    @abstractmethod
    def columns(self) -> tuple[str, ...]:
        """The columns `score` reads, so a runner can check a dataset before it starts."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The scorer's normalised spec: JSON-ready, and `scorer_from_spec(describe())` rebuilds it."""

    @abstractmethod
    def score(self, chunk: pd.DataFrame) -> ScoreBatch:
        """Predictions for every row of `chunk`; InvalidArgument if a column it needs is missing."""


class ColumnScorer(Scorer):
    """Predictions already in the dataset, in `column`."""

    kind = "column"

    def __init__(self, column: str, *, name: str | None = None) -> None:
        self.column = column
        self.name = name or f"column:{column}"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "column": self.column}

    def score(self, chunk: pd.DataFrame) -> ScoreBatch:
        require_columns(chunk, self.column, what="prediction column")
        return ScoreBatch(predictions=_labels(chunk[self.column]))


@dataclass(frozen=True)
class Rule:
    """A label given to inputs matching `pattern` (a regex); `source` is how the spec wrote it."""

    pattern: str
    label: str
    source: dict[str, Any]


class RulesScorer(Scorer):
    """Ordered regex rules: the first rule whose pattern is found in the input gives the label."""

    kind = "rules"

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        default: str | None = None,
        case_sensitive: bool = False,
        input_column: str = DEFAULT_INPUT_COLUMN,
        name: str | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.default = default
        self.case_sensitive = case_sensitive
        self.input_column = input_column
        self.name = name or "rules"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.input_column,)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "input_column": self.input_column,
            "rules": [dict(rule.source) for rule in self.rules],
            "default": self.default,
            "case_sensitive": self.case_sensitive,
        }

    def score(self, chunk: pd.DataFrame) -> ScoreBatch:
        require_columns(chunk, self.input_column, what="input column")
        text = chunk[self.input_column].astype("string").fillna("")
        predictions = _constant(self.default, chunk.index)
        explanations = _constant("no rule matched; default label", chunk.index)
        unmatched = pd.Series(True, index=chunk.index)
        flags = 0 if self.case_sensitive else re.IGNORECASE
        for number, rule in enumerate(self.rules, start=1):
            hits = unmatched & text.str.contains(rule.pattern, flags=flags, regex=True).fillna(False).astype(bool)
            predictions[hits] = rule.label
            explanations[hits] = f"rule {number} ({_describe_rule(rule.source)}) matched"
            unmatched &= ~hits
            if not unmatched.any():
                break
        return ScoreBatch(predictions=predictions, explanations=explanations)


class PythonScorer(Scorer):
    """A Python function found by import path, called per chunk (vectorised) or per item."""

    kind = "python"

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        vectorized: bool,
        path: str,
        input_column: str = DEFAULT_INPUT_COLUMN,
        name: str | None = None,
    ) -> None:
        self.function = function
        self.vectorized = vectorized
        self.arrow = vectorized and _input_kind(function) == "arrow"  # called with Arrow, not pandas
        self.path = path
        self.input_column = input_column
        self.name = name or f"python:{path}"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.input_column,)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "function": self.path,
            "vectorized": self.vectorized,
            "input_column": self.input_column,
        }

    def score(self, chunk: pd.DataFrame) -> ScoreBatch:
        require_columns(chunk, self.input_column, what="input column")
        inputs = chunk[self.input_column]
        return self._score_chunk(inputs) if self.vectorized else self._score_items(inputs)

    def _score_chunk(self, inputs: pd.Series) -> ScoreBatch:
        try:
            result = self.function(_arrow_input(inputs) if self.arrow else inputs)
            predictions, explanations = _split_vectorised(result, inputs.index)
        except Exception as error:
            return _failed(inputs.index, _error_text(error))
        return ScoreBatch(predictions=predictions, explanations=explanations)

    def _score_items(self, inputs: pd.Series) -> ScoreBatch:
        predictions: list[str | None] = []
        explanations: list[str | None] = []
        errors: list[str | None] = []
        for value in inputs.astype(object).where(inputs.notna(), None):
            failure: str | None = None
            try:
                label, explanation = _split_item(self.function(value))
            except Exception as error:
                label, explanation, failure = None, None, _error_text(error)
            predictions.append(label)
            explanations.append(explanation)
            errors.append(failure)
        index = inputs.index
        return ScoreBatch(
            predictions=pd.Series(predictions, index=index, dtype=object),
            explanations=pd.Series(explanations, index=index, dtype=object) if any(explanations) else None,
            errors=pd.Series(errors, index=index, dtype=object) if any(errors) else None,
        )


@dataclass(frozen=True)
class KernelScorerSpec:
    """A scorer that runs in a Jupyter kernel; executed by the evaluation service (see the module doc)."""

    function: str
    input_column: str = DEFAULT_INPUT_COLUMN
    kernel_id: str | None = None
    vectorized: bool = False
    name: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "kernel",
            "name": self.name or f"kernel:{self.function}",
            "function": self.function,
            "kernel_id": self.kernel_id,
            "vectorized": self.vectorized,
            "input_column": self.input_column,
        }


def vectorized(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a python scorer function as taking the whole input column (a Series) at once."""
    function.plexus_vectorized = True  # type: ignore[attr-defined]
    return function


# --- specs -------------------------------------------------------------------------------------------------


def parse_spec(spec: object) -> ColumnSpec | RulesSpec | PythonSpec | KernelSpec:
    """A spec (a string shorthand or a mapping) as its kind's model, checked without importing anything.

    Raises SpecError (an InvalidArgument) whose `field` names the offending field (`rules[0].pattern`)."""
    if isinstance(spec, str):
        spec = _expand_shorthand(spec)
    if not isinstance(spec, Mapping):
        raise SpecError(f"{SPEC_HELP}; got {type(spec).__name__}")
    try:
        return _SPEC.validate_python(dict(spec))
    except ValidationError as error:
        raise _spec_error(spec.get("kind"), error) from None


def normalize_spec(spec: object) -> dict[str, Any]:
    """A checked spec as a JSON-ready mapping: `kind`, then the fields it gave, by name (what is stored as an
    evaluation's definition). Raises SpecError as `parse_spec` does."""
    given = parse_spec(spec).model_dump(exclude_unset=True)
    return {"kind": given.pop("kind"), **dict(sorted(given.items()))}


def _spec_error(kind: object, error: ValidationError) -> SpecError:
    """The first of pydantic's errors in the spec's words: unknown fields first, then missing ones, then the
    others in field order; `field` is where it is (`rules[1]`, `rules[0].label`)."""
    order = {"extra_forbidden": 0, "missing": 1}
    problem = min(  # stable: among the others, the first pydantic met; unknown fields by name
        error.errors(include_url=False),
        key=lambda e: (order.get(e["type"], 2), str(e["loc"]) if e["type"] == "extra_forbidden" else ""),
    )
    if problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return SpecError(f"unknown scorer kind {kind!r}; expected one of {', '.join(SCORER_KINDS)}", "kind")
    location = problem["loc"][1:]  # after the kind's tag
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    name = location[-1]
    if problem["type"] == "extra_forbidden":
        if len(location) == 1:
            allowed = sorted(set(_KINDS[str(kind)].model_fields) - {"kind"})
            return SpecError(f"unknown field {name!r} for a {kind} scorer; allowed: {', '.join(allowed)}", field)
        return SpecError(f"unknown field {name!r}; allowed: {', '.join(sorted(RuleSpec.model_fields))}", field)
    if problem["type"] == "missing":
        return SpecError(f"a {kind} scorer needs {name!r}", field)
    return SpecError(str(problem["msg"]), field or None)


def scorer_from_spec(spec: object, *, input_column: str | None = None) -> Scorer:
    """Build a scorer from a spec (see the module doc); `input_column` is the default input column.

    Raises InvalidArgument (SpecError) for a malformed spec, an unknown kind, a bad regex, an import path
    that does not import or does not name a callable, and for kernel scorers, which the service runs.
    """
    checked = parse_spec(spec)
    if isinstance(checked, ColumnSpec):
        return ColumnScorer(checked.column, name=checked.name)
    column = checked.input_column or input_column or DEFAULT_INPUT_COLUMN
    if isinstance(checked, RulesSpec):
        rules = [Rule(rule.regex(), rule.label, rule.model_dump(exclude_unset=True)) for rule in checked.rules]
        return RulesScorer(
            rules,
            default=checked.default,
            case_sensitive=checked.case_sensitive,
            input_column=column,
            name=checked.name,
        )
    if isinstance(checked, PythonSpec):
        function = import_function(checked.function)
        vectorised = checked.vectorized
        if vectorised is None:
            vectorised = _declares_vectorised(function)
        return PythonScorer(
            function, vectorized=vectorised, path=checked.function, input_column=column, name=checked.name
        )
    raise SpecError(
        f"kernel scorer {checked.function!r} runs in its Jupyter kernel and is executed by the "
        "evaluation service, not here; use kernel_scorer_spec() to check it",
        "kind",
    )


def kernel_scorer_spec(spec: object, *, input_column: str | None = None) -> KernelScorerSpec:
    """Check a kernel scorer spec and return it for the service that runs it in the kernel."""
    checked = parse_spec(spec)
    if not isinstance(checked, KernelSpec):
        raise SpecError(f"expected a kernel scorer, not a {checked.kind} scorer", "kind")
    return KernelScorerSpec(
        function=checked.function,
        input_column=checked.input_column or input_column or DEFAULT_INPUT_COLUMN,
        kernel_id=checked.kernel_id,
        vectorized=bool(checked.vectorized),
        name=checked.name,
    )


def module_allowed(module: str, prefixes: Sequence[str]) -> bool:
    """Whether `module` is one of `prefixes` or inside one (the scorer_modules allowlist)."""
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def import_function(path: str) -> Callable[..., Any]:
    """The callable at 'package.module:attribute'; SpecError says which part failed and why."""
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise SpecError(f"cannot import module {module_name!r} for {path!r}: {error}", "function") from None
    except Exception as error:  # the module itself is broken (SyntaxError, an exception at import time)
        raise SpecError(
            f"importing module {module_name!r} for {path!r} failed: {_error_text(error)}", "function"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SpecError(f"module {module_name!r} has no attribute {attribute!r} (looked for {part!r})", "function")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"{path!r} is a {type(target).__name__}, not a function", "function")
    return target  # type: ignore[no-any-return]


def _expand_shorthand(text: str) -> dict[str, Any]:
    kind, separator, rest = text.strip().partition(":")
    if not separator or not rest:
        raise SpecError(f"cannot read scorer spec {text!r}; {SPEC_HELP}")
    if kind == "column":
        return {"kind": "column", "column": rest}
    if kind in {"python", "kernel"}:
        return {"kind": kind, "function": rest}
    if kind == "rules":
        raise SpecError("a rules scorer needs a mapping with 'rules' (a list of {pattern, label}), not a string")
    raise SpecError(f"unknown scorer kind {kind!r} in {text!r}; {SPEC_HELP}", "kind")


def _describe_rule(rule: Mapping[str, Any]) -> str:
    if "pattern" in rule:
        return f"pattern {rule['pattern']!r}"
    return f"keywords {', '.join(repr(k) for k in rule['keywords'])}"


def _declares_vectorised(function: Callable[..., Any]) -> bool:
    declared = getattr(function, "plexus_vectorized", None)
    if declared is not None:
        return bool(declared)
    return _input_kind(function) is not None


_SERIES_NAMES = {"pd.Series", "pandas.Series", "Series"}
_ARROW_NAMES = {"pa.Array", "pyarrow.Array", "Array", "pa.ChunkedArray", "pyarrow.ChunkedArray", "ChunkedArray"}


def _input_kind(function: Callable[..., Any]) -> str | None:
    """What the first parameter's annotation asks for: "series" (pd.Series), "arrow" (pa.Array or
    pa.ChunkedArray: the column as Arrow, no pandas step) or None (no such annotation)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if not parameters:
        return None
    annotation = parameters[0].annotation
    if isinstance(annotation, str):  # postponed annotations (from __future__ import annotations)
        name = annotation.split("[")[0].strip()
        return "series" if name in _SERIES_NAMES else "arrow" if name in _ARROW_NAMES else None
    if annotation is pd.Series or getattr(annotation, "__origin__", None) is pd.Series:
        return "series"
    if isinstance(annotation, type) and issubclass(annotation, pa.Array | pa.ChunkedArray):
        return "arrow"
    return None


def _arrow_input(inputs: pd.Series) -> pa.Array:
    """A chunk's input column as one Arrow array (zero-copy for a text column read from a file)."""
    array = pa.array(inputs, from_pandas=True)
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _split_vectorised(result: object, index: pd.Index) -> tuple[pd.Series, pd.Series | None]:
    if isinstance(result, pd.DataFrame):
        if "prediction" not in result.columns:
            raise ValueError(
                f"a vectorised scorer's DataFrame needs a 'prediction' column; it has "
                f"{', '.join(map(str, result.columns))}"
            )
        explanation = result["explanation"] if "explanation" in result.columns else None
        predictions = _aligned(result["prediction"], index)
        return _labels(predictions), None if explanation is None else _labels(_aligned(explanation, index))
    if isinstance(result, pa.Array | pa.ChunkedArray):  # an Arrow scorer's answer: labels as text, no per-row step
        text = result if pa.types.is_string(result.type) else pc.cast(result, pa.string())
        return _labels(_aligned(text.to_pandas(), index)), None
    if isinstance(result, str) or not isinstance(result, pd.Series | list | tuple | np.ndarray):
        raise TypeError(
            f"a vectorised scorer must return a Series, list or array of {len(index)} labels, "
            f"not {type(result).__name__}"
        )
    values = _aligned(result if isinstance(result, pd.Series) else pd.Series(list(result), dtype=object), index)
    if values.dtype == object and values.map(lambda v: isinstance(v, tuple)).any():  # a text column holds no pair
        pairs = values.map(_split_item)
        return (
            pd.Series([p[0] for p in pairs], index=index, dtype=object),
            pd.Series([p[1] for p in pairs], index=index, dtype=object),
        )
    return _labels(values), None


def _aligned(values: pd.Series, index: pd.Index) -> pd.Series:
    if len(values) != len(index):
        raise ValueError(f"scorer returned {len(values)} predictions for {len(index)} items")
    if values.index.equals(index):
        return values
    return values.set_axis(index)  # the values as they are (a text column stays Arrow)


def _split_item(result: object) -> tuple[str | None, str | None]:
    if isinstance(result, tuple):
        if len(result) != 2:
            raise ValueError(f"a scorer may return a label or a (label, explanation) pair, not a {len(result)}-tuple")
        return _label(result[0]), _label(result[1])
    return _label(result), None


def _label(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    return value if isinstance(value, str) else str(value)


def _labels(values: pd.Series) -> pd.Series:
    """Values as labels: str, or missing. A text column (pandas' str dtype) is that already: kept as it is,
    Arrow strings with no Python object per value; anything else becomes str or None, value by value."""
    if isinstance(values.dtype, pd.StringDtype):
        return values
    return pd.Series([_label(v) for v in values.to_numpy(dtype=object)], index=values.index, dtype=object)


def _failed(index: pd.Index, message: str) -> ScoreBatch:
    return ScoreBatch(predictions=_constant(None, index), errors=_constant(message, index))


def _constant(value: str | None, index: pd.Index) -> pd.Series:
    # Built from a list: pd.Series(None, index=..., dtype=object) would hold NaN, not None.
    return pd.Series([value] * len(index), index=index, dtype=object)


def _error_text(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
