"""Event filters: which bus events a subscriber (the event stream's WebSocket) wants to see, and the stream's
query (`FollowEvents`), declared once: the WebSocket handler reads it, the notebook's stream builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, Field, WithJsonSchema

from .events import Event
from .requests import LISTED, STATUSES_LISTED, Number, OptionalText, RequestModel, StatusName, listed, names_schema

ENTITY_TYPES = ("task",)


def known_entity_type(value: str) -> str:
    if value not in ENTITY_TYPES:
        raise ValueError(f"unknown entity_type; expected one of {', '.join(ENTITY_TYPES)}")
    return value


Name = Annotated[str, Field(max_length=64)]
MAX_FOLLOWED_IDS = 1000  # entities one event stream may name (as resources one MCP session may follow)


class FollowEvents(RequestModel):
    """The event stream's query: GET plexus/api/events (a WebSocket); the notebook's stream builds it. The
    filters are lists (repeated or comma-separated); an empty one matches everything."""

    entity_type: Annotated[
        tuple[Annotated[str, AfterValidator(known_entity_type)], ...],
        LISTED,
        WithJsonSchema(names_schema("Only events of these entity types", ENTITY_TYPES)),
    ] = ()
    ids: Annotated[
        tuple[Name, ...],
        listed(MAX_FOLLOWED_IDS, "ids"),
        WithJsonSchema(names_schema("Only events of these entities (ids)")),
    ] = ()
    status: Annotated[
        tuple[StatusName, ...], STATUSES_LISTED, WithJsonSchema(names_schema("Only tasks in these statuses"))
    ] = ()
    type: Annotated[tuple[Name, ...], LISTED, WithJsonSchema(names_schema("Only tasks of these types"))] = ()
    since: Annotated[int | None, Number] = Field(
        None,
        ge=0,
        description="A sequence number from an earlier event: the events after it still in the history are "
        "replayed first",
    )
    epoch: OptionalText = Field(None, max_length=64, description="The epoch of the hello that since came from")

    def event_filter(self) -> EventFilter:
        return EventFilter(
            frozenset(self.entity_type), frozenset(self.ids), frozenset(self.status), frozenset(self.type)
        )


@dataclass(frozen=True)
class EventFilter:
    """Entity types, ids, statuses and task types; an empty field matches everything."""

    entity_types: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    task_types: frozenset[str] = frozenset()

    def __call__(self, event: Event) -> bool:
        if self.entity_types and event.entity_type not in self.entity_types:
            return False
        if self.ids and event.entity_id not in self.ids:
            return False
        if self.statuses and event.data.get("status") not in self.statuses:
            return False
        return not (self.task_types and event.data.get("type") not in self.task_types)
