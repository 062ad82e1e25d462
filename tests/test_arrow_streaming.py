"""Arrow end to end (issue 15, item 2): datasets read in batches of the needed columns, metrics counted per
chunk, Arrow-annotated scorers; the faults (a file changing while read, mixed types, no labels, 1,000 classes).

The reader and the counter are checked on their own (batches are small here so that files are); evaluations
run through a real server, its worker processes and the SDK client, and their metrics are compared with
scikit-learn's.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, f1_score

from plexus_mcp_jupyter.core.errors import InvalidArgument
from plexus_mcp_jupyter.evaluations.dataset_stream import DatasetStream
from plexus_mcp_jupyter.evaluations.file_reads import ReadBounds
from plexus_mcp_jupyter.evaluations.metrics import ConfusionCounter, LabelNormalization, compute_metrics
from plexus_mcp_jupyter.evaluations.runner import SampledFrames

from .test_evaluations import all_results, create, finished, normalised

SMALL = 1 << 20  # the smallest block a CSV / JSON Lines stream reads (a line's bound)


def frame(rows: int, classes: int = 5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = np.array([f"class {i}" for i in range(classes)], dtype=object)
    label = names[rng.integers(0, classes, rows)]
    prediction = np.where(rng.random(rows) < 0.7, label, names[rng.integers(0, classes, rows)])
    return pd.DataFrame(
        {
            "id": np.arange(rows),
            "text": [f"row {i} of a test file" for i in range(rows)],
            "label": label,
            "prediction": prediction,
            "unused": rng.random(rows),
        }
    )


# --- the counter -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["arrow", "object"])
def test_a_confusion_counted_chunk_by_chunk_gives_the_metrics_of_the_whole(kind):
    rng = np.random.default_rng(3)
    labels = pd.Series(rng.choice(np.array(["Yes", " yes", "NO", None, "maybe"], dtype=object), 5000))
    predictions = pd.Series(rng.choice(np.array(["yes", "no", "x", None], dtype=object), 5000))
    if kind == "arrow":
        labels, predictions = labels.astype("str"), predictions.astype("str")
    counter = ConfusionCounter()
    for start in range(0, 5000, 777):
        counter.add(counter.classes(labels[start : start + 777]), counter.classes(predictions[start : start + 777]))
    assert counter.metrics().to_dict() == compute_metrics(labels, predictions).to_dict()


def test_the_counter_normalises_each_distinct_value_once_and_keeps_class_numbers():
    calls = []

    class Counting(LabelNormalization):
        def normalize(self, value):
            calls.append(value)
            return super().normalize(value)

    counter = ConfusionCounter(Counting())
    first = counter.classes(pa.array(["a", "A", "b"] * 100_000))
    second = counter.classes(pd.Series(["b", "a"], dtype="str"))
    assert len(calls) <= 3 + 1 + 2 + 1  # the distinct values (and the missing slot) of each batch
    assert first[:3].tolist() == [first[0], first[0], first[2]] and second.tolist() == [first[2], first[0]]


def test_a_thousand_classes_are_counted_as_compute_metrics_counts_them():
    data = frame(20_000, classes=1000, seed=5)
    counter = ConfusionCounter()
    for start in range(0, len(data), 3000):
        part = data.iloc[start : start + 3000]
        counter.add(counter.classes(part["label"]), counter.classes(part["prediction"]))
    metrics = counter.metrics()
    assert len(metrics.labels) == 1000
    assert metrics.to_dict() == compute_metrics(data["label"], data["prediction"]).to_dict()


# --- the reader --------------------------------------------------------------------------------------------


def stream(path, fmt, columns, text=(), names=None, batch_bytes=SMALL):
    names = names or list(pd.read_csv(path, nrows=0).columns) if fmt == "csv" else names or []
    return DatasetStream(path, fmt, path.name, names, columns, text, batch_bytes=batch_bytes)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_file_is_read_in_batches_of_only_the_selected_columns(tmp_path, fmt):
    data = frame(60_000)
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        data.to_csv(path, index=False)
    elif fmt == "parquet":
        data.to_parquet(path, index=False, row_group_size=10_000)
    else:
        data.to_json(path, orient="records", lines=True)
    batches = list(stream(path, fmt, ["label", "prediction"], ["label"], batch_bytes=SMALL))
    assert len(batches) > 1  # more than one batch: the file is never held whole
    assert all(list(b.columns) == ["label", "prediction"] for b in batches)
    whole = pd.concat(batches)
    assert whole.index.tolist() == list(range(len(data)))  # an item's default id is its row in the file
    assert whole["label"].tolist() == data["label"].tolist()
    assert whole["prediction"].tolist() == data["prediction"].tolist()


def test_json_lines_labels_keep_their_text_in_every_block(tmp_path):
    # pyarrow types a JSON block by its values: a date-like label would be a timestamp, integers in a block with a
    # null floats ('1.0' beside '1' elsewhere); a text column's block is then read as it is written.
    block = ReadBounds(header_bytes=1).block_bytes  # the smallest block a stream reads
    per_block = block // len('{"label":"2024-01-01","prediction":"2024-01-01"}\n') + 1
    lines = [{"label": "2024-01-01", "prediction": "2024-01-01"}] * per_block
    lines += [{"label": 1, "prediction": 1}] * per_block + [{"label": None, "prediction": 1}]
    lines += [{"label": 1, "prediction": 1}] * 4 * per_block
    path = tmp_path / "labels.jsonl"
    with path.open("w") as out:
        out.writelines(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
    read = DatasetStream(
        path,
        "jsonl",
        path.name,
        [],
        ["label", "prediction"],
        ["label", "prediction"],
        bounds=ReadBounds(header_bytes=1),
        batch_bytes=1,
    )
    batches = list(read)
    assert len(batches) > 2
    counter = ConfusionCounter()
    for batch in batches:
        counter.add(counter.classes(batch["label"]), counter.classes(batch["prediction"]))
    names = set(counter.names)  # one class each, whichever block it was read in (and the missing label's)
    assert {"1", "2024-01-01"} <= names and not names & {"1.0", "2024-01-01 00:00:00"}, names


def test_a_csv_column_whose_type_changes_after_the_first_block_fails_naming_it(tmp_path):
    path = tmp_path / "mixed.csv"
    rows = [f"{i},{i},yes" for i in range(80_000)] + ["x,not a number,no"]
    path.write_text("id,amount,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(InvalidArgument, match=r"column 'amount' holds values of more than one type"):
        list(stream(path, "csv", ["amount", "label"], ["label"]))
    # Read as text (a label column), the same values are classes like any other.
    assert pd.concat(stream(path, "csv", ["amount"], ["amount"]))["amount"].iloc[-1] == "not a number"


@pytest.mark.parametrize(
    ("name", "data", "rows"),
    [
        # a 2 MiB row: the count had read 1 MiB blocks (a raw ValueError), the stream reads 8 MiB ones
        ("long.csv", b"a,label\n" + b"x" * (2 << 20) + b",p\ny,n\n", 2),
        ("long.jsonl", b'{"a":"' + b"x" * (2 << 20) + b'","label":"p"}\n{"a":"y","label":"n"}\n', 2),
        # a latin-1 byte in a column the evaluation does not read (the count had read the first column as text)
        ("latin.csv", b"a,label\nx\xe9,p\ny,n\n", 2),
        # two records on one line, records split by a bare CR: lines counted 2, records read 3
        ("two.jsonl", b'{"a":"x","label":"p"} {"a":"q","label":"p"}\n{"a":"y","label":"n"}\n', 3),
        ("cr.jsonl", b'{"a":"x","label":"p"}\r{"a":"y","label":"n"}\n{"a":"z","label":"n"}\n', 3),
    ],
)
def test_an_exact_row_count_is_the_rows_the_stream_reads(tmp_path, name, data, rows):
    """A sample's rows are drawn from the count (runner.SampledFrames): a count of its own disagreed with the stream;
    now it is a pass of the stream over one of its columns."""
    path = tmp_path / name
    path.write_bytes(data)
    fmt = path.suffix[1:]
    read = DatasetStream(path, fmt, name, ["a", "label"] if fmt == "csv" else [], ["label"], ["label"])
    assert read.exact_rows() == sum(len(f) for f in read) == rows


def test_a_malformed_csv_fails_its_count_as_its_stream_does_naming_the_dataset(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_bytes(b"a,label\nx,p\ny,n,extra\n")
    read = DatasetStream(path, "csv", "ragged.csv", ["a", "label"], ["label"], ["label"])
    with pytest.raises(InvalidArgument, match=r"cannot read dataset 'ragged.csv' as CSV: CSV parse error"):
        read.exact_rows()


def test_a_json_lines_record_that_is_not_an_object_fails_naming_the_dataset(tmp_path):
    """pandas' reader (a block pyarrow refuses) raised a raw TypeError for a line holding an array."""
    path = tmp_path / "array.jsonl"
    path.write_bytes(b'{"a":"x","label":"p"}\n[1,2]\n{"a":"y","label":"n"}\n')
    read = DatasetStream(path, "jsonl", "array.jsonl", [], ["label"], ["label"])
    with pytest.raises(InvalidArgument, match=r"cannot read dataset 'array\.jsonl' as JSONL"):
        read.exact_rows()
    with pytest.raises(InvalidArgument, match=r"cannot read dataset 'array\.jsonl' as JSONL"):
        list(read)


