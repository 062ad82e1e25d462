"""Evaluation items as Parquet files beside the store (evaluations/item_files.py), end to end: a real server,
the SDK client, real worker processes, the SQLite store and the files on disk."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx2
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from plexus_mcp_jupyter.core.models import Task, TaskStatus
from plexus_mcp_jupyter.core.retention import RetentionPolicy
from plexus_mcp_jupyter.evaluations.item_files import EXCERPT_CHARS, ItemFiles, item_table, score_key
from plexus_mcp_jupyter.evaluations.store import ItemFilter, items_table

from .conftest import poll
from .test_evaluations import all_results, create, finished, normalised

LABELS = ("yes", "no", "maybe")


def write_dataset(root: Path, rows: int, name: str = "items.csv") -> pd.DataFrame:
    """Labels of three classes, predictions wrong on every 7th row and missing on every 50th."""
    frame = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(rows)],
            "text": [f"review {i % 40}" for i in range(rows)],
            "label": [LABELS[i % 3] for i in range(rows)],
            "prediction": [None if i % 50 == 0 else LABELS[(i + (i % 7 == 0)) % 3] for i in range(rows)],
        }
    )
    frame.to_csv(root / name, index=False)
    return frame


def store_bytes(runtime) -> int:
    """The SQLite store's logical size (pages in use, the WAL's included)."""
    with runtime.store.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
        size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
    return int((pages - free) * size)


def item_rows(runtime, evaluation_id: str) -> int:
    with runtime.store.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(items_table.c.evaluation_id == evaluation_id)
        return int(conn.execute(query).scalar_one())


def files_of(runtime) -> ItemFiles:
    files = runtime.evaluations.store.files
    assert files is not None
    return files


async def slow_evaluation(client, files: ItemFiles, chunks: int) -> dict:
    """An evaluation of a slow per-item scorer, once it has written `chunks` chunk files."""
    started = await create(
        client,
        type="accuracy",
        dataset="example:fraud",
        label_column="label",
        scorer="python:tests.scorer_functions:slow",
        input_column="text",
    )
    await poll(lambda: files.chunks(started["evaluation_id"], "score"), lambda c: len(c) >= chunks, timeout=30)
    return started


async def test_items_land_in_parquet_files_and_the_store_keeps_a_manifest(mcp_client, runtime, jp_root_dir):
    frame = write_dataset(jp_root_dir, 20_000)
    before = store_bytes(runtime)
    async with mcp_client() as client:
        made = await create(
            client,
            type="accuracy",
            dataset="items.csv",
            label_column="label",
            prediction_column="prediction",
            id_column="id",
        )
        done = await finished(client, made["evaluation_id"])
    assert done["status"] == "COMPLETED", done
    evaluation_id = made["evaluation_id"]
    files = files_of(runtime)
    assert item_rows(runtime, evaluation_id) == 0  # no row per item in the database
    manifest = runtime.evaluations.store.get(evaluation_id)["items_manifest"]
    chunks = files.chunks(evaluation_id, "score")
    assert manifest["format"] == "parquet" and manifest["path"] == str(files.directory(evaluation_id))
    assert manifest["scores"] == {"score": {"chunks": len(chunks), "rows": 20_000}} and len(chunks) > 1
    # Chunks cover the items once, in order, and hold what the results show.
    assert [c[0] for c in chunks] == [0] + [c[1] for c in chunks[:-1]] and chunks[-1][1] == 20_000
    table = pq.read_table(chunks[0][2])
    assert table.column("item_id").to_pylist()[:3] == ["r0", "r1", "r2"]
    # Store growth per item: the manifest and metrics only; the files a few bytes per item.
    grown = store_bytes(runtime) - before
    on_disk = files.size(evaluation_id)
    assert grown / len(frame) < 4, grown
    assert on_disk / len(frame) < 16, on_disk


async def test_pages_and_filters_read_from_the_files_are_exact_across_pages(mcp_client, runtime, jp_root_dir):
    frame = write_dataset(jp_root_dir, 3000)
    scorecard = (
        "name: two\ndataset: items.csv\ninput_column: text\nid_column: id\nlabel_column: label\nscores:\n"
        "  - {name: first, scorer: 'column:prediction'}\n"
        "  - {name: second, scorer: 'column:label'}\n"
    )
    async with mcp_client() as client:
        made = await create(client, type="accuracy", scorecard=scorecard)
        assert (await finished(client, made["evaluation_id"]))["status"] == "COMPLETED"
        evaluation_id = made["evaluation_id"]
        assert len(files_of(runtime).chunks(evaluation_id, "first")) > 1
        every = await all_results(client, evaluation_id, score="first")
        wrong = await all_results(client, evaluation_id, score="first", only_mismatches=True)
        maybe = await all_results(client, evaluation_id, score="first", label=" MAYBE ")
        maybe_wrong = await all_results(client, evaluation_id, score="first", label="maybe", only_mismatches=True)
        second_wrong = await all_results(client, evaluation_id, score="second", only_mismatches=True)
    expected_wrong = frame.index[normalised(frame["label"]) != normalised(frame["prediction"])].tolist()
    assert [i["seq"] for i in every] == list(range(3000))  # each item exactly once, in dataset order
    assert [i["item_id"] for i in every[:2]] == ["r0", "r1"] and every[1]["input"] == "review 1"
    assert [i["seq"] for i in wrong] == expected_wrong and len(wrong) > 37
    assert all(i["correct"] is not True for i in wrong)
    assert every[0]["prediction"] is None and every[0]["correct"] is False  # a missing prediction: the "na" class
    assert [i["seq"] for i in maybe] == frame.index[frame["label"] == "maybe"].tolist()
    assert [i["seq"] for i in maybe_wrong] == [s for s in expected_wrong if frame["label"][s] == "maybe"]
    assert second_wrong == []


async def test_a_cancelled_evaluation_s_files_are_removed(mcp_client, runtime):
    files = files_of(runtime)
    async with mcp_client() as client:
        started = await slow_evaluation(client, files, chunks=1)
        evaluation_id = started["evaluation_id"]
        await client.call_tool("cancel_tasks", {"task_ids": [started["task_id"]]})
        done = await finished(client, evaluation_id)
        pruned = await poll(
            lambda: runtime.evaluations.get(evaluation_id), lambda e: e["items_pruned_at"] is not None, timeout=30
        )
    assert done["status"] == "CANCELLED" and pruned["status"] == "CANCELLED"
    assert not files.directory(evaluation_id).exists()


async def test_a_worker_killed_mid_write_leaves_its_complete_chunks_readable(mcp_client, runtime):
    files = files_of(runtime)
    async with mcp_client() as client:
        started = await slow_evaluation(client, files, chunks=2)
        evaluation_id, task_id = started["evaluation_id"], started["task_id"]
        pid = runtime.executor.pid(task_id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        done = await finished(client, evaluation_id)
        assert done["status"] == "FAILED", done
        # A chunk being written when the worker died is a hidden temporary file: never read.
        folder = files.chunks(evaluation_id, "score")[0][2].parent
        (folder / ".chunk-000000999999-000001000000.parquet.dead.tmp").write_bytes(b"PAR1 half a chunk")
        written = files.count(evaluation_id, "score")
        items = await all_results(client, evaluation_id)
    assert written > 0 and [i["seq"] for i in items] == list(range(written))


async def test_rows_of_an_evaluation_from_before_the_files_stay_readable(mcp_client, runtime):
    store = runtime.evaluations.store
    runtime.store.create_task(
        Task(id="t-rows", type="evaluation", status=TaskStatus.COMPLETED, completed_at=time.time())
    )
    store.create(
        {
            "id": "e-rows",
            "task_id": "t-rows",
            "type": "accuracy",
            "owner": None,
            "dataset": "example:sentiment",
            "definition": {"scores": [{"name": "score"}]},
            "created_at": time.time(),
        }
    )
    store.add_items(
        "e-rows",
        "score",
        [(i, str(i), "x", "A", "a", "a" if i % 3 else "b", i % 3 != 0, None, None) for i in range(100)],
    )
    async with mcp_client() as client:
        every = await all_results(client, "e-rows")
        wrong = await all_results(client, "e-rows", only_mismatches=True, label="a")
    assert [i["seq"] for i in every] == list(range(100)) and every[0]["label"] == "A"
    assert [i["seq"] for i in wrong] == list(range(0, 100, 3))


async def test_retention_removes_an_expired_evaluation_s_files(mcp_client, runtime):
    files = files_of(runtime)
    async with mcp_client() as client:
        made = await create(
            client, type="accuracy", dataset="example:sentiment", label_column="label", prediction_column="prediction"
        )
        assert (await finished(client, made["evaluation_id"]))["status"] == "COMPLETED"
    folder = files.directory(made["evaluation_id"])
    assert files.chunks(made["evaluation_id"], "score")
    runtime.manager.configure_retention(RetentionPolicy(by_type={"evaluation": 0.5}), interval=0.2)
    await poll(lambda: folder.exists(), lambda exists: not exists, timeout=15)
    assert runtime.store.tombstone(made["task_id"]) is not None


def test_a_re_run_starts_from_no_files_and_a_late_chunk_after_clean_up_lands_nowhere(tmp_path):
    from plexus_mcp_jupyter.core.store import Store
    from plexus_mcp_jupyter.evaluations.store import EvaluationStore

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        files = ItemFiles(tmp_path / "items")
        evaluations = EvaluationStore(store.engine, files)
        store.create_task(Task(id="t", type="evaluation", status=TaskStatus.RUNNING))
        evaluations.create(
            {
                "id": "e",
                "task_id": "t",
                "type": "accuracy",
                "owner": None,
                "dataset": "x.csv",
                "definition": {"scores": [{"name": "s"}]},
                "created_at": time.time(),
            }
        )

        def chunk(start: int, n: int) -> dict:
            return {
                "seq": list(range(start, start + n)),
                "item_id": [str(i) for i in range(n)],
                "input": [None] * n,
                "label": ["a"] * n,
                "label_class": ["a"] * n,
                "prediction": ["b"] * n,
                "correct": [False] * n,
                "explanation": [None] * n,
                "error": [None] * n,
            }

        evaluations.reset("e")  # a run begins
        evaluations.add_chunk("e", "s", 0, chunk(0, 10))
        evaluations.add_chunk("e", "s", 10, chunk(10, 5))
        assert evaluations.count_items("e", "s") == 15
        evaluations.reset("e")  # a re-run (a re-queued task after a crash): nothing of the first run is left
        assert evaluations.count_items("e", "s") == 0 and files.directory("e").is_dir()
        evaluations.add_chunk("e", "s", 0, chunk(0, 4))
        manifest = evaluations.get("e")["items_manifest"]
        page, _ = evaluations.items("e", ItemFilter(score="s"), limit=10, manifest=manifest)
        assert [i["seq"] for i in page] == [0, 1, 2, 3]
        assert evaluations.remove_files("e") and not files.directory("e").exists()  # a cancel's clean-up
        with pytest.raises(FileNotFoundError):  # the worker's next chunk does not re-create the directory
            evaluations.add_chunk("e", "s", 4, chunk(4, 4))
        assert not files.directory("e").exists()
    finally:
        store.close()


def test_the_sweep_takes_only_evaluations_folders_not_the_servers_markers(tmp_path):
    """The items directory also holds the shared-directory check's markers (.plexus-servers): the sweep lists
    evaluations' folders only, so it neither logs that folder as a bad id nor deletes it."""
    files = ItemFiles(tmp_path / "items")
    for name in (".plexus-servers", "0b8f3c1e-5d2a-4f7e-9c61-2a4b6d8e0f13"):
        (files.root / name).mkdir(parents=True)
    assert files.evaluation_ids() == ["0b8f3c1e-5d2a-4f7e-9c61-2a4b6d8e0f13"]


