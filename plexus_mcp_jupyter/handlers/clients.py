"""`{base_url}plexus/api/clients`: ready MCP client configurations for this server (the lab's "Connect" panel).

The texts come from the CLI's own builders (`cli.client_text`, as `plexus mcp config` prints them), so the
panel and the command line never disagree. POST, not GET: the body may carry an API key's secret (just
minted by the panel), which must not appear in a URL or a log line.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr

from ..cli import CLIENT_CHOICES, client_text
from ..core.errors import PlexusError
from ..core.requests import RequestModel
from .base import BodyHandler, http_error

PLACEHOLDER = "<your API key>"
MAX_SECRET = 200


def _credential_text(value: Any) -> Any:
    if value is not None and not (
        isinstance(value, str) and 0 < len(value) <= MAX_SECRET and value.isprintable() and " " not in value
    ):
        raise ValueError(f"must be an API key or token: printable, no spaces, 1 to {MAX_SECRET} characters")
    return value


def _client_name(value: str) -> str:
    if not (0 < len(value) <= 64 and value.replace("-", "").replace("_", "").isalnum()):
        raise ValueError("must be 1 to 64 letters, digits, '-' or '_'")
    return value


class ClientConfigs(RequestModel):
    """POST plexus/api/clients: the configurations to make. The secret is a `SecretStr`: a refusal names the field
    and what it must be, never its text (core/requests.py: `request_error` quotes no secret)."""

    secret: Annotated[SecretStr | None, BeforeValidator(_credential_text)] = Field(
        None, description="An API key to put in the configurations (the caller's own credential otherwise)"
    )
    name: Annotated[str, Field(max_length=64), AfterValidator(_client_name)] = Field(
        "plexus", description="The server's name in the client's configuration"
    )


class ClientsHandler(BodyHandler):
    audit_mutations = False  # it changes nothing; a minted key is audited where it is created

    async def post(self) -> None:
        """{"secret"?: an API key to put in the configurations, "name"?: the server's name in the client}
        (ClientConfigs).

        Without a secret, the notebook user gets Jupyter's token in them; a key-authenticated caller gets a
        placeholder (it never sees the server's token)."""
        try:
            request = ClientConfigs.parse(await self.json_body())
        except PlexusError as exc:
            raise http_error(exc) from None
        secret = request.secret.get_secret_value() if request.secret is not None else None
        name = request.name
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
