"""Who owns work and who may see it: the rules every store and face applies, in one place.

An owner is None (the notebook user, work made through Jupyter's own login), a Jupyter user name, or
`key:<id>` for work created with an API key. An admin (viewer None) sees everything; any other caller sees
what is unowned, what the notebook's users own, and its own key's work: never another key's.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

KEY_OWNER_PREFIX = "key:"  # owners of work created with an API key


def key_owner(key_id: str) -> str:
    """The owner recorded for work created with API key `key_id`."""
    return f"{KEY_OWNER_PREFIX}{key_id}"


def is_key_owner(owner: str | None) -> bool:
    """Whether `owner` is an API key (whose work other keys never see, and whose caps apply)."""
    return owner is not None and owner.startswith(KEY_OWNER_PREFIX)


def owner_visible(owner: str | None, viewer: str | None) -> bool:
    """Whether a caller with owner `viewer` (None: an admin) may see work owned by `owner`; see visible_to."""
    return viewer is None or owner == viewer or not is_key_owner(owner)


def visible_to(owner_column: Any, viewer: Any) -> Any:
    """SQL for `owner_visible`: unowned, not owned by an API key, or the viewer's own.

    The prefix is compared exactly (not NOT LIKE, which ignores case on SQLite and not on PostgreSQL), as
    owner_visible does."""
    prefix = sa.func.substr(owner_column, 1, len(KEY_OWNER_PREFIX))
    return sa.or_(owner_column.is_(None), prefix != KEY_OWNER_PREFIX, owner_column == viewer)


def namespace(owner: str | None) -> str | None:
    """Whose names (kernel scorers) a caller of `owner` shares: an API key's own, or (None) the notebook user's."""
    return owner if is_key_owner(owner) else None
