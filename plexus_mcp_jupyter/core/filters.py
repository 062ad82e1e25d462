"""Event filters: which bus events a subscriber (WebSocket, MCP subscription) wants to see."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument
from .events import Event
from .models import TaskStatus

ENTITY_TYPES = ("task",)


@dataclass(frozen=True)
class EventFilter:
    """Entity types, ids, statuses and task types; an empty field matches everything."""

    entity_types: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    task_types: frozenset[str] = frozenset()

    @classmethod
    def parse(
        cls,
        entity_type: str | None = None,
        ids: str | None = None,
        status: str | None = None,
        type_names: str | None = None,
    ) -> EventFilter:
        """From comma-separated query values; unknown names are refused with the allowed ones."""
        entity_types = _split(entity_type)
        for name in entity_types:
            if name not in ENTITY_TYPES:
                raise InvalidArgument(f"unknown entity_type {name!r}; expected one of {', '.join(ENTITY_TYPES)}")
        statuses = frozenset(TaskStatus.parse(s).value for s in _split(status))
        return cls(frozenset(entity_types), frozenset(_split(ids)), statuses, frozenset(_split(type_names)))

    def __call__(self, event: Event) -> bool:
        if self.entity_types and event.entity_type not in self.entity_types:
            return False
        if self.ids and event.entity_id not in self.ids:
            return False
        if self.statuses and event.data.get("status") not in self.statuses:
            return False
        return not (self.task_types and event.data.get("type") not in self.task_types)


def _split(value: str | None) -> list[str]:
    if not value:
        return []
    return [part for part in (p.strip() for p in value.split(",")) if part]
