"""A large DataFrame registered in parts (issue 15, item 4): the notebook client sends Arrow IPC parts, one
bounded request each, and the server appends them to a Parquet file renamed into place once committed.
A real Jupyter server, the real notebook client over HTTP, and REST calls with real API keys."""

from __future__ import annotations

import asyncio

import httpx2
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from plexus_mcp_jupyter.notebook import PlexusInputError

from . import test_notebook_client

plexus = test_notebook_client.plexus  # the fixture: a Plexus connected to the test server

run = asyncio.to_thread


def frame_of(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": [f"review number {i}" for i in range(rows)],
            "label": [("yes", "no", "maybe")[i % 3] for i in range(rows)],
            "prediction": [("yes", "no", "maybe")[(i + (i % 7 == 0)) % 3] for i in range(rows)],
            # None throughout the first parts: its type comes from the whole frame, not from one part.
            "note": [None if i < 15_000 else f"n{i}" for i in range(rows)],
            "score": [i / 7 for i in range(rows)],
        }
    )


def said(answer: httpx2.Response) -> str:
    """An error answer's message (a 409 of the registry says it at the top level)."""
    body = answer.json()
    return str(body.get("message") or body["error"]["message"])


def arrow_part(frame: pd.DataFrame) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


async def test_a_frame_larger_than_a_part_is_registered_in_parts_and_evaluates(plexus, runtime):
    frame = frame_of(30_000)
    plexus.upload_part_bytes = 300_000  # about a tenth of the frame in memory
    info = await run(plexus.register_dataset, "parts", frame)
    assert info["rows"] == 30_000 and info["ref"] == "registered:parts"
    stored = runtime.catalog.registered_dir / "parts.parquet"
    assert pq.ParquetFile(stored).metadata.num_row_groups > 5  # a row group per part
    pd.testing.assert_frame_equal(pd.read_parquet(stored), frame)
    assert not list((runtime.catalog.registered_dir / ".uploads").iterdir())  # nothing left behind
    # evaluate(df) of a large frame goes the same way, under a name from the frame's content.
    evaluation = await run(plexus.evaluate, frame, None, "label", "prediction")
    assert evaluation.view["dataset"].startswith("registered:nb-")
    done = await run(evaluation.result, 60)
    assert done["status"] == "COMPLETED", done
    expected = (frame["label"] == frame["prediction"]).mean()
    assert done["metrics"]["score"]["accuracy"] == pytest.approx(expected)


