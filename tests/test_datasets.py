"""Datasets: files under the root (confined), registered frames, shipped examples, sampling."""

from __future__ import annotations

import os
import threading
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from plexus_mcp_jupyter.core.errors import InvalidArgument, NotFound
from plexus_mcp_jupyter.evaluations import sampling
from plexus_mcp_jupyter.evaluations.datasets import DatasetCatalog, confine_path, parse_ref, require_columns
from plexus_mcp_jupyter.evaluations.examples import make_examples
from plexus_mcp_jupyter.evaluations.sampling import sample_frame, sample_positions

FRAME = pd.DataFrame({"id": ["a", "b", "c"], "text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]})


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def catalog(root, tmp_path):
    return DatasetCatalog(root, tmp_path / "registered")


# --- refs and path confinement -------------------------------------------------------------------------------


def test_refs_name_their_source():
    assert (parse_ref("example:sentiment").source, parse_ref("example:sentiment").name) == ("example", "sentiment")
    assert parse_ref("registered:mine").source == "registered"
    assert parse_ref("data/x.csv") == parse_ref("file:data/x.csv")
    assert parse_ref("file:example:odd.csv").name == "example:odd.csv"
    assert str(parse_ref("file:example:odd.csv")) == "file:example:odd.csv"  # round-trips unambiguously


@pytest.mark.parametrize("ref", ["", "  ", "example:", "registered:", "file:"])
def test_an_empty_ref_or_name_is_refused_with_the_allowed_forms(ref):
    with pytest.raises(InvalidArgument, match="example:<name>"):
        parse_ref(ref)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("../outside.csv", "contains '..'"),
        ("data/../../outside.csv", "contains '..'"),
        ("/etc/passwd.csv", "is absolute"),
        ("~/x.csv", "is absolute"),
        (".git/config.csv", "hidden part '.git'"),
        ("data/.secret.csv", "hidden part '.secret.csv'"),
    ],
)
def test_paths_that_leave_the_root_or_are_hidden_are_refused(catalog, path, why):
    with pytest.raises(InvalidArgument, match=why):
        catalog.load(path)


def test_a_symlink_escaping_the_root_is_refused(catalog, root, tmp_path):
    FRAME.to_csv(tmp_path / "outside.csv", index=False)
    (root / "link.csv").symlink_to(tmp_path / "outside.csv")
    (root / "linkdir").symlink_to(tmp_path)
    with pytest.raises(InvalidArgument, match="outside the Jupyter root"):
        catalog.load("link.csv")
    with pytest.raises(InvalidArgument, match="outside the Jupyter root"):
        catalog.load("linkdir/outside.csv")


def test_a_symlink_inside_the_root_is_followed(catalog, root):
    (root / "data").mkdir()
    FRAME.to_csv(root / "data" / "real.csv", index=False)
    (root / "alias.csv").symlink_to(root / "data" / "real.csv")
    assert catalog.load("alias.csv").equals(catalog.load("data/real.csv"))


def test_confine_path_returns_the_real_path(root):
    (root / "a").mkdir()
    assert confine_path(root, "a/b.csv") == (root / "a" / "b.csv").resolve()


