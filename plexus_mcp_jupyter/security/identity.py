"""Who is calling, and what they may do: one definition for the MCP tools, resources, REST and the stream.

Roles are ordered: a viewer reads and subscribes; an operator also dispatches, evaluates and cancels its
own work; an admin also cancels anyone's work and manages keys and the audit log. The notebook user
(Jupyter's own authentication) is an admin. A non-admin sees its own tasks and evaluations and the
notebook user's, never another key's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..core.batches import Actor
from ..core.ownership import owner_visible


class Role(str, enum.Enum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @classmethod
    def parse(cls, value: object) -> Role:
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown role {value!r}; expected one of {', '.join(r.value for r in cls)}") from None


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}

# What each action needs. Tools and resources name an action; one table decides for every face.
ACTIONS: dict[str, Role] = {
    "read": Role.VIEWER,
    "subscribe": Role.VIEWER,
    "dispatch": Role.OPERATOR,
    "evaluate": Role.OPERATOR,
    "cancel_own": Role.OPERATOR,
    "register": Role.OPERATOR,  # datasets and kernel scorers
    "cancel_any": Role.ADMIN,
    "keys": Role.ADMIN,
    "audit": Role.ADMIN,
}

# The action each MCP tool needs.
TOOL_ACTIONS: dict[str, str] = {
    "run_demo_task": "dispatch",
    "list_tasks": "read",
    "get_task": "read",
    "cancel_tasks": "cancel_own",
    "dispatch_batch": "dispatch",
    "retry_tasks": "dispatch",
    "set_task_priority": "cancel_own",
    "create_evaluation": "evaluate",
    "get_evaluation": "read",
    "get_evaluation_results": "read",
    "list_evaluations": "read",
    "list_datasets": "read",
    "list_scorers": "read",
}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the owner recorded on what it creates, its role, and its key if any."""

    owner: str | None
    role: Role
    key_id: str | None = None
    name: str | None = None  # a key's name, for the audit log

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def may(self, action: str) -> bool:
        return self.role.rank >= ACTIONS[action].rank

    def may_call(self, tool: str) -> bool:
        return self.may(TOOL_ACTIONS.get(tool, "keys"))  # an unknown tool needs the most

    @property
    def actor(self) -> Actor:
        """This caller as the batch operations see it (core/batches.py): owner, role, and whether it may act
        on others' tasks."""
        return Actor(self.owner, self.role.value, self.may("cancel_any"))

    @property
    def viewer(self) -> str | None:
        """The TaskFilter.viewer of this caller: None (everything) for an admin."""
        return None if self.is_admin else (self.owner or "")

    def sees_owner(self, owner: str | None) -> bool:
        """Whether this caller may see work owned by `owner`."""
        return owner_visible(owner, self.viewer)

    def denial(self, action: str) -> str:
        needed = ACTIONS[action]
        return (
            f"permission denied: {self.describe()} may not {action.replace('_', ' ')} (needs the {needed.value} "
            "role or higher); ask an admin for a key with that role"
        )

    def describe(self) -> str:
        if self.key_id is not None:
            return f"key {self.key_id} ({self.role.value})"
        return f"{self.owner or 'the local user'} ({self.role.value})"


NOTEBOOK_ADMIN = Principal(owner="jupyter", role=Role.ADMIN)
LOCAL_ADMIN = Principal(owner=None, role=Role.ADMIN)  # stdio: whoever started the process
