"""Large JSON bodies parsed off the event loop, in pieces a thread can be interrupted between.

A thread alone does not take a parse off the loop: `json.loads` (and pydantic's `from_json`, orjson) is one C call
that holds the GIL until it returns, so the loop waits for the whole parse all the same (4 MiB of small objects:
60-200 ms). `cooperative_loads` reads the same JSON as `json.loads`, value for value and error for error (message
and position), but calls the C parser on pieces of at most `window` characters (64 KiB, ~3 ms), walking the
containers larger than that in Python; between two pieces the thread gives the GIL up whenever the loop asks for
it, and before each piece of a window's size it gives it up of its own accord (`time.sleep(0)`): the loop waits
for a piece (1-3 ms), not for the 5 ms switch interval, when it wakes (health p99 under a flood of 4 MiB bodies on
one core, benchmarks/bench_abuse.py --only bodies: 66-112 ms -> 28 ms, p50 12-13 -> 2-3 ms).

A run of a large container's small elements is parsed as one piece (`"[" + run + "]"`, cut at a comma past the
window, kept only if the C parser reads it whole: then the cut was between two of the container's own elements); a
string is one C call (a copy: ~2 ms for 4 MiB). With no comma past the window, a run is cut at the last one within
it (the small elements before a large last one); a run that closes early has read the container's last elements and
ends it; a run over two windows is not tried (a large element is read on its own). A refused run (a cut inside a
nested value or a string) tries the next two commas, then the container goes on element by element for 1, 2, 4...
elements before the next run; refused pieces cost at most the text's length (runs) and twice it (a value's pieces)
before none is tried. A value's first piece is four times its previous sibling's size, then twice as large each time
up to the window, so a value costs about twice its size in pieces, not a window's copy (`_Pieces.copied` counts the
characters copied: at most a few times the text; a crafted 462 kB body once copied 1.5 GB, 90x json.loads). Measured
for 4 MiB (thread CPU, against `json.loads`): small objects 0.9-1.2x, numbers 1.1x, nested lists of objects 1.7x,
strings with commas 2.2x, objects of objects 2.4x. What the loop may still wait for is the garbage collector: a full
collection, run by whichever thread allocates when it is due, walks every tracked object (tens of ms for the dicts
and lists a 4 MiB body makes) holding the GIL.

`parse_large` runs it in a small thread pool (`PARSE_THREADS`): bodies above `JSON_ON_LOOP_BYTES` only; smaller ones
are parsed where they are (a thread hop costs more than their parse).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from json import JSONDecodeError
from typing import Any

from .identity import Principal
from .ratelimit import BytesLimited, RateLimiter

# Bodies up to this size are parsed on the event loop; larger ones in a thread, in pieces (`cooperative_loads`).
JSON_ON_LOOP_BYTES = 64 * 1024
WINDOW = 64 * 1024  # characters the C parser reads in one call, at most (strings excepted)
SEPARATOR_CHARS = 1  # characters of an element's start a run's cut looks for after the comma (see _run)
RUN_CUTS = 3  # commas a run tries before it is refused
PARSE_THREADS = 2  # large bodies parsed at once; more wait their turn (each is charged to its sender first)

_DECODER = json.JSONDecoder()
_SCAN = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner: (text, index) -> (value, end), or
# StopIteration(index) when there is no value there
scanstring = json.decoder.scanstring  # type: ignore[attr-defined]  # the C one: (text, after the quote) -> (str, end)
_SPACE = re.compile(r"[ \t\n\r]*")
_POOL: ThreadPoolExecutor | None = None


def _trailing_comma_messages() -> dict[str, str]:
    """What this Python's json.loads says of a comma before a container's closing bracket, by bracket, when it says
    so at the comma: 3.13 has "Illegal trailing comma before end of array" (and "... of object"); earlier versions
    expect a value (or a property name) after the comma, as the walk finds by itself, and are not in it."""
    messages = {}
    for closing, text in (("]", "[1,]"), ("}", '{"a": 1,}')):
        try:
            json.loads(text)
        except JSONDecodeError as error:
            if error.pos == text.index(","):
                messages[closing] = error.msg
    return messages


_TRAILING_COMMA = _trailing_comma_messages()


def _skip(text: str, index: int) -> int:
    return _SPACE.match(text, index).end()  # type: ignore[union-attr]  # (it matches the empty string)


def cooperative_loads(text: str | bytes | bytearray, window: int = WINDOW) -> Any:
    """`json.loads(text)`, the C parser called on pieces of at most `window` characters (see the module)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode(json.detect_encoding(text), "surrogatepass")  # as json.loads decodes bytes
    if text.startswith("\ufeff"):
        raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    parser = _Pieces(text, window)
    value, end = parser.value(_skip(text, 0))
    end = _skip(text, end)
    if end != len(text):
        raise JSONDecodeError("Extra data", text, end)
    return value


