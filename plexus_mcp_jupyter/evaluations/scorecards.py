"""Scorecards: YAML files naming a dataset and several scores to evaluate on it.

```yaml
name: support-triage                 # required
description: Ticket topic scorers    # optional
dataset: example:topics              # required: a dataset ref (see datasets.py)
input_column: text                   # required: what scorers read (and per-item results show)
label_column: label                  # required: the correct answers
id_column: id                        # optional: item ids in per-item results (default: row number)
sample: {n: 100, seed: 7}            # optional: exactly one of n (>= 1) or fraction (0 < f <= 1); seed
scores:                              # required, at least one; names unique
  - name: stored predictions
    scorer: column:prediction        # a scorer spec (see scorers.py), string or mapping
  - name: keyword rules
    label_column: label              # optional: overrides the card's label_column for this score
    scorer:
      kind: rules
      rules:
        - {pattern: "refund|charged|invoice", label: billing}
        - {keywords: [parcel, tracking], label: shipping}
      default: other
```

:data:`SCORECARD_SCHEMA` is the same schema as JSON Schema (for docs and editors); the loader checks
a card against it, then checks what a schema cannot say (one of n / fraction, unique score names, scorer
specs, the dataset ref's syntax). Every error is one InvalidArgument line naming the YAML line and the
field: ``scorecard 'cards/a.yaml' line 12: field 'scores[1].scorer': unknown scorer kind 'rule'; ...``.
Nothing is imported or loaded while reading a card: whether the dataset exists and the scorers import is
checked when the evaluation starts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import yaml

from ..core.errors import InvalidArgument, NotFound, PlexusError, one_line
from .datasets import REF_HELP, confine_path, parse_ref
from .limits import DEFAULT_LIMITS, MAX_NESTING, MAX_NUMBER_CHARS, EvaluationLimits
from .sampling import check_sample
from .scorers import SCORER_SPEC_SCHEMA, SpecError, normalize_spec

SCORECARD_EXTENSIONS = (".yaml", ".yml")

_NAME = {"type": "string", "minLength": 1, "maxLength": 128}  # score names are stored in VARCHAR(128)
SCORECARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Plexus scorecard",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "dataset", "input_column", "label_column", "scores"],
    "properties": {
        "name": _NAME,
        "description": {"type": "string"},
        "dataset": {**_NAME, "description": REF_HELP},
        "input_column": {**_NAME, "description": "the column scorers read"},
        "label_column": {**_NAME, "description": "the column holding the correct labels"},
        "id_column": {**_NAME, "description": "item ids for per-item results; default: the row number"},
        "sample": {
            "type": "object",
            "additionalProperties": False,
            "description": "evaluate a random subset: exactly one of n and fraction",
            "properties": {
                "n": {"type": "integer", "minimum": 1},
                "fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "seed": {"type": "integer", "minimum": 0},
            },
        },
        "scores": {
            "type": "array",
            "minItems": 1,
            "description": "the scores to compute; names unique",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "scorer"],
                "properties": {
                    "name": _NAME,
                    "scorer": SCORER_SPEC_SCHEMA,
                    "label_column": {**_NAME, "description": "overrides the card's label_column"},
                },
            },
        },
    },
}


@dataclass(frozen=True)
class SampleSpec:
    n: int | None = None
    fraction: float | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            key: value
            for key, value in (("n", self.n), ("fraction", self.fraction), ("seed", self.seed))
            if value is not None
        }


@dataclass(frozen=True)
class ScoreSpec:
    """One score of a card: a name, a normalised scorer spec, and an optional label column override."""

    name: str
    scorer: dict[str, Any]
    label_column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"name": self.name, "scorer": self.scorer}
        if self.label_column is not None:
            result["label_column"] = self.label_column
        return result


@dataclass(frozen=True)
class Scorecard:
    name: str
    dataset: str
    input_column: str
    label_column: str
    scores: tuple[ScoreSpec, ...]
    description: str | None = None
    id_column: str | None = None
    sample: SampleSpec | None = None
    source: str | None = None  # the file it came from, relative to the root when there is one

    def label_column_for(self, score: ScoreSpec) -> str:
        return score.label_column or self.label_column

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            result["description"] = self.description
        result.update(dataset=self.dataset, input_column=self.input_column, label_column=self.label_column)
        if self.id_column is not None:
            result["id_column"] = self.id_column
        if self.sample is not None:
            result["sample"] = self.sample.to_dict()
        result["scores"] = [score.to_dict() for score in self.scores]
        return result


def load_scorecard(
    source: str | Path, *, root_dir: Path | str | None = None, limits: EvaluationLimits = DEFAULT_LIMITS
) -> Scorecard:
    """Read a scorecard from YAML text, or from a file when `source` is a Path or a one-line string ending
    in .yaml / .yml.

    With `root_dir` a file path is relative to it and confined like a dataset path (no ``..``, absolute
    paths, hidden parts or symlinks out); without it (a trusted local caller) the path is read as given.
    The text's size is bounded before any YAML is read, and its shape (nesting, aliases, number of scores,
    length of numbers) by a scan of the parser's events before anything is built. Raises NotFound for a
    missing file and InvalidArgument, naming the line and field, for anything else. Blocks for as long as
    parsing takes: call it from a thread, not the event loop.
    """
    if isinstance(source, Path) or ("\n" not in source and source.strip().lower().endswith(SCORECARD_EXTENSIONS)):
        label = str(source)
        data = _read_file(str(source), root_dir, limits.max_scorecard_bytes)
        where = f"scorecard {label!r}"
    else:
        label, where = None, "scorecard"
        data = _encoded(source, limits.max_scorecard_bytes)
    return _parse(data, where, label, limits.max_scorecard_scores)


def _too_big(what: str, size: int, bound: int) -> InvalidArgument:
    return InvalidArgument(
        f"{what} is {size:,} bytes, more than the {bound:,} a scorecard may have "
        "(max_scorecard_bytes); split it, or ask an admin to raise the bound"
    )


def _encoded(text: str, bound: int) -> bytes:
    """The text as UTF-8, refused before it is parsed when it is too big (a character is 1 to 4 bytes)."""
    if len(text) > bound:  # without encoding it: at least this many bytes
        raise _too_big("scorecard text", len(text.encode("utf-8", "surrogatepass")), bound)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidArgument(
            f"scorecard text is not valid Unicode: {error.reason} at character {error.start}"
        ) from None
    if len(data) > bound:
        raise _too_big("scorecard text", len(data), bound)
    return data


# The C parser (libyaml) when PyYAML has it: a scorecard parses in milliseconds, not seconds.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INT_TAG = "tag:yaml.org,2002:int"


def _read_file(path: str, root_dir: Path | str | None, bound: int) -> bytes:
    if not path.lower().endswith(SCORECARD_EXTENSIONS):
        raise InvalidArgument(f"scorecard {path!r} must be a {' or '.join(SCORECARD_EXTENSIONS)} file")
    real = confine_path(root_dir, str(PurePosixPath(path)), what="scorecard") if root_dir is not None else Path(path)
    if not real.is_file():
        raise NotFound(f"no scorecard file {path!r}" + (" under the Jupyter root" if root_dir is not None else ""))
    try:
        with real.open("rb") as handle:
            data = handle.read(bound + 1)  # never more than the bound, whatever the file's size
            if len(data) > bound:
                raise _too_big(f"scorecard {path!r}", os.fstat(handle.fileno()).st_size, bound)
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"cannot read scorecard {path!r}: {error}") from None
    return data


@contextlib.contextmanager
def _yaml_errors(where: str) -> Iterator[None]:
    """A parser's error as one InvalidArgument line with the YAML line; a constructor's ValueError too."""
    try:
        yield
    except PlexusError:
        raise  # already one line that says where
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = one_line(error.problem or error.context or "malformed YAML")
        raise InvalidArgument(f"{where}{line}: malformed YAML: {problem}") from None
    except yaml.YAMLError as error:
        raise InvalidArgument(f"{where}: malformed YAML: {one_line(error)}") from None
    except (ValueError, OverflowError) as error:  # a timestamp such as 2024-13-45, say
        raise InvalidArgument(f"{where}: a value cannot be read: {one_line(error)}") from None


def _scan(data: bytes, where: str, max_scores: int) -> None:
    """Check the shape of a card from the parser's events, before any node is built: nesting at most
    MAX_NESTING deep, no aliases (a few hundred bytes of nested aliases expand exponentially), numbers at
    most MAX_NUMBER_CHARS long, at most `max_scores` scores. Linear in the text, and never recursive."""
    loader = _Loader(data)
    depth = 0
    root_children = 0  # nodes directly in the root collection: key, value, key, value... for a mapping
    scores_next = in_scores = False
    scores, beyond = 0, None
    try:
        while loader.check_event():
            event = loader.get_event()
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent):
                raise InvalidArgument(
                    f"{where} line {line}: anchors and aliases (*name) are not allowed in a "
                    "scorecard: write the value out"
                )
            if isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                if depth == 1:
                    in_scores = False
                continue
            if not isinstance(event, yaml.NodeEvent):
                continue
            if depth == 1:
                if root_children % 2 == 0:
                    scores_next = isinstance(event, yaml.ScalarEvent) and event.value == "scores"
                else:
                    in_scores, scores_next = scores_next and isinstance(event, yaml.SequenceStartEvent), False
                root_children += 1
            elif depth == 2 and in_scores:
                scores += 1
                if scores == max_scores + 1:
                    beyond = line
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING:
                    raise InvalidArgument(
                        f"{where} line {line}: nested more than {MAX_NESTING} levels deep; a scorecard needs 7 at most"
                    )
            elif (
                isinstance(event, yaml.ScalarEvent)
                and event.implicit[0]
                and len(event.value) > MAX_NUMBER_CHARS
                and loader.resolve(yaml.ScalarNode, event.value, (True, False)) == _INT_TAG
            ):
                raise InvalidArgument(
                    f"{where} line {line}: a number of {len(event.value):,} characters; numbers "
                    f"in a scorecard have at most {MAX_NUMBER_CHARS}"
                )
    finally:
        loader.dispose()
    if beyond is not None:
        raise InvalidArgument(
            f"{where} line {beyond}: field 'scores': {scores:,} scores, more than the "
            f"{max_scores:,} a scorecard may have (max_scorecard_scores); split it into several"
        )


def _parse(data: bytes, where: str, label: str | None, max_scores: int) -> Scorecard:
    with _yaml_errors(where):
        _scan(data, where, max_scores)
        loader = _Loader(data)
        try:
            root = loader.get_single_node()
            if root is None:
                raise InvalidArgument(f"{where} is empty; it needs {', '.join(SCORECARD_SCHEMA['required'])}")
            _refuse_duplicate_keys(root, where)
            parsed = loader.construct_document(root)
        finally:
            loader.dispose()
    checker = _Checker(root, where)
    checker.check(parsed, SCORECARD_SCHEMA, [])
    return _build(parsed, checker, label)


def _build(data: dict[str, Any], checker: _Checker, label: str | None) -> Scorecard:
    try:
        parse_ref(data["dataset"])
    except InvalidArgument as error:
        checker.fail(["dataset"], str(error))
    sample = None
    if "sample" in data:
        try:
            check_sample(**data["sample"])
        except InvalidArgument as error:
            checker.fail(["sample"], str(error))
        sample = SampleSpec(**data["sample"])
    scores = []
    seen: dict[str, int] = {}
    for position, item in enumerate(data["scores"]):
        if item["name"] in seen:
            checker.fail(
                ["scores", position, "name"],
                f"duplicate score name {item['name']!r} (also "
                f"scores[{seen[item['name']]}]); score names must be unique",
            )
        seen[item["name"]] = position
        try:
            spec = normalize_spec(item["scorer"])
        except SpecError as error:
            # A string shorthand has no inner fields to point at; a mapping's error names one.
            inner = _split_field(error.field) if error.field and isinstance(item["scorer"], dict) else []
            checker.fail(["scores", position, "scorer", *inner], error.detail)
        scores.append(ScoreSpec(item["name"], spec, item.get("label_column")))
    return Scorecard(
        name=data["name"],
        dataset=data["dataset"],
        input_column=data["input_column"],
        label_column=data["label_column"],
        scores=tuple(scores),
        description=data.get("description"),
        id_column=data.get("id_column"),
        sample=sample,
        source=label,
    )


class _Checker:
    """Checks plain data against the subset of JSON Schema SCORECARD_SCHEMA uses; errors carry YAML lines."""

    _TYPES: dict[str, tuple[type, ...]] = {
        "object": (dict,),
        "array": (list,),
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
    }
    _NOUNS = {
        "object": "a mapping",
        "array": "a list",
        "string": "a string",
        "integer": "a whole number",
        "number": "a number",
        "boolean": "true or false",
    }

    def __init__(self, root: yaml.Node, where: str) -> None:
        self.root = root
        self.where = where

    def fail(self, path: Sequence[str | int], message: str) -> NoReturn:
        field = f" field {_field_name(path)!r}:" if path else ""
        raise InvalidArgument(f"{self.where} line {_line_of(self.root, path)}:{field} {message}")

    def check(self, value: Any, schema: dict[str, Any], path: list[str | int]) -> None:
        if schema is SCORER_SPEC_SCHEMA:
            return  # scorer specs are checked by scorers.normalize_spec, with their own messages
        expected = schema.get("type")
        if expected is not None and (
            (isinstance(value, bool) and expected != "boolean") or not isinstance(value, self._TYPES[expected])
        ):
            self.fail(path, f"must be {self._NOUNS[expected]}, not {_show(value)}")
        if expected == "object":
            self._check_object(value, schema, path)
        elif expected == "array":
            if len(value) < schema.get("minItems", 0):
                self.fail(path, f"needs at least {schema['minItems']} item(s)")
            for position, item in enumerate(value):
                self.check(item, schema["items"], [*path, position])
        elif expected == "string" and len(value.strip()) < schema.get("minLength", 0):
            self.fail(path, "must not be empty")
        elif expected == "string" and len(value) > schema.get("maxLength", len(value)):
            self.fail(path, f"must be at most {schema['maxLength']} characters, not {len(value):,}")
        elif expected in {"integer", "number"}:
            if "minimum" in schema and value < schema["minimum"]:
                self.fail(path, f"must be at least {schema['minimum']}, not {value!r}")
            if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
                self.fail(path, f"must be above {schema['exclusiveMinimum']}, not {value!r}")
            if "maximum" in schema and value > schema["maximum"]:
                self.fail(path, f"must be at most {schema['maximum']}, not {value!r}")

    def _check_object(self, value: dict[Any, Any], schema: dict[str, Any], path: list[str | int]) -> None:
        properties = schema.get("properties", {})
        for key in value:
            if key not in properties and schema.get("additionalProperties") is False:
                self.fail([*path, str(key)], f"unknown field; allowed: {', '.join(properties)}")
        for key, item in value.items():
            if key in properties:
                self.check(item, properties[key], [*path, key])
        for key in schema.get("required", []):
            if key not in value:
                self.fail(path, f"missing required field {key!r}")


def _refuse_duplicate_keys(node: yaml.Node, where: str) -> None:
    # PyYAML keeps the last of duplicate keys silently; a card with two `scores:` is surely a mistake.
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise InvalidArgument(f"{where} line {key.start_mark.line + 1}: duplicate key {key.value!r}")
                seen.add(key.value)
            _refuse_duplicate_keys(value, where)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, where)


def _line_of(root: yaml.Node, path: Sequence[str | int]) -> int:
    """The 1-based line of the deepest node along `path` (a key's line for a mapping entry)."""
    node = root
    line = root.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            entry = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if entry is None:
                break
            line = entry[0].start_mark.line + 1
            node = entry[1]
            if not isinstance(node, yaml.ScalarNode | yaml.SequenceNode | yaml.MappingNode):
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _field_name(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _split_field(field: str) -> list[str | int]:
    """'rules[2].pattern' -> ['rules', 2, 'pattern']."""
    parts: list[str | int] = []
    for piece in field.replace("[", ".[").split("."):
        if piece.startswith("[") and piece.endswith("]"):
            parts.append(int(piece[1:-1]))
        elif piece:
            parts.append(piece)
    return parts


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
