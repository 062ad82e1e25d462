"""The `plexus` command: `plexus mcp serve|config`, `plexus tasks ...` (batches), `plexus keys`, `plexus audit`,
`plexus db upgrade|current` (the store's schema migrations)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from jupyter_core.paths import jupyter_data_dir
from traitlets import TraitError

from ._version import __version__
from .config import PlexusSettings, SettingsError, allowed_values, env_var

if TYPE_CHECKING:
    from .core.requests import RequestModel
    from .runtime import PlexusRuntime

M = TypeVar("M", bound="RequestModel")

CLIENTS = ("claude", "claude-desktop", "cursor", "vscode", "generic")
# What the lab's "Connect an assistant" panel offers, in order: (client, label, where the text goes).
CLIENT_CHOICES = (
    ("claude-code", "Claude Code", "run in a terminal"),
    ("claude", "Claude Code (.mcp.json)", ".mcp.json in the project"),
    ("claude-desktop", "Claude Desktop", "claude_desktop_config.json (via the mcp-remote bridge)"),
    ("cursor", "Cursor", "~/.cursor/mcp.json"),
    ("vscode", "VS Code", ".vscode/mcp.json"),
    ("generic", "Generic JSON", "any MCP client over Streamable HTTP"),
)


def _settings_from_args(args: argparse.Namespace) -> PlexusSettings:
    """CLI flags over PLEXUS_MCP_* environment variables over defaults."""
    settings = PlexusSettings()
    given = {
        name: value
        for name, value in (("db_url", args.db_url), ("max_concurrency", args.max_concurrency))
        if value is not None
    }
    settings.apply_env(protected=given)
    for name, value in given.items():
        try:
            setattr(settings, name, value)
        except TraitError as exc:
            raise SettingsError([f"--{name.replace('_', '-')} {value!r} is not valid: {allowed_values(exc)}"]) from None
    return settings


def _configure_logging(level: str) -> None:
    # Logs go to stderr: in stdio mode stdout belongs to the protocol.
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s",
    )
    for name in ("mcp", "sse_starlette", "httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def take_stdout() -> BinaryIO | None:
    """stdio: stdout taken for the protocol before anything else of the server runs: fd 1 pointed at stderr (the
    null device when stderr is closed) from here on (a print in a warm-up or a start, a library that writes at import,
    the forkserver and the workers and any child process, which inherit fd 1), the client's pipe kept on a descriptor
    of its own, above 2 and not inherited, that only the transport writes (standalone.serve_stdio). The SDK's
    `stdio_server()` does the same, but only once it runs: the runtime's construction and start came before it. None
    where stdout is not fd 1, or on Windows (whose standard handles need rebinding: `stdio_server()` takes it, as
    before)."""
    if sys.platform == "win32":
        return None
    import fcntl  # (POSIX)

    try:
        if sys.stdout is None or sys.stdout.fileno() != 1:
            return None
        sys.stdout.flush()
        # Above 2 (as the SDK's `_dup_above_std`): os.dup takes the lowest free descriptor, 2 when a client launched
        # this process with stderr closed, and fd 1 pointed "at stderr" was the client's pipe still. Not inherited.
        wire = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    except (OSError, ValueError, AttributeError):  # (io.UnsupportedOperation is an OSError and a ValueError)
        return None
    try:
        try:
            diversion = os.dup(2)
        except OSError:  # stderr closed: what is written to fd 1 is dropped
            diversion = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(diversion, 1)
        finally:
            os.close(diversion)
    except OSError:
        os.close(wire)
        return None
    # Never closed (closefd=False, as the SDK's own wire): a thread may still write to it as the process exits, and a
    # descriptor closed by a wrapper's collection could be reused by another file under it.
    return os.fdopen(wire, "wb", closefd=False)


def cmd_serve(args: argparse.Namespace) -> int:
    wire = take_stdout() if args.transport == "stdio" else None  # first: nothing but JSON-RPC may reach it
    _configure_logging(args.log_level)
    settings = _settings_from_args(args)  # (a bad flag or PLEXUS_MCP_* value ends it here, before any process)
    early = settings.executor == "local"
    if early:
        from . import start_workers_early

        # The forkserver's imports (~0.7 s) beside this process's own (the runtime's, a second or more), as
        # Jupyter does: not after the server answers, where the first evaluation's worker waited for them.
        start_workers_early()
    runtime: PlexusRuntime | None = None
    try:
        from .core.executors import ExecutorUnavailable
        from .core.store_calls import store_unavailable
        from .migrations import StoreRefused
        from .runtime import PlexusRuntime
        from .standalone import serve_http, serve_stdio

        try:
            runtime = PlexusRuntime(settings, data_dir=jupyter_data_dir(), root_dir=args.root_dir)
        except (ExecutorUnavailable, StoreRefused) as exc:  # dask_fallback=refuse; a store newer than this code
            print(f"plexus: not started: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            unavailable = store_unavailable(exc)  # the database down or unreachable: its reason, not a traceback
            if unavailable is None:
                raise
            print(f"plexus: not started: {unavailable}; check --db-url / {env_var('db_url')}", file=sys.stderr)
            return 1
    finally:
        if runtime is None and early:  # not started (its store unreachable, say): the forkserver must not outlive
            from .core.executors.local import stop_early_forkserver  # this process on its stdout (a client's pipe)

            stop_early_forkserver(now=True)
    if args.transport == "stdio":
        asyncio.run(serve_stdio(runtime, wire))
        return 0
    token = args.token or os.environ.get(env_var("token"), "")
    generated = not token
    if generated:
        token = secrets.token_urlsafe(32)
    asyncio.run(
        serve_http(
            runtime,
            host=args.host,
            port=args.port,
            token=token,
            token_generated=generated,
            certfile=args.certfile,
            keyfile=args.keyfile,
            allowed_origins=tuple(args.allow_origin or ()),
        )
    )
    return 0


# Where each client reads its configuration (project scope where the client has one).
CONFIG_FILES = {"claude": ".mcp.json", "cursor": "~/.cursor/mcp.json", "vscode": ".vscode/mcp.json"}


def plexus_command() -> list[str]:
    """How a client launches this very installation: the absolute path of its `plexus` script (a client does
    not have this virtual environment on its PATH), else this Python running the CLI module."""
    script = Path(sys.executable).with_name("plexus")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "plexus_mcp_jupyter.cli"]


def client_config(
    client: str, *, url: str | None, token: str | None, stdio_args: list[str] | None, name: str = "plexus"
) -> dict[str, Any]:
    """A ready configuration for an MCP client, for HTTP (url + token) or stdio (a command)."""
    if stdio_args is not None:
        command, *prefix = plexus_command()
        entry: dict[str, Any] = {
            "command": command,
            "args": [*prefix, "mcp", "serve", "--transport", "stdio", *stdio_args],
        }
        if client == "vscode":
            return {"servers": {name: {"type": "stdio", **entry}}}
        return {"mcpServers": {name: entry}}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if client == "claude-desktop":
        # Claude Desktop's config file launches local commands only: the mcp-remote bridge speaks HTTP for it.
        args = ["-y", "mcp-remote", str(url)] + (["--header", f"Authorization: Bearer {token}"] if token else [])
        return {"mcpServers": {name: {"command": "npx", "args": args}}}
    if client == "generic":
        return {"mcpServers": {name: {"transport": "streamable-http", "url": url, "headers": headers}}}
    if client == "vscode":
        return {"servers": {name: {"type": "http", "url": url, "headers": headers}}}
    if client == "cursor":
        return {"mcpServers": {name: {"url": url, "headers": headers}}}
    return {"mcpServers": {name: {"type": "http", "url": url, "headers": headers}}}


def claude_code_command(url: str, token: str | None, name: str = "plexus") -> str:
    """Claude Code's one-line registration of the endpoint (`claude mcp add`)."""
    # Every part quoted for the shell: a name, URL or secret from a request body never runs as a command.
    header = f" --header {shlex.quote(f'Authorization: Bearer {token}')}" if token else ""
    return f"claude mcp add --transport http {shlex.quote(name)} {shlex.quote(url)}{header}"


