"""Service metrics, the plan's success metrics: tool usage, response times, update latency, resource use.

Two faces over one set of figures: Prometheus metrics on Jupyter's own `/metrics` (which Jupyter serves from
prometheus_client's default registry, behind its authentication unless `authenticate_prometheus` is off), and
the MCP resource `plexus://metrics` as JSON for assistants (endpoint/resources.py).

Nothing here costs a tool call anything on the event loop: calls are counted from the audit records, in the
audit log's writer thread (each record carries its call's duration); task counts come from a snapshot of the
store refreshed in a thread at most every SNAPSHOT_SECONDS, never from a query on the loop; the rest is read
from memory (the executor's workers, the sessions, the subscriptions) or fed by the event bus.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .core.events import Event
from .core.manager import TaskManager
from .core.models import TaskStatus
from .evaluations.store import SETUP_STAGE

log = logging.getLogger("plexus_mcp_jupyter")

SNAPSHOT_SECONDS = 5.0  # how stale the task counts may be
RECENT = 1000  # recent samples kept per figure for the JSON percentiles
RATE_WINDOW = 60.0  # seconds over which evaluation items per second are computed
SCORING_STAGE = "Scoring"  # the evaluation runner's stage whose items are the scored items

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOOL_CALLS = Counter(
    "plexus_tool_calls", "MCP tool calls, by tool and outcome (ok, error, denied)", ["tool", "outcome"]
)
TOOL_SECONDS = Histogram(
    "plexus_tool_call_seconds", "MCP tool call duration in the server, by tool", ["tool"], buckets=_BUCKETS
)
UPDATE_SECONDS = Histogram(
    "plexus_update_latency_seconds",
    "From a task's change on the event bus to the "
    "notifications/resources/updated that announces it (event lag to subscribers)",
    buckets=_BUCKETS,
)
EVALUATION_ITEMS = Counter("plexus_evaluation_items", "Items scored by evaluations (the Scoring stage)")


class Telemetry:
    """The figures of one server's core, for /metrics and plexus://metrics."""

    def __init__(
        self,
        manager: TaskManager,
        sessions: Callable[[], int] | None = None,
        subscriptions: Callable[[], int] | None = None,
    ) -> None:
        self.manager = manager
        self.sessions: Callable[[], int] = sessions or (lambda: 0)  # open MCP sessions (the runtime's endpoint)
        self.subscriptions: Callable[[], int] = subscriptions or (lambda: 0)  # URIs followed (ResourceWatch.followed)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._counts_at = 0.0
        self._refreshing = False
        self._calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._call_seconds: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=RECENT))
        self._updates: deque[float] = deque(maxlen=RECENT)
        self._scored: deque[tuple[float, int]] = deque(maxlen=RECENT)
        self._scored_total = 0
        self._processed: dict[str, tuple[int, int | None]] = {}  # evaluation task -> items scored, stage total
        _LIVE.add(self)

    # -- fed by the audit thread, the bus and the subscription senders --------------------------------------

    def on_audit(self, rows: list[dict[str, Any]]) -> None:
        """Audit records (in the audit log's writer thread): every tool call is one, with its duration."""
        for row in rows:
            action, seconds = row.get("action") or "", row.get("seconds")
            if not action.startswith("tool.") or seconds is None:
                continue
            tool, outcome = action[5:], row.get("outcome") or "ok"
            TOOL_CALLS.labels(tool, outcome).inc()
            TOOL_SECONDS.labels(tool).observe(seconds)
            with self._lock:
                self._calls[tool][outcome] += 1
                self._call_seconds[tool].append(seconds)

    def on_event(self, event: Event) -> None:
        """Bus listener: items an evaluation scored since its last event. Progress events are coalesced, so the
        end of the Scoring stage may only show as the next stage: the items it had left are counted then.
        Only this server's evaluations: another server on a shared store counts its own (summed across servers,
        each item counts once)."""
        data = event.data
        if event.origin is not None or event.entity_type != "task" or data.get("type") != "evaluation":
            return
        progress = data.get("progress") or {}
        seen, total = self._processed.get(event.entity_id, (0, None))
        if progress.get("stage") == SCORING_STAGE:
            processed, total = int(progress.get("processed") or 0), progress.get("total")
        elif total is not None and progress.get("stage") not in (None, SETUP_STAGE):
            processed = int(total)  # Scoring ended: all its items were scored
        else:
            processed = seen
        if data.get("status") in _FINAL:
            processed = max(processed, self._scored_at_end(event.entity_id))
        if processed > seen:
            delta = processed - seen
            EVALUATION_ITEMS.inc(delta)
            self._scored.append((event.at, delta))
            self._scored_total += delta
        self._processed[event.entity_id] = (processed, total)
        if data.get("status") in _FINAL:  # kept until then: the end reads what Scoring did (_scored_at_end)
            self._processed.pop(event.entity_id, None)

    def _scored_at_end(self, task_id: str) -> int:
        """The items the evaluation's Scoring stage processed, from the task as this server holds it: a quick
        evaluation's coalesced events may never show that stage (it went from Setup to its end between two)."""
        task = self.manager.task_in_memory(task_id)
        stage = next((s for s in task.stages if s.name == SCORING_STAGE), None) if task is not None else None
        return stage.processed_items if stage is not None else 0

    def on_update_sent(self, seconds: float) -> None:
        UPDATE_SECONDS.observe(seconds)
        self._updates.append(seconds)

    # -- task counts: a snapshot refreshed off the loop -------------------------------------------------------

    def refresh(self) -> None:
        """Read the task counts from the store (a thread's work: it scans an index). A store that cannot be
        read leaves the previous counts (and is retried at the next scrape)."""
        try:
            counts = self.manager.store.counts_by_status_and_type()
        except Exception:
            log.warning("Plexus: the task counts for the metrics could not be read", exc_info=True)
            return
        finally:
            self._refreshing = False
        self._counts, self._counts_at = counts, time.monotonic()

    def close(self) -> None:
        """This core stops: its figures leave /metrics."""
        _LIVE.discard(self)

    async def fresh_counts(self) -> dict[tuple[str, str], int]:
        if time.monotonic() - self._counts_at > SNAPSHOT_SECONDS / 5:
            await asyncio.to_thread(self.refresh)
        return self._counts

    def counts(self) -> dict[tuple[str, str], int]:
        """The snapshot; when stale, a refresh starts in a thread (this answer is the previous one)."""
        if time.monotonic() - self._counts_at > SNAPSHOT_SECONDS and not self._refreshing:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.refresh()
            else:
                self._refreshing = True
                loop.run_in_executor(None, self.refresh)
        return self._counts

    # -- the JSON form ----------------------------------------------------------------------------------------

    def snapshot(self, counts: dict[tuple[str, str], int], *, activity: bool) -> dict[str, Any]:
        """plexus://metrics. Without `activity` (a caller who is not an admin) only what reveals nobody's work:
        queue depth, running tasks and the server's resource use."""
        by_status = {s.value: 0 for s in TaskStatus}
        by_type: dict[str, dict[str, int]] = {}
        for (status, type_), n in counts.items():
            by_status[status] = by_status.get(status, 0) + n
            by_type.setdefault(type_, {})[status] = n
        executor = self.manager.executor.status()
        result: dict[str, Any] = {
            "queue_depth": by_status.get(TaskStatus.QUEUED.value, 0),
            "running": executor.get("running", 0),
            "resources": {
                **_process_use(),
                "workers": executor.get("workers"),
                "idle_workers": executor.get("idle_workers"),
                "max_concurrency": self.manager.max_concurrency,
            },
        }
        if not activity:
            return result
        now = time.time()
        recent = sum(n for at, n in self._scored if at >= now - RATE_WINDOW)
        with self._lock:
            tools = {
                tool: {"calls": dict(outcomes), **_latency_ms(self._call_seconds[tool])}
                for tool, outcomes in sorted(self._calls.items())
            }
        result.update(
            {
                "tasks": {"by_status": by_status, "by_type": by_type},
                "tools": tools,
                "update_latency_ms": _latency_ms(self._updates),
                "evaluations": {"items_scored": self._scored_total, "items_per_second": round(recent / RATE_WINDOW, 1)},
                "sessions": self.sessions(),
                "subscriptions": self.subscriptions(),
            }
        )
        return result


