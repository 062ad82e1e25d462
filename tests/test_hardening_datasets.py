"""Issue 11, datasets: pathological files under the root, whole-file reads, control characters, deep JSON.

Each test drives a real server the way the attack did, with files of a few MB and the bounds set low.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.evaluations.datasets import DatasetCatalog
from plexus_mcp_jupyter.evaluations.file_reads import MAX_TRACKED_LABELS, ReadBounds

from .conftest import open_client, poll
from .loop_watch import watched
from .parquet_thrift import get, rewrite
from .test_standalone import start_http, stop

HEADER_BYTES = 64 * 1024
MAX_COLUMNS = 100
ENDLESS = 4 * 1024 * 1024  # a first line without a newline, 64 times the bound


@pytest.fixture
def plexus_config(plexus_config):
    return {
        **plexus_config,
        "max_dataset_header_bytes": HEADER_BYTES,
        "max_dataset_columns": MAX_COLUMNS,
        "dataset_threads": 2,
        "rate_limit": 10_000.0,
        "rate_burst": 10_000,
    }


@pytest.fixture
def api(server_url, token):
    """An HTTP client for the REST API, as the notebook user."""

    def factory(credential: str | None = None) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            base_url=f"{server_url}plexus/api/",
            timeout=60.0,
            headers={"Authorization": f"Bearer {credential or token}"},
        )

    return factory


def write_pathological_files(root: Any) -> None:
    (root / "endless.csv").write_bytes(b"x" * ENDLESS)  # one column whose name is 4 MB long
    (root / "endless.jsonl").write_bytes(b'{"' + b"k" * ENDLESS + b'": 1}\n')
    (root / "wide.csv").write_text(
        ",".join(f"c{i}" for i in range(MAX_COLUMNS * 5)) + "\n" + ",".join("1" for _ in range(MAX_COLUMNS * 5)) + "\n"
    )
    (root / "long_name.csv").write_text("n" * 5000 + ",label\n1,a\n")
    (root / "fine.csv").write_text("text,label\ngood,pos\nbad,neg\n")


async def with_health(api_client: httpx2.AsyncClient, work: Callable[[], Awaitable[Any]]) -> Any:
    """The result of `work()`, run while health is asked again and again; checked that the server's event loop did
    not run the work (loop_watch.py: its CPU between two answers, against the same server idle first)."""

    async def ask() -> None:
        assert (await api_client.get("health")).status_code == 200

    return await watched(ask, work)


async def test_files_outside_the_bounds_are_listed_as_unreadable_with_a_bounded_reason(api, keys, jp_root_dir):
    write_pathological_files(jp_root_dir)
    async with api(keys["viewer"]) as viewer:
        response = await with_health(viewer, lambda: viewer.get("datasets"))
    assert response.status_code == 200
    assert len(response.content) < 64 * 1024, f"the listing is {len(response.content):,} bytes"
    listed = {d["ref"]: d for d in response.json()["datasets"]}
    assert (
        "first line is longer than 65,536 bytes (the max_dataset_header_bytes setting)"
        in listed["endless.csv"]["error"]
    )
    assert "first line is longer than 65,536 bytes" in listed["endless.jsonl"]["error"]
    assert "500 columns, more than 100 (the max_dataset_columns setting)" in listed["wide.csv"]["error"]
    assert "column name of 5,000 characters" in listed["long_name.csv"]["error"]
    assert listed["fine.csv"]["rows"] == 2 and "error" not in listed["fine.csv"]
    assert all(d["rows"] is None and d["columns"] == [] for ref, d in listed.items() if "error" in d)


async def test_an_evaluation_or_describe_of_such_a_file_is_a_short_400(api, keys, jp_root_dir, caplog):
    write_pathological_files(jp_root_dir)
    async with api(keys["operator"]) as operator:
        for dataset in ("endless.csv", "endless.jsonl", "long_name.csv"):
            created = await operator.post(
                "evaluations",
                json={"type": "accuracy", "dataset": dataset, "prediction_column": "p", "label_column": "label"},
            )
            assert created.status_code == 400 and len(created.content) < 2000, created.content[:200]
            assert "\n" not in created.json()["error"]["message"]
            described = await operator.get(f"datasets/{dataset}")
            assert described.status_code == 400 and len(described.content) < 2000, described.content[:200]
        message = (await operator.get("datasets/endless.csv")).json()["error"]["message"]
    assert message == (
        "dataset 'endless.csv' cannot be read: its first line is longer than 65,536 bytes "
        "(the max_dataset_header_bytes setting)"
    )
    # What the server logs about these requests is bounded too (tornado logs an HTTPError's message).
    assert all(len(record.getMessage()) < 4000 for record in caplog.records)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_describing_a_big_csv_streams_it_once_with_bounded_memory(api, keys, jp_root_dir):
    rows = 600_000
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "id": np.arange(rows),
            "text": rng.choice(["good film", "bad plot", "fine"], rows),
            "label": rng.choice(["pos", "neg", "neutral"], rows, p=[0.5, 0.3, 0.2]),
        }
    )
    frame.to_csv(jp_root_dir / "big.csv", index=False)
    expected = frame["label"].value_counts().to_dict()
    del frame
    peak = baseline = _rss()
    sampling = True

    def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        async with api(keys["viewer"]) as viewer:
            answers = await with_health(
                viewer, lambda: asyncio.gather(*(viewer.get("datasets/big.csv") for _ in range(4)))
            )
    finally:
        sampling = False
        sampler.join()
    assert [a.status_code for a in answers] == [200] * 4
    info = answers[0].json()
    assert all(a.json() == info for a in answers)
    assert info["rows"] == rows and info["label_column"] == "label" and info["label_classes"] == 3
    assert {d["label"]: d["count"] for d in info["label_distribution"]} == expected
    assert [c["name"] for c in info["columns"]] == ["id", "text", "label"]
    grown = (peak - baseline) / 2**20
    assert grown < 60, (
        f"four describes of a {os.path.getsize(jp_root_dir / 'big.csv') / 2**20:.0f} MB CSV "
        f"grew the server by {grown:.0f} MB"
    )
    # The cached description is of that version of the file: a changed file is described again.
    with open(jp_root_dir / "big.csv", "a") as handle:
        handle.write("x,y,pos\n")
    async with api(keys["viewer"]) as viewer:
        again = (await viewer.get("datasets/big.csv")).json()
    assert again["rows"] == rows + 1


async def test_file_reads_use_a_few_threads_of_their_own(api, keys, jp_root_dir, monkeypatch):
    """Many slow listings at once hold at most `dataset_threads` threads; the default pool stays free."""
    (jp_root_dir / "slow.csv").write_text("text,label\na,b\n")
    release = threading.Event()
    busy, most = 0, 0
    lock = threading.Lock()
    original = DatasetCatalog._describe_cheaply

    def slow(self: DatasetCatalog, parsed: Any) -> Any:
        nonlocal busy, most
        if parsed.source == "file":
            with lock:
                busy += 1
                most = max(most, busy)
            release.wait(30)  # a file that takes long to read (a slow disk, a huge file)
            with lock:
                busy -= 1
        return original(self, parsed)

    monkeypatch.setattr(DatasetCatalog, "_describe_cheaply", slow)
    async with api(keys["viewer"]) as viewer:
        # More than the default pool's threads (at most 32), as one client's burst of listings can be.
        listings = asyncio.gather(*(viewer.get("datasets") for _ in range(40)))
        deadline = time.monotonic() + 10
        while busy < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        loop = asyncio.get_running_loop()
        try:
            probe = await asyncio.wait_for(loop.run_in_executor(None, lambda: "free"), timeout=2)
            health = await viewer.get("health")
        finally:
            release.set()
        answers = await listings
    assert probe == "free" and health.status_code == 200
    assert 1 <= most <= 2, f"{most} file reads ran at once"
    assert all(a.status_code == 200 for a in answers)


async def test_names_with_control_characters_are_refused_not_changed(api, keys, jp_root_dir):
    buffer = io.BytesIO()
    pd.DataFrame({"text": ["a"], "label": ["b"]}).to_parquet(buffer)
    (jp_root_dir / "fine.csv").write_text("text,label\ngood,pos\n")
    async with api() as notebook:
        registered = await notebook.post(
            "datasets?name=evil%00",
            content=buffer.getvalue(),
            headers={"Content-Type": "application/vnd.apache.parquet"},
        )
        assert registered.status_code == 400
        assert (
            "invalid registered dataset name 'evil\\x00'; use 1 to 64 letters" in registered.json()["error"]["message"]
        )
        listed = (await notebook.get("datasets", params={"include_files": "false"})).json()["datasets"]
        assert "registered:evil" not in [d["ref"] for d in listed]
        for path, params in (
            ("datasets/fine.csv", {"label_column": "label\x00"}),
            ("datasets/fine.csv", {"label_column": "label\n"}),
            ("datasets/fine%01.csv", {}),
        ):
            described = await notebook.get(path, params=params)
            assert described.status_code == 400, (path, params, described.text)
            assert "control character" in described.json()["error"]["message"]
        created = await notebook.post(
            "evaluations",
            json={"type": "accuracy", "dataset": "fine.csv\n", "prediction_column": "text", "label_column": "label"},
        )
        assert created.status_code == 400 and "control character" in created.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        '{"a":' * 100_000 + "1" + "}" * 100_000,
        '{"records": [{"a": 1' + "0" * 100_000 + "}]}",
        '{"records": [{"a": ' + "[" * 100_000 + "]" * 100_000 + "}]}",
    ],
)
async def test_deep_or_huge_json_records_are_a_one_line_400(api, keys, body):
    async with api(keys["operator"]) as operator:
        response = await operator.post("datasets?name=deep", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text[:300]
        message = response.json()["error"]["message"]
        assert "\n" not in message and len(message) < 500
        assert (await operator.get("health")).status_code == 200


async def test_the_standalone_server_lists_pathological_files_within_bounds(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    write_pathological_files(root)
    proc, url, token = start_http(
        tmp_path,
        "--root-dir",
        str(root),
        PLEXUS_MCP_MAX_DATASET_HEADER_BYTES=str(HEADER_BYTES),
        PLEXUS_MCP_MAX_DATASET_COLUMNS=str(MAX_COLUMNS),
    )
    try:
        async with open_client(url, token) as client:
            # Before the bounds, this answer carried the 4 MB column name (and took minutes to build).
            result = await asyncio.wait_for(client.call_tool("list_datasets", {}), timeout=60)
        listed = {d["ref"]: d for d in result.structured_content["datasets"]}
        size = len(json.dumps(result.structured_content))
        assert size < 64 * 1024, f"list_datasets answered {size:,} bytes"
        assert "max_dataset_header_bytes" in listed["endless.csv"]["error"]
        assert "max_dataset_columns" in listed["wide.csv"]["error"]
        assert listed["fine.csv"]["rows"] == 2
    finally:
        stop(proc)


# --- the catalog's bounded reads, without a server -------------------------------------------------------


@pytest.fixture
def catalog(tmp_path):
    (tmp_path / "root").mkdir()
    return DatasetCatalog(tmp_path / "root", tmp_path / "registered", bounds=ReadBounds(header_bytes=4096))


def test_describe_streams_json_lines_and_parquet_as_pandas_would_count_them(catalog):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(1000)], "label": (["a", "b", None, "a"] * 250)})
    frame.to_json(catalog.root_dir / "d.jsonl", orient="records", lines=True)
    frame.to_parquet(catalog.root_dir / "d.parquet")
    expected = {"a": 500, "b": 250, None: 250}
    for ref in ("d.jsonl", "d.parquet"):
        info = catalog.describe(ref)
        assert info.rows == 1000 and info.label_classes == 3, ref
        assert dict(info.label_distribution or ()) == expected, ref
    assert catalog.describe("d.jsonl", label_column="text").label_classes == 1000


def test_a_column_of_too_many_distinct_values_gets_a_note_not_a_distribution(catalog):
    count = MAX_TRACKED_LABELS + 1
    pd.DataFrame({"label": [str(i) for i in range(count)]}).to_csv(catalog.root_dir / "ids.csv", index=False)
    info = catalog.describe("ids.csv")
    assert info.rows == count and info.label_distribution is None and info.label_classes is None
    assert "more than 10,000 distinct values" in (info.label_note or "")


def test_a_json_lines_line_is_bounded_exactly_wherever_it_is(tmp_path):
    """A JSON Lines line had been bounded by where it sat: one longer than the block passed when it began inside a
    block (it was checked only when it crossed a block's end), so a 9 MiB record was accepted at one offset and refused
    100 kB earlier. Each line is checked now: a line of the bound's bytes (without its newline) reads at every offset,
    one byte more is refused at every offset."""
    from plexus_mcp_jupyter.evaluations.dataset_stream import DatasetStream

    bound = 1 << 20  # (the block: max(batch_bytes, the bounds' block_bytes))
    small = b'{"text": "s", "label": "a"}\n'

    def line(size: int) -> bytes:
        head = b'{"label": "b", "text": "'
        return head + b"x" * (size - len(head) - 2) + b'"}'

    for pad in (0, 100_000, 500_000, bound - 40, bound + 10_000, 3 * bound // 2):
        lines = pad // len(small)
        for size, fits in ((bound, True), (bound + 1, False)):
            path = tmp_path / f"{pad}-{size}.jsonl"
            path.write_bytes(small * lines + line(size) + b"\n" + small)
            stream = DatasetStream(path, "jsonl", path.name, ["text", "label"], ["label"], ["label"], None, bound)
            if fits:
                assert sum(len(frame) for frame in stream) == lines + 2, (pad, size)
            else:
                with pytest.raises(ValueError, match=r"a line is longer than 1,048,576 bytes"):
                    list(stream)


def test_a_row_longer_than_a_block_or_a_crafted_footer_is_an_error_not_a_read(catalog):
    # A row is read in the stream's blocks (8 MiB), by a describe as by an evaluation: a describe's count of its own
    # had read 1 MiB blocks (a 2 MiB row failed the describe, not the evaluation), and a JSON Lines line is bounded
    # by the block wherever it is (the stream's bound of 1 MiB had held only across a block's end).
    (catalog.root_dir / "long_row.jsonl").write_bytes(b'{"label": "a"}\n{"label": "' + b"b" * (2 << 20) + b'"}\n')
    assert catalog.describe("long_row.jsonl").rows == 2
    shifted = (
        b'{"label": "a"}\n' * 500_000 + b'{"label": "' + b"b" * (2 << 20) + b'"}\n'
    )  # across the first block's end
    (catalog.root_dir / "shifted.jsonl").write_bytes(shifted)
    assert catalog.describe("shifted.jsonl").rows == 500_001
    (catalog.root_dir / "longer_row.jsonl").write_bytes(b'{"label": "a"}\n{"label": "' + b"b" * (17 << 20) + b'"}\n')
    for read in (
        lambda: catalog.describe("longer_row.jsonl"),
        lambda: list(catalog.stream("longer_row.jsonl", ["label"])),
    ):
        with pytest.raises(InvalidArgument, match=r"as JSONL: a line is longer than 8,388,608 bytes, the block a JSON"):
            read()
    (catalog.root_dir / "long_row.csv").write_bytes(b"text,label\na,b\nc," + b"d" * (2 << 20) + b"\n")
    assert catalog.describe("long_row.csv").rows == 2
    (catalog.root_dir / "longer_row.csv").write_bytes(b"text,label\na,b\nc," + b"d" * (20 << 20) + b"\n")
    with pytest.raises(InvalidArgument, match=r"a row is longer than 8,388,608 bytes, the block a CSV file is read"):
        catalog.describe("longer_row.csv")
    with pytest.raises(InvalidArgument, match=r"a row is longer than 8,388,608 bytes, the block a CSV file is read"):
        list(catalog.stream("longer_row.csv", ["label"], ["label"]))
    # A Parquet file whose footer claims 1 GB: refused before pyarrow tries to read it.
    (catalog.root_dir / "crafted.parquet").write_bytes(b"PAR1" + b"\0" * 64 + (1 << 30).to_bytes(4, "little") + b"PAR1")
    (listed,) = [info for info in catalog.list() if info.ref == "crafted.parquet"]
    assert "Parquet footer is 1,073,741,824 bytes" in (listed.error or "")


def test_a_parquet_file_under_the_root_is_counted_within_the_parquet_bound(catalog):
    # A body posted as Parquet is read within max_parquet_uncompressed_bytes (its pages' headers walked, its batches'
    # decoded size added up); a file under the root is read the same way for its label counts: a dictionary page of
    # one 50 kB string and 1,000 indices to it (a few hundred bytes on disk) read back as 50 MB in one batch, and a
    # plain page of 10 MB of one character (a few kB of zstd) was decompressed whole.
    catalog.max_parquet_uncompressed_bytes = 1_000_000
    pq.write_table(
        pa.table({"label": ["x" * 50_000] * 1000, "n": list(range(1000))}), catalog.root_dir / "dict.parquet"
    )
    assert (catalog.root_dir / "dict.parquet").stat().st_size < 60_000
    with pytest.raises(
        InvalidArgument,
        match=r"'label' is too large to count: it reads back as more than 1,000,000 bytes.*max_parquet_unc",
    ):
        catalog.describe("dict.parquet")
    assert catalog.describe("dict.parquet", label_column="n").label_classes == 1000  # (another column: counted)
    pq.write_table(
        pa.table({"label": ["x" * 10_000_000]}),
        catalog.root_dir / "page.parquet",
        use_dictionary=False,
        compression="zstd",
    )
    with pytest.raises(
        InvalidArgument,
        match=r"too large to count: its Parquet pages decompress to 10,000,0\d\d bytes; at most 1,000,000",
    ):
        catalog.describe("page.parquet")
    # Within the bound, counted as before (the strings read as a dictionary, counted by value).
    frame = pd.DataFrame({"label": ["a", "b", None, "a"] * 250, "text": [f"t{i}" for i in range(1000)]})
    frame.to_parquet(catalog.root_dir / "fine.parquet")
    info = catalog.describe("fine.parquet")
    assert info.rows == 1000 and dict(info.label_distribution or ()) == {"a": 500, "b": 250, None: 250}


def test_the_column_bound_is_checked_before_pandas_parses_the_header(tmp_path, monkeypatch):
    # Half a million empty names in a 1 MiB header took pandas about a minute and a gigabyte to parse, per
    # listing: the bound must refuse such a file from its first line alone.
    from plexus_mcp_jupyter.evaluations import datasets

    parse = datasets.parse_head

    def parse_head(data: bytes, *args: Any) -> Any:
        assert len(data.split(b"\n", 1)[0]) < 4096, "pandas parsed a header beyond the column bound"
        return parse(data, *args)

    monkeypatch.setattr(datasets, "parse_head", parse_head)
    catalog = DatasetCatalog(tmp_path, tmp_path / "registered", bounds=ReadBounds(columns=100))
    (tmp_path / "wide.csv").write_text("," * 100_000 + "\n" + "1," * 100_000 + "\n")
    (tmp_path / "wide.jsonl").write_text(json.dumps({f"k{i}": 1 for i in range(1000)}) + "\n")
    (tmp_path / "long.csv").write_text('"' + "n" * 5000 + '",label\n1,a\n')
    listed = {info.ref: info.error for info in catalog.list()}
    assert "has 100,001 columns, more than 100" in (listed["wide.csv"] or "")
    assert "has 1,000 columns, more than 100" in (listed["wide.jsonl"] or "")
    assert "column name of 5,000 characters" in (listed["long.csv"] or "")
    for ref in ("wide.csv", "wide.jsonl"):
        with pytest.raises(InvalidArgument, match="columns, more than 100 "):
            catalog.columns(ref)


def test_the_rows_an_evaluation_check_reads_from_a_parquet_footer_are_bounded_too(catalog):
    (catalog.root_dir / "crafted.parquet").write_bytes(b"PAR1" + b"\0" * 64 + (1 << 30).to_bytes(4, "little") + b"PAR1")
    with pytest.raises(InvalidArgument, match="Parquet footer is 1,073,741,824 bytes"):
        catalog.known_rows("crafted.parquet")


# --- a Parquet file under the root, read by an evaluation's worker or a load ---------------------------------------

PARQUET_BOUND = 5_000_000


def expanding_parquet(path: Any, rows: int = 2_000) -> None:
    """A Parquet file of a few kB whose `text` column is a dictionary page of one 100 kB string and `rows` indices to
    it: 200 MB once decoded (written from its dictionary, so the writer never holds them either; without its Arrow
    schema, so that pyarrow reads it back as strings)."""
    text = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["x" * 100_000]))
    pq.write_table(pa.table({"text": text, "label": ["pos", "neg"] * (rows // 2)}), path, store_schema=False)


def delta_prefixed_parquet(path: Any, rows: int = 2_000) -> None:
    """DELTA_BYTE_ARRAY pages of `rows` 100 kB values, each its predecessor's with one byte changed: a few kB on disk
    (each value stores only what differs from the one before it), 200 MB once decoded."""
    text = pa.array(["x" * 100_000 + str(i % 10) for i in range(rows)])
    table = pa.table({"text": text, "label": pa.array(["pos", "neg"] * (rows // 2))})
    pq.write_table(table, path, use_dictionary=["label"], column_encoding={"text": "DELTA_BYTE_ARRAY"})


@pytest.mark.parametrize(
    ("write", "named"),
    [
        (expanding_parquet, "read back as more than 5,000,000 bytes (setting max_parquet_uncompressed_bytes)"),
        (delta_prefixed_parquet, "holds DELTA_BYTE_ARRAY pages"),
    ],
)
async def test_an_evaluation_of_a_parquet_file_that_expands_fails_within_the_parquet_bound(
    api, keys, jp_root_dir, runtime, write, named
):
    """A file under the Jupyter root was read by the evaluation's worker (record batches) and by a load with no bound:
    a few kB that decode to 200 MB (a dictionary page of one long string, or DELTA_BYTE_ARRAY pages) took that much of
    the worker's memory. Each row group is now read within max_parquet_uncompressed_bytes, refused before it is
    decoded or at the batch that passes it; an ordinary file is read as before."""
    runtime.catalog.max_parquet_uncompressed_bytes = PARQUET_BOUND  # (the server's load and describe)
    runtime.manager.worker_environment["max_parquet_uncompressed_bytes"] = PARQUET_BOUND  # (the worker's stream)
    write(jp_root_dir / "expands.parquet")
    assert (jp_root_dir / "expands.parquet").stat().st_size < 100_000
    pd.DataFrame({"text": ["pos", "neg", "pos"] * 1000, "label": ["pos", "neg", "neg"] * 1000}).to_parquet(
        jp_root_dir / "fine.parquet", row_group_size=1000
    )
    async with api(keys["operator"]) as operator:

        async def evaluated(dataset: str) -> dict[str, Any]:
            created = await operator.post(
                "evaluations",
                json={"type": "accuracy", "dataset": dataset, "prediction_column": "text", "label_column": "label"},
            )
            assert created.status_code in (200, 201, 202), created.text
            url = f"evaluations/{created.json()['evaluation_id']}"

            async def state() -> dict[str, Any]:
                return (await operator.get(url)).json()

            return await poll(state, lambda e: e["status"] in ("COMPLETED", "FAILED"), timeout=120)

        failed = await evaluated("expands.parquet")
        assert failed["status"] == "FAILED" and named in failed["error_message"], failed["error_message"]
        assert len(failed["error_message"]) < 1000
        fine = await evaluated("fine.parquet")
        assert fine["status"] == "COMPLETED" and fine["processed_items"] == 3000, fine
    with pytest.raises(InvalidArgument, match=r"max_parquet_uncompressed_bytes|DELTA_BYTE_ARRAY"):
        runtime.catalog.load("expands.parquet", ["text", "label"])
    assert len(runtime.catalog.load("fine.parquet", ["label"])) == 3000


def test_describing_a_delta_prefixed_label_column_says_why_it_is_not_counted(catalog):
    delta_prefixed_parquet(catalog.root_dir / "prefixed.parquet")
    with pytest.raises(InvalidArgument, match="column 'text' holds DELTA_BYTE_ARRAY pages"):
        catalog.describe("prefixed.parquet", "text")
    assert catalog.describe("prefixed.parquet", "label").rows == 2_000


async def evaluated(client: Any, dataset: str, **extra: Any) -> dict[str, Any]:
    """An accuracy evaluation of `dataset` (prediction `text`, label `label`), polled until it is over."""
    body = {"type": "accuracy", "dataset": dataset, "prediction_column": "text", "label_column": "label", **extra}
    created = await client.post("evaluations", json=body)
    assert created.status_code in (200, 201, 202), created.text
    url = f"evaluations/{created.json()['evaluation_id']}"

    async def state() -> dict[str, Any]:
        return (await client.get(url)).json()

    return await poll(state, lambda e: e["status"] in ("COMPLETED", "FAILED"), timeout=120)


def row_groups_at_one_chunk(path: Any, groups: int, footer_rows: int) -> None:
    """An expanding file (expanding_parquet, 200 rows: 20 MB decoded) whose footer repeats its one row group `groups`
    times, each pointing at the same column chunks, its footer's num_rows `footer_rows`."""
    sink = io.BytesIO()
    expanding_parquet(sink, rows=200)

    def footer(meta: Any) -> None:
        listed = get(meta, 4)[2][2]
        listed[:] = [copy.deepcopy(listed[0]) for _ in range(groups)]
        get(meta, 3)[2] = footer_rows

    path.write_bytes(rewrite(sink.getvalue(), footer=footer))


async def test_an_evaluation_reads_a_parquet_files_bytes_once_within_the_bound(api, keys, jp_root_dir, runtime):
    """Each row group had been bounded alone: 50 row groups pointing at one 13 kB chunk streamed 10,000 rows (1 GB
    decoded) past a footer that said 200, and a sample (which keeps every row group) held them all. Now the file is
    checked whole before it is read (its groups' rows add up to its footer's, its chunks do not overlap). A sample
    keeps only its rows of each batch as the file streams (it had kept every row, then held them to the bound in
    all: a file of 330 kB decoded was "too large to sample" within 200 kB, and a list column, a few bytes a row in
    Arrow, held as 10x that in pandas objects)."""
    bound = 25_000_000
    runtime.catalog.max_parquet_uncompressed_bytes = bound
    runtime.manager.worker_environment["max_parquet_uncompressed_bytes"] = bound
    row_groups_at_one_chunk(jp_root_dir / "footer.parquet", 50, 200)
    row_groups_at_one_chunk(jp_root_dir / "overlap.parquet", 50, 200 * 50)
    assert (jp_root_dir / "overlap.parquet").stat().st_size < 100_000
    # 20 row groups of some 16 kB each once decoded (330 kB): streamed whole, and sampled, within 200 kB
    text = [("x" * 140) + str(i) for i in range(2_000)]
    pd.DataFrame({"text": text, "label": ["pos", "neg"] * 1_000}).to_parquet(
        jp_root_dir / "groups.parquet", row_group_size=100
    )
    # a list column: 60,000 empty lists, 240 kB decoded (some 5 MB as pandas objects), in 1,000-row groups
    tags = pa.array([[]] * 60_000, pa.list_(pa.int8()))
    labels = pa.array(["pos", "neg"] * 30_000)
    pq.write_table(pa.table({"tags": tags, "text": labels, "label": labels}), jp_root_dir / "tags.parquet", 1_000)
    async with api(keys["operator"]) as operator:
        for dataset, named in (
            ("footer.parquet", "its row groups hold 10,000 rows, its footer says 200"),
            ("overlap.parquet", "its column chunks overlap"),
        ):
            for extra in ({}, {"sample_n": 10}):
                failed = await evaluated(operator, dataset, **extra)
                assert failed["status"] == "FAILED" and named in failed["error_message"], failed["error_message"]
        runtime.manager.worker_environment["max_parquet_uncompressed_bytes"] = 200_000
        whole = await evaluated(operator, "groups.parquet")
        assert whole["status"] == "COMPLETED" and whole["processed_items"] == 2_000, whole["error_message"]
        for dataset, extra in (("groups.parquet", {}), ("tags.parquet", {"input_column": "tags"})):
            sampled = await evaluated(operator, dataset, sample_n=10, seed=5, **extra)
            assert sampled["status"] == "COMPLETED" and sampled["processed_items"] == 10, sampled["error_message"]


def test_joined_parquet_batches_are_yielded_once_past_half_the_bound(catalog):
    """Batches read a row group at a time (LZ4: read as dictionaries) are joined, and yielded once past half of
    max_parquet_uncompressed_bytes: the next batch is decoded while they are held (they had been held up to the whole
    bound, the next beside them)."""
    rows = 2_000
    text = [("x" * 1_000) + str(i) for i in range(rows)]  # some 102 kB decoded a 100-row group
    frame = pd.DataFrame({"text": text, "label": ["pos", "neg"] * (rows // 2)})
    frame.to_parquet(catalog.root_dir / "wide.parquet", row_group_size=100, compression="lz4")
    catalog.max_parquet_uncompressed_bytes = 340_000  # three row groups fit in it, two pass half of it
    frames = list(catalog.stream("wide.parquet", ["text", "label"]))
    assert [len(f) for f in frames] == [200] * 10, [len(f) for f in frames]
    assert pd.concat(frames)["text"].tolist() == text


def test_small_row_groups_stream_in_batches_that_span_them_within_the_bound(catalog):
    """Each row group had been read alone, a batch never spanning two: 1M rows in 1,000-row groups gave 1,000 frames
    and 1,004 scoring chunks (8 and 30 before the bound), 25x the CPU. Consecutive row groups are read at once while
    their rows fit in a batch and their pages in max_parquet_uncompressed_bytes; a row group with a column read as
    dictionaries, flat or nested (pyarrow cannot join a nested one across row groups), is read alone."""
    rows = 20_000
    frame = pd.DataFrame({"text": [f"input number {i}" for i in range(rows)], "label": ["pos", "neg"] * (rows // 2)})
    frame.to_parquet(catalog.root_dir / "small.parquet", row_group_size=100)
    frames = list(catalog.stream("small.parquet", ["text", "label"]))
    assert [len(f) for f in frames] == [rows] and frames[0]["text"].tolist() == frame["text"].tolist()
    # 200 row groups of some 2.6 kB of pages each: within 20 kB, a batch holds a few of them
    catalog.max_parquet_uncompressed_bytes = 20_000
    frames = list(catalog.stream("small.parquet", ["text", "label"]))
    assert 200 > len(frames) > 10 and sum(len(f) for f in frames) == rows, len(frames)
    assert pd.concat(frames)["text"].tolist() == frame["text"].tolist()
    catalog.max_parquet_uncompressed_bytes = 2**30
    # parquet's LZ4: its string columns are read as dictionaries, a row group alone, and its batches joined after
    frame.to_parquet(catalog.root_dir / "lz4.parquet", row_group_size=100, compression="lz4")
    frames = list(catalog.stream("lz4.parquet", ["text", "label"]))
    assert [len(f) for f in frames] == [rows] and frames[0]["text"].tolist() == frame["text"].tolist(), len(frames)
    nested = pa.table({"tags": [[f"tag {i % 7}"] for i in range(1_000)], "label": ["pos", "neg"] * 500})
    # (parquet's LZ4: its dictionaries are not read before, so its string columns are read as dictionaries)
    pq.write_table(nested, catalog.root_dir / "nested.parquet", row_group_size=100, compression="lz4")
    frames = list(catalog.stream("nested.parquet", ["tags", "label"]))
    assert sum(len(f) for f in frames) == 1_000 and list(frames[0]["tags"].iloc[0]) == ["tag 0"]


def test_a_load_too_large_says_so_in_its_own_words(catalog):
    """A load of a file under the root that reads back past max_parquet_uncompressed_bytes had been refused in a request
    body's words ("too large for one request ... send it in parts"): it says the dataset is too large to load."""
    catalog.max_parquet_uncompressed_bytes = PARQUET_BOUND
    expanding_parquet(catalog.root_dir / "expands.parquet")
    for columns in (["text", "label"], None):
        with pytest.raises(InvalidArgument) as refused:
            catalog.load("expands.parquet", columns)
        said = str(refused.value)
        assert said.startswith("dataset 'expands.parquet' is too large to load: its Parquet data reads back as"), said
        assert "for one request" not in said and "send it in parts" not in said
        assert said.endswith(
            "max_parquet_uncompressed_bytes): evaluate it (an evaluation streams it), or load fewer of its columns"
        )


async def test_describe_counts_the_rows_an_evaluation_reads_and_says_why_it_cannot(api, keys, jp_root_dir):
    """A describe counted CSV and JSON Lines rows with counts of its own, which differed from the stream an evaluation
    reads: JSON records separated by a bare CR were one line to the count (refused as "not a JSON record" with a label
    column, one row without), two records to the evaluation; a line that is not an object was a raw TypeError (a
    500). Now a describe reads the file as the evaluation does: the same rows and the same clear errors."""
    records = [{"text": ("pos", "neg")[i % 2], "label": ("pos", "neg", "neg")[i % 3]} for i in range(30)]
    (jp_root_dir / "cr.jsonl").write_bytes(b"\r".join(json.dumps(r).encode() for r in records) + b"\n")
    (jp_root_dir / "cr_unlabelled.jsonl").write_bytes(b'{"text": "a"}\r{"text": "b"}\r{"text": "c"}\n')
    (jp_root_dir / "not_objects.jsonl").write_bytes(b'{"text": "pos", "label": "pos"}\n[1, 2]\n')
    async with api(keys["operator"]) as operator:
        described = await operator.get("datasets/cr.jsonl")
        assert described.status_code == 200, described.text
        info = described.json()
        assert info["rows"] == 30 and {d["label"]: d["count"] for d in info["label_distribution"]} == {
            "pos": 10,
            "neg": 20,
        }
        done = await evaluated(operator, "cr.jsonl")
        assert done["status"] == "COMPLETED" and done["counts"]["score"]["items"] == info["rows"], done
        assert done["metrics"]["score"]["label_distribution"] == {"pos": 10, "neg": 20}
        unlabelled = await operator.get("datasets/cr_unlabelled.jsonl")
        assert unlabelled.status_code == 200 and unlabelled.json()["rows"] == 3, unlabelled.text
        refused = await operator.get("datasets/not_objects.jsonl")
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert message == (
            "cannot read dataset 'not_objects.jsonl' as JSONL: a line is not a JSON object (each line must be one "
            "record)"
        )
        failed = await evaluated(operator, "not_objects.jsonl")
        assert failed["status"] == "FAILED" and failed["error_message"] == message, failed