def client_text(client: str, url: str, token: str | None, name: str = "plexus") -> str:
    """What a user pastes for `client` (one of CLIENT_CHOICES): a shell command or a JSON document."""
    if client == "claude-code":
        return claude_code_command(url, token, name)
    return json.dumps(client_config(client, url=url, token=token, stdio_args=None, name=name), indent=2)


def _running_jupyter() -> dict[str, Any] | None:
    from jupyter_server.serverapp import list_running_servers

    return next(iter(list_running_servers()), None)


def write_config(path: Path, config: dict[str, Any]) -> str:
    """Merge a client configuration into the file at `path`: its other servers and settings are kept, only the
    entry of the same name is replaced. Refuses (ValueError) a file that is not a JSON object, unchanged."""
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text() or "{}")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); fix or move it, then run this again") from None
        if not isinstance(existing, dict):
            raise ValueError(f"{path} does not hold a JSON object; fix or move it, then run this again")
    ((top, servers),) = config.items()
    current = existing.get(top, {})
    if not isinstance(current, dict):
        raise ValueError(f"{path}: {top!r} is not a JSON object; fix it, then run this again")
    ((name, entry),) = servers.items()
    action = "updated" if name in current else "added"
    existing[top] = {**current, name: entry}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".plexus-tmp")
    temporary.write_text(json.dumps(existing, indent=2) + "\n")
    temporary.replace(path)  # all or nothing: never a half-written configuration
    return f"plexus: {action} the {name!r} server in {path}"


