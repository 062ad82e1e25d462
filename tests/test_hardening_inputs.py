"""Every client-sized input is bounded, and refused in one line that says what is allowed.

Each test drives the real server (Jupyter with the extension, real HTTP, the official MCP SDK client) and sends
what a careless or hostile client could: a megabyte URI, a thousand subscriptions, a huge completion text,
long id and type lists, long cursors, repeated filter values.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Callable

import anyio
import httpx2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mcp.shared.exceptions import MCPError
from mcp.types import ResourceTemplateReference
from tornado.httpclient import HTTPClientError

from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.core.requests import ListTasks
from plexus_mcp_jupyter.core.store import decode_position

from . import parquet_thrift as thrift
from .conftest import MODERN, poll

MAX_ERROR_CHARS = 2000  # endpoint/input_limits.py (a literal: the test runs against older code too)

# Client.subscribe_resource is deprecated for the 2026 era; the 2025-11-25 era still uses it.
pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")


async def next_message(ws, timeout: float = 10.0) -> dict:
    message = await asyncio.wait_for(ws.read_message(), timeout)
    assert message is not None, f"closed: {ws.close_code} {ws.close_reason}"
    return json.loads(message)


async def next_answer(ws, timeout: float = 10.0) -> dict:
    """The next message that is not an event (the stream also carries the events of the tasks a test made)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (message := await next_message(ws, deadline - asyncio.get_running_loop().time()))["type"] == "event":
        pass
    return message


LONG_URI = "plexus://tasks/" + "x" * 10_000


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_a_resource_uri_over_4096_characters_is_refused_before_it_is_parsed(mcp_client, runtime, mode):
    async with mcp_client(mode) if mode == MODERN else mcp_client() as client:
        with pytest.raises(MCPError) as err:
            await client.read_resource(LONG_URI)
        assert err.value.code == -32602
        assert "uri is 10015 characters long; at most 4096 are allowed" in err.value.message
        assert (await client.list_tools()).tools  # still serving


async def test_subscribing_to_a_uri_over_4096_characters_is_refused(mcp_client, runtime):
    async with mcp_client() as client:
        with pytest.raises(MCPError) as err:
            await client.subscribe_resource(LONG_URI)
        assert err.value.code == -32602 and "at most 4096 are allowed" in err.value.message
        assert runtime.mcp.resource_watch.followed() == 0


async def test_an_error_quoting_a_long_uri_is_bounded(mcp_client, runtime):
    """The SDK's own `Unknown resource: <uri>` and our `cannot subscribe to <uri>; ...` quote the URI: the message
    a client gets is bounded whoever wrote it."""
    uri = "plexus://nowhere/" + "y" * 4000
    async with mcp_client() as client:
        with pytest.raises(MCPError) as read:
            await client.read_resource(uri)
        with pytest.raises(MCPError) as subscribe:
            await client.subscribe_resource(uri)
    for err in (read, subscribe):
        assert len(err.value.message) <= MAX_ERROR_CHARS, len(err.value.message)
        assert "plexus://nowhere/yyy" in err.value.message  # still says what was wrong
        # and its data too (the SDK sends an unknown resource's URI again as {"uri": ...})
        assert len(json.dumps(err.value.error.data)) <= MAX_ERROR_CHARS, err.value.error.data
    assert read.value.error.data["uri"].startswith("plexus://nowhere/yyy")


def test_an_error_s_data_of_any_type_is_bounded():
    """bounded_error cuts an MCPError's data whatever its type: a string, a dict's long strings (its shape kept), or
    the JSON text of data too large even then; data within the bound is sent as it was."""
    from plexus_mcp_jupyter.endpoint.input_limits import bounded_error

    small = {"uri": "plexus://tasks", "count": 3}
    for data in ("z" * 5000, {"uri": "y" * 5000, "count": 3}, {"ids": ["x" * 100] * 200}, [["w" * 300] * 30] * 3):
        error = MCPError(-32602, "Unknown resource", data)
        bounded_error(error)
        sent = error.error.data
        assert len(sent if isinstance(sent, str) else json.dumps(sent)) <= MAX_ERROR_CHARS, sent
        assert error.error.message == "Unknown resource" and error.error.code == -32602
    error = MCPError(-32602, "Unknown resource", {"uri": "y" * 5000, "count": 3})
    bounded_error(error)
    assert error.error.data["count"] == 3 and error.error.data["uri"].startswith("yyy")
    error = MCPError(-32602, "Unknown resource", small)
    bounded_error(error)
    assert error.error.data is small


async def test_a_session_follows_at_most_max_subscriptions_resources(mcp_client, runtime):
    watch = runtime.mcp.resource_watch
    watch.max_subscriptions = 5  # the bound (1000 by default) is a setting of the watch; 5 keeps this quick
    uris = [f"plexus://tasks?type=demo&limit={n}" for n in range(1, 7)]
    async with mcp_client() as client:
        for uri in uris[:5]:
            await client.subscribe_resource(uri)
        await client.subscribe_resource(uris[0])  # following one again is not one more
        with pytest.raises(MCPError) as err:
            await client.subscribe_resource(uris[5])
        assert err.value.code == -32602
        assert "this session would follow 6 resources; one session may follow at most 5 (resources/unsubscribe" in (
            err.value.message
        )
        assert watch.followed() == 5
        await client.unsubscribe_resource(uris[0])
        await client.subscribe_resource(uris[5])  # room again
        assert watch.followed() == 5


async def test_a_completion_value_over_4096_characters_is_refused(mcp_client, runtime):
    ref = ResourceTemplateReference(type="ref/resource", uri="plexus://tasks/{task_id}")
    async with mcp_client() as client:
        assert (await client.complete(ref, {"name": "task_id", "value": "ab"})).completion.values == []
        with pytest.raises(MCPError) as err:
            await client.complete(ref, {"name": "task_id", "value": "a" * 5000})
        assert err.value.code == -32602
        assert "argument.value is 5000 characters long; at most 4096 are allowed" in err.value.message


async def rest_get(server_url: str, token: str, path: str) -> httpx2.Response:
    async with httpx2.AsyncClient(headers={"Authorization": f"token {token}"}, timeout=30) as http:
        return await http.get(f"{server_url}plexus/api/{path}")


async def test_a_bulk_call_takes_at_most_64_types_and_ids_of_at_most_64_characters(mcp_client, runtime):
    async with mcp_client() as client:
        many = await client.call_tool("cancel_tasks", {"type": [f"t{n}" for n in range(65)], "dry_run": True})
        assert many.is_error and "65 names given; at most 64 are allowed" in many.content[0].text
        same = await client.call_tool("cancel_tasks", {"type": ["demo"] * 1000, "dry_run": True})
        assert not same.is_error, same.content[0].text  # one type, a thousand times, is one type
        long_id = await client.call_tool("retry_tasks", {"task_ids": ["x" * 1000], "dry_run": True})
        assert long_id.is_error and "at most 64 characters" in long_id.content[0].text
        listed = await client.call_tool("list_tasks", {"type": [f"t{n}" for n in range(65)]})
        assert listed.is_error and "at most 64 are allowed" in listed.content[0].text
        objects = await client.call_tool("list_tasks", {"type": [{}] * 1000})  # unhashable: counted, not each checked
        assert objects.is_error and "1000 names given; at most 64 are allowed" in objects.content[0].text