def test_a_sample_whose_read_passes_its_count_fails_at_that_frame_naming_the_dataset():
    """A pass that reads more rows than were counted fails at the frame that passes the count, not at its end."""
    read = []

    def frames():
        for start in range(0, 100, 10):
            read.append(start)
            yield pd.DataFrame({"label": ["p"] * 10}, index=pd.RangeIndex(start, start + 10))

    sampled = SampledFrames(frames(), np.array([1, 5, 12]), 20, "data.csv")
    counted = r"'data\.csv': its rows were counted as 20 .* the read gave more than 20"
    with pytest.raises(InvalidArgument, match=counted):
        list(sampled)
    assert read == [0, 10, 20]
    short = SampledFrames(iter([pd.DataFrame({"label": ["p"]}, index=pd.RangeIndex(0, 1))]), np.array([0]), 2, "d")
    with pytest.raises(InvalidArgument, match="the count and the read disagree"):
        list(short)


def test_a_file_that_changes_while_it_is_read_fails_saying_so(tmp_path):
    path = tmp_path / "growing.csv"
    frame(60_000).to_csv(path, index=False)
    batches = iter(stream(path, "csv", ["label"], ["label"]))
    next(batches)
    with path.open("a") as out:
        out.write("1,more,class 1,class 1,0.5\n")
    with pytest.raises(InvalidArgument, match=r"changed while it was being read \(size"):
        list(batches)


