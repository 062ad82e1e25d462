"""The notebook client inside a real IPython kernel (jupyter_client) talking to the real test server.

The kernel finds the server through PLEXUS_MCP_URL/PLEXUS_MCP_TOKEN or a connection file, as kernels
launched by the extension do, and imports this checkout (PYTHONPATH). Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from jupyter_client.manager import AsyncKernelManager
from sklearn.metrics import accuracy_score, cohen_kappa_score

from plexus_mcp_jupyter.evaluations.datasets import EXAMPLES_DIR

CHECKOUT = str(Path(__file__).resolve().parents[1])


class Kernel:
    """A started kernel and its client; `run(code)` executes a cell and returns what it printed."""

    def __init__(self, km: AsyncKernelManager) -> None:
        self.km = km
        self.kc = km.client()
        self.iopub: list[dict[str, Any]] = []  # every IOPub message, in order

    async def start(self) -> None:
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)

    async def next_iopub(self, deadline: float) -> dict[str, Any]:
        msg = await self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        self.iopub.append(msg)
        return msg

    async def run(self, code: str, timeout: float = 60.0) -> str:
        msg_id = self.kc.execute(code)
        deadline = time.monotonic() + timeout
        out: list[str] = []
        while True:
            msg = await self.next_iopub(deadline)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                raise AssertionError(f"the cell failed: {content['ename']}: {content['evalue']}\n{code}")
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)

    async def until(self, predicate, timeout: float = 30.0) -> dict[str, Any]:
        """Read IOPub (kernel idle or not) until a message satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        for msg in self.iopub:
            if predicate(msg):
                return msg
        while True:
            msg = await self.next_iopub(deadline)
            if predicate(msg):
                return msg


@pytest.fixture
def kernel_env(server_url, token, runtime) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_MCP_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, os.environ.get("PYTHONPATH")) if p)
    return env


async def start_kernel(env: dict[str, str]) -> Kernel:
    km = AsyncKernelManager(kernel_name="python3")
    await km.start_kernel(env=env)
    kernel = Kernel(km)
    await kernel.start()
    return kernel


async def stop_kernel(kernel: Kernel) -> None:
    kernel.kc.stop_channels()
    await kernel.km.shutdown_kernel(now=True)


def state_of(msg: dict[str, Any]) -> dict[str, Any]:
    return msg["content"].get("data", {}).get("state", {})


async def test_a_kernel_runs_a_task_and_its_widget_moves_while_the_kernel_is_idle(kernel_env, server_url, token):
    kernel = await start_kernel({**kernel_env, "PLEXUS_MCP_URL": server_url, "PLEXUS_MCP_TOKEN": token})
    try:
        started = time.monotonic()
        out = await kernel.run(
            "%load_ext plexus_mcp_jupyter\n"
            "import plexus_mcp_jupyter, threading\n"
            "print(plexus_mcp_jupyter.__file__)\n"
            "h = plexus.run_demo(items=400, item_delay_ms=5)\n"
            "w = h.progress()\n"
            "display(w)\n"
            "print('bar', w.bar.model_id)\n"
        )
        assert out.splitlines()[0].startswith(CHECKOUT)
        bar = out.split("bar ")[1].strip()
        # The cell has ended: the kernel's main thread is idle. The event thread alone moves the bar
        # (comm messages sent from a background thread) to its end.
        await kernel.until(
            lambda m: (
                m["msg_type"] == "comm_msg"
                and m["content"]["comm_id"] == bar
                and state_of(m).get("bar_style") == "success"
            )
        )
        values = [
            state_of(m)["value"]
            for m in kernel.iopub
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == bar and "value" in state_of(m)
        ]
        maxima = [
            state_of(m)["max"]
            for m in kernel.iopub
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == bar and "max" in state_of(m)
        ]
        assert 400 in maxima and max(values) > 100 and values[-1] == maxima[-1]  # through the stages, to the end
        assert len(values) < 100  # coalesced: not one message per item
        out = await kernel.run(
            "print(h.status, w.bar.value == w.bar.max, h.result()['items_processed'])\n"
            "print(plexus.tasks().loc[lambda f: f.task_id == h.id, 'status'].iloc[0])"
        )
        assert out.split() == ["COMPLETED", "True", "400", "COMPLETED"]
        assert time.monotonic() - started < 30
    finally:
        await stop_kernel(kernel)