# --- files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d.csv", "d.parquet", "d.pq", "d.jsonl", "d.ndjson", "sub/D.CSV"])
def test_every_file_format_loads_the_same_frame(catalog, root, name):
    path = root / name
    path.parent.mkdir(exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        FRAME.to_csv(path, index=False)
    elif suffix in {".parquet", ".pq"}:
        FRAME.to_parquet(path, index=False)
    else:
        FRAME.to_json(path, orient="records", lines=True)
    loaded = catalog.load(name)
    assert loaded.to_dict("records") == FRAME.to_dict("records")
    assert isinstance(loaded.index, pd.RangeIndex)


def test_load_can_select_columns_in_order(catalog, root):
    FRAME.to_parquet(root / "d.parquet")
    assert list(catalog.load("d.parquet", columns=["label", "id"]).columns) == ["label", "id"]
    with pytest.raises(InvalidArgument, match=r"'nope' not found; the columns are: id, text, label"):
        catalog.load("d.parquet", columns=["id", "nope"])


def test_a_missing_file_is_not_found(catalog):
    with pytest.raises(NotFound, match=r"no dataset file 'missing\.csv'"):
        catalog.load("missing.csv")


def test_an_unsupported_extension_lists_the_supported_ones(catalog, root):
    (root / "d.xlsx").write_text("x")
    with pytest.raises(InvalidArgument, match=r"unsupported extension '\.xlsx'; supported: \.csv, \.parquet"):
        catalog.load("d.xlsx")


def test_a_folder_is_not_a_dataset(catalog, root):
    (root / "dir.csv").mkdir()
    with pytest.raises(InvalidArgument, match="is a folder"):
        catalog.load("dir.csv")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "is empty"),
        ("header.csv", "id,text,label\n", "has no rows"),
        ("bad.jsonl", '{"a": 1}\n{oops\n', "cannot read dataset 'bad.jsonl' as JSONL: "),
        ("bad.parquet", "not parquet at all", "cannot read dataset 'bad.parquet' as PARQUET: "),
        ("ragged.csv", 'a,b\n1,2\n3,4,5,6\n"unterminated\n', "cannot read dataset 'ragged.csv' as CSV: "),
        ("latin.csv", b"a\n\xff\xfe\n", "cannot read dataset 'latin.csv' as CSV: "),
    ],
)
def test_unreadable_or_empty_files_say_why_in_one_line(catalog, root, name, content, message):
    path = root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(InvalidArgument, match=message) as caught:
        catalog.load(name)
    assert "\n" not in str(caught.value)


# --- registered frames ---------------------------------------------------------------------------------------


def test_a_registered_frame_loads_back(catalog):
    info = catalog.register("mine", FRAME)
    assert (info.ref, info.source, info.rows) == ("registered:mine", "registered", 3)
    assert catalog.load("registered:mine").equals(FRAME)


def test_a_bare_name_is_a_path_not_a_registered_name(catalog):
    catalog.register("mine.csv", FRAME)
    with pytest.raises(NotFound, match="no dataset file"):
        catalog.load("mine.csv")


def test_a_named_index_becomes_a_column_and_an_unnamed_one_is_dropped(catalog):
    catalog.register("named", FRAME.set_index("id"))
    catalog.register("unnamed", FRAME.iloc[[2, 0]])
    assert list(catalog.load("registered:named").columns) == ["id", "text", "label"]
    unnamed = catalog.load("registered:unnamed")
    assert list(unnamed["id"]) == ["c", "a"] and list(unnamed.index) == [0, 1]


def test_a_taken_name_is_refused_unless_replaced(catalog):
    catalog.register("mine", FRAME)
    with pytest.raises(InvalidArgument, match="already registered as 'mine'; pass replace=True"):
        catalog.register("mine", FRAME.head(1))
    catalog.register("mine", FRAME.head(1), replace=True)
    assert len(catalog.load("registered:mine")) == 1


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "x" * 65, "sp ace", "é"])
def test_registered_names_are_checked(catalog, name):
    with pytest.raises(InvalidArgument, match="invalid registered dataset name"):
        catalog.register(name, FRAME)


def test_frames_that_cannot_be_stored_are_refused_and_leave_nothing(catalog, tmp_path):
    catalog.register("good", FRAME)
    with pytest.raises(InvalidArgument, match="has no rows"):
        catalog.register("empty", FRAME.head(0))
    with pytest.raises(InvalidArgument, match="duplicate column names"):
        catalog.register("dups", pd.DataFrame([[1, 2]], columns=["a", "a"]))
    with pytest.raises(InvalidArgument, match="cannot store DataFrame 'mixed' as Parquet"):
        catalog.register("mixed", pd.DataFrame({"a": [1, "x", object()]}))
    # No half-written or temporary file: the dataset, its owner (none: "") and the registrations' lock.
    assert sorted(os.listdir(tmp_path / "registered")) == [".admit.lock", ".good.owner", "good.parquet"]