async def test_parts_are_checked_and_an_upload_is_its_callers_alone(server_url, keys, runtime):
    api = f"{server_url}plexus/api/datasets/uploads"
    mine = {"Authorization": f"Bearer {keys['operator']}"}
    theirs = {"Authorization": f"Bearer {keys['operator2']}"}
    frame = frame_of(20)
    async with httpx2.AsyncClient() as http:
        began = await http.post(api, params={"name": "checked"}, headers=mine)
        assert began.status_code == 201, began.text
        upload = f"{api}/{began.json()['upload_id']}"
        empty = await http.post(upload, headers=mine)
        assert empty.status_code == 400 and "has no rows" in said(empty)

        began = await http.post(api, params={"name": "checked"}, headers=mine)
        upload = f"{api}/{began.json()['upload_id']}"
        skipped = await http.put(upload, params={"part": "1"}, content=arrow_part(frame), headers=mine)
        assert skipped.status_code == 400 and "expects part 0, not 1" in said(skipped)
        garbage = await http.put(upload, params={"part": "0"}, content=b"not arrow", headers=mine)
        assert garbage.status_code == 400 and "not an Arrow IPC stream" in said(garbage)
        first = await http.put(upload, params={"part": "0"}, content=arrow_part(frame[:10]), headers=mine)
        assert first.status_code == 200 and first.json()["rows"] == 10, first.text
        other = await http.put(upload, params={"part": "1"}, content=arrow_part(frame[["text"]][10:]), headers=mine)
        assert other.status_code == 400 and "not those of part 0" in said(other)
        # Another caller cannot see it, add to it, register or abandon it.
        for method in ("PUT", "POST", "DELETE"):
            answer = await http.request(
                method, upload, params={"part": "1"}, content=arrow_part(frame[10:]), headers=theirs
            )
            assert answer.status_code == 404, (method, answer.text)
        second = await http.put(upload, params={"part": "1"}, content=arrow_part(frame[10:]), headers=mine)
        assert second.status_code == 200 and second.json()["rows"] == 20
        done = await http.post(upload, headers=mine)
        assert done.status_code == 201 and done.json()["rows"] == 20, done.text
        taken = await http.post(api, params={"name": "checked"}, headers=mine)
        assert taken.status_code == 409 and "replace=true" in said(taken)
        not_theirs = await http.post(api, params={"name": "checked", "replace": "true"}, headers=theirs)
        assert not_theirs.status_code == 403

        opened = [await http.post(api, params={"name": f"open{i}"}, headers=mine) for i in range(5)]
        assert [a.status_code for a in opened] == [201, 201, 201, 201, 400]
        assert "4 uploads in progress already" in said(opened[-1])
        for answer in opened[:4]:
            assert (await http.delete(f"{api}/{answer.json()['upload_id']}", headers=mine)).status_code == 204

        runtime.uploads.max_bytes = 4096
        began = await http.post(api, params={"name": "big"}, headers=mine)
        upload = f"{api}/{began.json()['upload_id']}"
        big = await http.put(upload, params={"part": "0"}, content=arrow_part(frame_of(2000)), headers=mine)
        assert big.status_code == 413 and "max_dataset_upload_bytes" in said(big)  # (refused from its size, unread)
        gone = await http.put(upload, params={"part": "0"}, content=arrow_part(frame), headers=mine)
        assert gone.status_code == 404
    assert pd.read_parquet(runtime.catalog.registered_dir / "checked.parquet").equals(frame)
    assert not list((runtime.catalog.registered_dir / ".uploads").iterdir())
    assert "big" not in runtime.catalog.registered_names()


async def test_the_client_refuses_a_frame_past_the_servers_bound_before_sending_it(plexus, runtime):
    runtime.uploads.max_bytes = 10_000
    plexus.upload_part_bytes = 5_000
    with pytest.raises(PlexusInputError, match="max_dataset_upload_bytes"):
        await run(plexus.register_dataset, "refused", frame_of(2000))
    assert "refused" not in runtime.catalog.registered_names()
    assert not list((runtime.catalog.registered_dir / ".uploads").iterdir())


async def test_a_body_s_query_is_read_once_before_the_body(server_url, keys, runtime, monkeypatch):
    """A registration's and an upload part's query (name, replace, part) were read by `admit_request` before the body
    and again by the method once it had come: read once now (the method uses what `admit_request` read), with the same
    refusals of a bad argument."""
    from plexus_mcp_jupyter.handlers.base import PlexusHandler

    read: list[str] = []
    query_request = PlexusHandler.query_request

    def counted(self: PlexusHandler, model: type, **given: object) -> object:
        read.append(model.__name__)
        return query_request(self, model, **given)

    monkeypatch.setattr(PlexusHandler, "query_request", counted)
    api = f"{server_url}plexus/api/datasets"
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {keys['operator']}"}, timeout=60) as http:
        body = arrow_part(frame_of(10))
        began = await http.post(f"{api}/uploads", params={"name": "once"})
        assert began.status_code == 201, began.text
        upload = f"{api}/uploads/{began.json()['upload_id']}"
        read.clear()
        sent = await http.put(upload, params={"part": "0"}, content=body)
        assert sent.status_code == 200 and read == ["UploadPart"], (sent.text, read)
        bad = await http.put(upload, params={"part": "-1"}, content=body)
        assert bad.status_code == 400 and "part" in said(bad), bad.text
        read.clear()
        parquet = pa.BufferOutputStream()
        pq.write_table(pa.table({"label": ["a", "b"]}), parquet)
        registered = await http.post(
            api,
            params={"name": "once2"},
            content=parquet.getvalue().to_pybytes(),
            headers={"Content-Type": "application/vnd.apache.parquet"},
        )
        assert registered.status_code == 201 and read == ["RegisterDataset"], (registered.text, read)
        bad = await http.post(
            api, params={"name": "bad name"}, content=b"x", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400 and "invalid registered dataset name" in said(bad), bad.text
