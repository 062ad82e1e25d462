"""`{base_url}plexus/api/keys` and `.../audit`: API key management and the audit log (admins only)."""

from __future__ import annotations

import functools

from ..core.errors import PlexusError
from ..security.audit import QueryAudit
from ..security.keys import CreateKey, ListKeys
from .base import BodyHandler, BodylessHandler, http_error


class KeysHandler(BodyHandler):
    async def get(self) -> None:
        """The keys (never their secrets); ?include_revoked=true lists revoked ones too (ListKeys)."""
        self.require("keys")
        try:
            request = self.query_request(ListKeys)
        except PlexusError as exc:
            raise http_error(exc) from None
        keys = await self.runtime.store_calls.run(
            functools.partial(self.runtime.keys.list, include_revoked=request.include_revoked)
        )
        self.reply({"keys": [k.to_dict() for k in keys]})

    async def post(self) -> None:
        """Create a key: the body is a CreateKey {"name", "role": viewer|operator|admin, "expires_in_days"?,
        "rate_limit"?}, as `plexus keys create` builds it.

        201 with the key and its secret, which is shown this once and stored only as a hash.
        """
        principal = self.require("keys")
        body = await self.json_body()
        try:
            request = CreateKey.parse(body)  # a refused body: 400 naming each bad field and what is allowed
            key, secret = await self.runtime.store_calls.run(
                functools.partial(self.runtime.keys.add, request, created_by=principal.owner)
            )
        except PlexusError as exc:
            raise http_error(exc) from None
        self.runtime.audit.record(
            principal, "key.create", target=key.id, details={"name": key.name, "role": key.role.value}
        )
        self.reply(
            {
                **key.to_dict(),
                "secret": secret,
                "note": "the secret is shown only now: store it; send it as 'Authorization: Bearer <secret>'",
            },
            status=201,
        )


class KeyHandler(BodylessHandler):
    async def get(self, key_id: str) -> None:
        self.require("keys")
        try:
            self.reply((await self.runtime.store_calls.run(self.runtime.keys.get, key_id)).to_dict())
        except PlexusError as exc:
            raise http_error(exc) from None

    async def delete(self, key_id: str) -> None:
        """Revoke a key: its next request is refused and its open streams end now."""
        principal = self.require("keys")
        try:
            self.reply(self.runtime.revoke_key(key_id, by=principal).to_dict())
        except PlexusError as exc:
            raise http_error(exc) from None


class AuditHandler(BodylessHandler):
    async def get(self) -> None:
        """Audit records, newest first: ?action=tool.*&outcome=denied&owner=key:<id>&since=ISO&limit=&cursor=
        (QueryAudit, as plexus://audit and `plexus audit export` take them)."""
        self.require("audit")
        runtime = self.runtime
        try:
            request = self.query_request(QueryAudit)
            records, next_cursor = await runtime.store_calls.run(runtime.audit.query, request)
        except PlexusError as exc:
            raise http_error(exc) from None
        self.reply({"records": records, "next_cursor": next_cursor})