async def test_a_repeated_filter_value_counts_once_and_a_long_list_is_refused(server_url, token, runtime):
    repeated = await rest_get(server_url, token, "tasks?" + "&".join(["status=RUNNING"] * 500))
    assert repeated.status_code == 200, repeated.text
    distinct = await rest_get(server_url, token, "tasks?" + "&".join(f"type=t{n}" for n in range(100)))
    assert distinct.status_code == 400
    assert "100 names given; at most 64 are allowed" in distinct.text


async def test_a_cursor_over_1024_characters_is_refused_before_it_is_decoded(mcp_client, server_url, token, runtime):
    cursor = "A" * 2000
    async with mcp_client() as client:
        listed = await client.call_tool("list_tasks", {"cursor": cursor})
        assert listed.is_error and "a cursor is at most 1024 characters, not 2000" in listed.content[0].text
        with pytest.raises(MCPError) as err:
            await client.read_resource(f"plexus://tasks?cursor={cursor}")
        assert "a cursor is at most 1024 characters" in err.value.message
    refused = await rest_get(server_url, token, f"tasks?cursor={cursor}")
    assert refused.status_code == 400 and "at most 1024 characters" in refused.text
    # the MCP tasks extension's own listing (tasks/list) decodes its cursor without a request model
    with pytest.raises(InvalidArgument, match="at most 1024 characters, not 2000"):
        decode_position(cursor, "fingerprint", 2)


async def test_an_owner_has_at_most_max_kernel_scorers_registered(jp_ws_fetch, runtime, keys):
    runtime.kernel_scorers.max_per_owner = 3  # 100 by default (setting max_kernel_scorers_per_owner)
    auth = {"Authorization": f"Bearer {keys['operator']}"}
    ws = await jp_ws_fetch("plexus", "api", "events", headers=auth)
    assert (await next_message(ws))["type"] == "hello"
    for n in range(4):
        ws.write_message(json.dumps({"type": "register_scorer", "name": f"s{n}"}))
        answer = await next_message(ws)
        if n < 3:
            assert answer == {"type": "scorer_registered", "name": f"s{n}"}
    assert answer["type"] == "error" and answer["in_reply_to"] == "register_scorer"
    assert "already have 3 kernel scorers registered" in answer["message"]
    assert "max_kernel_scorers_per_owner" in answer["message"]
    ws.write_message(json.dumps({"type": "register_scorer", "name": "s0"}))  # one it has already: re-registered
    assert await next_message(ws) == {"type": "scorer_registered", "name": "s0"}
    # another owner (the notebook user) has its own room
    mine = await jp_ws_fetch("plexus", "api", "events")
    await next_message(mine)
    mine.write_message(json.dumps({"type": "register_scorer", "name": "s3"}))
    assert await next_message(mine) == {"type": "scorer_registered", "name": "s3"}
    ws.write_message(json.dumps({"type": "unregister_scorer", "name": "s1"}))
    ws.write_message(json.dumps({"type": "register_scorer", "name": "s3"}))
    assert await next_message(ws) == {"type": "scorer_registered", "name": "s3"}
    ws.close()
    mine.close()


async def test_an_api_key_has_at_most_max_event_streams_open(jp_ws_fetch, runtime, keys):
    runtime.max_event_streams_per_key = 2  # 20 by default (setting max_event_streams_per_key)
    viewer = {"Authorization": f"Bearer {keys['viewer']}"}
    opened = [await jp_ws_fetch("plexus", "api", "events", headers=viewer) for _ in range(2)]
    for ws in opened:
        assert (await next_message(ws))["type"] == "hello"
    with pytest.raises(HTTPClientError) as refused:
        await jp_ws_fetch("plexus", "api", "events", headers=viewer)
    assert refused.value.code == 429
    assert b"already has 2 event streams open" in refused.value.response.body
    other = await jp_ws_fetch("plexus", "api", "events", headers={"Authorization": f"Bearer {keys['operator']}"})
    assert (await next_message(other))["type"] == "hello"  # another key is not held by this one's streams
    opened[0].close()
    await poll(lambda: runtime.event_streams.get(_key_id(runtime, keys["viewer"]), 0), lambda n: n == 1)
    again = await jp_ws_fetch("plexus", "api", "events", headers=viewer)
    assert (await next_message(again))["type"] == "hello"
    for ws in (opened[1], other, again):
        ws.close()


def _key_id(runtime, credential: str) -> str:
    return runtime.keys.verify(credential).id


def ipc_stream(table: pa.Table, compression: str | None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def error_message(answer: httpx2.Response) -> str:
    body = answer.json()
    return str(body.get("message") or body["error"]["message"])


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
async def test_a_compressed_arrow_part_is_refused_before_it_is_decompressed(server_url, keys, runtime, compression):
    """2 MB of zeros is a few hundred bytes of ZSTD; as much of a few gigabytes would be a bomb."""
    api = f"{server_url}plexus/api/datasets/uploads"
    auth = {"Authorization": f"Bearer {keys['operator']}"}
    bomb = ipc_stream(pa.table({"label": pa.array([0] * 250_000, pa.int64())}), compression)
    assert len(bomb) < 50_000
    async with httpx2.AsyncClient(headers=auth, timeout=30) as http:
        began = await http.post(api, params={"name": "bomb"})
        upload = f"{api}/{began.json()['upload_id']}"
        refused = await http.put(upload, params={"part": "0"}, content=bomb)
        assert refused.status_code == 400, refused.text
        assert "compressed record batch (LZ4 or ZSTD IPC body compression)" in error_message(refused)
        plain = ipc_stream(pa.table({"label": ["a", "b"], "prediction": ["a", "a"]}), None)
        accepted = await http.put(upload, params={"part": "0"}, content=plain)
        assert accepted.status_code == 200 and accepted.json()["rows"] == 2, accepted.text


async def test_a_parquet_body_whose_footer_declares_too_much_is_refused_before_it_is_read(server_url, token, runtime):
    runtime.catalog.max_parquet_uncompressed_bytes = 1_000_000  # 1 GiB by default (max_parquet_uncompressed_bytes)
    api = f"{server_url}plexus/api/datasets"
    headers = {"Authorization": f"token {token}", "Content-Type": "application/vnd.apache.parquet"}

    def parquet_of(rows: int) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"label": pa.array([7] * rows, pa.int64())}), sink)  # a run: a few bytes per million
        return bytes(sink.getvalue().to_pybytes())

    expanding = parquet_of(200_000)  # 1.6 MB as a frame's int64 column
    assert len(expanding) < 10_000
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        refused = await http.post(api, params={"name": "expands"}, content=expanding)
        assert refused.status_code == 400, refused.text
        assert "max_parquet_uncompressed_bytes" in error_message(refused)
        assert "200,000 rows x 1 columns" in error_message(refused)
        small = await http.post(api, params={"name": "small"}, content=parquet_of(1000))
        assert small.status_code == 201, small.text
    assert "expands" not in runtime.catalog.registered_names()


