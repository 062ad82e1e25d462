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
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..core.errors import InvalidArgument, NotFound
from ..core.models import iso
from ..core.ownership import key_owner
from ..core.store import metadata
from .identity import Principal, Role

PREFIX = "plx_"
KEY_PATTERN = re.compile(r"^plx_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
CACHE_SECONDS = 5.0
LAST_USED_EVERY = 60.0  # write last_used_at at most this often per key
MAX_NAME = 100

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


class KeyStore:
    """Creates, lists, revokes and verifies API keys on the shared engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cache: dict[str, tuple[float, ApiKey, str]] = {}  # id -> (read at, key, secret hash)
        self._last_written: dict[str, float] = {}
        self._lock = threading.Lock()

    def create(
        self,
        name: str,
        role: str | Role,
        *,
        expires_in_days: float | None = None,
        created_by: str | None = None,
        rate_limit: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the caller)."""
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise InvalidArgument(f"a key needs a name of 1 to {MAX_NAME} characters (say who or what uses it)")
        try:
            role = Role.parse(role)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if expires_in_days is not None and (
            isinstance(expires_in_days, bool)
            or not isinstance(expires_in_days, int | float)
            or not 0 < expires_in_days <= 3650
        ):
            raise InvalidArgument(f"expires_in_days must be a number of days from 0 to 3650, not {expires_in_days!r}")
        if rate_limit is not None and (not isinstance(rate_limit, int | float) or not 0 < rate_limit <= 10_000):
            raise InvalidArgument(f"rate_limit must be requests per second from 0 to 10000, not {rate_limit!r}")
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        secret = secrets.token_urlsafe(32)
        now = time.time()
        expires_at = now + expires_in_days * 86400 if expires_in_days is not None else None
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(keys_table).values(
                    id=key_id,
                    name=name.strip(),
                    role=role.value,
                    secret_hash=_hash(secret),
                    created_at=now,
                    created_by=created_by,
                    expires_at=expires_at,
                    rate_limit=rate_limit,
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