# --- through a server ----------------------------------------------------------------------------------------


def assert_matches_sklearn(metrics: dict, data: pd.DataFrame) -> None:
    labels, predictions = normalised(data["label"]), normalised(data["prediction"])
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
async def test_an_evaluation_of_each_format_matches_scikit_learn(mcp_client, runtime, jp_root_dir, fmt):
    data = frame(3000)
    data.loc[::97, "label"] = None  # missing labels are the "na" class
    data.loc[::89, "prediction"] = "  CLASS 1 "  # normalised like any other
    path = jp_root_dir / f"data.{fmt}"
    if fmt == "csv":
        data.to_csv(path, index=False)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pandas(data, preserve_index=False), path, row_group_size=500)
    else:
        data.to_json(path, orient="records", lines=True)
    async with mcp_client() as client:
        started = await create(
            client, type="accuracy", dataset=f"data.{fmt}", label_column="label", prediction_column="prediction"
        )
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "COMPLETED", done["error_message"]
        assert done["processed_items"] == done["total_items"] == len(data)
        assert_matches_sklearn(done["metrics"]["score"], data)
        items = await all_results(client, started["evaluation_id"])
        assert [int(i["item_id"]) for i in items] == data["id"].tolist()
        assert [i["correct"] for i in items] == (normalised(data["label"]) == normalised(data["prediction"])).tolist()


async def test_a_label_column_of_mixed_types_is_text(mcp_client, runtime, jp_root_dir):
    labels = ["1", "2", "yes"] * 30_000  # numbers for more than a block, then words
    (jp_root_dir / "mixed.csv").write_text(
        "label,prediction\n"
        + "".join(
            f"{label},{label if i % 4 else '2'}\n" for i, label in enumerate(sorted(labels, key=lambda v: v == "yes"))
        )
    )
    data = pd.read_csv(jp_root_dir / "mixed.csv", dtype=str)
    async with mcp_client() as client:
        started = await create(
            client, type="accuracy", dataset="mixed.csv", label_column="label", prediction_column="prediction"
        )
        done = await finished(client, started["evaluation_id"])
    assert done["status"] == "COMPLETED", done["error_message"]
    assert done["metrics"]["score"]["labels"] == ["1", "2", "yes"]
    assert_matches_sklearn(done["metrics"]["score"], data)