def parquet_body(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return bytes(sink.getvalue().to_pybytes())


# Bodies of a few hundred bytes that the footer check alone let through (its fields are a writer's to set):
EXPANDING_PARQUET = {
    # a dictionary page of one 50 kB string and 1,000 indices to it: the footer says 50,053 bytes, 1,000 rows;
    # it reads back as 50 MB
    "strings": pa.table({"label": pa.array(["x" * 50_000] * 1000)}),
    # one row holding a list of 5,000,000 int64 (rows count top-level rows, not values): 40 MB
    "list": pa.table({"label": pa.array([[0] * 5_000_000], pa.list_(pa.int64()))}),
    # a map's string values are read as a dictionary too (a map is not a list to pyarrow's type checks): 50 MB
    "map": pa.table({"label": pa.array([[("k", "x" * 50_000)]] * 1000, pa.map_(pa.string(), pa.string()))}),
    # and a struct's inside a map's values
    "map of structs": pa.table(
        {
            "label": pa.array(
                [[("k", {"text": "x" * 50_000})]] * 1000,
                pa.map_(pa.string(), pa.struct([("text", pa.string())])),
            )
        }
    ),
}


@pytest.mark.parametrize("kind", sorted(EXPANDING_PARQUET))
async def test_a_small_parquet_body_that_expands_past_the_bound_is_refused(server_url, token, runtime, kind):
    runtime.catalog.max_parquet_uncompressed_bytes = 1_000_000  # 1 GiB by default (max_parquet_uncompressed_bytes)
    api = f"{server_url}plexus/api/datasets"
    headers = {"Authorization": f"token {token}", "Content-Type": "application/vnd.apache.parquet"}
    expanding = parquet_body(EXPANDING_PARQUET[kind])
    assert len(expanding) < 1_000
    ordinary = pa.table(
        {
            "label": pa.array(["cat", "dog", None] * 1000),
            "prediction": pa.array(["cat", "cat", "dog"] * 1000).dictionary_encode(),
            "score": pa.array([0.5, 0.25, 1.0] * 1000),
            "tags": pa.array([["a", "b"], [], None] * 1000, pa.list_(pa.string())),
            "attributes": pa.array([[("a", "b")], [], None] * 1000, pa.map_(pa.string(), pa.string())),
        }
    )
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        refused = await http.post(api, params={"name": "expands"}, content=expanding)
        assert refused.status_code == 400, refused.text
        assert "max_parquet_uncompressed_bytes" in error_message(refused)
        assert "at most 1,000,000" in error_message(refused)
        accepted = await http.post(api, params={"name": "ordinary"}, content=parquet_body(ordinary))
        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["rows"] == 3000, accepted.text
        runs = parquet_body(pa.table({"label": ["a"] * 100_000}))  # 5 pages of a few bytes (one per 20,000 rows)
        accepted = await http.post(api, params={"name": "runs"}, content=runs)
        assert accepted.status_code == 201 and accepted.json()["rows"] == 100_000, accepted.text
    assert "expands" not in runtime.catalog.registered_names()
    frame = runtime.catalog.load("registered:ordinary")
    assert list(frame["label"][:3].fillna("-")) == ["cat", "dog", "-"]
    assert list(frame["tags"][0]) == ["a", "b"] and frame["score"].sum() == 1750.0
    assert [tuple(pair) for pair in frame["attributes"][0]] == [("a", "b")]


def test_string_columns_whose_pages_bound_them_are_read_without_dictionaries(monkeypatch):
    """Reading a string column as dictionaries costs about 5x the plain read when its values are unique (pyarrow
    hashes every value its writer stopped dictionary-encoding): a column whose pages bound what it decodes to (plain
    pages, and dictionary-encoded values times the dictionary's longest entry) is decoded as it is read; one whose
    dictionary-encoded values could decode past the bound is still read as dictionaries, and refused."""
    from plexus_mcp_jupyter.evaluations import file_reads

    asked: list[object] = []
    opened = file_reads.pq.ParquetFile

    def recorded(*args: object, **kwargs: object) -> pq.ParquetFile:
        asked.append(kwargs.get("read_dictionary"))
        return opened(*args, **kwargs)

    monkeypatch.setattr(file_reads.pq, "ParquetFile", recorded)
    rows = 100_000
    unique = pa.table(
        {
            "text": [f"item {i} of a hundred thousand" for i in range(rows)],  # a 1 MiB dictionary, then plain pages
            "label": ["cat", "dog", "bird", "fish"] * (rows // 4),  # dictionary-encoded throughout
            "tags": pa.array([["a", f"t{i}"] for i in range(rows)], pa.list_(pa.string())),
        }
    )
    body = parquet_body(unique)
    metadata = pq.ParquetFile(pa.BufferReader(body)).metadata
    encodings = {
        metadata.row_group(0).column(i).path_in_schema: metadata.row_group(0).column(i).encodings for i in range(3)
    }
    assert "PLAIN" in encodings["text"] and "RLE_DICTIONARY" in encodings["text"], encodings
    asked.clear()
    table = file_reads.read_parquet_bounded(io.BytesIO(body), 1 << 30, "unique")
    assert table.equals(pq.read_table(pa.BufferReader(body)))
    assert asked[-1] is None, asked
    # A chunk whose pages hold fewer values than its footer says is read as dictionaries: pyarrow reads pages until it
    # has them, past the range walked (it pads it by 100 bytes for files of parquet-mr before 1.2.9, PARQUET-816)
    handle = io.BytesIO(body)
    walk = file_reads.walk_parquet_pages(handle, metadata)
    assert file_reads.dense_byte_arrays(handle, walk, 1 << 30) == {0, 1, 2}
    walk.byte_arrays[0].declared_values += 1
    assert file_reads.dense_byte_arrays(handle, walk, 1 << 30) == {1, 2}
    with pytest.raises(InvalidArgument, match="reads back as more than 1,000,000 bytes"):
        file_reads.read_parquet_bounded(io.BytesIO(parquet_body(EXPANDING_PARQUET["strings"])), 1_000_000, "bomb")
    assert asked[-1] == ["label"], asked


async def test_a_parquet_body_of_delta_length_strings_registers(server_url, token, runtime):
    """DELTA_LENGTH_BYTE_ARRAY pages hold their values (pyarrow cannot read them as dictionaries: such a body was
    refused as unreadable); DELTA_BYTE_ARRAY ones may repeat each value's predecessor and are still refused."""
    runtime.catalog.max_parquet_uncompressed_bytes = 1_000_000
    headers = {"Authorization": f"token {token}", "Content-Type": "application/vnd.apache.parquet"}

    def written(encoding: str, values: list[str]) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(
            pa.table({"text": values}),
            sink,
            use_dictionary=False,
            column_encoding={"text": encoding},
            compression="zstd",
        )
        return bytes(sink.getvalue().to_pybytes())

    prefixed = ["x" * 50_000 + str(i) for i in range(1000)]  # 50 MB of values, a few hundred bytes of pages
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        api = f"{server_url}plexus/api/datasets"
        accepted = await http.post(
            api, params={"name": "lengths"}, content=written("DELTA_LENGTH_BYTE_ARRAY", ["a", "bc"] * 500)
        )
        assert accepted.status_code == 201 and accepted.json()["rows"] == 1000, accepted.text
        refused = await http.post(api, params={"name": "prefixes"}, content=written("DELTA_BYTE_ARRAY", prefixed))
        assert refused.status_code == 400, refused.text
        # refused from its page headers, saying why (pyarrow's "Not yet implemented: DecodeArrow of DictAccumulator"
        # had been the reason given) and what to send instead
        assert "column 'text' holds DELTA_BYTE_ARRAY pages" in error_message(refused), refused.text
        assert "PLAIN, dictionary or DELTA_LENGTH_BYTE_ARRAY encoding" in error_message(refused)
    assert list(runtime.catalog.load("registered:lengths")["text"][:3]) == ["a", "bc", "a"]
    assert "prefixes" not in runtime.catalog.registered_names()


def test_a_fixed_size_binary_column_is_bounded_by_its_width_before_it_is_read():
    """A dictionary page of one 50 kB fixed-size value and 1,000 indices to it is a few hundred bytes, and 50 MB once
    read (in one batch: the batch's size was counted after pyarrow had decoded it); each value takes its column's
    width whatever its encoding, so the footer says what the column reads back as."""
    from plexus_mcp_jupyter.evaluations.file_reads import read_parquet_bounded

    expanding = parquet_body(pa.table({"key": pa.array([b"x" * 50_000] * 1000, pa.binary(50_000))}))
    assert len(expanding) < 1_000
    with pytest.raises(
        InvalidArgument, match="its fixed-size binary, decimal or view columns read back as 50,000,000 bytes"
    ):
        read_parquet_bounded(io.BytesIO(expanding), 1_000_000, "wide")
    keys = pa.table({"key": pa.array([bytes([n % 256]) * 16 for n in range(3000)], pa.binary(16))})
    assert read_parquet_bounded(io.BytesIO(parquet_body(keys)), 1_000_000, "keys").equals(keys)


def varint(number: int, width: int = 0) -> bytes:
    """`number` as a Thrift compact varint, padded to `width` bytes (a reader takes the longer form as well)."""
    out = bytearray()
    while True:
        out.append(number & 0x7F | 0x80)
        number >>= 7
        if not number and len(out) >= width:
            out[-1] &= 0x7F
            return bytes(out)


def test_a_parquet_footer_that_under_declares_a_chunk_s_values_is_caught_by_the_page_walk():
    """pyarrow decodes the values a page header says it holds, whatever the footer says of its chunk: one row of a
    list of a million zeros is a few hundred bytes (one run) with a footer of one value, and 8 MB once read (in one
    batch: one row). The page walk adds up the pages' values before any page is read."""
    from plexus_mcp_jupyter.evaluations.file_reads import read_parquet_bounded

    values = 1_000_000
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"label": pa.array([[0] * values], pa.list_(pa.int64()))}), sink, write_statistics=False)
    body = bytearray(sink.getvalue().to_pybytes())
    footer = len(body) - 8 - int.from_bytes(body[-8:-4], "little")
    declared = varint(2 * values)  # zigzag: the column chunk's num_values (an i64 field: type 6)
    at = next(i for i in range(footer, len(body)) if body[i : i + len(declared)] == declared and body[i - 1] & 15 == 6)
    body[at : at + len(declared)] = varint(2 * 1, len(declared))
    metadata = pq.ParquetFile(pa.BufferReader(bytes(body))).metadata
    assert metadata.row_group(0).column(0).num_values == 1
    assert pq.read_table(pa.BufferReader(bytes(body))).column(0)[0].values.to_pylist()[-1] == 0  # (read whole)
    with pytest.raises(InvalidArgument, match="its Parquet pages hold 1,000,000 values; at most 125,000 values"):
        read_parquet_bounded(io.BytesIO(bytes(body)), 1_000_000, "lies")