def old_era_columns(rows: int, text: str) -> dict:
    """Items as a worker made them: inputs clipped to 200 characters, explanations to 500 (`text` repeated)."""
    import numpy as np
    import pyarrow as pa

    return {
        "seq": pa.array(np.arange(rows)),
        "item_id": pa.array([f"item-{i:08d}" for i in range(rows)]),
        "input": pa.array([text * 190 + str(i) for i in range(rows)]),
        "label": pa.array(["yes", "no"] * (rows // 2)),
        "label_class": pa.array(["yes", "no"] * (rows // 2)),
        "prediction": pa.array(["no"] * rows),
        "correct": pa.array([i % 2 == 1 for i in range(rows)]),
        "explanation": pa.array([text * 490 + str(i) for i in range(rows)]),
        "error": pa.nulls(rows, pa.string()),
    }


def test_an_item_file_of_one_row_group_of_50_000_items_as_workers_wrote_them_reads(tmp_path):
    """From 76cc39a until e15682d a worker wrote a chunk of up to 50,000 items as one row group (every column a
    dictionary): with non-ASCII text a group declares ~104 MB, and the fixed 64 MiB a group refused such files as
    damaged. A group is bounded per item now (rows x what a clipped item can take): the file reads."""
    files = ItemFiles(tmp_path / "items")
    files.start("old-eval")
    rows = 50_000
    folder = files.directory("old-eval") / score_key("accuracy")
    folder.mkdir()
    path = folder / f"chunk-{0:012d}-{rows:012d}.parquet"
    table = item_table(old_era_columns(rows, "日"))
    pq.write_table(table, path, compression="zstd", use_dictionary=True, write_statistics=["seq"])
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups == 1 and metadata.row_group(0).total_byte_size > 64 << 20
    page = files.page(
        "old-eval", "accuracy", limit=21, after=None, only_mismatches=True, label=None, columns=["seq", "input"]
    )
    assert [row["seq"] for row in page] == list(range(0, 42, 2)) and page[1]["input"] == "日" * 190 + "2"
    tail = files.page("old-eval", "accuracy", limit=5, after=49_990, only_mismatches=False, label="no", columns=["seq"])
    assert [row["seq"] for row in tail] == [49_991, 49_993, 49_995, 49_997, 49_999]


def test_a_long_label_class_is_stored_clipped_and_counted_as_what_it_decodes_to(tmp_path):
    """label_class was the one text column written unclipped, and a group's text was counted as rows x its longest
    value: one 70,000-character class in a group of 1,024 items made the file damaged for good (a re-run wrote the
    same). A class is clipped at write as the other text (EXCERPT_CHARS), a label filter clipped alike, and a
    dictionary column counted as what it decodes to, so a file holding such a class (an older one) reads too."""
    import numpy as np
    import pyarrow as pa

    files = ItemFiles(tmp_path / "items")
    files.start("e")
    rows, long = 1024, "x" * 70_000
    columns = {
        "seq": pa.array(np.arange(rows)),
        "item_id": pa.array(np.arange(rows)),
        "input": pa.array(["i"] * rows),
        "label": pa.array([long[:EXCERPT_CHARS]] + ["short"] * (rows - 1)),
        "label_class": pa.array([long] + ["short"] * (rows - 1)),
        "prediction": pa.array(["p"] * rows),
        "correct": pa.array([False] * rows),
        "explanation": pa.nulls(rows, pa.string()),
        "error": pa.nulls(rows, pa.string()),
    }
    files.write_chunk("e", "accuracy", 0, columns)
    page = files.page("e", "accuracy", limit=3, after=None, only_mismatches=True, label=None, columns=["label_class"])
    assert page[0]["label_class"] == "x" * (EXCERPT_CHARS - 1) + "…" and page[1]["label_class"] == "short"
    found = files.page("e", "accuracy", limit=3, after=None, only_mismatches=False, label=long, columns=["seq"])
    assert found == [{"seq": 0}]
    # A file written with the class whole (before the clip) reads: counted as 70,000 + 1,023 x 5 bytes, not x 1,024.
    (path,) = [chunk for _first, _end, chunk in files.chunks("e", "accuracy")]
    pq.write_table(item_table(columns), path, use_dictionary=["label", "label_class", "prediction"])
    page = files.page("e", "accuracy", limit=2, after=None, only_mismatches=True, label=None, columns=["label_class"])
    assert page == [{"label_class": long}, {"label_class": "short"}]
    found = files.page("e", "accuracy", limit=3, after=None, only_mismatches=False, label=long, columns=["seq"])
    assert found == [{"seq": 0}], "the whole label still finds a class stored whole"


async def test_an_item_file_past_what_a_worker_writes_is_refused_clearly_not_read(
    mcp_client, runtime, jp_root_dir, server_url, token
):
    """Item files were read without a bound: a chunk corrupted or replaced (by anyone with access to items_dir) with
    a row group that reads back as 100 MB was read whole into the server for a page of 20 results, and one pyarrow
    cannot read was a raw Arrow error. Now a row group's declared sizes are checked before it is read (and what it
    reads back as once read), the footer's length first: one clear error, the same over MCP, REST and Arrow."""
    import pyarrow as pa

    write_dataset(jp_root_dir, 100)
    async with mcp_client() as client:
        made = await create(
            client, type="accuracy", dataset="items.csv", label_column="label", prediction_column="prediction"
        )
        evaluation_id = made["evaluation_id"]
        assert (await finished(client, evaluation_id))["status"] == "COMPLETED"
        chunk = files_of(runtime).chunks(evaluation_id, "score")[0][2]  # (the first: where a page starts)
        # A damaged chunk after the first: an Arrow stream begun is cut (the client sees no end), never ended quietly.
        second = files_of(runtime).chunks(evaluation_id, "score")[1][2]
        kept = second.read_bytes()
        second.write_bytes(b"PAR1 not a parquet file at all PAR1")
        headers = {"Authorization": f"token {token}", "Accept": "application/vnd.apache.arrow.stream"}
        async with httpx2.AsyncClient(timeout=60) as http:
            with pytest.raises(httpx2.HTTPError):  # (RemoteProtocolError: the chunked body ends without its end)
                async with http.stream(
                    "GET", f"{server_url}plexus/api/evaluations/{evaluation_id}/results", headers=headers
                ) as cut:
                    assert cut.status_code == 200
                    await cut.aread()
        second.write_bytes(kept)
        original = pq.read_table(chunk)
        # A chunk of every column as dictionaries (as workers wrote them before 55d7dd4) reads as before.
        pq.write_table(original, chunk)
        page = await client.call_tool("get_evaluation_results", {"evaluation_id": evaluation_id, "limit": 3})
        assert not page.is_error and [i["seq"] for i in page.structured_content["items"]] == [0, 1, 2], page
        rows = 1024
        expanding = {name: original.column(name).to_pylist()[:1] * rows for name in original.column_names}
        expanding["seq"] = list(range(rows))
        expanding["input"] = ["x" * 100_000] * rows  # 100 MB of text, a few hundred kB compressed
        table = pa.table(expanding, schema=original.schema)
        for damage, why in (
            ("dictionary", "row group 0 reads back as 102,"),  # a few bytes in the footer's sizes
            ("plain", "row group 0 declares 1,024 items, 9 columns and 102,"),  # refused from the footer's sizes
            ("garbage", "its Parquet footer is"),
        ):
            if damage == "garbage":
                chunk.write_bytes(b"PAR1 not a parquet file at all PAR1")
            else:
                pq.write_table(table, chunk, compression="zstd", use_dictionary=damage == "dictionary")
                assert chunk.stat().st_size < 1_000_000
            result = await client.call_tool("get_evaluation_results", {"evaluation_id": evaluation_id})
            assert result.is_error, result.content[0].text[:300]
            message = result.content[0].text
            assert f"the items of evaluation {evaluation_id} cannot be read" in message and why in message, message
            assert "run the evaluation again" in message and "Traceback" not in message
            headers = {"Authorization": f"token {token}"}
            url = f"{server_url}plexus/api/evaluations/{evaluation_id}/results"
            async with httpx2.AsyncClient(timeout=60) as http:
                page = await http.get(url, headers=headers)
                arrow = await http.get(url, headers={**headers, "Accept": "application/vnd.apache.arrow.stream"})
            for answer in (page, arrow):
                assert answer.status_code == 400, answer.text[:300]
                assert answer.json()["error"]["message"] == message.removeprefix(
                    "Error executing tool get_evaluation_results: "
                )


async def test_json_lines_integer_labels_with_a_null_are_the_items_labels_a_csv_gives(mcp_client, jp_root_dir):
    """A JSON Lines block of integer labels with a null was read by pandas as floats: the evaluation's items said
    "1.0" and "0.0" where the same data as CSV says "1" and "0". Both give the same items and metrics now."""
    rows = 60
    labels = [None if i % 5 == 0 else i % 2 for i in range(rows)]
    predictions = [i % 2 if i % 7 else 1 - i % 2 for i in range(rows)]
    (jp_root_dir / "ints.jsonl").write_text(
        "".join(
            f'{{"text": "t{i}", "label": {json.dumps(label)}, "prediction": {prediction}}}\n'
            for i, (label, prediction) in enumerate(zip(labels, predictions, strict=True))
        )
    )
    (jp_root_dir / "ints.csv").write_text(
        "text,label,prediction\n"
        + "".join(f"t{i},{'' if labels[i] is None else labels[i]},{predictions[i]}\n" for i in range(rows))
    )
    seen = {}
    async with mcp_client() as client:
        for ref in ("ints.jsonl", "ints.csv"):
            made = await create(
                client, type="accuracy", dataset=ref, label_column="label", prediction_column="prediction"
            )
            done = await finished(client, made["evaluation_id"])
            assert done["status"] == "COMPLETED", done["error_message"]
            items = await all_results(client, made["evaluation_id"])
            seen[ref] = ([(i["label"], i["prediction"]) for i in items], done["metrics"]["score"]["accuracy"])
    assert seen["ints.jsonl"] == seen["ints.csv"], seen
    assert seen["ints.csv"][0][:3] == [(None, "1"), ("1", "1"), ("0", "0")], seen["ints.csv"][0][:3]
