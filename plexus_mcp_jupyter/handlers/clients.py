"""`{base_url}plexus/api/clients`: ready MCP client configurations for this server (the lab's "Connect" panel).

The texts come from the CLI's own builders (`cli.client_text`, as `plexus mcp config` prints them), so the
panel and the command line never disagree. POST, not GET: the body may carry an API key's secret (just
minted by the panel), which must not appear in a URL or a log line.
"""

from __future__ import annotations

from typing import Any

from tornado import web

from ..cli import CLIENT_CHOICES, client_text
from .base import PlexusHandler

PLACEHOLDER = "<your API key>"
MAX_SECRET = 200


class ClientsHandler(PlexusHandler):
    audit_mutations = False  # it changes nothing; a minted key is audited where it is created

    async def post(self) -> None:
        """{"secret"?: an API key to put in the configurations, "name"?: the server's name in the client}.

        Without a secret, the notebook user gets Jupyter's token in them; a key-authenticated caller gets a
        placeholder (it never sees the server's token)."""
        body = await self.json_body()
        secret = body.get("secret")
        name = body.get("name", "plexus")
        if secret is not None and (
            not isinstance(secret, str)
            or not 0 < len(secret) <= MAX_SECRET
            or not secret.isprintable()
            or " " in secret
        ):
            raise web.HTTPError(
                400, f"secret must be an API key or token: printable, no spaces, 1 to {MAX_SECRET} characters"
            )
        if not isinstance(name, str) or not (0 < len(name) <= 64 and name.replace("-", "").replace("_", "").isalnum()):
            raise web.HTTPError(400, "name must be 1 to 64 letters, digits, '-' or '_'")
        if secret:
            token, credential = secret, "api_key"
        elif self.principal.key_id is None and self.identity_provider.token:
            token, credential = self.identity_provider.token, "jupyter_token"
        elif self.principal.key_id is None:
            token, credential = None, "none"  # Jupyter's auth is off: nothing to send
        else:
            token, credential = PLACEHOLDER, "placeholder"
        url = f"{self.request.protocol}://{self.request.host}{self.base_url}plexus/mcp"
        clients: list[dict[str, Any]] = [
            {
                "id": client,
                "label": label,
                "where": where,
                "format": "shell" if client == "claude-code" else "json",
                "text": client_text(client, url, token, name),
            }
            for client, label, where in CLIENT_CHOICES
        ]
        # `bearer`: what the configurations send, for the panel's "test connection" (the caller already holds it).
        bearer = token if credential in ("api_key", "jupyter_token") else None
        self.reply({"url": url, "credential": credential, "bearer": bearer, "clients": clients})