def test_the_page_walk_follows_pyarrow_past_a_chunk_of_an_old_parquet_mr_file():
    """For a file of parquet-mr before 1.2.9 (PARQUET-816) pyarrow reads up to 100 bytes past a chunk's range while its
    pages hold fewer values than the footer says: a 44-byte page of a million dictionary-encoded zeros there (one
    row's list) was decoded before the batch was counted. The walk goes on as far, and counts it first."""
    from plexus_mcp_jupyter.evaluations.file_reads import read_parquet_bounded

    sink = pa.BufferOutputStream()
    table = pa.table({"label": pa.array([[0], [0] * 1_000_000], pa.list_(pa.int64()))})
    pq.write_table(table, sink, write_statistics=False, data_page_size=1, compression="none")
    body = bytearray(sink.getvalue().to_pybytes())
    chunk = pq.ParquetFile(pa.BufferReader(bytes(body))).metadata.row_group(0).column(0)
    assert (chunk.num_values, chunk.total_compressed_size) == (1_000_001, 100)  # a dictionary page and two data pages
    footer = len(body) - 8 - int.from_bytes(body[-8:-4], "little")

    def rewrite(old: bytes, new: bytes) -> None:  # an i64 field's value (type 6), everywhere in the footer
        for at in [i for i in range(footer, len(body)) if body[i : i + len(old)] == old and body[i - 1] & 15 == 6]:
            body[at : at + len(old)] = new

    rewrite(varint(2 * 100), varint(2 * 56, 2))  # the chunk ends before its last data page (44 bytes: in the padding)
    rewrite(varint(2 * 1_000_001), varint(2 * 2, 3))  # and declares 2 values
    writer = body.index(b"parquet-cpp-arrow version ")
    body[writer : writer + 32] = b"parquet-mr version 1.2.8 (build)"
    crafted = bytes(body)
    assert [len(row) for row in pq.read_table(pa.BufferReader(crafted)).column(0).to_pylist()] == [1, 1_000_000]
    with pytest.raises(InvalidArgument, match="its Parquet pages hold 1,000,001 values; at most 125,000 values"):
        read_parquet_bounded(io.BytesIO(crafted), 1_000_000, "old")


def list_of_zeros(values: int, edit: Callable[[list[list[object]]], None]) -> bytes:
    """One row of a list of `values` dictionary-encoded zeros in one data page (a run of each level and of the
    indices: a few hundred bytes), its footer saying 1 value, its data page header's fields passed to `edit`."""
    body = thrift.written(
        pa.table({"label": pa.array([[0] * 1000], pa.list_(pa.int64()))}), write_statistics=False, compression="none"
    )
    levels = thrift.with_length(thrift.rle(1, 0, 1) + thrift.rle(values - 1, 1, 1))  # one row: repetition levels
    levels += thrift.with_length(thrift.rle(values, 3, 2))  # all present: definition levels
    payload = levels + bytes([1]) + thrift.rle(values, 0, 1)  # indices of 1 bit, all to the dictionary's 0

    def pages(_: int, found: list[thrift.Page]) -> None:
        for page in found:
            if page.kind == 0:
                page.replace_payload(payload)
                edit(thrift.get(page.header, 5)[2])

    def footer(meta: list[list[object]]) -> None:
        chunk = thrift.get(thrift.get(thrift.get(meta, 4)[2][2][0], 1)[2][2][0], 3)[2]
        thrift.get(chunk, 5)[2] = 1  # num_values

    return thrift.rewrite(body, pages, footer)


def _values_twice(header: list[list[object]]) -> None:  # the i32 pyarrow reads, then an i16 it skips
    thrift.get(header, 1)[2] = 1_000_000
    header.append([1, thrift.I16, 1])


def _values_as_field_65537(header: list[list[object]]) -> None:  # pyarrow wraps the id to 16 bits: 1, read last
    thrift.get(header, 1)[2] = 1
    header.append([65_537, thrift.I32, 1_000_000])


def _a_large_page_sized_twice() -> bytes:
    """One int64 value in a page of 50 MB of zeros (zstd: a few kB), its uncompressed size given twice: the i32 50 MB
    pyarrow allocates to decompress it, then an i16 8."""
    size = 50_000_000
    compressed = pa.Codec("zstd").compress(bytes(size), asbytes=True)
    body = thrift.written(
        pa.table({"a": pa.array([7], pa.int64())}), compression="zstd", write_statistics=False, use_dictionary=False
    )

    def pages(_: int, found: list[thrift.Page]) -> None:
        found[0].replace_payload(compressed, size)
        found[0].header.insert(2, [2, thrift.I16, 8])

    return thrift.rewrite(body, pages)


