"""The notebook's `.results()` straight from the item files when the kernel sees them (issue 15, item 3): the
owner-only manifest over REST, the files read with the same filters as the server's pages, and the Arrow stream
when the files are not visible here. A real server, real HTTP, API keys; nothing mocked."""

from __future__ import annotations

import asyncio
import base64
import os

import pandas as pd
import pyarrow as pa
import pytest
import requests

from plexus_mcp_jupyter.evaluations.item_files import read_listed
from plexus_mcp_jupyter.notebook import Plexus
from plexus_mcp_jupyter.notebook.client import PlexusClient

from .conftest import poll
from .test_arrow_results import finished_evaluation
from .test_evaluations import all_results


def manifest_get(server_url, credential, evaluation_id, **params) -> requests.Response:
    return requests.get(
        f"{server_url}plexus/api/evaluations/{evaluation_id}/items/manifest",
        params=params,
        headers={"Authorization": f"Bearer {credential}"},
        timeout=30,
    )


def results_of(server_url, credential, evaluation_id, path_map=None, **filters) -> pd.DataFrame:
    plexus = Plexus()
    plexus._client = PlexusClient(server_url, credential, check=False)
    plexus._client.items_path_map = path_map
    try:
        return plexus.evaluation(evaluation_id).results(**filters)
    finally:
        plexus.close()


def as_pages(frame: pd.DataFrame) -> list[dict]:
    """A results frame as the MCP pages' items (seq back as a field, missing values as None)."""
    out = frame.reset_index().astype(object)
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in out.to_dict("records")]


FILTERS = [{}, {"only_mismatches": True}, {"label": "Yes "}, {"only_mismatches": True, "label": "maybe"}]


async def test_results_read_the_files_when_the_kernel_sees_them_and_equal_the_pages(
    server_url, token, mcp_client, runtime, jp_root_dir, tmp_path
):
    evaluation_id, _pages, _ = await finished_evaluation(mcp_client, jp_root_dir)
    root = str(runtime.evaluations.store.files.root)
    os.symlink(root, tmp_path / "mounted")  # the same volume, mounted elsewhere in the kernel's container
    for filters in FILTERS:
        async with mcp_client() as client:
            arguments = {"only_mismatches": filters.get("only_mismatches", False)}
            pages = await all_results(
                client, evaluation_id, **arguments, **({"label": filters["label"]} if "label" in filters else {})
            )
        direct = await asyncio.to_thread(results_of, server_url, token, evaluation_id, **filters)
        mounted = await asyncio.to_thread(
            results_of, server_url, token, evaluation_id, (root, str(tmp_path / "mounted")), **filters
        )
        # Not visible here (another machine's disk): the same frame over the Arrow stream.
        elsewhere = await asyncio.to_thread(
            results_of, server_url, token, evaluation_id, (root, str(tmp_path / "not-mounted")), **filters
        )
        assert direct.attrs["read_from"] == mounted.attrs["read_from"] == "files", filters
        assert elsewhere.attrs["read_from"] == "server", filters
        assert pages and as_pages(direct) == pages, filters
        pd.testing.assert_frame_equal(direct, elsewhere)
        pd.testing.assert_frame_equal(mounted, elsewhere)


async def test_a_file_changed_since_the_listing_is_not_read_from_disk(
    server_url, token, mcp_client, runtime, jp_root_dir
):
    evaluation_id, pages, _ = await finished_evaluation(mcp_client, jp_root_dir)
    manifest = (await asyncio.to_thread(manifest_get, server_url, token, evaluation_id)).json()
    assert manifest["files"] and all(os.path.isabs(f["path"]) for f in manifest["files"])
    assert sum(f["end_seq"] - f["first_seq"] for f in manifest["files"]) == len(pages)
    changed = [dict(f) for f in manifest["files"]]
    changed[-1]["mtime_ns"] -= 1  # as a re-run since the listing would leave it
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest["schema"])))
    assert read_listed(changed, only_mismatches=False, label=None, schema=schema) is None
    whole = read_listed(manifest["files"], only_mismatches=False, label=None, schema=schema)
    assert whole.to_pylist() == pages


async def test_the_manifest_is_only_for_the_owner_or_an_admin(
    server_url, token, keys, mcp_client, runtime, jp_root_dir
):
    root = str(runtime.evaluations.store.files.root)
    (jp_root_dir / "mine.csv").write_text("text,label,prediction\n" + "a,x,x\nb,y,x\n" * 50)
    made = await asyncio.to_thread(
        requests.post,
        f"{server_url}plexus/api/evaluations",
        json={"type": "accuracy", "dataset": "mine.csv", "label_column": "label", "prediction_column": "prediction"},
        headers={"Authorization": f"Bearer {keys['operator']}"},
        timeout=30,
    )
    assert made.status_code == 201, made.text
    key_evaluation = made.json()["evaluation_id"]

    async def status():
        answer = await asyncio.to_thread(
            requests.get,
            f"{server_url}plexus/api/evaluations/{key_evaluation}",
            headers={"Authorization": f"Bearer {keys['operator']}"},
            timeout=30,
        )
        return answer.json()["status"]

    assert await poll(status, lambda s: s in ("COMPLETED", "FAILED", "CANCELLED"), timeout=60) == "COMPLETED"
    notebook_evaluation, _pages, _ = await finished_evaluation(mcp_client, jp_root_dir)

    for credential, evaluation_id in ((keys["operator"], key_evaluation), (keys["admin"], key_evaluation)):
        answer = await asyncio.to_thread(manifest_get, server_url, credential, evaluation_id)
        assert answer.status_code == 200 and answer.json()["files"][0]["path"].startswith(root)
    # Another key: not even the evaluation (404); the notebook user's evaluation, which it may read: 403.
    hidden = await asyncio.to_thread(manifest_get, server_url, keys["operator2"], key_evaluation)
    assert hidden.status_code == 404
    denied = await asyncio.to_thread(manifest_get, server_url, keys["operator2"], notebook_evaluation)
    assert denied.status_code == 403 and "only to its owner or an admin" in denied.json()["error"]["message"]
    for answer in (hidden, denied):
        assert root not in answer.text and "chunk-" not in answer.text

    # Its `.results()` then comes over the Arrow stream, equal to the owner's read from the files.
    other = await asyncio.to_thread(results_of, server_url, keys["operator2"], notebook_evaluation)
    own = await asyncio.to_thread(results_of, server_url, token, notebook_evaluation)
    assert other.attrs["read_from"] == "server" and own.attrs["read_from"] == "files"
    pd.testing.assert_frame_equal(other, own)


@pytest.mark.parametrize("filters", [{"score": "nope"}])
async def test_a_bad_filter_is_refused_clearly_on_either_path(
    server_url, token, mcp_client, runtime, jp_root_dir, filters
):
    evaluation_id, _pages, _ = await finished_evaluation(mcp_client, jp_root_dir)
    answer = await asyncio.to_thread(manifest_get, server_url, token, evaluation_id, **filters)
    assert answer.status_code == 400 and "has no score 'nope'" in answer.json()["error"]["message"]