async def test_a_thousand_classes_through_the_server(mcp_client, runtime, jp_root_dir):
    data = frame(20_000, classes=1000, seed=7)
    data.to_parquet(jp_root_dir / "many.parquet", index=False)
    async with mcp_client() as client:
        started = await create(
            client, type="accuracy", dataset="many.parquet", label_column="label", prediction_column="prediction"
        )
        done = await finished(client, started["evaluation_id"])
    assert done["status"] == "COMPLETED", done["error_message"]
    assert len(done["metrics"]["score"]["labels"]) == 1000
    assert_matches_sklearn(done["metrics"]["score"], data)


async def test_all_labels_missing_fails_clearly(mcp_client, runtime, jp_root_dir):
    (jp_root_dir / "nolabels.csv").write_text("text,label\n" + "".join(f"t{i},\n" for i in range(50)))
    async with mcp_client() as client:
        started = await create(
            client, type="accuracy", dataset="nolabels.csv", label_column="label", prediction_column="text"
        )
        done = await finished(client, started["evaluation_id"])
    assert done["status"] == "FAILED"
    assert done["error_message"] == (
        "label column 'label' has no labels: every value is missing or blank; pick "
        "the column that holds the correct labels"
    )


async def test_a_dataset_changed_while_evaluated_fails_and_says_so(mcp_client, runtime, jp_root_dir):
    path = jp_root_dir / "changing.csv"
    path.write_text("path,text,label\n" + "".join(f"{path},t{i},{'yes' if i % 2 else 'no'}\n" for i in range(20)))
    scorer = {"kind": "python", "function": "tests.arrow_scorer_functions:append_to_file", "input_column": "path"}
    async with mcp_client() as client:
        started = await create(client, type="accuracy", dataset="changing.csv", label_column="label", scorer=scorer)
        done = await finished(client, started["evaluation_id"])
    assert done["status"] == "FAILED"
    assert "changed while it was being read" in done["error_message"]
    assert "'changing.csv'" in done["error_message"]


async def test_a_scorer_annotated_with_arrow_gets_arrow(mcp_client, runtime, jp_root_dir):
    frame(500).to_csv(jp_root_dir / "texts.csv", index=False)
    async with mcp_client() as client:
        kind = await create(
            client,
            type="accuracy",
            dataset="texts.csv",
            label_column="label",
            scorer="python:tests.arrow_scorer_functions:arrow_kind",
        )
        words = await create(
            client,
            type="accuracy",
            dataset="texts.csv",
            label_column="label",
            scorer="python:tests.arrow_scorer_functions:arrow_first_word",
        )
        kind_done = await finished(client, kind["evaluation_id"])
        words_done = await finished(client, words["evaluation_id"])
        assert kind_done["status"] == words_done["status"] == "COMPLETED", (kind_done, words_done)
        assert kind_done["metrics"]["score"]["prediction_distribution"]["arrow"] == 500
        assert words_done["metrics"]["score"]["prediction_distribution"]["row"] == 500
        first = (
            await client.call_tool("get_evaluation_results", {"evaluation_id": kind["evaluation_id"], "limit": 1})
        ).structured_content
        assert first["items"][0]["prediction"] == "arrow"
        assert json.dumps(first)  # results stay JSON


async def test_long_texts_of_a_pandas_parquet_file_are_cut_in_the_results(mcp_client, runtime, jp_root_dir):
    """pandas' str columns are large_string in Arrow: the results' excerpt of a text longer than its bound is cut
    with the column's own string type (the join had no kernel for large_string beside string: the evaluation
    failed with ArrowNotImplementedError)."""
    data = pd.DataFrame({"text": ["word " * 100, "short"] * 50, "label": ["word", "short"] * 50}, dtype="str")
    data.to_parquet(jp_root_dir / "long.parquet", index=False)
    assert pq.read_schema(jp_root_dir / "long.parquet").field("text").type == pa.large_string()
    async with mcp_client() as client:
        started = await create(
            client,
            type="accuracy",
            dataset="long.parquet",
            label_column="label",
            scorer="python:tests.arrow_scorer_functions:arrow_first_word",
            input_column="text",
        )
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "COMPLETED", done["error_message"]
        assert done["metrics"]["score"]["accuracy"] == 1.0
        items = await all_results(client, started["evaluation_id"])
    inputs = [item["input"] for item in items]
    assert inputs[0] == ("word " * 100)[:199] + "…" and inputs[1] == "short"
    assert len(inputs) == 100