async def test_a_kernel_finds_the_server_by_its_connection_file_and_errors_leave_it_usable(kernel_env, token):
    # The file the extension writes for the kernels it launches (user-only, URL and token).
    connection = os.environ["PLEXUS_MCP_CONNECTION_FILE"]
    assert json.loads(Path(connection).read_text())["token"] == token
    kernel = await start_kernel({**kernel_env, "PLEXUS_MCP_CONNECTION_FILE": connection})
    try:
        out = await kernel.run(
            "from plexus_mcp_jupyter import plexus\n"
            "from plexus_mcp_jupyter.notebook import PlexusInputError\n"
            "import pandas as pd\n"
            "try:\n"
            "    plexus.evaluate(pd.DataFrame({'text': ['a']}), prediction='guess', label='gold')\n"
            "except PlexusInputError as exc:\n"
            "    print('refused:', exc)\n"
            "h = plexus.run_demo(items=20, item_delay_ms=1)\n"
            "print(h.wait(30).status)\n"
        )
        assert "refused: label='gold' is not a column of the DataFrame; its columns: 'text'" in out
        assert out.strip().endswith("COMPLETED")
    finally:
        await stop_kernel(kernel)


async def test_an_assistant_evaluates_a_kernels_dataframe_with_its_scorer_and_the_dashboard_mirrors_it(
    kernel_env, server_url, token, mcp_client
):
    kernel = await start_kernel({**kernel_env, "PLEXUS_MCP_URL": server_url, "PLEXUS_MCP_TOKEN": token})
    frame = pd.read_csv(EXAMPLES_DIR / "sentiment.csv")
    try:
        out = await kernel.run(
            "%load_ext plexus_mcp_jupyter\n"
            "import pandas as pd\n"
            f"df = pd.read_csv({str(EXAMPLES_DIR / 'sentiment.csv')!r})\n"
            "def keywords(texts):\n"
            "    words = ('great', 'love', 'excellent', 'good')\n"
            "    return ['positive' if any(w in t.lower() for w in words) else 'negative' for t in texts]\n"
            "plexus.register_dataset('reviews', df, replace=True)\n"
            "print(plexus.register_scorer('keywords', keywords))\n"
            "d = plexus.dashboard()\n"
            "display(d)\n"
        )
        assert out.strip() == "kernel:keywords"
        async with mcp_client() as client:
            started = (
                await client.call_tool(
                    "create_evaluation",
                    {
                        "type": "accuracy",
                        "dataset": "registered:reviews",
                        "scorer": "kernel:keywords",
                        "label_column": "label",
                        "input_column": "text",
                    },
                )
            ).structured_content
            deadline = time.monotonic() + 60
            while True:
                view = (
                    await client.call_tool("get_evaluation", {"evaluation_id": started["evaluation_id"]})
                ).structured_content
                if view["status"] in ("COMPLETED", "FAILED", "CANCELLED") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert view["status"] == "COMPLETED", view["error_message"]
        words = ("great", "love", "excellent", "good")
        expected = ["positive" if any(w in t.lower() for w in words) else "negative" for t in frame["text"]]
        labels = frame["label"].str.strip().str.lower()
        m = view["metrics"]["score"]
        assert m["accuracy"] == pytest.approx(accuracy_score(labels, expected))
        assert m["cohen_kappa"] == pytest.approx(cohen_kappa_score(labels, expected))
        # The kernel's dashboard picked up the assistant's evaluation and settled on its final state.
        out = await kernel.run(
            f"row = d.row({started['task_id']!r})\n"
            "print(row.state.done.wait(10), row.status.value, row.bar.value == row.bar.max, row.cancel.disabled)\n"
            f"ev = plexus.evaluation({started['evaluation_id']!r})\n"
            "print(round(ev.metrics.attrs['summary']['accuracy'], 6))\n"
        )
        assert out.split() == ["True", "COMPLETED", "True", "True", str(round(m["accuracy"], 6))]
    finally:
        await stop_kernel(kernel)
