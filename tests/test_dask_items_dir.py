"""Dask workers that cannot use the server's evaluation_items_dir (issue 15): health degraded naming them, one
warning, evaluations refused at once with the reason; all well again once such a worker leaves.

A real LocalCluster (one worker that sees the directory) joined by a real `dask worker` process that does not:
- "blind": started in a mount namespace of its own (`unshare --mount`) with an empty tmpfs mounted over the items
  directory: the same path, another directory, as on a machine without the shared mount;
- "read-only": started as the user nobody (`setpriv`), which sees the directory but may not write in it.
Both need root (or unprivileged user namespaces, for the first); the test is skipped where neither is possible."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from .conftest import local_cluster, poll
from .processes import stop_process
from .test_evaluations import create, finished
from .test_multi_server import wait_until

pytestmark = pytest.mark.filterwarnings("ignore:Mismatched versions found")  # the read-only worker's python

EVALUATION = {
    "type": "accuracy",
    "dataset": "example:sentiment",
    "prediction_column": "prediction",
    "label_column": "label",
}


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def outsider_prefix(kind: str, items_dir: Path, scratch: Path) -> list[str] | None:
    """The command that starts a process whose view of `items_dir` differs as `kind` says; None where this
    machine cannot make one."""
    if kind == "blind":
        namespace = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            namespace = ["unshare", "--user", "--map-root-user", "--mount"]
        mount = ["sh", "-c", 'mount -t tmpfs plexus-test "$0" && exec "$@"', str(items_dir)]
        probe = scratch / "probe"
        probe.mkdir()
        if shutil.which("unshare") is None or not _works([*namespace, *mount[:3], str(probe), "true"]):
            return None
        return [*namespace, *mount]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    return prefix if _works([*prefix, "true"]) else None


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[LocalCluster]:
    """A cluster of its own (one worker that sees everything): the session's is not joined by strangers."""
    cluster = local_cluster(1)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def items_dir() -> Iterator[Path]:
    """Under /tmp itself (pytest's tmp_path is 0700): the read-only outsider may enter it, not write in it."""
    path = Path(tempfile.mkdtemp(prefix="plexus-items-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plexus_config(plexus_config, own_cluster, items_dir):
    return {
        **plexus_config,
        "executor": "dask",
        "dask_scheduler_address": own_cluster.scheduler_address,
        "dask_message_interval": 0.05,
        "evaluation_items_dir": str(items_dir),
    }


class Outsider:
    """A `dask worker` process whose view of the items directory differs, joined to the cluster."""

    def __init__(self, kind: str, cluster: LocalCluster, items_dir: Path, scratch: Path) -> None:
        self.kind = kind
        prefix = outsider_prefix(kind, items_dir, scratch)
        if prefix is None:
            pytest.skip(f"this machine cannot start a {kind} worker (needs root or user namespaces)")
        work = Path(tempfile.mkdtemp(prefix=f"plexus-worker-{kind}-"))
        work.chmod(0o777)
        self.work = work
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), HOME=str(work))
        self.process = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                cluster.scheduler_address,
                "--nthreads=1",
                "--no-nanny",
                "--no-dashboard",
                "--resources=slots=1",
                f"--name={kind}",
                "--host=127.0.0.1",
                f"--local-directory={work}",
            ],
            env=env,
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = Client(cluster.scheduler_address, set_as_default=False)
        try:
            self.address = wait_until(lambda: self._joined(kind), 60, "the outsider worker joined")
        except BaseException:
            self.stop()
            raise

    def _joined(self, kind: str) -> str | None:
        for address, info in self.client.scheduler_info(n_workers=-1)["workers"].items():
            if info.get("name") == kind:
                return str(address)
        return None

    def stop(self) -> None:
        """End the worker process this fixture started (by its pid)."""
        stop_process(self.process)
        self.client.close()
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(params=["blind", "read-only"])
def outsider(request, own_cluster, items_dir, tmp_path) -> Iterator[Outsider]:
    joined = Outsider(request.param, own_cluster, items_dir, tmp_path)
    yield joined
    joined.stop()


async def health_of(jp_fetch) -> dict:
    return json.loads((await jp_fetch("plexus", "api", "health")).body)


async def test_a_worker_that_cannot_use_the_items_dir_degrades_health_and_refuses_evaluations(
    outsider, runtime, jp_fetch, mcp_client, caplog
):
    caplog.set_level("WARNING", logger="plexus_mcp_jupyter")
    health = await poll(
        lambda: health_of(jp_fetch),
        lambda h: outsider.address in h["evaluation_items"].get("workers_problem", ""),
        timeout=60,
        interval=0.2,
    )
    assert health["status"] == "degraded"
    problem = health["evaluation_items"]["workers_problem"]
    assert problem.startswith("1 of 2 Dask worker(s) cannot use evaluation_items_dir")
    why = "it sees another directory" if outsider.kind == "blind" else "cannot write in"
    assert why in problem and "set evaluation_items_dir to a path every worker reaches" in problem

    async with mcp_client() as client:
        refused = await client.call_tool("create_evaluation", EVALUATION)
        assert refused.is_error
        assert "evaluations cannot run now" in refused.content[0].text and outsider.address in refused.content[0].text
        listed = (await client.call_tool("list_evaluations", {})).structured_content
        assert listed["evaluations"] == []  # refused before anything was stored

    from tornado.httpclient import HTTPClientError

    with pytest.raises(HTTPClientError) as rest:
        await jp_fetch("plexus", "api", "evaluations", method="POST", body=json.dumps(EVALUATION))
    assert rest.value.code == 503
    assert outsider.address in json.loads(rest.value.response.body)["error"]["message"]

    # Looked at again (as the periodic check does): the same worker for the same reason is warned about once.
    assert outsider.address in await asyncio.to_thread(runtime.worker_items_check.check)
    warned = [r for r in caplog.records if r.name == "plexus_mcp_jupyter" and outsider.address in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]

    # The worker leaves: the check sees the change of workers, health is ok, evaluations run again.
    outsider.stop()
    health = await poll(
        lambda: health_of(jp_fetch), lambda h: "workers_problem" not in h["evaluation_items"], timeout=60, interval=0.2
    )
    assert health["status"] == "ok"
    async with mcp_client() as client:
        started = await create(client, **EVALUATION)
        done = await finished(client, started["evaluation_id"])
    assert done["status"] == "COMPLETED", done["error_message"]
    assert any(items_dir_file.suffix == ".parquet" for items_dir_file in Path(runtime.items_dir).rglob("*"))
