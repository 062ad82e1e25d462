"""Settings shared by the Jupyter extension and the `plexus` CLI.

Every setting is a traitlet, so it can be set in a Jupyter config file
(`c.PlexusMCPExtension.max_concurrency = 8`), on the command line
(`--PlexusMCPExtension.max_concurrency=8`) or by an environment variable
(`PLEXUS_MCP_MAX_CONCURRENCY=8`). Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from traitlets import Bool, CaselessStrEnum, Float, Integer, TraitError, Unicode
from traitlets.config import Configurable
from traitlets.config.loader import DeferredConfig

ENV_PREFIX = "PLEXUS_MCP_"


class SettingsError(ValueError):
    """One or more settings have values that are not allowed; `problems` has a line for each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def allowed_values(exc: Exception) -> str:
    """Traitlets' message without its class-instance preamble ("The 'x' trait of a Y instance expected ...")."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"^The (value of the )?'\w+' trait of an? \w+ instance ", "", text).rstrip(".")


def _shown(value: Any) -> Any:
    """A config value as the user typed it (a deferred command-line string shows as that string)."""
    return str(value) if isinstance(value, DeferredConfig) else value


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


class PlexusSettings(Configurable):
    """The settings of the Plexus core and MCP endpoint."""

    db_url = Unicode(
        "",
        help="SQLAlchemy URL of the task store. Empty: SQLite in WAL mode at "
        "{jupyter data dir}/plexus_mcp/plexus.db. Example: postgresql+psycopg://user@host/plexus",
    ).tag(config=True)
    executor = CaselessStrEnum(
        ["local", "dask"],
        default_value="local",
        help="Where task code runs: 'local' (worker processes on this machine, see worker_reuse) or 'dask' (a Dask "
        "cluster: dask_scheduler_address, or a LocalCluster; needs the dask extra). Default local.",
    ).tag(config=True)
    max_concurrency = Integer(4, min=0, help="Tasks that may run at once; the rest wait QUEUED.").tag(config=True)
    max_concurrency_per_owner = Integer(
        0, min=0, help="Tasks one identity may run at once (0: no per-identity cap)."
    ).tag(config=True)
    cancel_grace_seconds = Float(
        5.0, min=0.1, help="Seconds a cancelled task has to stop by itself before its worker is killed."
    ).tag(config=True)
    progress_write_interval = Float(
        1.0,
        min=0.0,
        help="Seconds between progress writes of one task to the store (stage changes and ends are "
        "always written at once).",
    ).tag(config=True)
    poll_interval = Float(
        1.0,
        min=0.05,
        help="Seconds between checks of the store for work and cancellations from other servers sharing it.",
    ).tag(config=True)
    max_page_size = Integer(100, min=1, max=1000, help="Largest page a listing returns.").tag(config=True)
    max_output_bytes = Integer(
        65_536, min=1024, help="Largest task output kept as it is (JSON bytes); larger outputs are truncated."
    ).tag(config=True)
    session_idle_timeout = Float(1800.0, min=1.0, help="Seconds after which an idle MCP session is closed.").tag(
        config=True
    )
    max_sessions = Integer(1000, min=1, help="Most MCP sessions open at once.").tag(config=True)
    max_request_bytes = Integer(
        4 * 1024 * 1024,
        min=1024,
        help="Largest MCP request body, and REST JSON body (tasks, cancellations, "
        "evaluations, keys), in bytes (larger ones get HTTP 413). Registering a dataset (POST plexus/api/datasets) "
        "has Jupyter's ServerApp.max_body_size instead.",
    ).tag(config=True)
    max_json_values = Integer(
        100_000,
        min=100,
        help="Most JSON values (arrays, objects and their elements) one MCP request body, REST JSON body or "
        "event-stream message may hold; more are refused (HTTP 400 / a JSON-RPC error) before the body is parsed, "
        "so a body within max_request_bytes cannot expand into millions of Python objects. Default 100000 (about "
        "max_request_bytes / 40).",
    ).tag(config=True)
    max_dataset_json_values = Integer(
        1_000_000,
        min=100,
        help="Most JSON values (the records, their fields' values, and any arrays or objects in them) a dataset "
        'registered as JSON records (POST plexus/api/datasets, {"records": [...]}) may hold; more are refused '
        "(HTTP 400) before the body is parsed: such a body has Jupyter's ServerApp.max_body_size, not "
        "max_request_bytes, and each value becomes a Python object of 50 to 200 bytes. A larger frame goes as "
        "Parquet (the notebook client sends it in parts). Default 1000000 (110,000 rows of 8 columns).",
    ).tag(config=True)
    event_store_size = Integer(
        10_000, min=1, help="SSE events kept so a dropped MCP stream can resume with Last-Event-ID."
    ).tag(config=True)
    event_store_bytes = Integer(
        32 * 1024 * 1024,
        min=64 * 1024,
        help="Most bytes of SSE events kept for resumption; the oldest go first past this or event_store_size.",
    ).tag(config=True)

    worker_nice = Integer(
        10,
        min=0,
        max=19,
        help="How much lower than the server's the priority of task workers is (Unix nice): "
        "the server keeps answering quickly while workers are busy.",
    ).tag(config=True)
    scorer_modules = Unicode(
        "plexus_mcp_jupyter.evaluations.examples",
        help="Comma-separated Python module prefixes whose functions API keys may name as python: scorers (a "
        "python: scorer runs that code in a worker, so this is an allowlist). The notebook user, an admin, may "
        "name any importable function.",
    ).tag(config=True)
    redact_columns = Unicode(
        "",
        help="Comma-separated dataset column names whose values never appear in evaluation results (ids, "
        "input excerpts or labels shown as [redacted]); they are still scored.",
    ).tag(config=True)
    rate_limit = Float(
        20.0,
        min=0.01,
        help="Requests per second an API key may make on average (HTTP 429 beyond; a key may have its own).",
    ).tag(config=True)
    rate_burst = Integer(40, min=1, help="Requests an API key may make at once before rate_limit applies.").tag(
        config=True
    )
    request_bytes_rate = Integer(
        2 * 1024 * 1024,
        min=1024,
        help="Bytes per second each caller (an API key, a user) may send on average in MCP request bodies, REST JSON "
        "bodies and event WebSocket messages over 64 KiB (parsed off the event loop, charged before): HTTP 429 "
        "beyond, with Retry-After (a WebSocket message waits).",
    ).tag(config=True)
    request_bytes_burst = Integer(
        16 * 1024 * 1024,
        min=1024,
        help="Bytes of such bodies a caller may send at once before request_bytes_rate applies (at least "
        "max_request_bytes).",
    ).tag(config=True)
    ws_message_rate = Float(
        20.0,
        min=0.01,
        help="Messages per second one event WebSocket may send on average (twice that at once); beyond, the next "
        "message waits (the connection is read no further meanwhile); nothing is dropped.",
    ).tag(config=True)
    max_tasks_per_key = Integer(
        50, min=1, help="Unfinished tasks (queued and running) one API key may have; more are refused."
    ).tag(config=True)
    max_sessions_per_key = Integer(
        20,
        min=1,
        help="MCP sessions one API key may have open at once (HTTP 429 beyond; a session ends by DELETE "
        "or after session_idle_timeout). The notebook user and the server's token are held only to max_sessions.",
    ).tag(config=True)
    max_event_streams_per_key = Integer(
        20,
        min=1,
        help="Event-stream WebSockets (plexus/api/events) one API key may have open at once; one more is refused "
        "with HTTP 429 naming this setting. The notebook user and the server's token are not held to it. Default 20.",
    ).tag(config=True)
    max_kernel_scorers_per_owner = Integer(
        100,
        min=1,
        help="Kernel scorers (plexus.register_scorer) one owner (an API key, or the notebook user) may have "
        "registered at once; one more is refused, naming this setting (unregister one first). Default 100.",
    ).tag(config=True)
    reserved_session_share = Float(
        0.1,
        min=0.0,
        max=0.9,
        help="Share of max_sessions that only admins (the notebook user, the server's token, "
        "admin keys) may use: viewer and operator keys together stop at max_sessions minus this share, rounded "
        "up (HTTP 503), so a flood of keys never locks the admins out. Default 0.1 (100 of 1000).",
    ).tag(config=True)

    key_slot_share = Float(
        0.5,
        min=0.0,
        max=1.0,
        help="Share of max_concurrency the running tasks of one API key may hold: floor(share x max_concurrency), at "
        "least 1 (default 0.5: half the slots, so one key never holds all of them while max_concurrency >= 2). The "
        "key's other tasks wait QUEUED and the scheduler starts the next eligible task; 1 turns the share off. The "
        "notebook user (Jupyter's own identity, the standalone token) has no share.",
    ).tag(config=True)
    max_priority_operator = Integer(
        10,
        min=-1000,
        max=1000,
        help="Highest task priority an operator key may set (dispatch and evaluations); a higher one is refused "
        "with an error naming this setting. Admins (keys and the notebook user) may use the full range, -1000 to "
        "1000; viewers cannot dispatch at all.",
    ).tag(config=True)
    max_scorecard_bytes = Integer(
        64 * 1024,
        min=1024,
        help="Largest scorecard, in bytes of YAML (inline text or file); a larger one is "
        "refused before it is parsed. Default 65536 (64 KiB).",
    ).tag(config=True)
    max_scorecard_scores = Integer(
        100,
        min=1,
        help="Most scores one scorecard may name; more are refused before the card is built. Default 100.",
    ).tag(config=True)
    max_evaluation_items = Integer(
        5_000_000,
        min=1,
        help="Most items one evaluation may score (rows x scores x runs); a larger one is refused "
        "before it is dispatched, or fails at Setup when its rows are only known once loaded (CSV, JSON Lines). "
        "Default 5000000.",
    ).tag(config=True)

    http_header_timeout = Float(
        60.0,
        min=0.1,
        help="Seconds a client connection may take to send a request's headers, and may stay idle "
        "between requests (keep-alive), before the server closes it. Applies to the whole Jupyter server when the "
        "extension runs in it (tornado's idle_connection_timeout; its default is 3600).",
    ).tag(config=True)
    http_body_timeout = Float(
        300.0,
        min=0.1,
        help="Seconds a client may take to send a whole request body before the server closes the "
        "connection (a slow-body client holds a connection until then).",
    ).tag(config=True)
    max_connections_per_address = Integer(
        512,
        min=1,
        help="HTTP connections one client address may have open at once; more are closed on arrival "
        "(logged once a minute). Established WebSockets do not count.",
    ).tag(config=True)
    max_dataset_header_bytes = Integer(
        1024 * 1024,
        min=1024,
        help="Longest first line (header, or first record) of a CSV or JSON Lines file that listing, describing "
        "or checking a dataset reads, in bytes. A file beyond it is listed as unreadable, with the reason. The "
        "longest row or line a describe or an evaluation streams is the 8 MiB block a file is read in (this "
        "setting when larger). Default 1 MiB.",
    ).tag(config=True)
    max_dataset_columns = Integer(
        10_000,
        min=1,
        help="Most columns a dataset may have (a file is listed as unreadable beyond it; a DataFrame with more is "
        "not registered). Default 10000.",
    ).tag(config=True)
    dataset_threads = Integer(
        2,
        min=1,
        help="Threads that list, describe and check data files, and check evaluation requests (scorecards, "
        "headers), at once (their own pool, so that slow reads never hold the event loop or the default thread "
        "pool); more requests wait their turn. Default 2.",
    ).tag(config=True)

    # -- issue 12: the queue model, resources and retention (docs/tasks.md) -----------------------------
    queue_fairness = CaselessStrEnum(
        ["round_robin", "weighted", "fifo"],
        default_value="round_robin",
        help="How owners share a priority level of the queue: 'round_robin' (default: the next start goes to the "
        "owner with the fewest tasks running and placed), 'weighted' (the same, counted relative to the weight of "
        "the role that dispatched each task, queue_role_weights) or 'fifo' (no sharing: oldest first).",
    ).tag(config=True)
    queue_role_weights = Unicode(
        "admin=2,operator=1,viewer=1",
        help="Weights of roles under queue_fairness='weighted', as role=weight (default admin=2,operator=1,viewer=1: "
        "an admin's tasks get two starts for an operator's one); a role not named weighs 1.",
    ).tag(config=True)
    max_concurrency_by_type = Unicode(
        "",
        help="Most tasks of a type running at once, as type=count (e.g. 'evaluation=2'); default empty: only "
        "max_concurrency and the resources bound them.",
    ).tag(config=True)
    executor_resources = Unicode(
        "",
        help="The executor's capacity, overriding what it declares (the local one: this machine's memory_mb), "
        "as name=amount (e.g. 'slots=4,memory_mb=8000,gpu=1'). slots bounds max_concurrency; a named resource not "
        "declared has 0. A task type's needs that exceed it are refused at dispatch. Default empty.",
    ).tag(config=True)
    task_retention_seconds = Float(
        30 * 86_400.0,
        min=1.0,
        help="Seconds a finished task (stages, progress history, evaluation record) is kept "
        "after it ended before it is pruned (default 2592000: 30 days); its id then answers 'expired'.",
    ).tag(config=True)
    task_retention_by_type = Unicode(
        "",
        help="Retention of finished tasks by type, as type=seconds (e.g. 'demo=3600,evaluation=7776000'); a "
        "type not named keeps task_retention_seconds. Default empty.",
    ).tag(config=True)
    max_task_ttl_seconds = Float(
        30 * 86_400.0,
        min=1.0,
        help="Longest retention an MCP client may ask for with a task's ttl (a shorter "
        "ttl is honoured down to 1 s; a longer one is cut to this). Default 2592000 (30 days).",
    ).tag(config=True)
    retention_interval_seconds = Float(
        60.0,
        min=0.05,
        help="Seconds between passes of the background pruner of expired tasks (default 60).",
    ).tag(config=True)
    retention_batch_size = Integer(
        500,
        min=1,
        max=10_000,
        help="Most tasks one pruning transaction removes (default 500); a pass runs batches "
        "until nothing expired is left, off the event loop.",
    ).tag(config=True)
    max_batch_size = Integer(
        1000,
        min=1,
        max=100_000,
        help="Most tasks one batch call may touch: tasks dispatched by dispatch_batch, and tasks cancelled, retried "
        "or re-prioritised by ids or by a filter. A larger call is refused with the count and this bound (narrow the "
        "filter or split the batch); a dry run still counts. Default 1000.",
    ).tag(config=True)
    event_relay = CaselessStrEnum(
        ["auto", "poll", "off"],
        default_value="auto",
        help="How this server sees the events of tasks other servers sharing its store run (docs/scale-out.md): "
        "'auto' (default) LISTEN/NOTIFY on PostgreSQL and polling on other databases (SQLite); 'poll' polling "
        "everywhere (a PostgreSQL behind a pooler that drops LISTEN); 'off' (a server alone on its store).",
    ).tag(config=True)
    event_relay_interval = Float(
        0.25,
        min=0.01,
        max=60.0,
        help="Seconds between two writes of this server's events for the other servers, "
        "and between two polls for theirs (default 0.25): one small transaction each at most.",
    ).tag(config=True)
    event_relay_keep_seconds = Float(
        60.0,
        min=1.0,
        help="Seconds relayed events are kept for the other servers before they are pruned "
        "(default 60); a server that stalls longer misses what was pruned.",
    ).tag(config=True)
    server_heartbeat_seconds = Float(
        5.0,
        min=0.05,
        help="Seconds between two heartbeats that renew the leases of the tasks this server runs (default 5).",
    ).tag(config=True)
    server_lease_seconds = Float(
        30.0,
        min=0.1,
        help="Seconds a running task's lease lasts without a heartbeat (default 30, at least twice "
        "server_heartbeat_seconds): past it, another server on the store recovers the task as a restart would "
        "(failed, or re-queued where its type is safe to retry).",
    ).tag(config=True)

    worker_reuse = Bool(
        True,
        help="Reuse warm worker processes across tasks (default true): max_concurrency workers are started "
        "ahead and each runs one task at a time, so a small task costs milliseconds, not a process start. False: "
        "every task gets a fresh process discarded after it (isolation for untrusted task code, at about 30 tasks/s). "
        "Task types flagged isolated (evaluations) always get a fresh process.",
    ).tag(config=True)
    worker_max_tasks = Integer(
        1000,
        min=1,
        help="Tasks one reused worker runs before it is replaced by a fresh one (bounds what leaks "
        "across tasks; default 1000).",
    ).tag(config=True)
    worker_max_memory_mb = Integer(
        1024,
        min=64,
        help="Resident memory, in MB, above which a reused worker is replaced after its task ends "
        "(a process keeps memory it freed; default 1024).",
    ).tag(config=True)
    dask_scheduler_address = Unicode(
        "",
        help="With executor=dask: the Dask scheduler to connect to (e.g. 'tcp://10.0.0.5:8786'). Empty (default): "
        "start a LocalCluster on this machine, sized by dask_local_workers, dask_local_threads, dask_local_memory_mb.",
    ).tag(config=True)
    dask_local_workers = Integer(
        2,
        min=1,
        help="Worker processes of the LocalCluster started when dask_scheduler_address is empty (default 2).",
    ).tag(config=True)
    dask_local_threads = Integer(
        1,
        min=1,
        help="Threads per LocalCluster worker (default 1): tasks running at once per worker. Stopping a task "
        "that ignores cancellation restarts its worker, which ends every task on it: keep 1 unless tasks are short.",
    ).tag(config=True)
    dask_local_memory_mb = Integer(
        0,
        min=0,
        help="Memory limit of each LocalCluster worker in MB, also declared as its memory_mb resource "
        "(default 0: Dask's share of this machine's memory, not declared).",
    ).tag(config=True)
    dask_worker_resources = Unicode(
        "",
        help="Dask resources each LocalCluster worker declares besides slots (= its threads), as name=amount "
        "(e.g. 'gpu=1'); a task type needing a resource runs only on workers that have it. Workers of a remote "
        "scheduler declare theirs themselves (`dask worker --resources`). Default empty.",
    ).tag(config=True)
    dask_fallback = CaselessStrEnum(
        ["local", "refuse"],
        default_value="local",
        help="With executor=dask, when the scheduler cannot be reached at start: 'local' (default) runs tasks with the "
        "local executor (logged, and shown in plexus/api/health); 'refuse' serves no Plexus route (503 naming the "
        "scheduler) until the server is restarted with the scheduler up.",
    ).tag(config=True)
    dask_connect_timeout = Float(
        10.0,
        min=0.1,
        help="Seconds to wait for the Dask scheduler at start before dask_fallback applies (default 10).",
    ).tag(config=True)
    dask_message_interval = Float(
        0.1,
        min=0.01,
        max=5.0,
        help="Seconds a Dask worker gathers its tasks' progress and log messages before it "
        "sends them to the server in one queue put (default 0.1): bounds the load on the scheduler.",
    ).tag(config=True)

    audit_retention_days = Float(
        365.0,
        min=0.0,
        help="Days an audit record is kept; older ones are deleted in the background (bounded "
        "batches, after a write, at most hourly). 0 keeps them forever. Default 365.",
    ).tag(config=True)
    db_pool_size = Integer(
        10,
        min=1,
        max=1000,
        help="Connections the server keeps open to the store (SQLAlchemy's pool), and the most it opens at once: a "
        "store call waits for a free one up to db_pool_timeout_seconds. Several servers on one PostgreSQL each open "
        "this many (keep the sum under the server's max_connections). Default 10.",
    ).tag(config=True)
    db_pool_timeout_seconds = Float(
        30.0,
        min=0.1,
        help="Seconds a store call waits for a free pooled connection (or for PostgreSQL to accept a new one) before "
        "it fails with a clear error. Default 30.",
    ).tag(config=True)
    db_statement_timeout_seconds = Float(
        30.0,
        min=0.0,
        help="PostgreSQL: seconds one statement may run before the database cancels it (statement_timeout; 0: no "
        "limit). SQLite waits at most 5 s for its write lock instead. Default 30.",
    ).tag(config=True)
    evaluation_items_dir = Unicode(
        "",
        help="Directory of evaluations' per-item results, as Parquet files (one directory per evaluation, a file "
        "per scored chunk; the store keeps only a manifest). Every worker and server must reach it: with Dask on "
        "other machines or several servers on one PostgreSQL, a shared path. Default '' (empty): "
        "{data_dir}/plexus_mcp/items.",
    ).tag(config=True)
    max_dataset_upload_bytes = Integer(
        8 * 2**30,
        min=1,
        help="Most bytes of Arrow data one dataset registered in parts may total (the notebook sends a large "
        "DataFrame in parts, each a request below Jupyter's ServerApp.max_body_size); past it the upload is "
        "discarded with an error saying so (a part declaring more than is left: 413 before it is read). A "
        "registration in one request (POST plexus/api/datasets) may send at most this many bytes too. Default 8 GiB.",
    ).tag(config=True)
    max_parquet_uncompressed_bytes = Integer(
        2**30,
        min=1,
        help="Most bytes a Parquet body registered in one request (POST plexus/api/datasets) may read back as. Its "
        "footer is a first filter (declared uncompressed bytes, rows x columns and leaf values times 8, and values "
        "read back wider, fixed-size binary, decimal or view, times their width, checked before any data is read); "
        "the read enforces it: the page headers' decompressed sizes and values (times 8, or their width) before any "
        "page is decompressed (a header no writer makes is refused; and, from the "
        "dictionary pages, the most a string column's dictionary-encoded values decode to), then each batch's "
        "decoded size (a string column whose pages do not bound it counted from its dictionaries, not decoded), "
        "so a small body cannot expand into gigabytes even when its footer under-declares. Past it the body is "
        "refused saying so (send the frame in parts: the notebook client does). The label column of a Parquet "
        "file under the Jupyter root that a describe counts is held to it the same way (its page headers, then its "
        "batches' decoded size), and so are a Parquet file's columns an evaluation reads, row group by row group "
        "(a larger file streams, sampled or not; a row group past it fails the evaluation), and a dataset load. "
        "A DELTA_BYTE_ARRAY string column is refused (no bound reaches it). Default 1 GiB.",
    ).tag(config=True)
    max_registered_bytes_per_principal = Integer(
        2 * 2**30,
        min=0,
        help="Most bytes of registered datasets (their Parquet files) one API key may keep; registering past it "
        "is refused with an error saying the quota, the use and how to free it (delete datasets). The notebook "
        "user (Jupyter's token) is not limited. 0: no limit. Default 2 GiB.",
    ).tag(config=True)

    def apply_env(self, environ: Mapping[str, str] | None = None, protected: Iterable[str] = ()) -> None:
        """Set traits from PLEXUS_MCP_* variables, except those in `protected` (set on the command line).

        Raises SettingsError naming every bad variable, its value and what is allowed; valid ones are set."""
        environ = os.environ if environ is None else environ
        protected = set(protected)
        problems = []
        for name, trait in self.settings_traits().items():
            var = env_var(name)
            if var not in environ or name in protected:
                continue
            raw = environ[var]
            try:
                setattr(self, name, trait.from_string(raw))
            except (TraitError, ValueError) as exc:
                problems.append(f"{var}={raw!r} is not a valid value for {name}: {allowed_values(exc)}")
        if problems:
            raise SettingsError(problems)

    def invalid_settings(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`config` (a traitlets Config) without the Plexus settings whose values are invalid, and why each is.

        Traitlets raises on the first bad value and Jupyter then only warns and drops the whole extension:
        this lets the caller report every bad setting by name and refuse to serve (see app.py)."""
        traits = self.settings_traits()
        problems: list[str] = []
        clean = dict(config)
        for section in ("PlexusMCPExtension", "PlexusSettings"):
            values = config.get(section)
            if not values:
                continue
            kept = type(values)()
            for name, value in values.items():
                trait = traits.get(name)
                try:
                    if trait is not None:
                        given = value.get_value(trait) if isinstance(value, DeferredConfig) else value
                        trait.validate(self, given)
                    kept[name] = value
                except (TraitError, ValueError) as exc:
                    problems.append(f"{section}.{name}={_shown(value)!r} is not valid: {allowed_values(exc)}")
            clean[section] = kept
        return clean, problems

    @classmethod
    def settings_traits(cls) -> dict[str, Any]:
        """The traits of PlexusSettings itself (not those of classes that mix it in)."""
        return PlexusSettings.class_traits(config=True)
