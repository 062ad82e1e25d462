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
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..core.errors import InvalidArgument, one_line
from .datasets import require_columns

SCORER_KINDS = ("column", "rules", "python", "kernel")
DEFAULT_INPUT_COLUMN = "text"
SPEC_HELP = (
    "a scorer spec is 'column:<column>', 'python:<module>:<function>', 'kernel:<name>' or a mapping "
    f"with 'kind' ({', '.join(SCORER_KINDS)})"
)
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

_STRING = {"type": "string", "minLength": 1}
_COMMON = {"name": _STRING, "input_column": _STRING}
SCORER_SPEC_SCHEMA: dict[str, Any] = {
    "description": "A scorer: a string shorthand or a mapping with 'kind'.",
    "oneOf": [
        {
            "type": "string",
            "pattern": r"^(column:.+|python:[\w.]+:[\w.]+|kernel:.+)$",
            "examples": [
                "column:prediction",
                "python:plexus_mcp_jupyter.evaluations.examples.scorers:keyword_sentiment",
            ],
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["kind", "column"],
            "properties": {"kind": {"const": "column"}, "name": _STRING, "column": _STRING},
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["kind", "rules"],
            "properties": {
                **_COMMON,
                "kind": {"const": "rules"},
                "rules": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["label"],
                        "properties": {
                            "pattern": {**_STRING, "description": "a regular expression"},
                            "keywords": {"type": "array", "minItems": 1, "items": _STRING},
                            "label": _STRING,
                        },
                    },
                },
                "default": {"type": ["string", "null"]},
                "case_sensitive": {"type": "boolean", "default": False},
            },
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["kind", "function"],
            "properties": {
                **_COMMON,
                "kind": {"const": "python"},
                "function": {"type": "string", "pattern": r"^[\w.]+:[\w.]+$"},
                "vectorized": {"type": "boolean"},
            },
        },
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["kind", "function"],
            "properties": {
                **_COMMON,
                "kind": {"const": "kernel"},
                "function": _STRING,
                "kernel_id": _STRING,
                "vectorized": {"type": "boolean"},
            },
        },
    ],
}

# Each kind's fields, read from the published schema (one declaration): kind -> (required, optional) besides kind.
_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    shape["properties"]["kind"]["const"]: (
        set(shape["required"]) - {"kind"},
        set(shape["properties"]) - set(shape["required"]),
    )
    for shape in SCORER_SPEC_SCHEMA["oneOf"][1:]
}


