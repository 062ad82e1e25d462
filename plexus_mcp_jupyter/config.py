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

from traitlets import CaselessStrEnum, Float, Integer, TraitError, Unicode
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
        help="Where task code runs: 'local' (a worker process per task).",
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
    max_dataset_header_bytes = Integer(
        1024 * 1024, min=1024,
        help="Longest first line (header, or first record) of a CSV or JSON Lines file that listing, describing "
        "or checking a dataset reads, in bytes; also the longest row a describe streams. A file beyond it is "
        "listed as unreadable, with the reason. Default 1 MiB.",
    ).tag(config=True)
    max_dataset_columns = Integer(
        10_000, min=1,
        help="Most columns a dataset may have (a file is listed as unreadable beyond it; a DataFrame with more is "
        "not registered). Default 10000.",
    ).tag(config=True)
    dataset_threads = Integer(
        2, min=1,
        help="Threads that list, describe and check data files at once (their own pool, so that slow reads never "
        "hold the event loop or the default thread pool); more requests wait their turn. Default 2.",
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
