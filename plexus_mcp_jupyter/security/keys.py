"""API keys: `plx_<id>_<secret>`, shown once, stored as a hash, revocable, with a role and an expiry.

The id (`plx_<id>` is the visible prefix) finds the row; the secret is compared in constant time with
its SHA-256 (the secret has 256 bits of entropy, so a slow password hash adds nothing but latency).
Verification is cached for a few seconds per key, so a busy client costs one dictionary lookup, while a
revocation still takes effect on the next request: `revoke` clears the cache, and other processes
sharing the store see it within `CACHE_SECONDS`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import BeforeValidator, Field, StringConstraints, WithJsonSchema
from sqlalchemy.engine import Engine

from ..core.errors import NotFound
from ..core.models import iso
from ..core.ownership import key_owner
from ..core.requests import Number, RequestModel
from ..core.store import metadata
from .identity import Principal, Role

PREFIX = "plx_"
KEY_PATTERN = re.compile(r"^plx_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
CACHE_SECONDS = 5.0
LAST_USED_EVERY = 60.0  # write last_used_at at most this often per key
MAX_NAME = 100
MAX_DAYS = 3650
MAX_RATE = 10_000

keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(12), primary_key=True),
    sa.Column("name", sa.String(MAX_NAME), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(128)),
    sa.Column("expires_at", sa.Float),
    sa.Column("last_used_at", sa.Float),
    sa.Column("revoked_at", sa.Float),
    sa.Column("rate_limit", sa.Float),  # requests per second for this key (None: the configured default)
)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: Role
    created_at: float
    created_by: str | None
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None
    rate_limit: float | None

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.id}"

    def status(self, at: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (at or time.time()):
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(owner=key_owner(self.id), role=self.role, key_id=self.id, name=self.name)

    def to_dict(self) -> dict[str, Any]:
        """Everything about the key but its secret (which is never stored)."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "name": self.name,
            "role": self.role.value,
            "status": self.status(),
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "expires_at": iso(self.expires_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
            "rate_limit": self.rate_limit,
        }


class KeyRejected(Exception):
    """The credential looks like a Plexus key but is not a valid one (the message says why, safely)."""


def key_id_of(text: str) -> str:
    """The id in an id, a prefix plx_<id>, or a whole credential plx_<id>_<secret>."""
    match = KEY_PATTERN.match(text)
    return match.group(1) if match else text.removeprefix(PREFIX)


SECRET_IN_TEXT = re.compile(r"(plx_[a-z0-9]{12})_[A-Za-z0-9_-]+")


def without_secrets(text: str) -> str:
    """`text` with the secret of any API key in it replaced (paths, messages): plx_<id>_[redacted]."""
    return SECRET_IN_TEXT.sub(r"\1_[redacted]", text)


def looks_like_key(credential: str) -> bool:
    return credential.startswith(PREFIX)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _role(value: Any) -> Role:
    try:
        return Role.parse(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


class CreateKey(RequestModel):
    """Create an API key: the body of POST plexus/api/keys, and what `plexus keys create` builds from its flags."""

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_NAME)] = Field(
        description=f"Who or what uses it, e.g. 'claude-desktop on my laptop' (1 to {MAX_NAME} characters)"
    )
    role: Annotated[Role, BeforeValidator(_role), WithJsonSchema({"enum": [r.value for r in Role]})] = Field(
        Role.VIEWER, description="viewer (read), operator (also run and cancel its own tasks) or admin"
    )
    expires_in_days: Annotated[float | None, Number] = Field(
        None,
        gt=0,
        le=MAX_DAYS,
        description=f"Days until it expires, more than 0 and at most {MAX_DAYS} (default: never)",
    )
    rate_limit: Annotated[float | None, Number] = Field(
        None,
        gt=0,
        le=MAX_RATE,
        description=f"Requests per second for this key, more than 0 and at most {MAX_RATE} (default: the setting)",
    )


class ListKeys(RequestModel):
    """List the API keys: GET plexus/api/keys, `plexus keys list`."""

    include_revoked: bool = Field(False, description="Also the revoked keys")


class KeyStore:
    """Creates, lists, revokes and verifies API keys on the shared engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[str, tuple[float, ApiKey, str]] = {}  # id -> (read at, key, secret hash)
        self._last_written: dict[str, float] = {}
        self._lock = threading.Lock()

    def create(
        self, name: str, role: str | Role = "viewer", *, created_by: str | None = None, **options: Any
    ) -> tuple[ApiKey, str]:
        """A new key and its secret: `add` with the CreateKey of these fields (`options`: expires_in_days,
        rate_limit); InvalidArgument names a bad one."""
        return self.add(CreateKey.parse({"name": name, "role": role, **options}), created_by=created_by)

    def add(self, request: CreateKey, *, created_by: str | None = None) -> tuple[ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the caller)."""
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        secret = secrets.token_urlsafe(32)
        now = time.time()
        days = request.expires_in_days
        expires_at = now + days * 86400 if days is not None else None
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(keys_table).values(
                    id=key_id,
                    name=request.name,
                    role=request.role.value,
                    secret_hash=_hash(secret),
                    created_at=now,
                    created_by=created_by,
                    expires_at=expires_at,
                    rate_limit=request.rate_limit,
                )
            )
        return self.get(key_id), f"{PREFIX}{key_id}_{secret}"

    def get(self, key_id: str) -> ApiKey:
        """A key by its id, its prefix (plx_<id>) or the whole credential (whose secret is never echoed)."""
        key_id = key_id_of(key_id)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.id == key_id)).mappings().first()
        if row is None:
            shown = key_id if re.fullmatch(r"[a-z0-9]{1,12}", key_id) else "(not a key id)"
            raise NotFound(f"no API key {shown}; list the keys to see their ids")
        return _key(row)

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        query = sa.select(keys_table).order_by(keys_table.c.created_at.desc())
        if not include_revoked:
            query = query.where(keys_table.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key(r) for r in conn.execute(query).mappings()]

    def revoke(self, key_id: str) -> ApiKey:
        key = self.get(key_id)
        if key.revoked_at is None:
            with self.engine.begin() as conn:
                conn.execute(sa.update(keys_table).where(keys_table.c.id == key.id).values(revoked_at=time.time()))
        with self._lock:
            self._cache.pop(key.id, None)
        return self.get(key.id)

    def verify(self, credential: str) -> ApiKey:
        """The key a credential proves; KeyRejected with a reason safe to show (never the credential)."""
        match = KEY_PATTERN.match(credential)
        if match is None:
            raise KeyRejected("malformed API key: expected plx_<12 characters>_<43 characters>")
        key_id, secret = match.groups()
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > CACHE_SECONDS:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(keys_table).where(keys_table.c.id == key_id)).mappings().first()
            if row is None:
                raise KeyRejected("unknown API key")
            cached = (now, _key(row), str(row["secret_hash"]))
            with self._lock:
                self._cache[key_id] = cached
        _, key, secret_hash = cached
        if not hmac.compare_digest(_hash(secret), secret_hash):
            raise KeyRejected("unknown API key")
        status = key.status()
        if status != "active":
            raise KeyRejected(f"API key {key.prefix} is {status}")
        self._touch(key.id)
        return key

    def _touch(self, key_id: str) -> None:
        now = time.time()
        with self._lock:
            if now - self._last_written.get(key_id, 0.0) < LAST_USED_EVERY:
                return
            self._last_written[key_id] = now
        with self.engine.begin() as conn:
            conn.execute(sa.update(keys_table).where(keys_table.c.id == key_id).values(last_used_at=now))


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        role=Role(row["role"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        rate_limit=row["rate_limit"],
    )
