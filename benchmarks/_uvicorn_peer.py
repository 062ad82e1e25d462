"""The peer of bench_tools_call.py: the same Plexus MCP server, served by the SDK on uvicorn.

Same MCPServer, same store kind, same event store and session settings as the Jupyter endpoint;
only the HTTP server differs. Run by the benchmark as a subprocess: `python _uvicorn_peer.py PORT DB_URL`.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

import uvicorn
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.routing import Route

from plexus_mcp_jupyter.config import PlexusSettings
from plexus_mcp_jupyter.endpoint.event_store import MemoryEventStore
from plexus_mcp_jupyter.runtime import PlexusRuntime


def main() -> None:
    port, db_url, data_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    runtime = PlexusRuntime(PlexusSettings(db_url=db_url), data_dir=data_dir)
    manager = StreamableHTTPSessionManager(
        app=runtime.mcp._lowlevel_server,
        event_store=MemoryEventStore(),
        security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )

    @asynccontextmanager
    async def lifespan(_app):
        await runtime.manager.start()
        async with manager.run():
            yield
        await runtime.manager.stop()

    app = Starlette(routes=[Route("/mcp", endpoint=StreamableHTTPASGIApp(manager))], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
