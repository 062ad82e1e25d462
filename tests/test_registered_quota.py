"""The per-principal quota on registered bytes (issue 15, item 4): an API key's registered datasets may not
pass max_registered_bytes_per_principal, whether sent as one body or in parts (checked at begin when the size
is declared, and on the file's bytes before it is placed); the error says the quota, the use and how to free
it; deleting a dataset frees it; another key is not affected. A real server, REST, real API keys."""

from __future__ import annotations

import io
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pandas as pd
import pytest

from plexus_mcp_jupyter.core.errors import Forbidden
from plexus_mcp_jupyter.evaluations.datasets import DatasetCatalog

from .raw_http import answer_before_body, chunked_answer
from .test_eval_uploads import arrow_part, said

QUOTA = 100_000


@pytest.fixture
def plexus_config(plexus_config) -> dict[str, Any]:
    return {**plexus_config, "max_registered_bytes_per_principal": QUOTA}


def frame(rows: int = 1000) -> pd.DataFrame:
    """About 36 KB as Parquet: random text does not compress."""
    return pd.DataFrame({"text": [uuid.uuid4().hex for _ in range(rows)], "label": ["yes", "no"] * (rows // 2)})


def parquet(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    return buffer.getvalue()


async def test_a_key_past_its_quota_is_refused_clearly_and_another_is_not(server_url, keys, runtime):
    registered = runtime.catalog.registered_dir
    api = f"{server_url}plexus/api/datasets"

    def as_key(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]}", "Content-Type": "application/vnd.apache.parquet"}

    async with httpx2.AsyncClient(timeout=60) as http:

        async def register(key: str, name: str, body: bytes, replace: bool = False) -> httpx2.Response:
            params = {"name": name, **({"replace": "true"} if replace else {})}
            return await http.post(api, params=params, content=body, headers=as_key(key))

        for name in ("a1", "a2"):
            assert (await register("operator", name, parquet(frame()))).status_code == 201
        size = (registered / "a1.parquet").stat().st_size
        assert 2 * size <= QUOTA < 3 * size  # two fit, a third does not

        refused = await register("operator", "a3", parquet(frame()))
        assert refused.status_code == 403
        message = said(refused)
        for part in ("quota of registered data", "97.7 KiB", "max_registered_bytes_per_principal", "2 registered"):
            assert part in message, message
        assert "delete_dataset" in message and "Traceback" not in refused.text
        assert not (registered / "a3.parquet").exists() and not list(registered.glob(".a3.*"))

        # Another key is not affected; replacing one's own dataset does not count the one it replaces.
        assert (await register("operator2", "b1", parquet(frame()))).status_code == 201
        assert (await register("operator", "a2", parquet(frame()), replace=True)).status_code == 201

        # In parts: refused at begin when the declared size does not fit, else at commit on the file's bytes.
        uploads = f"{api}/uploads"
        declared = await http.post(uploads, params={"name": "a4", "bytes": str(size)}, headers=as_key("operator"))
        assert declared.status_code == 403 and "quota of registered data" in said(declared)
        began = await http.post(uploads, params={"name": "a4"}, headers=as_key("operator"))
        assert began.status_code == 201, began.text
        upload = f"{uploads}/{began.json()['upload_id']}"
        sent = await http.put(upload, params={"part": "0"}, content=arrow_part(frame()), headers=as_key("operator"))
        assert sent.status_code == 200, sent.text
        committed = await http.post(upload, headers=as_key("operator"))
        assert committed.status_code == 403 and "quota of registered data" in said(committed)
        assert not (registered / "a4.parquet").exists() and not list((registered / ".uploads").iterdir())

        # Deleting frees it: another key cannot (not even see it), its owner can.
        other = await http.delete(f"{api}/registered:a1", headers=as_key("operator2"))
        assert other.status_code == 404 and (registered / "a1.parquet").exists()
        assert (await http.delete(f"{api}/registered:a1", headers=as_key("operator"))).status_code == 204
        assert not (registered / "a1.parquet").exists() and not (registered / ".a1.owner").exists()
        assert (await register("operator", "a3", parquet(frame()))).status_code == 201
        missing = await http.delete(f"{api}/registered:a1", headers=as_key("operator"))
        assert missing.status_code == 404
        wrong = await http.delete(f"{api}/example:sentiment", headers=as_key("admin"))
        assert wrong.status_code == 400 and "only registered datasets can be deleted" in said(wrong)


def test_registrations_by_one_key_at_once_never_pass_its_quota_together(tmp_path):
    """Eight registrations by one key, released at once from eight threads (as eight requests in this server and
    another on the same directory would be): the quota admits as many as fit, never more, and each admitted
    file is owned; the refused ones leave their temporary file for the caller to remove, nothing placed."""
    catalog = DatasetCatalog(tmp_path / "root", tmp_path / "registered")
    catalog.registered_dir.mkdir(parents=True)
    files = []
    for index in range(8):
        path = catalog.registered_dir / f".n{index}.tmp"
        frame().to_parquet(path, index=False)
        files.append(path)
    size = max(path.stat().st_size for path in files)
    catalog.max_registered_bytes = 3 * size  # three fit, a fourth does not
    owner = "key:k1"
    start = threading.Barrier(len(files))

    def admit(index: int) -> str:
        start.wait(10)
        try:
            catalog.admit(files[index], f"n{index}", owner=owner, replace=False)
        except Forbidden:
            return "refused"
        return "placed"

    with ThreadPoolExecutor(len(files)) as pool:
        outcomes = list(pool.map(admit, range(len(files))))
    assert outcomes.count("placed") == 3 and outcomes.count("refused") == 5, outcomes
    used, count = catalog.registered_bytes(owner)
    assert count == 3 and used <= catalog.max_registered_bytes
    placed = [f"n{index}" for index, outcome in enumerate(outcomes) if outcome == "placed"]
    assert sorted(catalog.registered_names()) == sorted(placed)
    assert all(catalog.owner_of(name) == owner for name in placed)


async def test_a_body_larger_than_the_quota_left_registers_when_what_is_stored_fits(server_url, keys, runtime):
    """What is stored (the frame as compressed Parquet) is what counts against the quota: a body had been refused
    unread once its size as sent passed what the quota had left, so JSON records (several times their stored size)
    and Parquet sent uncompressed that would be stored within the quota were refused. A body is refused unread only
    past 16 times what is left (and a sender with nothing left); below that it is read, stored and counted as stored,
    declared or chunked."""
    api = f"{server_url}plexus/api/datasets"
    headers = {"Authorization": f"Bearer {keys['operator']}", "Content-Type": "application/vnd.apache.parquet"}
    buffer = io.BytesIO()
    pd.DataFrame({"text": ["the same words again"] * 50_000}).to_parquet(
        buffer, index=False, compression=None, use_dictionary=False
    )
    body = buffer.getvalue()  # 1.2 MB as sent (a few kB once stored)
    assert 10 * QUOTA < len(body) < 16 * QUOTA

    async def chunked() -> Any:
        for start in range(0, len(body), 65_536):
            yield body[start : start + 65_536]

    records = {"records": [{"text": uuid.uuid4().hex, "label": "yes"} for _ in range(1000)] * 8}
    async with httpx2.AsyncClient(timeout=60) as http:
        declared = await http.post(api, params={"name": "declared"}, content=body, headers=headers)
        assert declared.status_code == 201, declared.text
        sent = await http.post(api, params={"name": "chunked"}, content=chunked(), headers=headers)
        assert sent.status_code == 201, sent.text
        stored = sum(path.stat().st_size for path in runtime.catalog.registered_dir.glob("*.parquet"))
        left = QUOTA - stored
        json_body = json.dumps(records).encode()
        assert left < len(json_body) < 16 * left, (left, len(json_body))  # (its Parquet: ~40 kB)
        as_json = await http.post(
            api, params={"name": "records"}, content=json_body, headers={**headers, "Content-Type": "application/json"}
        )
        assert as_json.status_code == 201, as_json.text
        stored = sum(path.stat().st_size for path in runtime.catalog.registered_dir.glob("*.parquet"))
        assert stored < QUOTA
        runtime.catalog.max_registered_bytes = stored  # (now at its quota: refused before the body is read)
        answer = await answer_before_body(f"{api}?name=more", headers, len(body), body[:4])
        assert answer.status == 403 and answer.closed, answer
        assert "max_registered_bytes_per_principal" in answer.body.decode(), answer
    assert sorted(runtime.catalog.registered_names()) == ["chunked", "declared", "records"]


async def test_a_body_larger_than_its_sender_s_quota_left_is_refused_unread_declared_or_chunked(
    server_url, keys, runtime, monkeypatch
):
    """A registration's body was read, parsed and re-encoded before `admit` refused a sender with little quota left
    (the size stored is what counts), so full-size bodies sent again and again cost a parse each, and no quota. Now a
    body larger than 16 times what its sender's quota has left is refused before it is parsed, with the quota's
    message (403), alike with a Content-Length (unread: the connection ends) and chunked (once past it); one that fits
    is read, parsed and stored (its stored size checked as before)."""
    api = f"{server_url}plexus/api/datasets"
    headers = {"Authorization": f"Bearer {keys['operator']}", "Content-Type": "application/vnd.apache.parquet"}
    parsed: list[int] = []
    read_parquet_body = runtime.catalog.read_parquet_body

    def counted(body: bytes, name: str) -> pd.DataFrame:
        parsed.append(len(body))
        return read_parquet_body(body, name)

    monkeypatch.setattr(runtime.catalog, "read_parquet_body", counted)
    buffer = io.BytesIO()
    pd.DataFrame({"text": ["the same words again"] * 100_000}).to_parquet(
        buffer, index=False, compression=None, use_dictionary=False
    )
    body = buffer.getvalue()  # 2 MB as sent (a few kB once stored)
    assert len(body) > 20 * QUOTA
    async with httpx2.AsyncClient(timeout=60) as http:
        first = await http.post(api, params={"name": "first"}, content=parquet(frame()), headers=headers)
        assert first.status_code == 201, first.text
    left = QUOTA - (runtime.catalog.registered_dir / "first.parquet").stat().st_size
    assert 0 < left < 70_000 and len(parsed) == 1

    for _ in range(3):
        answer = await answer_before_body(f"{api}?name=more", headers, len(body), body[:4])
        assert answer.status == 403 and answer.closed, answer
        message = answer.body.decode()
        for part in ("max_registered_bytes_per_principal", "compressed Parquet", "1 registered", "16 times"):
            assert part in message, message
        chunked, sent = await chunked_answer(f"{api}?name=more", headers, body[:65_536], 40)
        assert chunked.status == 403 and "max_registered_bytes_per_principal" in chunked.body.decode(), chunked
        assert sent <= 16 * left // 65_536 + 2, sent  # refused once past 16 x what is left, the rest never sent
    assert len(parsed) == 1, parsed  # none of the refused bodies was parsed
    assert sorted(runtime.catalog.registered_names()) == ["first"]

    async with httpx2.AsyncClient(timeout=60) as http:  # one that fits is read and stored
        fits = await http.post(api, params={"name": "second"}, content=parquet(frame()), headers=headers)
        assert fits.status_code == 201, fits.text
    assert len(parsed) == 2