class _Pieces:
    """One parse: the text, the window, and how much refused pieces have cost so far."""

    def __init__(self, text: str, window: int) -> None:
        self.text = text
        self.window = window
        self.trial_budget = 2 * len(text)  # characters refused pieces of one value may cost before none is tried
        self.run_budget = len(text)  # characters refused runs may cost before none is tried
        self.copied = 0  # characters copied into pieces and runs (what the parse costs beyond json.loads's)

    def value(self, index: int, size_hint: int = 0) -> tuple[Any, int]:
        """The value at `index` and the index after it (`size_hint`: its likely size, its previous sibling's)."""
        text = self.text
        first = text[index : index + 1]
        if first == '"':
            return scanstring(text, index + 1, True)
        if first not in ("[", "{"):
            return self._scalar(index)
        if len(text) - index <= self.window:
            return self._scalar(index)  # the rest of the text is one piece
        # A small piece first when the siblings are small (a window's copy for each would cost more than them),
        # then pieces twice as large up to the window's: a value costs at most about twice its size in pieces.
        size = 4 * size_hint if 0 < 4 * size_hint < self.window else self.window
        while self.trial_budget > 0:  # (checked before the slice is copied)
            if size >= self.window:
                size = self.window
                time.sleep(0)  # (as before a run)
            whole = self._piece(text[index : index + size])
            if whole is not None:
                return whole[0], index + whole[1]
            if size == self.window:
                break
            size *= 2
        return self._array(index) if first == "[" else self._object(index)

    def _scalar(self, index: int) -> tuple[Any, int]:
        try:
            return _SCAN(self.text, index)  # type: ignore[no-any-return]
        except StopIteration as stop:
            raise JSONDecodeError("Expecting value", self.text, stop.value) from None

    def _piece(self, piece: str) -> tuple[Any, int] | None:
        """(value, end) of the value `piece` starts with, or None if the C parser cannot read one (cut too early,
        or the piece is not JSON: what is wrong is found element by element)."""
        if self.trial_budget <= 0:
            return None
        self.copied += len(piece)
        try:
            return _SCAN(piece, 0)  # type: ignore[no-any-return]
        except (StopIteration, JSONDecodeError, RecursionError):
            self.trial_budget -= len(piece)
            return None

    def _run(self, index: int, opening: str, closing: str, separator: str) -> tuple[Any, int, bool] | None:
        """The container's elements from `index` up to a comma past `index + window` (or, if there is none, the last
        one before it), read as one piece: (elements, index of that comma, False); or, when the container closes
        before that comma, (its remaining elements, the index after its closing bracket, True). None if there is no
        such comma, the piece would be over two windows, or it is not read whole. The comma looked for first is one
        followed by what followed the last one (`separator`: the comma, spaces and the next element's first
        character), likely the container's own."""
        if self.run_budget <= 0:
            return None
        start = index + self.window
        for attempt in range(RUN_CUTS):
            cut = self.text.find(separator, start) if len(separator) > 1 else -1
            if cut == -1:
                cut = self.text.find(",", start)
            if cut == -1 and attempt == 0:  # no comma past the window (a large last element, or the text's end):
                cut = self.text.rfind(separator, index, start)  # the small elements before it, to the window's last
                if cut == -1 and len(separator) > 1:
                    cut = self.text.rfind(",", index, start)
            if cut <= index or cut - index > 2 * self.window:  # (a piece past two windows: a large element,
                return None  # which value() reads or walks on its own, and not one long C call)
            piece = opening + self.text[index:cut] + closing
            self.copied += len(piece)
            time.sleep(0)  # the GIL to the loop now if it waits for it, not after the 5 ms switch interval
            try:
                value, end = _SCAN(piece, 0)
            except (StopIteration, JSONDecodeError, RecursionError):
                end = -1
            if end == len(piece):
                return value, cut, False
            if end > 0 and value:  # it closed early, with the container's own bracket: its last elements
                return value, index + end - 1, True  # (an empty one would be a trailing comma's, refused)
            # (one that does not close cut a nested value or a string)
            self.run_budget -= len(piece)
            if self.run_budget <= 0:
                return None
            start = cut + 1
        return None

    def _array(self, index: int) -> tuple[list[Any], int]:
        items: list[Any] = []

        def element(index: int, size: int) -> tuple[int, int]:
            item, end = self.value(index, size)
            items.append(item)
            return index, end

        return items, self._elements(index, "[", "]", items.extend, element)

    def _object(self, index: int) -> tuple[dict[str, Any], int]:
        members: dict[str, Any] = {}
        text = self.text

        def member(index: int, size: int) -> tuple[int, int]:
            if text[index : index + 1] != '"':
                raise JSONDecodeError("Expecting property name enclosed in double quotes", text, index)
            key, index = scanstring(text, index + 1, True)
            index = _skip(text, index)
            if text[index : index + 1] != ":":
                raise JSONDecodeError("Expecting ':' delimiter", text, index)
            index = _skip(text, index + 1)
            members[key], end = self.value(index, size)
            return index, end

        # (members.update: a key given twice keeps its last value, as in json.loads)
        return members, self._elements(index, "{", "}", members.update, member)

    def _elements(
        self,
        index: int,
        opening: str,
        closing: str,
        add_run: Callable[[Any], None],
        element: Callable[[int, int], tuple[int, int]],
    ) -> int:
        """The index after the container opening at `index`, its elements read: runs of small ones as one piece each
        (`_run`, given to `add_run`), the others one by one (`element`: from an element's index and its previous
        sibling's size, the index of its value and the index after it)."""
        text = self.text
        index = _skip(text, index + 1)
        if text[index : index + 1] == closing:
            return index + 1
        separator, size, wait, backoff = ",", 0, 0, 1
        while True:
            # After a run is refused, the next is tried only after 1, 2, 4... more elements (at most 1,024).
            run = self._run(index, opening, closing, separator) if wait <= 0 else None
            if run is not None:
                add_run(run[0])
                if run[2]:
                    return int(run[1])
                index = self._after_comma(run[1], closing)
                backoff = 1
                continue
            if wait <= 0:
                wait, backoff = backoff, min(2 * backoff, 1024)
            wait -= 1
            start, end = element(index, size)
            size = end - start
            index = _skip(text, end)
            delimiter = text[index : index + 1]
            if delimiter == closing:
                return index + 1
            if delimiter != ",":
                raise JSONDecodeError("Expecting ',' delimiter", text, index)
            comma, index = index, self._after_comma(index, closing)
            separator = text[comma : index + SEPARATOR_CHARS]

    def _after_comma(self, comma: int, closing: str) -> int:
        """The index of the element after the container's comma at `comma`; JSONDecodeError as this Python's
        json.loads has it (3.13: at the comma) when the container closes there instead."""
        index = _skip(self.text, comma + 1)
        if closing in _TRAILING_COMMA and self.text[index : index + 1] == closing:
            raise JSONDecodeError(_TRAILING_COMMA[closing], self.text, comma)
        return index


