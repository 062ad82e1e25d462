"""Settings shared by the Jupyter extension and the `plexus` CLI.

Every setting is a traitlet, so it can be set in a Jupyter config file
(`c.PlexusMCPExtension.max_concurrency = 8`), on the command line
(`--PlexusMCPExtension.max_concurrency=8`) or by an environment variable
(`PLEXUS_MCP_MAX_CONCURRENCY=8`). Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from traitlets import Bool, CaselessStrEnum, Float, Integer, TraitError, Unicode
from traitlets.config import Configurable

ENV_PREFIX = "PLEXUS_MCP_"


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
        ["local"], default_value="local",
        help="Where task code runs: 'local' (worker processes on this machine, see worker_reuse).",
    ).tag(config=True)
    max_concurrency = Integer(4, min=0, help="Tasks that may run at once; the rest wait QUEUED.").tag(config=True)
    max_concurrency_per_owner = Integer(
        0, min=0, help="Tasks one identity may run at once (0: no per-identity cap)."
    ).tag(config=True)
    cancel_grace_seconds = Float(
        5.0, min=0.1, help="Seconds a cancelled task has to stop by itself before its worker is killed."
    ).tag(config=True)
    progress_write_interval = Float(
        1.0, min=0.0, help="Seconds between progress writes of one task to the store (stage changes and ends are "
        "always written at once)."
    ).tag(config=True)
    poll_interval = Float(
        1.0, min=0.05, help="Seconds between checks of the store for work and cancellations from other servers "
        "sharing it."
    ).tag(config=True)
    max_page_size = Integer(100, min=1, max=1000, help="Largest page a listing returns.").tag(config=True)
    max_output_bytes = Integer(
        65_536, min=1024, help="Largest task output kept as it is (JSON bytes); larger outputs are truncated."
    ).tag(config=True)
    session_idle_timeout = Float(
        1800.0, min=1.0, help="Seconds after which an idle MCP session is closed."
    ).tag(config=True)
    max_sessions = Integer(1000, min=1, help="Most MCP sessions open at once.").tag(config=True)
    max_request_bytes = Integer(
        4 * 1024 * 1024, min=1024, help="Largest MCP request body, in bytes (larger ones get HTTP 413)."
    ).tag(config=True)
    event_store_size = Integer(
        10_000, min=1, help="SSE events kept so a dropped MCP stream can resume with Last-Event-ID."
    ).tag(config=True)
    event_store_bytes = Integer(
        32 * 1024 * 1024, min=64 * 1024,
        help="Most bytes of SSE events kept for resumption; the oldest go first past this or event_store_size.",
    ).tag(config=True)

    worker_nice = Integer(
        10, min=0, max=19, help="How much lower than the server's the priority of task workers is (Unix nice): "
        "the server keeps answering quickly while workers are busy.",
    ).tag(config=True)
    scorer_modules = Unicode(
        "plexus_mcp_jupyter.evaluations.examples",
        help="Comma-separated Python module prefixes whose functions API keys may name as python: scorers (a "
        "python: scorer runs that code in a worker, so this is an allowlist). The notebook user, an admin, may "
        "name any importable function.",
    ).tag(config=True)
    redact_columns = Unicode(
        "", help="Comma-separated dataset column names whose values never appear in evaluation results (ids, "
        "input excerpts or labels shown as [redacted]); they are still scored.",
    ).tag(config=True)
    rate_limit = Float(
        20.0, min=0.01, help="Requests per second an API key may make on average (HTTP 429 beyond; a key may "
        "have its own).",
    ).tag(config=True)
    rate_burst = Integer(40, min=1, help="Requests an API key may make at once before rate_limit applies.").tag(
        config=True)
    max_tasks_per_key = Integer(
        50, min=1, help="Unfinished tasks (queued and running) one API key may have; more are refused."
    ).tag(config=True)
    max_sessions_per_key = Integer(
        20, min=1, help="MCP sessions one API key may have open at once (HTTP 429 beyond; a session ends by DELETE "
        "or after session_idle_timeout). The notebook user and the server's token are held only to max_sessions.",
    ).tag(config=True)
    reserved_session_share = Float(
        0.1, min=0.0, max=0.9, help="Share of max_sessions that only admins (the notebook user, the server's token, "
        "admin keys) may use: viewer and operator keys together stop at max_sessions minus this share, rounded "
        "up (HTTP 503), so a flood of keys never locks the admins out. Default 0.1 (100 of 1000).",
    ).tag(config=True)

    key_slot_share = Float(
        0.5, min=0.0, max=1.0,
        help="Share of max_concurrency the running tasks of one API key may hold: floor(share x max_concurrency), at "
        "least 1 (default 0.5: half the slots, so one key never holds all of them while max_concurrency >= 2). The "
        "key's other tasks wait QUEUED and the scheduler starts the next eligible task; 1 turns the share off. The "
        "notebook user (Jupyter's own identity, the standalone token) has no share.",
    ).tag(config=True)
    max_priority_operator = Integer(
        10, min=-1000, max=1000,
        help="Highest task priority an operator key may set (dispatch and evaluations); a higher one is refused "
        "with an error naming this setting. Admins (keys and the notebook user) may use the full range, -1000 to "
        "1000; viewers cannot dispatch at all.",
    ).tag(config=True)

    worker_reuse = Bool(
        True, help="Reuse warm worker processes across tasks (default true): max_concurrency workers are started "
        "ahead and each runs one task at a time, so a small task costs milliseconds, not a process start. False: "
        "every task gets a fresh process discarded after it (isolation for untrusted task code, at about 30 tasks/s). "
        "Task types flagged isolated (evaluations) always get a fresh process.",
    ).tag(config=True)
    worker_max_tasks = Integer(
        1000, min=1, help="Tasks one reused worker runs before it is replaced by a fresh one (bounds what leaks "
        "across tasks; default 1000).",
    ).tag(config=True)
    worker_max_memory_mb = Integer(
        1024, min=64, help="Resident memory, in MB, above which a reused worker is replaced after its task ends "
        "(a process keeps memory it freed; default 1024).",
    ).tag(config=True)

    def apply_env(self, environ: Mapping[str, str] | None = None, protected: Iterable[str] = ()) -> None:
        """Set traits from PLEXUS_MCP_* variables, except those in `protected` (set on the command line)."""
        environ = os.environ if environ is None else environ
        protected = set(protected)
        for name, trait in self.settings_traits().items():
            var = env_var(name)
            if var not in environ or name in protected:
                continue
            raw = environ[var]
            try:
                setattr(self, name, trait.from_string(raw))
            except (TraitError, ValueError) as exc:
                raise ValueError(f"{var}={raw!r} is not a valid value for {name}: {exc}") from None

    @classmethod
    def settings_traits(cls) -> dict[str, Any]:
        """The traits of PlexusSettings itself (not those of classes that mix it in)."""
        return PlexusSettings.class_traits(config=True)