def _strings_of_encoding_twice() -> bytes:
    """200 dictionary-encoded 100 kB strings (20 MB, a few hundred bytes of zstd), the data page's encoding given twice:
    the i32 RLE_DICTIONARY pyarrow decodes the page by, then an i16 PLAIN (the walk took the column as bounded by its
    pages and decoded it whole in one batch)."""
    body = thrift.written(pa.table({"s": ["x" * 100_000] * 200}), compression="zstd", write_statistics=False)

    def pages(_: int, found: list[thrift.Page]) -> None:
        for page in found:
            if page.kind == 0:
                thrift.get(page.header, 5)[2].append([2, thrift.I16, 0])

    return thrift.rewrite(body, pages)


CRAFTED_HEADERS = {
    "num_values twice": lambda: list_of_zeros(1_000_000, _values_twice),
    "num_values as field 65537": lambda: list_of_zeros(1_000_000, _values_as_field_65537),
    "uncompressed_page_size twice": _a_large_page_sized_twice,
    "encoding twice": _strings_of_encoding_twice,
}


@pytest.mark.parametrize("case", sorted(CRAFTED_HEADERS))
def test_a_page_header_that_reads_otherwise_to_pyarrow_is_refused(case):
    """pyarrow's Thrift reads a page header's fields as i32 only (skipping an i16 or i64 copy), wraps field ids to 16
    bits and keeps a field's last copy: a header could give pyarrow the real value and the walk a decoy (a million
    zeros decoded for a footer's and walk's 1 value; a 50 MB page allocated for a walk's 8 bytes; 20 MB of strings
    decoded in one batch for a walk's plain page). A header no writer makes (ids not strictly increasing within
    1..32,767, a wanted field not an i32) is refused before any page is read."""
    from plexus_mcp_jupyter.evaluations.file_reads import read_parquet_bounded

    crafted = CRAFTED_HEADERS[case]()
    assert len(crafted) < 20_000
    if case.startswith("num_values"):  # what pyarrow reads of it
        assert len(pq.read_table(pa.BufferReader(crafted)).column(0)[0].values) == 1_000_000
    with pytest.raises(ValueError, match=r"a page header's field ids are not increasing within 1\.\.32,767"):
        read_parquet_bounded(io.BytesIO(crafted), 1_000_000, case)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (bytes([0x14, 0x02, 0x00]), "field 1 is not an i32 .Thrift type 4"),  # num_values as an i16 (delta 1)
        (bytes([0x16, 0x02, 0x00]), "field 1 is not an i32 .Thrift type 6"),  # as an i64
        (bytes([0x15, 0x02, 0x05]) + thrift.zigzag(1) + bytes([0x04, 0x00]), "field 1 after 1"),  # twice
        (bytes([0x36, 0x02, 0x05, 0x02, 0x02, 0x00]), "field 1 after 3"),  # decreasing
        (bytes([0x05]) + thrift.zigzag(32_768) + bytes([0x02, 0x00]), "field 32,768 after 0"),  # past an i16
        (bytes([0x05]) + thrift.zigzag(32_760) + bytes([0x00, 0xF5, 0x02, 0x00]), "field 32,775 after 32,760"),
        (bytes([0x05]) + thrift.zigzag(0) + bytes([0x02, 0x00]), "field 0 after 0"),
        (bytes([0x15]) + thrift.varint(1 << 32 | 2) + bytes([0x00]), "field 1 does not fit in 32 bits"),
        (bytes([0x15, 0x02, 0x15, 0x00, 0x00]), "field 2 is not a struct"),
    ],
)
def test_the_page_walk_reads_only_headers_a_writer_makes(fields, error):
    """The walk's Thrift reader refuses a struct whose wanted fields pyarrow could read otherwise; a writer's passes
    (an unwanted field of any type skipped)."""
    from plexus_mcp_jupyter.evaluations.file_reads import _CompactReader

    wanted = {1: None, 2: {1: None}}
    with pytest.raises(ValueError, match=error):
        _CompactReader(fields).struct_fields(wanted)
    written = bytes([0x15, 0x02, 0x1C, 0x15, 0x06, 0x00, 0x16, 0x04, 0x00])  # 1: i32 1, 2: {1: i32 3}, 3: i64 2
    assert _CompactReader(written).struct_fields(wanted) == {1: 1, 2: {1: 3}}