def _latency_ms(samples: deque[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    if not ordered:
        return {"samples": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None}

    def at(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 2)

    return {"samples": len(ordered), "p50_ms": at(0.5), "p95_ms": at(0.95), "p99_ms": at(0.99)}


def _process_use() -> dict[str, Any]:
    times = os.times()
    try:
        with open("/proc/self/statm") as f:
            rss_mb: float | None = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        rss_mb = None
    return {"rss_mb": rss_mb, "cpu_seconds": round(times.user + times.system, 2)}


_FINAL = frozenset(s.value for s in TaskStatus if s.is_final)
_LIVE: weakref.WeakSet[Telemetry] = weakref.WeakSet()  # the cores of this process (one, but for tests)


class _Gauges(Collector):
    """The figures read at scrape time, summed over this process's cores."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tasks = GaugeMetricFamily(
            "plexus_tasks",
            f"Tasks in the store, by status and type (a snapshot at most {SNAPSHOT_SECONDS:g} s old)",
            labels=["status", "type"],
        )
        queued = GaugeMetricFamily("plexus_queue_depth", "Tasks waiting to start (QUEUED)")
        running = GaugeMetricFamily("plexus_running_tasks", "Tasks running on this server's executor")
        workers = GaugeMetricFamily("plexus_workers", "Worker processes of this server's executor")
        sessions = GaugeMetricFamily("plexus_mcp_sessions", "Open MCP sessions")
        followed = GaugeMetricFamily("plexus_subscriptions", "Resource URIs followed by subscribers")
        totals: dict[tuple[str, str], int] = defaultdict(int)
        figures: defaultdict[str, int] = defaultdict(int)
        for telemetry in list(_LIVE):
            for key, n in telemetry.counts().items():
                totals[key] += n
            status = telemetry.manager.executor.status()
            figures["running"] += status.get("running", 0)
            figures["workers"] += status.get("workers", 0)
            figures["sessions"] += telemetry.sessions()
            figures["subscriptions"] += telemetry.subscriptions()
        for (status_name, type_), n in sorted(totals.items()):
            tasks.add_metric([status_name, type_], n)
        queued.add_metric([], sum(n for (s, _), n in totals.items() if s == TaskStatus.QUEUED.value))
        running.add_metric([], figures["running"])
        workers.add_metric([], figures["workers"])
        sessions.add_metric([], figures["sessions"])
        followed.add_metric([], figures["subscriptions"])
        yield from (tasks, queued, running, workers, sessions, followed)


REGISTRY.register(_Gauges())
