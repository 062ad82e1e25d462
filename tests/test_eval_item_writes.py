"""How a worker writes an evaluation's items (issue 15, speed): chunks written on a thread of their own while
the next chunk is read and scored (runner.ChunkWrites), a numeric id column kept as numbers, and Parquet
options that compress only free text. End to end on a real server with the SDK client and real workers; the
write thread's error handling directly."""

from __future__ import annotations

import functools
import threading

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plexus_mcp_jupyter.evaluations.runner import ChunkWrites

from .test_columnar_items import LABELS, files_of
from .test_evaluations import all_results, create, finished


async def test_a_numeric_id_column_is_stored_as_numbers_and_shown_as_text(mcp_client, runtime, jp_root_dir):
    rows = 120_000  # several chunks (a fast scorer's largest is 50,000 items)
    frame = pd.DataFrame(
        {
            "id": pd.array(range(10**12, 10**12 + rows), dtype="int64"),
            "text": [f"review {i % 40}" for i in range(rows)],
            "label": [LABELS[i % 3] for i in range(rows)],
            "prediction": [LABELS[(i + (i % 7 == 0)) % 3] for i in range(rows)],
        }
    )
    frame.to_parquet(jp_root_dir / "numbered.parquet", index=False)
    async with mcp_client() as client:
        made = await create(
            client, type="accuracy", dataset="numbered.parquet", label_column="label", prediction_column="prediction"
        )
        done = await finished(client, made["evaluation_id"])
        assert done["status"] == "COMPLETED", done
        evaluation_id = made["evaluation_id"]
        wrong = await all_results(client, evaluation_id, only_mismatches=True)
    expected = frame[frame["label"] != frame["prediction"]]
    assert [i["item_id"] for i in wrong] == [str(v) for v in expected["id"]]  # the default id column: "id"
    assert [i["input"] for i in wrong] == expected["text"].tolist()
    chunks = files_of(runtime).chunks(evaluation_id, "score")
    assert len(chunks) > 1 and chunks[-1][1] == rows
    metadata = pq.ParquetFile(chunks[0][2]).metadata
    schema = pq.read_schema(chunks[0][2])
    assert schema.field("item_id").type == pa.int64()
    codecs = {metadata.schema.column(i).name: metadata.row_group(0).column(i).compression for i in range(len(schema))}
    assert codecs["input"] == "ZSTD" and codecs["label_class"] == codecs["seq"] == "UNCOMPRESSED", codecs
    assert codecs["explanation"] == "UNCOMPRESSED", codecs  # no value at all (a prediction column explains nothing)


def test_chunk_writes_run_one_at_a_time_off_the_calling_thread_and_finish_before_the_block_ends():
    callers: list[str] = []
    active, most = [0], [0]
    lock = threading.Lock()

    def write(n: int) -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        callers.append(f"{threading.current_thread().name}:{n}")
        with lock:
            active[0] -= 1

    with ChunkWrites() as writes:
        for n in range(5):
            writes.submit(functools.partial(write, n))
    assert [c.split(":")[1] for c in callers] == ["0", "1", "2", "3", "4"]  # all written, in order
    assert all(c.startswith("plexus-item-writes") for c in callers) and most[0] == 1


def test_a_failed_chunk_write_fails_the_next_chunk_or_the_end_with_its_own_error():
    def full(_n: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), ChunkWrites() as writes:
        writes.submit(functools.partial(full, 0))
        writes.submit(functools.partial(full, 1))  # the first one's error, here
    with pytest.raises(OSError, match="No space left"), ChunkWrites() as writes:
        writes.submit(functools.partial(full, 0))  # the last one's error, at the end of the block

    written = threading.Event()

    def slow(_n: int) -> None:
        written.wait(5)

    # The task fails (or is cancelled) while a chunk is being written: the write ends before the task does, and
    # the task's own error is the one raised.
    with pytest.raises(RuntimeError, match="scorer"), ChunkWrites() as writes:
        writes.submit(functools.partial(slow, 0))
        threading.Timer(0.05, written.set).start()
        raise RuntimeError("the scorer failed")
    assert written.is_set()