def test_registration_is_atomic_for_readers(catalog, monkeypatch):
    catalog.register("mine", FRAME)
    big = pd.concat([FRAME] * 2000, ignore_index=True)
    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(len(catalog.load("registered:mine")))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(10):
        catalog.register("mine", big, replace=True)
        catalog.register("mine", FRAME, replace=True)
    stop.set()
    reader.join()
    assert seen and set(seen) <= {3, 6000}  # always a whole frame, never an error or a partial one


def test_concurrent_registrations_of_a_new_name_have_one_winner(catalog):
    outcomes: list[str] = []

    def register(rows: int) -> None:
        try:
            catalog.register("race", FRAME.head(rows))
            outcomes.append("ok")
        except InvalidArgument:
            outcomes.append("taken")

    threads = [threading.Thread(target=register, args=(1 + i % 3,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") == 1


def test_unregister_removes_a_dataset(catalog):
    catalog.register("mine", FRAME)
    catalog.unregister("mine")
    with pytest.raises(NotFound, match="no registered dataset 'mine'; registered: none yet"):
        catalog.load("registered:mine")
    with pytest.raises(NotFound):
        catalog.unregister("mine")


# --- examples ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rows", "classes"), [("sentiment", 200, 2), ("topics", 300, 5), ("fraud", 500, 2)])
def test_examples_load_and_describe(catalog, name, rows, classes):
    info = catalog.describe(f"example:{name}")
    assert (info.source, info.rows, info.label_column, info.label_classes) == ("example", rows, "label", classes)
    df = catalog.load(f"example:{name}")
    assert {"id", "text", "label", "prediction"} <= set(df.columns)
    accuracy = (df["label"] == df["prediction"]).mean()
    assert 0.7 < accuracy < 1.0  # plausible but imperfect predictions


def test_the_fraud_example_is_imbalanced(catalog):
    info = catalog.describe("example:fraud")
    counts = dict(info.label_distribution or ())
    assert 0.03 < counts["fraud"] / info.rows < 0.08  # type: ignore[operator]


def test_the_example_files_are_what_the_committed_script_writes(tmp_path):
    make_examples.main(tmp_path)
    for name in ("sentiment", "topics", "fraud"):
        shipped = (make_examples.HERE / f"{name}.csv").read_bytes()
        assert (tmp_path / f"{name}.csv").read_bytes() == shipped


def test_an_unknown_example_lists_the_examples(catalog):
    with pytest.raises(NotFound, match="example:fraud, example:sentiment, example:topics"):
        catalog.load("example:nope")


# --- describe and list ---------------------------------------------------------------------------------------


def test_describe_reports_columns_and_a_chosen_label_column(catalog, root):
    FRAME.to_csv(root / "d.csv", index=False)
    info = catalog.describe("d.csv", label_column="text")
    data = info.to_dict()
    assert data["rows"] == 3 and data["source"] == "file" and data["size_bytes"] > 0
    assert [c["name"] for c in data["columns"]] == ["id", "text", "label"]
    assert data["label_column"] == "text" and data["label_classes"] == 3
    with pytest.raises(InvalidArgument, match="label column 'nope' not found"):
        catalog.describe("d.csv", label_column="nope")


def test_the_label_distribution_keeps_the_top_20_and_counts_missing(catalog):
    labels = [f"c{i:02d}" for i in range(30)] * 2 + ["c00"] * 5 + [None]
    catalog.register("many", pd.DataFrame({"label": labels}))
    info = catalog.describe("registered:many")
    assert info.label_classes == 31 and len(info.label_distribution or ()) == 20
    assert (info.label_distribution or ())[0] == ("c00", 7)
    assert catalog.describe("registered:many", label_column=None).label_column == "label"


def test_list_gives_examples_registered_and_files(catalog, root):
    catalog.register("mine", FRAME)
    (root / "a" / "b").mkdir(parents=True)
    FRAME.to_parquet(root / "a" / "b" / "deep.parquet")
    pd.DataFrame({"x": range(250)}).to_csv(root / "big.csv", index=False)
    pd.DataFrame({"x": range(250)}).to_json(root / "big.jsonl", orient="records", lines=True)
    for skipped in (".git", "node_modules", ".ipynb_checkpoints"):
        (root / skipped).mkdir()
        FRAME.to_csv(root / skipped / "hidden.csv", index=False)
    (root / "notes.txt").write_text("not data")
    (root / "broken.csv").write_text("")
    listed = {info.ref: info for info in catalog.list()}
    assert set(listed) == {
        "example:fraud",
        "example:sentiment",
        "example:topics",
        "registered:mine",
        "a/b/deep.parquet",
        "big.csv",
        "big.jsonl",
        "broken.csv",
    }
    assert listed["a/b/deep.parquet"].rows == 3
    assert listed["big.csv"].rows == 250 and listed["big.jsonl"].rows == 250
    assert listed["broken.csv"].error and "empty" in listed["broken.csv"].error
    assert listed["registered:mine"].rows == 3 and listed["example:topics"].label_distribution is None
    assert [i.source for i in catalog.list(include_files=False)] == ["example"] * 3 + ["registered"]
    assert len(catalog.list(limit=2)) == 2


def test_list_does_not_count_rows_of_huge_text_files(catalog, root, monkeypatch):
    from plexus_mcp_jupyter.evaluations import datasets

    monkeypatch.setattr(datasets, "COUNT_LINES_MAX_BYTES", 100)
    pd.DataFrame({"x": range(250)}).to_csv(root / "big.csv", index=False)
    (info,) = catalog.list(limit=10)[3:]
    assert info.ref == "big.csv" and info.rows is None and info.columns[0].name == "x"


def test_list_stops_at_the_depth_bound(catalog, root, monkeypatch):
    from plexus_mcp_jupyter.evaluations import datasets

    monkeypatch.setattr(datasets, "WALK_MAX_DEPTH", 2)
    deep = root / "1" / "2" / "3"
    deep.mkdir(parents=True)
    FRAME.to_csv(root / "1" / "2" / "shallow.csv", index=False)
    FRAME.to_csv(deep / "deep.csv", index=False)
    refs = [info.ref for info in catalog.list() if info.source == "file"]
    assert refs == ["1/2/shallow.csv"]


def test_require_columns_names_the_missing_and_the_existing_columns():
    wide = pd.DataFrame({f"col{i}": [1] for i in range(30)})
    with pytest.raises(
        InvalidArgument,
        match=r"input column 'text' not found; the columns are: col0, col1, .*"
        r"col19, \.\.\. \(10 more\)",
    ):
        require_columns(wide, "col0", "text", what="input column")
    require_columns(wide, "col0", "col29")


# --- sampling -------------------------------------------------------------------------------------------------

NUMBERS = pd.DataFrame({"x": range(100)})


def test_a_sample_is_reproducible_and_keeps_order_and_index():
    first = sample_frame(NUMBERS, n=10, seed=3)
    assert first.equals(sample_frame(NUMBERS, n=10, seed=3))
    assert len(first) == 10 and list(first.index) == sorted(first.index) and list(first["x"]) == list(first.index)
    assert not first.equals(sample_frame(NUMBERS, n=10, seed=4))
    assert len(sample_frame(NUMBERS, fraction=0.25, seed=1)) == 25


@pytest.mark.parametrize("hypergeometric_max", [10**9, 2_000], ids=["hypergeometric", "binomial"])
def test_a_large_population_is_drawn_chunk_by_chunk_exactly_and_uniformly(monkeypatch, hypergeometric_max):
    monkeypatch.setattr(sampling, "WHOLE_DRAW_ROWS", 1_000)
    monkeypatch.setattr(sampling, "_HYPERGEOMETRIC_MAX", hypergeometric_max)
    positions = sample_positions(10_500, n=4_000, seed=7)
    assert positions is not None and len(positions) == 4_000 and len(set(positions.tolist())) == 4_000
    assert positions.tolist() == sorted(positions.tolist()) and positions[0] >= 0 and positions[-1] < 10_500
    shares = np.bincount(positions // 1_000, minlength=11)
    assert all(300 <= share <= 460 for share in shares[:10]) and 100 <= shares[10] <= 250  # ~381 a chunk, ~190
    assert positions.tolist() == sample_positions(10_500, n=4_000, seed=7).tolist()
    every = sample_positions(10_500, fraction=0.999, seed=1)
    assert every is not None and len(set(every.tolist())) == 10_489


def test_a_sample_of_a_large_population_holds_the_sample_and_one_chunk_not_every_row():
    # 5e7 rows, 2e6 drawn: in one go numpy permutes every row (400 MB); chunk by chunk ~134 MB at most.
    tracemalloc.start()
    try:
        positions = sample_positions(50_000_000, n=2_000_000, seed=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert positions is not None and len(positions) == 2_000_000 and len(np.unique(positions)) == 2_000_000
    assert peak < 250 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_n_above_the_row_count_takes_every_row():
    assert sample_frame(NUMBERS, n=1000).equals(NUMBERS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of n"),
        ({"n": 5, "fraction": 0.5}, "exactly one of n"),
        ({"n": 0}, "at least 1"),
        ({"n": True}, "whole number"),
        ({"fraction": 0}, "above 0 and at most 1"),
        ({"fraction": 1.5}, "above 0 and at most 1"),
        ({"n": 3, "seed": -1}, "seed must be"),
        ({"fraction": 0.001}, "selects no rows"),
    ],
)
def test_bad_sample_settings_are_refused(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        sample_frame(NUMBERS, **kwargs)


def test_json_lines_columns_named_like_dates_keep_their_values(catalog, root):
    """pandas 2's read_json converted columns named like dates ("date", "modified", "*_at"...) to timestamps (a
    "modified" column of integers too) unless told not to: a listing, a describe and a load read them as given, as an
    evaluation's stream did already (pandas 3 converts none without dtype)."""
    (root / "dated.jsonl").write_text(
        '{"date": "2020-01-01", "modified": 1600000000, "created_at": "yes", "label": "a"}\n'
        '{"date": "2021-02-03", "modified": 1600000001, "created_at": "no", "label": "b"}\n'
    )
    kinds = {column.name: column.dtype for column in catalog.describe("dated.jsonl").columns}
    assert not any("datetime" in kind for kind in kinds.values()), kinds
    listed = next(info for info in catalog.list() if info.name == "dated.jsonl")
    assert not any("datetime" in column.dtype for column in listed.columns), listed
    df = catalog.load("dated.jsonl")
    assert df["date"].tolist() == ["2020-01-01", "2021-02-03"]
    assert df["modified"].tolist() == [1600000000, 1600000001]
    assert df["created_at"].tolist() == ["yes", "no"]


def test_json_lines_integer_labels_with_a_null_read_as_they_are_written(catalog, root):
    """A JSON Lines block whose integer labels have a null is read by pandas (pyarrow types them as numbers, not text),
    which made them floats: labels "1.0" and "0.0" in the evaluation's items and in a describe, where a CSV's are "1"
    and "0". The fallback keeps a text column's values as the file writes them."""
    (root / "ints.jsonl").write_text(
        "".join(f'{{"text": "t{i}", "label": {"null" if i % 5 == 0 else i % 2}}}\n' for i in range(100))
    )
    (root / "ints.csv").write_text(
        "text,label\n" + "".join(f"t{i},{'' if i % 5 == 0 else i % 2}\n" for i in range(100))
    )
    for ref in ("ints.jsonl", "ints.csv"):
        assert dict(catalog.describe(ref).label_distribution or ()) == {"1": 40, "0": 40, None: 20}, ref
        labels = [value for frame in catalog.stream(ref, ["label"], ["label"]) for value in frame["label"]]
        assert [None if pd.isna(value) else value for value in labels[:4]] == [None, "1", "0", "1"], (ref, labels[:4])