class SpecError(InvalidArgument):
    """A scorer spec is malformed; `field` is the path of the offending field inside the spec, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        message = one_line(message)  # it quotes what the client sent, which may be megabytes
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.detail = message


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


def normalize_spec(spec: object) -> dict[str, Any]:
    """Check a spec's shape (kinds, fields, types, regexes) without importing anything; return it as a mapping.

    Raises SpecError (an InvalidArgument) whose `field` names the offending field.
    """
    if isinstance(spec, str):
        spec = _expand_shorthand(spec)
    if not isinstance(spec, Mapping):
        raise SpecError(f"{SPEC_HELP}; got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in _FIELDS:
        raise SpecError(f"unknown scorer kind {kind!r}; expected one of {', '.join(SCORER_KINDS)}", "kind")
    required, optional = _FIELDS[kind]
    unknown = sorted(set(spec) - required - optional - {"kind"}, key=str)
    if unknown:
        raise SpecError(
            f"unknown field {unknown[0]!r} for a {kind} scorer; allowed: {', '.join(sorted(required | optional))}",
            str(unknown[0]),
        )
    for key in sorted(required):
        if key not in spec:
            raise SpecError(f"a {kind} scorer needs {key!r}", key)
    result: dict[str, Any] = {"kind": kind}
    for key in sorted(set(spec) - {"kind"}):
        value = spec[key]
        if key in {"vectorized", "case_sensitive"}:
            if not isinstance(value, bool):
                raise SpecError(f"must be true or false, not {value!r}", key)
        elif key == "default":
            if value is not None and not isinstance(value, str):
                raise SpecError(f"must be a label (a string) or null, not {value!r}", key)
        elif key == "rules":
            value = _check_rules(value, bool(spec.get("case_sensitive", False)))
        elif not isinstance(value, str) or not value.strip():
            raise SpecError(f"must be a non-empty string, not {value!r}", key)
        result[key] = value
    if kind == "python" and not _IMPORT_PATH.fullmatch(result["function"]):
        raise SpecError(f"{result['function']!r} is not an import path; expected 'package.module:function'", "function")
    return result


def scorer_from_spec(spec: object, *, input_column: str | None = None) -> Scorer:
    """Build a scorer from a spec (see the module doc); `input_column` is the default input column.

    Raises InvalidArgument (SpecError) for a malformed spec, an unknown kind, a bad regex, an import path
    that does not import or does not name a callable, and for kernel scorers, which the service runs.
    """
    checked = normalize_spec(spec)
    kind = checked["kind"]
    column = checked.get("input_column") or input_column or DEFAULT_INPUT_COLUMN
    if kind == "column":
        return ColumnScorer(checked["column"], name=checked.get("name"))
    if kind == "rules":
        rules = [Rule(_rule_pattern(rule), rule["label"], rule) for rule in checked["rules"]]
        return RulesScorer(
            rules,
            default=checked.get("default"),
            case_sensitive=checked.get("case_sensitive", False),
            input_column=column,
            name=checked.get("name"),
        )
    if kind == "python":
        function = import_function(checked["function"])
        vectorised = checked.get("vectorized")
        if vectorised is None:
            vectorised = _declares_vectorised(function)
        return PythonScorer(
            function, vectorized=vectorised, path=checked["function"], input_column=column, name=checked.get("name")
        )
    raise SpecError(
        f"kernel scorer {checked['function']!r} runs in its Jupyter kernel and is executed by the "
        "evaluation service, not here; use kernel_scorer_spec() to check it",
        "kind",
    )


def kernel_scorer_spec(spec: object, *, input_column: str | None = None) -> KernelScorerSpec:
    """Check a kernel scorer spec and return it for the service that runs it in the kernel."""
    checked = normalize_spec(spec)
    if checked["kind"] != "kernel":
        raise SpecError(f"expected a kernel scorer, not a {checked['kind']} scorer", "kind")
    return KernelScorerSpec(
        function=checked["function"],
        input_column=checked.get("input_column") or input_column or DEFAULT_INPUT_COLUMN,
        kernel_id=checked.get("kernel_id"),
        vectorized=checked.get("vectorized", False),
        name=checked.get("name"),
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


def _check_rules(rules: object, case_sensitive: bool) -> list[dict[str, Any]]:
    if not isinstance(rules, list) or not rules:
        raise SpecError("must be a non-empty list of {pattern, label} or {keywords, label}", "rules")
    checked: list[dict[str, Any]] = []
    for position, rule in enumerate(rules):
        where = f"rules[{position}]"
        if not isinstance(rule, Mapping):
            raise SpecError(f"must be a mapping with 'pattern' or 'keywords' and 'label', not {rule!r}", where)
        unknown = sorted(set(rule) - {"pattern", "keywords", "label"}, key=str)
        if unknown:
            raise SpecError(f"unknown field {unknown[0]!r}; allowed: keywords, label, pattern", f"{where}.{unknown[0]}")
        label = rule.get("label")
        if not isinstance(label, str) or not label.strip():
            raise SpecError(f"must be a non-empty string, not {label!r}", f"{where}.label")
        if ("pattern" in rule) == ("keywords" in rule):
            raise SpecError("give exactly one of 'pattern' (a regex) and 'keywords' (a list of words)", where)
        if "pattern" in rule:
            pattern = rule["pattern"]
            if not isinstance(pattern, str) or not pattern:
                raise SpecError(f"must be a non-empty regular expression, not {pattern!r}", f"{where}.pattern")
            try:
                re.compile(pattern, 0 if case_sensitive else re.IGNORECASE)
            except re.error as error:
                raise SpecError(f"invalid regular expression {pattern!r}: {error}", f"{where}.pattern") from None
            checked.append({"pattern": pattern, "label": label})
        else:
            keywords = rule["keywords"]
            if not isinstance(keywords, list) or not keywords or not all(isinstance(k, str) and k for k in keywords):
                raise SpecError(f"must be a non-empty list of non-empty strings, not {keywords!r}", f"{where}.keywords")
            checked.append({"keywords": list(keywords), "label": label})
    return checked


def _rule_pattern(rule: Mapping[str, Any]) -> str:
    if "pattern" in rule:
        return str(rule["pattern"])
    return "|".join(re.escape(keyword) for keyword in rule["keywords"])


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