async def test_a_body_with_a_crafted_page_header_is_refused_in_words(server_url, token, runtime):
    """Over HTTP, such a body is a 400 saying it is not a readable Parquet file, and why."""
    runtime.catalog.max_parquet_uncompressed_bytes = 1_000_000
    headers = {"Authorization": f"token {token}", "Content-Type": "application/vnd.apache.parquet"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        refused = await http.post(
            f"{server_url}plexus/api/datasets",
            params={"name": "decoy"},
            content=list_of_zeros(1_000_000, _values_twice),
        )
    assert refused.status_code == 400, refused.text
    assert "not a readable Parquet file: a page header's field ids are not increasing" in refused.text
    assert "decoy" not in runtime.catalog.registered_names()


def as_decimal256(body: bytes, values: int | None = None) -> bytes:
    """`body` (one BYTE_ARRAY leaf) with its leaf annotated DECIMAL(76, 0), which pyarrow reads as a decimal256 (32
    bytes a value, whatever the bytes of each), and its chunk's values in the footer set to `values` if given."""

    def footer(meta: list[list[object]]) -> None:
        meta[:] = [f for f in meta if f[0] != 5]  # no ARROW:schema
        leaf = thrift.get(meta, 2)[2][2][-1]
        leaf += [
            [6, thrift.I32, 5],
            [7, thrift.I32, 0],
            [8, thrift.I32, 76],
        ]  # converted type DECIMAL, scale, precision
        leaf.append([10, thrift.STRUCT, [[5, thrift.STRUCT, [[1, thrift.I32, 0], [2, thrift.I32, 76]]]]])
        leaf.sort(key=lambda f: f[0])
        if values is not None:
            chunk = thrift.get(thrift.get(thrift.get(meta, 4)[2][2][0], 1)[2][2][0], 3)[2]
            thrift.get(chunk, 5)[2] = values

    return thrift.rewrite(body, footer=footer)


def test_values_read_back_wider_than_8_bytes_are_counted_at_their_width():
    """A one-byte BYTE_ARRAY annotated DECIMAL(76) reads back as a decimal256 (32 bytes a value) and a string_view as
    16 bytes a value besides its data: counted as 8, a list of 200,000 of them (a few hundred bytes) was decoded in
    one batch at 4x (2x) the bound before the batch was counted. They are counted at the width of the Arrow type they
    are read as: in the footer, and in the page walk when the footer under-declares."""
    from plexus_mcp_jupyter.evaluations.file_reads import read_parquet_bounded

    values = 200_000
    ones = thrift.written(
        pa.table({"d": pa.array([[b"\x01"] * values], pa.list_(pa.binary()))}),
        compression="zstd",
        write_statistics=False,
    )
    decimals = as_decimal256(ones)
    assert pq.read_table(pa.BufferReader(decimals)).schema.field("d").type == pa.list_(pa.decimal256(76, 0))
    views = thrift.written(pa.table({"v": pa.array([["a"] * values], pa.list_(pa.string_view()))}), compression="zstd")
    for body, read_back in ((decimals, "6,400,000"), (views, "3,200,000")):
        assert len(body) < 2_000
        with pytest.raises(InvalidArgument, match=f"decimal or view columns read back as {read_back} bytes"):
            read_parquet_bounded(io.BytesIO(body), 2_000_000, "wide")
    under_declared = as_decimal256(ones, values=1)
    assert pq.ParquetFile(pa.BufferReader(under_declared)).metadata.row_group(0).column(0).num_values == 1
    with pytest.raises(InvalidArgument, match=r"pages hold 200,000 values \(read back as 6,400,000 bytes\)"):
        read_parquet_bounded(io.BytesIO(under_declared), 2_000_000, "wide")
    # within the bound they are read as pyarrow reads them
    for body in (decimals, views, as_decimal256(thrift.written(pa.table({"d": [b"\x01", b"\x02\x03", None]})))):
        assert read_parquet_bounded(io.BytesIO(body), 10_000_000, "ok").equals(pq.read_table(pa.BufferReader(body)))


def test_a_byte_array_decimal_whose_pages_do_not_bound_it_is_refused_unread():
    """pyarrow decodes a BYTE_ARRAY decimal's bytes whole before it converts them, whatever read_dictionary asks: a
    dictionary of one 100 kB entry and 1,000 indices to it (256 bytes) was 200 MB decoded (then an error: no decimal is
    that long). Such a column is read only when its pages bound it (dense_byte_arrays), else refused unread."""
    from plexus_mcp_jupyter.evaluations.file_reads import read_parquet_bounded

    long = as_decimal256(thrift.written(pa.table({"d": [b"\x01" * 100_000] * 1000}), compression="zstd"))
    assert len(long) < 1_000
    with pytest.raises(
        InvalidArgument, match=r"its column 'd' is read as 'decimal256\(76, 0\)' from byte arrays whose"
    ):
        read_parquet_bounded(io.BytesIO(long), 1_000_000, "long")


def nested_strings_in_row_groups() -> dict[str, bytes]:
    """Valid bodies of nested string columns in several row groups, each read as dictionaries (their pages do not
    bound them: a 100 kB tag among short ones; an LZ4 chunk), with dictionaries that differ from group to group."""
    tags = [["a", "b"] for _ in range(100_000)]
    tags[5] = ["x" * 100_000]
    short = [None if i % 7 == 0 else f"s{i % 500}-{'x' * (i % 13)}" for i in range(30_000)]
    listed = [None if i % 11 == 0 else [s, None, "k"] for i, s in enumerate(short)]
    return {
        "list, a long tag": thrift.written(
            pa.table({"tags": pa.array(tags, pa.list_(pa.string()))}), row_group_size=50_000
        ),
        "list, lz4": thrift.written(
            pa.table({"lst": pa.array(listed, pa.list_(pa.string()))}),
            compression="lz4",
            row_group_size=4000,
            dictionary_pagesize_limit=8192,
        ),
        "struct, a long value": thrift.written(
            pa.table({"s": pa.array([{"a": row[0], "n": i} for i, row in enumerate(tags)])}), row_group_size=30_000
        ),
    }


def test_a_nested_string_column_read_as_dictionaries_spans_row_groups():
    """pyarrow cannot read a nested column as dictionaries into one batch from two row groups whose dictionaries
    differ ("Nested data conversions not implemented for chunked array outputs": such valid bodies were refused as
    unreadable); they are read one row group at a time, as pq.read_table reads them."""
    from plexus_mcp_jupyter.evaluations.file_reads import dense_byte_arrays, read_parquet_bounded, walk_parquet_pages

    for case, body in nested_strings_in_row_groups().items():
        metadata = pq.ParquetFile(pa.BufferReader(body)).metadata
        assert metadata.num_row_groups > 1, case
        handle = io.BytesIO(body)
        assert dense_byte_arrays(handle, walk_parquet_pages(handle, metadata), 1 << 30) == set(), case
        read = read_parquet_bounded(io.BytesIO(body), 1 << 30, case)
        assert read.equals(pq.read_table(pa.BufferReader(body))), case


async def test_a_body_of_nested_strings_in_row_groups_registers(server_url, token, runtime):
    """Over HTTP, such a body registers and loads as pandas reads it."""
    runtime.catalog.max_parquet_uncompressed_bytes = 100_000_000
    headers = {"Authorization": f"token {token}", "Content-Type": "application/vnd.apache.parquet"}
    body = nested_strings_in_row_groups()["list, lz4"]
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
        registered = await http.post(f"{server_url}plexus/api/datasets", params={"name": "nested"}, content=body)
    assert registered.status_code == 201 and registered.json()["rows"] == 30_000, registered.text
    loaded = runtime.catalog.load("registered:nested")["lst"]
    expected = pq.read_table(pa.BufferReader(body)).column("lst").to_pylist()
    assert [None if value is None else list(value) for value in loaded] == expected


def test_a_column_type_holding_a_dictionary_the_size_count_does_not_know_is_refused():
    """decoded_nbytes counts dictionaries inside lists, maps and structs; any other type holding one is refused
    rather than counted by nbytes (which counts a dictionary once, however many rows refer to it)."""
    from plexus_mcp_jupyter.evaluations.file_reads import decoded_nbytes

    strings = pa.array(["x" * 1000] * 100).dictionary_encode()
    ones = pa.array([1] * 100, pa.int32())
    assert decoded_nbytes(pa.ListArray.from_arrays(pa.array(range(101), pa.int32()), strings)) >= 100_000
    views = pa.ListViewArray.from_arrays(pa.array(range(100), pa.int32()), ones, strings)
    union = pa.UnionArray.from_sparse(pa.array([0] * 100, pa.int8()), [strings])
    for array in (views, union):
        with pytest.raises(InvalidArgument, match="cannot be read within a size bound"):
            decoded_nbytes(array)


@pytest.mark.parametrize("kind", ["plain page", "dictionary"])
async def test_a_parquet_footer_that_under_declares_is_caught_by_the_read(
    server_url, token, runtime, monkeypatch, kind
):
    """The footer's sizes are a writer's to set: with its check passed (as a crafted footer would pass it), a plain
    page of 10 MB of zstd (a few kB) is refused from its page headers before it is decompressed, and a dictionary
    column by its decoded size during the read."""
    from plexus_mcp_jupyter.evaluations import datasets, file_reads

    monkeypatch.setattr(file_reads, "check_parquet_sizes", lambda *args: None)
    monkeypatch.setattr(
        datasets, "check_parquet_sizes", lambda *args: None, raising=False
    )  # where older code called it
    runtime.catalog.max_parquet_uncompressed_bytes = 1_000_000
    sink = pa.BufferOutputStream()
    if kind == "plain page":
        pq.write_table(pa.table({"text": ["x" * 10_000_000]}), sink, use_dictionary=False, compression="zstd")
        said = "its Parquet pages decompress to 10,000,0"
    else:
        pq.write_table(EXPANDING_PARQUET["strings"], sink, compression="zstd")
        said = "its Parquet data reads back as more than 1,000,000 bytes"
    headers = {"Authorization": f"token {token}", "Content-Type": "application/vnd.apache.parquet"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        refused = await http.post(
            f"{server_url}plexus/api/datasets", params={"name": "lies"}, content=sink.getvalue().to_pybytes()
        )
    assert refused.status_code == 400, refused.text
    assert said in error_message(refused) and "max_parquet_uncompressed_bytes" in error_message(refused)
    assert "lies" not in runtime.catalog.registered_names()


def parquet_with_long_statistics() -> tuple[bytes, int]:
    """A Parquet body whose page header holds 8 kB of statistics (two 4,001-byte strings: pyarrow writes values of
    up to 4,096 bytes), and the offset of the max_value's length in it."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"label": ["x" * 4000 + "0", "x" * 4000 + "2"]}), sink, use_dictionary=False)
    body = bytes(sink.getvalue().to_pybytes())
    at = body.index(b"\xa1\x1f" + b"x" * 4000 + b"2")  # the length (varint 4,001) and the bytes of max_value
    assert at < 100, at  # in the first page's header, not the data or the footer
    return body, at


async def test_a_parquet_page_header_holding_a_long_list_is_refused(server_url, token, runtime):
    """The page-header walk parses each header from at most 1 MiB read at once, and refuses a list or map of more
    than 1,000 elements (a header has none; one declaring 500 million booleans took the walk minutes a header)."""
    ordinary, at = parquet_with_long_statistics()
    crafted = bytearray(ordinary)
    crafted[at - 1] = (crafted[at - 1] & 0xF0) | 9  # the max_value field becomes a list (same length: the footer's
    crafted[at : at + 4003] = b"\xf1\xa0\x1f" + b"\x01" * 4000  # offsets hold) of 4,000 booleans
    assert pq.read_table(pa.BufferReader(bytes(crafted))).num_rows == 2  # (pyarrow skips a field of another type)
    headers = {"Authorization": f"token {token}", "Content-Type": "application/vnd.apache.parquet"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        api = f"{server_url}plexus/api/datasets"
        refused = await http.post(api, params={"name": "listed"}, content=bytes(crafted))
        assert refused.status_code == 400, refused.text
        assert "a page header holds a list or map of 4,000 elements; at most 1,000" in error_message(refused)
        accepted = await http.post(api, params={"name": "statistics"}, content=ordinary)
        assert accepted.status_code == 201 and accepted.json()["rows"] == 2, accepted.text
    assert "listed" not in runtime.catalog.registered_names()


def test_a_parquet_page_header_over_1_mib_is_refused_from_one_read():
    """A header is read into memory once (1 KiB, then up to 1 MiB), not byte by byte, and refused past 1 MiB."""
    from plexus_mcp_jupyter.evaluations.file_reads import parquet_page_bytes

    ordinary, _ = parquet_with_long_statistics()
    metadata = pq.ParquetFile(pa.BufferReader(ordinary)).metadata
    start = metadata.row_group(0).column(0).data_page_offset
    blob = b"x" * 5_000_000  # a 5 MB field 100 (binary) after the page's sizes
    header = b"\x15\x00\x15\xc8\x01\x15\x14" + b"\x08\xc8\x01" + b"\xc0\x96\xb1\x02" + blob + b"\x00"

    class Counted(io.BytesIO):
        reads = 0

        def read(self, size: int | None = -1) -> bytes:
            Counted.reads += 1
            return super().read(size)

    handle = Counted(ordinary[:start] + header + b"\x00" * 10)
    with pytest.raises(ValueError, match=f"a page header at byte {start:,} is larger than 1,048,576 bytes"):
        parquet_page_bytes(handle, metadata)
    assert Counted.reads <= 2


async def test_registering_reads_the_registered_directory_off_the_event_loop(server_url, token, runtime):
    loop_thread = threading.get_ident()
    threads: list[int] = []
    catalog = runtime.catalog
    listed = catalog.registered_names

    def watched() -> list[str]:
        threads.append(threading.get_ident())
        return listed()

    catalog.registered_names = watched
    try:
        async with httpx2.AsyncClient(headers={"Authorization": f"token {token}"}, timeout=30) as http:
            body = {"records": [{"label": "a", "prediction": "a"}]}
            first = await http.post(f"{server_url}plexus/api/datasets", params={"name": "offloop"}, json=body)
            assert first.status_code == 201, first.text
            again = await http.post(f"{server_url}plexus/api/datasets", params={"name": "offloop"}, json=body)
            assert again.status_code == 409, again.text
            began = await http.post(f"{server_url}plexus/api/datasets/uploads", params={"name": "offloop2"})
            assert began.status_code == 201, began.text
    finally:
        del catalog.registered_names
    assert threads and loop_thread not in threads


async def test_a_body_holding_too_many_json_values_is_refused_before_it_is_parsed(
    jp_ws_fetch, mcp_url, server_url, token, runtime
):
    """A few bytes each, a Python object of 50 to 200 bytes each: a body within max_request_bytes must not become
    millions of objects. 300 here (100,000 by default, setting max_json_values)."""
    runtime.settings.max_json_values = runtime.endpoint.max_json_values = 300
    many = [[] for _ in range(5000)]  # 15 kB
    text_with_commas = {"description": "," * 999}  # commas in a string are not values
    headers = {"Authorization": f"token {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        rest = await http.post(f"{server_url}plexus/api/tasks/cancel", json={"task_ids": many, "dry_run": True})
        assert rest.status_code == 400, rest.text
        assert "it holds 5,003 JSON values" in rest.text and "max_json_values" in rest.text
        fine = await http.post(
            f"{server_url}plexus/api/tasks", json={"type": "demo", "params": {"items": 1}, **text_with_commas}
        )
        assert fine.status_code == 201, fine.text
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "list_tasks", "arguments": {"type": many}},
        }
        mcp_headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": MODERN}
        mcp = await http.post(mcp_url, json=call, headers=mcp_headers)
        assert mcp.status_code == 400, mcp.text
        assert "it holds 5,008 JSON values" in mcp.json()["error"]["message"], mcp.text
    ws = await jp_ws_fetch("plexus", "api", "events")
    assert (await next_message(ws))["type"] == "hello"
    ws.write_message(json.dumps({"type": "score_result", "request_id": "s1", "predictions": many}))
    answer = await next_answer(ws)
    assert answer["type"] == "error" and "max_json_values" in answer["message"]
    ws.close()


async def test_a_listen_stream_follows_at_most_max_subscriptions_resources(mcp_client, runtime):
    """subscriptions/listen (2026-07-28): its URIs are counted (once each) and measured before they are parsed."""
    runtime.mcp.resource_watch.max_subscriptions = 3
    async with mcp_client(MODERN) as client:
        with anyio.fail_after(30):
            uris = [f"plexus://tasks?type=demo&limit={n}" for n in range(1, 5)]
            with pytest.raises(MCPError) as many:
                async with client.listen(resource_subscriptions=uris):
                    pass
            assert (
                "this stream would follow 4 resources; one stream may follow at most 3 (list fewer"
                in many.value.message
            )
            with pytest.raises(MCPError) as many_sent:  # past 10 x the default bound, repeats included: unparsed
                async with client.listen(resource_subscriptions=[f"plexus://x{n % 3}" for n in range(10_001)]):
                    pass
            assert "notifications.resourceSubscriptions has 10001 entries; at most 10000" in many_sent.value.message
            repeats = uris[:3] * 400  # 1,200 entries, three resources: within the bound of three
            async with client.listen(resource_subscriptions=repeats):
                assert runtime.mcp.resource_watch.followed() == 3
            with pytest.raises(MCPError) as long:
                async with client.listen(resource_subscriptions=[LONG_URI]):
                    pass
            assert "at most 4096 are allowed" in long.value.message
            async with client.listen(resource_subscriptions=uris[:3] + uris[:1]):  # a URI twice is one
                assert runtime.mcp.resource_watch.followed() == 3


async def test_an_event_stream_names_at_most_1000_ids(jp_ws_fetch, runtime):
    ids = ",".join(f"t{n}" for n in range(1001))
    refused = await jp_ws_fetch("plexus", "api", "events", params={"ids": ids})
    answer = await next_message(refused)
    assert answer["type"] == "error" and "ids: 1001 ids given; at most 1000 are allowed" in answer["message"]
    assert await refused.read_message() is None and refused.close_code == 4400
    again = ",".join([ids.rsplit(",", 1)[0]] * 2)  # 1000 ids, each twice: 1000
    accepted = await jp_ws_fetch("plexus", "api", "events", params={"ids": again})
    assert (await next_message(accepted))["type"] == "hello"
    accepted.close()


def test_counting_the_values_of_an_unterminated_string_takes_linear_time():
    """An unterminated string of escaped quotes, then commas enough to pass the quick upper bound: a string pattern
    that could fail started again at every later quote and scanned to the end (quadratic in the body, the GIL
    held: a 4 MB body took hours, the event loop frozen). Counted in a child process, killed after 60 s."""
    code = (
        "from plexus_mcp_jupyter.security.http import json_refusal\n"
        "limit = 100_000\n"
        "body = b'\"' + b'\\\\\"' * 1_900_000 + b',' * (limit + 1)\n"
        "print(json_refusal(body, limit))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "None"  # all of it one string: one value


def nested(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


async def test_json_nested_deeper_than_64_levels_is_refused_before_it_is_parsed(
    jp_ws_fetch, mcp_client, mcp_url, server_url, token, runtime
):
    """Python's parser would recurse to about a thousand levels; no request needs more than a few. REST bodies, MCP
    bodies and event-stream messages share one check (security/http.py MAX_JSON_DEPTH), with the depth found."""
    headers = {"Authorization": f"token {token}"}
    deep = nested(100)
    refused = "JSON nested more than the 64 levels allowed"  # 100 lists in the body's object
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        rest = await http.post(f"{server_url}plexus/api/tasks/cancel", json={"task_ids": deep, "dry_run": True})
        assert rest.status_code == 400, rest.text
        assert refused in rest.text, rest.text
        strings = {"type": "demo", "params": {"items": 1}, "description": "[" * 500}  # brackets in text are text
        fine = await http.post(f"{server_url}plexus/api/tasks", json=strings)
        assert fine.status_code == 201, fine.text
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_tasks"}}
        mcp_headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": MODERN}
        mcp = await http.post(
            mcp_url, json={**call, "params": {**call["params"], "arguments": {"type": deep}}}, headers=mcp_headers
        )
        assert mcp.status_code == 400, mcp.text
        assert refused in mcp.json()["error"]["message"], mcp.text
    async with mcp_client() as client:  # the SDK client gets the JSON-RPC error; its session still serves
        with pytest.raises(MCPError) as err:
            await client.call_tool("list_tasks", {"type": deep})
        assert refused in err.value.message
        assert (await client.list_tools()).tools
    ws = await jp_ws_fetch("plexus", "api", "events")
    assert (await next_message(ws))["type"] == "hello"
    ws.write_message(json.dumps({"type": "score_result", "request_id": "s1", "predictions": deep}))
    answer = await next_answer(ws)
    assert answer["type"] == "error" and refused in answer["message"], answer
    ws.close()


@pytest.mark.parametrize(
    "value",
    [
        {"s": "[" * 300},  # brackets in a string are text
        {"s": "\\", "t": "]" * 70, "deep": nested(65)},  # a string ending in an escaped backslash
        ['"[[[[', nested(64), '\\"' + "]" * 70],  # escaped quotes inside strings
        ['\\\\"]]]', nested(63), "x"],  # 64 levels: allowed
    ],
    ids=["brackets-in-text", "escaped-backslash", "escaped-quotes", "64-levels"],
)
def test_the_nesting_check_reads_strings_and_escapes_as_the_parser_does(value):
    from plexus_mcp_jupyter.security.http import MAX_JSON_DEPTH, json_depth, json_refusal  # new in this check

    def true_depth(value) -> int:
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        return 0 if children is None else 1 + max(map(true_depth, children), default=0)

    depth = true_depth(value)
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False).encode()):
        measured = json_depth(text, MAX_JSON_DEPTH)
        assert measured == min(depth, MAX_JSON_DEPTH + 1), (depth, measured)  # deeper than the bound: bound + 1
        assert (json_refusal(text) is not None) == (depth > MAX_JSON_DEPTH)


async def test_a_json_records_dataset_holding_too_many_values_is_refused_before_it_is_parsed(
    server_url, token, runtime
):
    """A dataset body has Jupyter's max_body_size (512 MiB), not max_request_bytes: its values are bounded by
    max_dataset_json_values (1,000,000 by default; 300 here)."""
    runtime.settings.max_dataset_json_values = 300
    api = f"{server_url}plexus/api/datasets"
    rows = [{"label": "a", "prediction": "b"} for _ in range(200)]  # 1 + 1 + 200 objects + 400 values
    async with httpx2.AsyncClient(headers={"Authorization": f"token {token}"}, timeout=30) as http:
        refused = await http.post(api, params={"name": "many"}, json={"records": rows})
        assert refused.status_code == 400, refused.text
        message = error_message(refused)
        assert "it holds 602 JSON values" in message and "max_dataset_json_values" in message, message
        assert "as Parquet" in message
        small = await http.post(api, params={"name": "few"}, json={"records": rows[:50]})
        assert small.status_code == 201, small.text
    assert "many" not in runtime.catalog.registered_names()


async def test_a_status_named_in_several_cases_is_one_status(mcp_client, server_url, token, runtime):
    """`running`, `RUNNING` and `Running` are one status: a hundred spellings of it are not a hundred filters (nor
    refused as more than 64 names); an unknown name is still refused with the allowed ones."""
    spellings = list(dict.fromkeys("".join(c) for c in itertools.product(*zip("running", "RUNNING", strict=True))))
    assert len(spellings) == 128
    listed = await rest_get(server_url, token, "tasks?" + "&".join(f"status={s}" for s in spellings))
    assert listed.status_code == 200, listed.text
    async with mcp_client() as client:
        called = await client.call_tool("list_tasks", {"status": spellings})
        assert not called.is_error, called.content[0].text
        unknown = await client.call_tool("list_tasks", {"status": ["running", "sleeping"]})
        assert unknown.is_error and "expected one of" in unknown.content[0].text
    assert ListTasks.parse({"status": ["running", " RUNNING", "Queued"]}).status == ("RUNNING", "QUEUED")


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64])
def test_values_and_nesting_are_counted_alike_whatever_the_pieces(monkeypatch, piece):
    """The checks look at a large text a piece at a time (so a thread doing them gives the GIL back: one regex over a
    4 MiB body held it 50-130 ms); a piece's end may fall inside a string, an escape or an empty container: the
    count is the text's (at most one more a piece, for an empty container cut in two), the depth the text's."""
    import random

    from plexus_mcp_jupyter.security import http as checks

    monkeypatch.setattr(checks, "_PIECE_BYTES", piece)
    rng = random.Random(piece)
    alphabet = ["a", "\\", '"', "[", "]", "{", "}", ",", " ", "é"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))

    def value(level: int = 0):
        roll = rng.random()
        if level > 5 or roll < 0.4:
            return rng.choice([text(), 1, None, True])
        if roll < 0.7:
            return [value(level + 1) for _ in range(rng.randint(0, 4))]
        return {text(): value(level + 1) for _ in range(rng.randint(0, 4))}

    def count(v) -> int:
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        return 1 + sum(map(count, children))

    def depth(v) -> int:
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        return 0 if children is None else 1 + max(map(depth, children), default=0)

    for _ in range(300):
        v = value()
        for dumped in (json.dumps(v), json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()):
            counted, cuts = checks.json_values(dumped), len(dumped) // piece + 1
            assert count(v) <= counted <= count(v) + cuts, (dumped, counted, count(v))
            assert checks.json_depth(dumped, 4) == min(depth(v), 5), dumped
