"""An evaluation's items as Arrow (issue 15, item 3): REST's results as an Arrow IPC stream, the notebook's
`.results()` and `plexus evaluations export` read from it; all equal to the MCP pages. A real server, real HTTP,
the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import io
import os
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import requests

from plexus_mcp_jupyter.notebook import Plexus
from plexus_mcp_jupyter.notebook.client import PlexusClient
from plexus_mcp_jupyter.notebook.errors import PlexusNotFound

from .test_evaluations import all_results, create, finished

ARROW = "application/vnd.apache.arrow.stream"


async def finished_evaluation(mcp_client, jp_root_dir):
    """A finished evaluation of 5,000 rows (ids, some missing labels), and its items as the MCP pages give them,
    all and only the mismatches."""
    rng = np.random.default_rng(2)
    labels = rng.choice(np.array(["yes", "no", "maybe"], dtype=object), 5000)
    frame = pd.DataFrame(
        {
            "id": [f"item-{i}" for i in range(5000)],
            "text": [f"t {i}" for i in range(5000)],
            "label": labels,
            "prediction": np.where(rng.random(5000) < 0.7, labels, "no"),
        }
    )
    frame.loc[::101, "label"] = None
    frame.to_csv(jp_root_dir / "items.csv", index=False)
    async with mcp_client() as client:
        started = await create(
            client, type="accuracy", dataset="items.csv", label_column="label", prediction_column="prediction"
        )
        done = await finished(client, started["evaluation_id"])
        assert done["status"] == "COMPLETED", done["error_message"]
        pages = await all_results(client, started["evaluation_id"])
        mismatches = await all_results(client, started["evaluation_id"], only_mismatches=True)
    return started["evaluation_id"], pages, mismatches


def as_rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def arrow_get(server_url, token, evaluation_id, **params) -> requests.Response:
    return requests.get(
        f"{server_url}plexus/api/evaluations/{evaluation_id}/results",
        params=params,
        headers={"Authorization": f"token {token}", "Accept": ARROW},
        timeout=30,
    )


async def test_rest_results_as_arrow_equal_the_mcp_pages(server_url, token, mcp_client, runtime, jp_root_dir):
    evaluation_id, pages, mismatches = await finished_evaluation(mcp_client, jp_root_dir)
    answer = await asyncio.to_thread(arrow_get, server_url, token, evaluation_id)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == ARROW
    table = pa.ipc.open_stream(io.BytesIO(answer.content)).read_all()
    assert table.num_rows == len(pages) == 5000
    assert as_rows(table) == pages
    only = await asyncio.to_thread(arrow_get, server_url, token, evaluation_id, only_mismatches="true")
    assert as_rows(pa.ipc.open_stream(io.BytesIO(only.content)).read_all()) == mismatches


async def test_rest_arrow_errors_are_json_and_clear(server_url, token, mcp_client, runtime, jp_root_dir):
    evaluation_id, _pages, _ = await finished_evaluation(mcp_client, jp_root_dir)
    wrong = await asyncio.to_thread(arrow_get, server_url, token, evaluation_id, score="nope")
    assert wrong.status_code == 400 and "has no score 'nope'" in wrong.json()["error"]["message"]
    missing = await asyncio.to_thread(arrow_get, server_url, token, "0" * 8)
    assert missing.status_code == 404


async def test_notebook_results_equal_the_mcp_pages(server_url, token, mcp_client, runtime, jp_root_dir):
    evaluation_id, pages, mismatches = await finished_evaluation(mcp_client, jp_root_dir)
    plexus = Plexus()
    plexus._client = PlexusClient(server_url, token, check=False)
    try:
        handle = await asyncio.to_thread(plexus.evaluation, evaluation_id)
        whole = await asyncio.to_thread(handle.results)
        only = await asyncio.to_thread(handle.results, only_mismatches=True)
        first = await asyncio.to_thread(handle.results, limit=10)
        with pytest.raises(PlexusNotFound):
            await asyncio.to_thread(plexus.client.arrow_stream, "evaluations/nope/results", {})
    finally:
        plexus.close()
    assert len(whole) == 5000 and whole.index.tolist() == [p["seq"] for p in pages]
    assert whole["item_id"].tolist() == [p["item_id"] for p in pages]
    assert whole["correct"].tolist() == [p["correct"] for p in pages]
    assert whole["label"].astype(object).where(whole["label"].notna(), None).tolist() == [p["label"] for p in pages]
    assert only.index.tolist() == [p["seq"] for p in mismatches]
    pd.testing.assert_frame_equal(first, whole.iloc[:10])  # pages and Arrow give the same frame


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
async def test_the_cli_exports_the_items_as_parquet_or_csv(
    server_url, token, mcp_client, runtime, jp_root_dir, tmp_path, fmt
):
    evaluation_id, pages, _ = await finished_evaluation(mcp_client, jp_root_dir)
    output = tmp_path / f"out.{fmt}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_MCP_")}
    env |= {"PLEXUS_MCP_URL": server_url, "PLEXUS_MCP_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "plexus_mcp_jupyter.cli",
        "evaluations",
        "export",
        evaluation_id,
        "--format",
        fmt,
        "--output",
        str(output),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"5,000 items of evaluation {evaluation_id} written to {output}" in out.decode()
    if fmt == "parquet":
        table = pq.read_table(output)
    else:
        types = {
            "seq": pa.int64(),
            "correct": pa.bool_(),
            **{c: pa.string() for c in ("item_id", "input", "label", "prediction", "explanation", "error")},
        }
        table = pa_csv.read_csv(
            output, convert_options=pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True)
        )
    rows = as_rows(table)
    if fmt == "csv":  # CSV has no null string: an empty field reads back as missing
        pages = [{k: (None if v == "" else v) for k, v in p.items()} for p in pages]
    assert rows == pages
    assert not list(tmp_path.glob(".*.part"))  # written under a temporary name, renamed once complete

    bad = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "plexus_mcp_jupyter.cli",
        "evaluations",
        "export",
        evaluation_id,
        "--score",
        "nope",
        "--output",
        str(tmp_path / "bad.parquet"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await bad.communicate()
    assert bad.returncode != 0 and "has no score 'nope'" in err.decode() and "Traceback" not in err.decode()
    assert not (tmp_path / "bad.parquet").exists() and not list(tmp_path.glob(".*.part"))