def _emit(args: argparse.Namespace, config: dict[str, Any]) -> int:
    if args.write is None:
        print(json.dumps(config, indent=2))
        print(
            f"plexus: put this in {CONFIG_FILES[args.client]}, or run again with --write to merge it into that "
            "file (other servers there are kept)",
            file=sys.stderr,
        )
        return 0
    path = Path(CONFIG_FILES[args.client] if args.write == "" else args.write).expanduser()
    try:
        print(write_config(path, config), file=sys.stderr)
    except ValueError as exc:
        print(f"plexus: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.stdio:
        extra = ["--db-url", args.db_url] if args.db_url else []
        return _emit(args, client_config(args.client, url=None, token=None, stdio_args=extra, name=args.name))
    url, token = args.url, args.token
    if url is None:
        server = _running_jupyter()
        if server is None:
            print(
                "plexus: no running Jupyter server was found. Start one with `jupyter lab`, pass --url and "
                "--token for another server, or use --stdio for a client-launched server.",
                file=sys.stderr,
            )
            return 1
        url = server["url"].rstrip("/") + "/plexus/mcp"
        token = token or server.get("token") or None
    return _emit(args, client_config(args.client, url=url, token=token, stdio_args=None, name=args.name))


def _store_url(args: argparse.Namespace) -> str:
    """The store's URL, as `plexus mcp serve` and Jupyter would open it (--db-url, env, or the default)."""
    from .core.store import default_db_url

    settings = PlexusSettings()
    settings.apply_env(protected={"db_url"} if args.db_url else ())
    return args.db_url or settings.db_url or default_db_url(jupyter_data_dir())


def _store_engine(args: argparse.Namespace) -> Any:
    """The store's engine, its schema migrated to this release's (as at a server's start)."""
    from .core.store import Store

    return Store(_store_url(args)).engine


def cmd_db(args: argparse.Namespace) -> int:
    """`plexus db upgrade`: migrate the store to this release's schema; `plexus db current`: its revision."""
    from .core.errors import PlexusError
    from .core.store import make_engine
    from .migrations import current_revision, head_revision, upgrade_store

    engine = make_engine(_store_url(args))
    safe_url = engine.url.render_as_string(hide_password=True)
    try:
        if args.command == "upgrade":
            before, after = upgrade_store(engine, safe_url)
            if before == after:
                print(f"{safe_url}: already at revision {after} (head)")
            else:
                print(f"{safe_url}: migrated from revision {before or '(empty)'} to {after} (head)")
        else:
            revision, head = current_revision(engine), head_revision()
            shown = "(none)" if revision is None else f"{revision} (head)" if revision == head else revision
            print(f"{safe_url}: {shown}; this release's head is {head}")
    except PlexusError as exc:
        return _fail(exc)
    except Exception as exc:  # the database is unreachable, the URL wrong: one line, no traceback
        return _fail(RuntimeError(f"{safe_url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    finally:
        engine.dispose()
    return 0


def request_from(args: argparse.Namespace, model: type[M], **given: Any) -> M:
    """A command's request model from its flags, each named as the model's field (`--expires-in-days` is
    `expires_in_days`), and `given`; InvalidArgument in the server's words. The fields are declared once, in the
    model: a flag left out is the model's default."""
    fields = {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
    return model.parse({**fields, **{k: v for k, v in given.items() if v is not None}})


def cmd_keys(args: argparse.Namespace) -> int:
    """`plexus keys create|list|revoke`: manage API keys directly in the store (as its owner, an admin)."""
    from .core.errors import PlexusError
    from .security.audit import AuditLog
    from .security.identity import LOCAL_ADMIN
    from .security.keys import CreateKey, KeyStore

    request = None
    if args.command == "create":
        try:  # REST's body model, checked before the store is opened: the same words, nothing written
            request = request_from(args, CreateKey)
        except PlexusError as exc:
            return _fail(exc)
    engine = _store_engine(args)
    keys, audit = KeyStore(engine), AuditLog(engine)
    try:
        if request is not None:
            key, secret = keys.add(request, created_by="cli")
            audit.record(
                LOCAL_ADMIN,
                "key.create",
                target=key.id,
                client="cli",
                details={"name": key.name, "role": key.role.value},
            )
            print(json.dumps({**key.to_dict(), "secret": secret}, indent=2))
            print(
                "The secret is shown only now: store it. Clients send 'Authorization: Bearer <secret>'.",
                file=sys.stderr,
            )
        elif args.command == "list":
            for key in keys.list(include_revoked=args.all):
                print(json.dumps(key.to_dict()))
        else:
            key = keys.revoke(args.key_id)
            audit.record(LOCAL_ADMIN, "key.revoke", target=key.id, client="cli")
            print(json.dumps(key.to_dict()))
            print("Revoked: servers refuse it within seconds and close its open streams.", file=sys.stderr)
    except PlexusError as exc:
        return _fail(exc)
    finally:
        audit.close()
    return 0


def _fail(exc: Exception) -> int:
    print(f"plexus: {exc}", file=sys.stderr)
    return 2


def cmd_audit(args: argparse.Namespace) -> int:
    """`plexus audit export`: the audit log as JSON lines, oldest first."""
    from .core.errors import PlexusError
    from .security.audit import MAX_AUDIT_PAGE, AuditLog, QueryAudit

    try:  # the REST query's model, checked before the store is opened
        request = request_from(args, QueryAudit, limit=MAX_AUDIT_PAGE)
    except PlexusError as exc:
        return _fail(exc)
    audit = AuditLog(_store_engine(args))
    try:
        records, cursor = audit.query(request)
        pages = [records]
        while cursor:
            records, cursor = audit.query(request.model_copy(update={"cursor": cursor}))
            pages.append(records)
        for page in reversed(pages):
            for record in reversed(page):
                print(json.dumps(record, default=str))
    except PlexusError as exc:
        return _fail(exc)
    finally:
        audit.close()
    return 0


def _tasks_client(args: argparse.Namespace) -> Any:
    """A REST client of the server: --url/--token, else PLEXUS_MCP_URL/PLEXUS_MCP_TOKEN, else the running Jupyter
    server. An API key (plx_...) works as the token: the server applies its role, caps and priority ceiling."""
    from .notebook.client import PlexusClient, resolve_connection
    from .notebook.errors import PlexusConnectionError

    try:
        url, token = resolve_connection(args.url, args.token)
    except PlexusConnectionError:
        server = _running_jupyter()
        if server is None:
            raise
        url, token = server["url"], args.token or server.get("token") or None
    return PlexusClient(url, token)


def _bulk_request(args: argparse.Namespace) -> Any:
    """The operation's request model (core/requests.py), built here: a bad filter is refused before sending."""
    from .core.requests import BULK_REQUESTS

    return request_from(args, BULK_REQUESTS[args.command], task_ids=args.ids)


def _task_specs(path: str) -> list[dict[str, Any]]:
    """The specs of `plexus tasks dispatch`, checked with the server's DispatchBatch model before sending;
    ValueError in one line (which spec, which field: the server's words) when one is wrong."""
    from .core.errors import InvalidArgument
    from .core.requests import DispatchBatch

    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    example = '[{"type": "demo", "params": {...}, "priority": 0}, ...]'
    try:
        specs = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc}): give a list of task specs {example}") from None
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{path} must hold a non-empty list of task specs {example}, not {type(specs).__name__}")
    try:
        DispatchBatch.parse({"tasks": specs})
    except InvalidArgument as exc:
        raise ValueError(f"{path}: {exc}; nothing was sent") from None
    return specs


def cmd_tasks(args: argparse.Namespace) -> int:
    """`plexus tasks dispatch|cancel|retry|priority|batch`: batch operations over the server's REST API. Specs and
    filters are checked here with the server's request models, so a mistake is one line and exit status 2."""
    from .core.errors import InvalidArgument
    from .notebook.errors import PlexusError

    try:
        if args.command == "dispatch":
            specs = _task_specs(args.file)
            answer = _tasks_client(args).dispatch_batch(specs)
        elif args.command == "batch":
            answer = _tasks_client(args).batch(args.batch_id)
        else:
            request = _bulk_request(args)
            answer = _tasks_client(args).bulk(request)
    except (PlexusError, InvalidArgument, OSError, ValueError) as exc:
        return _fail(exc)
    print(json.dumps(answer, indent=2))
    return 0


def _add_tasks_parser(sub: Any) -> None:
    tasks = sub.add_parser("tasks", help="batch operations on a running server's tasks (REST)").add_subparsers(
        dest="command", required=True
    )
    dispatch = tasks.add_parser("dispatch", help="dispatch a batch: a JSON file holding a list of task specs")
    dispatch.add_argument("file", help='JSON list of {"type", "params", "priority", "description"}; - for stdin')
    batch = tasks.add_parser("batch", help="a batch's counts by status and progress")
    batch.add_argument("batch_id")
    commands = [dispatch, batch]
    for name, help_text in (
        ("cancel", "cancel tasks by id or by filter"),
        ("retry", "run FAILED or CANCELLED tasks again as new attempts"),
        ("priority", "change the priority of queued tasks"),
    ):
        command = tasks.add_parser(name, help=help_text)
        if name == "priority":
            command.add_argument("priority", type=int, help="the new priority, -1000 to 1000")
        command.add_argument("--ids", nargs="+", help="task ids (instead of a filter)")
        command.add_argument("--status", help="filter: comma-separated statuses")
        command.add_argument("--type", help="filter: comma-separated task types")
        command.add_argument("--owner", help="filter: the owner (admins only; others act on their own tasks)")
        command.add_argument("--created-after", help="filter: created at or after this ISO 8601 time")
        command.add_argument("--created-before", help="filter: created before this ISO 8601 time")
        command.add_argument("--batch", help="filter: the tasks of this batch")
        command.add_argument("--dry-run", action="store_true", help="only count what would be changed")
        commands.append(command)
    for command in commands:
        command.add_argument("--url", help="the server (default $PLEXUS_MCP_URL, else the running Jupyter server)")
        command.add_argument("--token", help="its token or an API key (default $PLEXUS_MCP_TOKEN)")
        command.set_defaults(func=cmd_tasks)


def cmd_evaluations(args: argparse.Namespace) -> int:
    """`plexus evaluations export ID`: an evaluation's items, streamed from the server as Arrow (REST) and written
    batch by batch as Parquet or CSV: bounded memory whatever the evaluation's size. The file is written under a
    temporary name and renamed once complete, so a failed export leaves nothing half-written."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    from .core.errors import InvalidArgument
    from .evaluations.requests import GetEvaluationResults
    from .notebook.errors import PlexusError

    try:  # the server's request model: a bad argument is one line (exit 2), nothing sent
        request = request_from(args, GetEvaluationResults)
    except InvalidArgument as exc:
        return _fail(exc)
    output = Path(args.output or f"{args.evaluation_id}.{args.format}")
    temporary = output.with_name(f".{output.name}.part")
    try:
        reader = _tasks_client(args).arrow_stream(
            f"evaluations/{request.evaluation_id}/results", request.query(exclude={"evaluation_id"})
        )
        rows = 0
        writer: Any = (
            pq.ParquetWriter(temporary, reader.schema, compression="zstd")
            if args.format == "parquet"
            else pa_csv.CSVWriter(temporary, reader.schema)
        )
        with writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
        os.replace(temporary, output)
    except (PlexusError, OSError, ValueError) as exc:  # pyarrow's errors are ValueErrors or OSErrors
        with contextlib.suppress(OSError):
            temporary.unlink()
        return _fail(exc)
    print(f"{rows:,} items of evaluation {args.evaluation_id} written to {output}")
    return 0


def _add_evaluations_parser(sub: Any) -> None:
    evaluations = sub.add_parser("evaluations", help="a running server's evaluations (REST)").add_subparsers(
        dest="command", required=True
    )
    export = evaluations.add_parser("export", help="write an evaluation's per-item results as Parquet or CSV")
    export.add_argument("evaluation_id")
    export.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    export.add_argument("--output", "-o", help="the file to write (default: <evaluation id>.<format>)")
    export.add_argument("--score", help="the score whose items to export (default: the first)")
    export.add_argument("--only-mismatches", action="store_true", help="only the items that are wrong or failed")
    export.add_argument("--label", help="only the items of this label class")
    export.add_argument("--url", help="the server (default $PLEXUS_MCP_URL, else the running Jupyter server)")
    export.add_argument("--token", help="its token or an API key (default $PLEXUS_MCP_TOKEN)")
    export.set_defaults(func=cmd_evaluations)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plexus", description="Plexus MCP: long-running tasks for AI assistants.")
    parser.add_argument("--version", action="version", version=f"plexus-mcp-jupyter {__version__}")
    sub = parser.add_subparsers(dest="group", required=True)
    mcp = sub.add_parser("mcp", help="the MCP server").add_subparsers(dest="command", required=True)

    serve = mcp.add_parser("serve", help="serve MCP without Jupyter, on the same store")
    serve.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP: address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP: port (default 8765; 0 picks a free one)")
    serve.add_argument("--token", help=f"HTTP: bearer token (default ${env_var('token')}, else generated)")
    serve.add_argument("--certfile", help="HTTP: TLS certificate file")
    serve.add_argument("--keyfile", help="HTTP: TLS private key file")
    serve.add_argument("--allow-origin", action="append", help="HTTP: a browser Origin to allow (repeatable)")
    serve.add_argument(
        "--root-dir",
        help="folder that dataset and scorecard paths are relative to (default: the "
        "current folder); nothing outside it can be read",
    )
    serve.add_argument(
        "--db-url",
        help=f"SQLAlchemy URL of the store (default ${env_var('db_url')}, else the SQLite file Jupyter uses)",
    )
    serve.add_argument("--max-concurrency", type=int, help="tasks that may run at once")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (logs go to stderr)")
    serve.set_defaults(func=cmd_serve)

    config = mcp.add_parser("config", help="print a client configuration for the running server")
    config.add_argument("--client", choices=CLIENTS, default="claude")
    config.add_argument("--url", help="MCP endpoint URL (default: the running Jupyter server's)")
    config.add_argument("--token", help="bearer token (default: the running Jupyter server's)")
    config.add_argument("--stdio", action="store_true", help="configure the client to launch `plexus mcp serve`")
    config.add_argument("--db-url", help="with --stdio: the store the launched server uses")
    config.add_argument("--name", default="plexus", help="the server's name in the client (default plexus)")
    config.add_argument(
        "--write",
        nargs="?",
        const="",
        metavar="FILE",
        help="merge the configuration into FILE (default: the client's own, e.g. .mcp.json for "
        "claude), keeping the other servers there, instead of printing it",
    )
    config.set_defaults(func=cmd_config)

    keys = sub.add_parser("keys", help="API keys for MCP clients, REST and the event stream").add_subparsers(
        dest="command", required=True
    )
    create = keys.add_parser("create", help="create a key and print its secret (shown only once)")
    create.add_argument("name", help="who or what uses it, e.g. 'claude-desktop on my laptop'")
    create.add_argument("--role", choices=("viewer", "operator", "admin"), default="viewer")
    create.add_argument("--expires-in-days", type=float, help="days until it expires (default: never)")
    create.add_argument("--rate-limit", type=float, help="requests per second for this key (default: the setting)")
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = keys.add_parser("revoke", help="revoke a key by its id or prefix (plx_<id>)")
    revoke.add_argument("key_id")
    for command in (create, listing, revoke):
        command.add_argument("--db-url", help="the store (default: the one Jupyter and `plexus mcp serve` use)")
        command.set_defaults(func=cmd_keys)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="command", required=True)
    export = audit.add_parser("export", help="print the audit log as JSON lines, oldest first")
    export.add_argument("--since", help="only records at or after this ISO 8601 time")
    export.add_argument("--action", help="only these actions (* wildcard, e.g. 'tool.*')")
    export.add_argument("--db-url", help="the store (default: the one Jupyter and `plexus mcp serve` use)")
    export.set_defaults(func=cmd_audit)
    db = sub.add_parser("db", help="the store's schema (migrations)").add_subparsers(dest="command", required=True)
    upgrade = db.add_parser("upgrade", help="migrate the store to this release's schema (servers also do at start)")
    current = db.add_parser("current", help="print the store's schema revision and this release's newest")
    for command in (upgrade, current):
        command.add_argument("--db-url", help="the store (default: the one Jupyter and `plexus mcp serve` use)")
        command.set_defaults(func=cmd_db)
    _add_tasks_parser(sub)
    _add_evaluations_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:  # a bad PLEXUS_MCP_* value or flag: one line naming it, exit code 2
        return _fail(exc)


if __name__ == "__main__":
    sys.exit(main())