# What pydantic_core.from_json (the handshake-era SDK's parse) refuses and json.loads reads: a text that is not UTF-8
# (json.loads takes UTF-16 and UTF-32, a UTF-8 byte-order mark, and UTF-8-encoded surrogates), a surrogate escape
# that is not half of a pair (a high one not followed at once by a low one, a low one not preceded by a high one).
_ENCODED_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
_LONE_SURROGATE_ESCAPE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def utf8_json_refusal(body: bytes) -> str | None:
    """Why pydantic_core.from_json refuses a text json.loads (and `cooperative_loads`) reads, or None: the SDK parses a
    handshake-era body with from_json, so a large body parsed here must be refused where a small one would be.
    Cheap for the common case (substring searches, a few ms for 4 MiB): only a body holding a `\\uD` escape or a
    0xED byte (UTF-8 of U+D000-U+DFFF) is scanned further, a piece at a time, with its escaped backslashes made two
    other bytes first (pairs from the left, as JSON reads them: every `\\u` left is an escape, none moved next to
    another)."""
    if json.detect_encoding(body) != "utf-8":
        return "not valid JSON: the text is not UTF-8 (UTF-16, UTF-32 or a byte-order mark)"
    if b"\xed" in body and _ENCODED_SURROGATE.search(body) is not None:
        return "not valid JSON: the text is not UTF-8 (it holds an encoded UTF-16 surrogate)"
    if b"\\ud" not in body and b"\\uD" not in body:
        return None
    escapes = body.replace(b"\\\\", b"00")
    for start in range(0, len(escapes), _PIECE_BYTES):  # (a match starting in the piece sees 12 bytes past it)
        lone = _LONE_SURROGATE_ESCAPE.search(escapes, start, start + _PIECE_BYTES + 12)
        if lone is not None and lone.start() < start + _PIECE_BYTES:
            return (
                f"not valid JSON: it holds {lone.group().decode()}, a UTF-16 surrogate escape that is not half of a "
                "pair (a character above U+FFFF is escaped as a high surrogate followed by a low one)"
            )
    return None


