"""`completion/complete`: values for prompt arguments and resource-template arguments.

What an argument is comes from its name (and, for `status` and `type`, from whether the template or prompt is
about tasks or evaluations); the values are what the caller could use there: dataset refs from the catalog,
scorer specs (kinds, shipped examples, the kernel scorers the caller may name), the ids of the tasks,
evaluations and batches the caller may see (matched by prefix, newest first, in SQL), statuses and types.
Matches are ranked (the value starts with what was typed, then a part of it does, then it contains it) and
at most MAX_VALUES are sent, with `total` and `hasMore`. Nothing here changes anything; a caller whose role
may not use the matching tool gets no values, and an unknown prompt or argument gets an empty list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.types import CompleteRequestParams, CompleteResult, Completion, PromptReference

from ..core.manager import TaskManager
from ..core.models import TaskStatus
from ..core.tasks import task_type_names
from ..evaluations.requests import EVALUATION_TYPES
from ..evaluations.service import EvaluationService
from ..evaluations.store import EvaluationStatus
from ..security.identity import Principal
from .principal import principal_of
from .prompts import PROMPT_ARGUMENT_KINDS
from .sdk_compat import lowlevel_server

MAX_VALUES = 20  # values one answer carries (the protocol allows 100; a menu shows far fewer)
ID_CANDIDATES = 100  # ids fetched per prefix, newest first: enough to rank, bounded whatever the store holds

# Resource-template arguments, by name (the kinds of PROMPT_ARGUMENT_KINDS).
TEMPLATE_ARGUMENT_KINDS = {
    "task_id": "task_id",
    "evaluation_id": "evaluation_id",
    "batch_id": "batch_id",
    "batch": "batch_id",
    "status": "status",
    "type": "type",
    "only_mismatches": "flag",
    "outcome": "audit_outcome",
}
# Which tool a caller must be allowed to call to be offered values of a kind (what the values come from).
KIND_TOOL = {
    "dataset": "list_datasets",
    "column": "list_datasets",
    "scorer": "list_scorers",
    "task_id": "get_task",
    "batch_id": "list_tasks",
    "evaluation_id": "get_evaluation",
}


class Completer:
    """Computes completions for one server's core (tasks and, when served, evaluations)."""

    def __init__(self, manager: TaskManager, evaluations: EvaluationService | None) -> None:
        self.manager = manager
        self.evaluations = evaluations

    async def complete(self, principal: Principal, params: CompleteRequestParams) -> Completion:
        kind, about_evaluations = self._kind(params)
        if kind is None or (kind in KIND_TOOL and not principal.may_call(KIND_TOOL[kind])):
            return Completion(values=[], total=0, has_more=False)
        typed = params.argument.value
        context = (params.context.arguments if params.context else None) or {}
        if kind in ("status", "type"):
            kind = ("evaluation_" if about_evaluations else "task_") + kind
        if kind.endswith(("_status", "_type")):  # a filter value: complete the name after the last comma
            done, _, typed = typed.rpartition(",")
            values = await self._values(kind, typed, principal, context)
            return _rank([f"{done}," + v if done else v for v in values], (done + "," if done else "") + typed)
        return _rank(await self._values(kind, typed, principal, context), typed)

    @staticmethod
    def _kind(params: CompleteRequestParams) -> tuple[str | None, bool]:
        name = params.argument.name
        if isinstance(params.ref, PromptReference):
            kinds = PROMPT_ARGUMENT_KINDS.get(params.ref.name, {})
            return kinds.get(name), params.ref.name in ("evaluate_dataset", "compare_evaluations")
        uri = params.ref.uri
        if not uri.startswith("plexus://"):
            return None, False
        if uri.startswith("plexus://audit"):
            return ("audit_outcome" if name == "outcome" else None), False
        return TEMPLATE_ARGUMENT_KINDS.get(name), uri.startswith("plexus://evaluations")

    async def _values(self, kind: str, typed: str, principal: Principal, context: dict[str, str]) -> list[str]:
        viewer = principal.viewer
        if kind == "task_id":
            return await self.manager.ids_with_prefix(typed.strip().lower(), viewer, ID_CANDIDATES)
        if kind == "batch_id":
            return await self.manager.ids_with_prefix(typed.strip().lower(), viewer, ID_CANDIDATES, batch=True)
        if kind == "evaluation_id":
            return (
                []
                if self.evaluations is None
                else await self.evaluations.ids_with_prefix(typed.strip().lower(), viewer, ID_CANDIDATES)
            )
        if kind == "task_status":
            return [s.value for s in TaskStatus]
        if kind == "evaluation_status":
            return list(EvaluationStatus.ALL)
        if kind == "task_type":
            return list(task_type_names())
        if kind == "evaluation_type":
            return list(EVALUATION_TYPES)
        if kind == "flag":
            return ["true", "false"]
        if kind == "audit_outcome":
            return ["ok", "error", "denied"]
        if self.evaluations is None:
            return []
        if kind == "dataset":
            datasets = await self.evaluations.catalog.run(self.evaluations.datasets)
            # "sent" finds example:sentiment: a ref's name part counts as a start too (see _rank).
            return [d["ref"] for d in datasets if not d.get("error")]
        if kind == "scorer":
            scorers = self.evaluations.scorers(principal.owner)
            specs = [s["spec"] for s in scorers["kernel_scorers"]] + [e["spec"] for e in scorers["examples"]]
            return specs + [f"{kind}:" for kind in ("column", "python", "kernel")]
        if kind == "column":
            dataset = context.get("dataset")
            if not dataset:
                return []
            service = self.evaluations
            try:
                return await service.catalog.run(lambda: service.catalog.columns(service.catalog.resolve(dataset)))
            except Exception:  # a dataset that cannot be read has no columns to offer, and says why elsewhere
                return []
        return []


def _rank(values: Iterable[str], typed: str) -> Completion:
    """Matches of `typed` (case-insensitive), best first: the value starts with it, then a part after ':' or
    '/' does, then it contains it; the values' own order within each group. Bounded to MAX_VALUES."""
    needle = typed.strip().lower()
    groups: tuple[list[str], list[str], list[str]] = ([], [], [])
    for value in dict.fromkeys(values):
        lowered = value.lower()
        if lowered.startswith(needle):
            groups[0].append(value)
        elif any(part.startswith(needle) for part in lowered.replace("/", ":").split(":")[1:]):
            groups[1].append(value)
        elif needle in lowered:
            groups[2].append(value)
    ranked = [*groups[0], *groups[1], *groups[2]]
    return Completion(values=ranked[:MAX_VALUES], total=len(ranked), has_more=len(ranked) > MAX_VALUES)


def install_completion(server: MCPServer, manager: TaskManager, evaluations: EvaluationService | None) -> Completer:
    """Serve `completion/complete` (and so advertise the completions capability) for this server."""
    completer = Completer(manager, evaluations)

    async def on_complete(ctx: Any, params: CompleteRequestParams) -> CompleteResult:
        return CompleteResult(completion=await completer.complete(principal_of(ctx), params))

    lowlevel_server(server).add_request_handler("completion/complete", CompleteRequestParams, on_complete)
    return completer