_PIECE_BYTES = 64 * 1024  # bytes a regex reads in one call (a thread gives the GIL back between two)


def charge_identity(principal: Principal) -> tuple[str, str]:
    """Whose byte budget (request_bytes_rate) a principal's large bodies are charged to, and how a refusal names it."""
    if principal.key_id is not None:
        return principal.key_id, "this API key"
    return f"user:{principal.owner}", "this user"


def charge_body(budget: RateLimiter, principal: Principal, size: int) -> None:
    """Charge a large body (over JSON_ON_LOOP_BYTES) to its sender's byte budget: BytesLimited when over it."""
    identity, what = charge_identity(principal)
    wait = budget.take(identity, cost=size)
    if wait:
        raise BytesLimited(wait, budget.rate, budget.burst, what)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="plexus-json")
    return _POOL


async def parse_large(body: str | bytes, utf8_only: bool = False) -> Any:
    """`cooperative_loads(body)` in the parse threads (for bodies above JSON_ON_LOOP_BYTES): json.loads's value or
    its exception (JSONDecodeError, RecursionError, UnicodeDecodeError, ValueError for a huge integer). `utf8_only`
    (a bytes body the SDK would parse with pydantic_core.from_json): a ValueError for what from_json refuses and
    json.loads reads (`utf8_json_refusal`), before the parse.

    The body and the value pass through lists emptied here, not as the executor's argument and result: the executor's
    future and asyncio's are a reference cycle, which only a full garbage collection frees (rarely, when the objects
    made are dicts of strings and numbers, which the collector does not track), so what it held stayed alive: 45 MB
    per 4 MiB body of small objects, measured (benchmarks/bench_abuse.py --only bodies)."""
    given: list[str | bytes] = [body]
    del body
    answer: list[Any] = []

    def parse() -> None:
        try:
            text = given.pop()
            refused = utf8_json_refusal(text) if utf8_only and isinstance(text, bytes) else None
            if refused is not None:
                raise ValueError(refused)
            answer.append(cooperative_loads(text))
        except (ValueError, RecursionError) as exc:
            answer.append(exc.with_traceback(None))

    await asyncio.get_running_loop().run_in_executor(_pool(), parse)
    result = answer.pop()
    if isinstance(result, (ValueError, RecursionError)):
        raise result
    return result
