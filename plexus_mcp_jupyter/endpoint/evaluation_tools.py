"""The evaluation tools and resources: EvaluationService over MCP. Each tool returns in milliseconds.

`create_evaluation` starts an evaluation task and answers at once (or, with a progress token, streams
progress until it ends, like `run_demo_task`); it can also run as an MCP task.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS, CallToolResult, ToolAnnotations

from ..core.errors import NotFound, PlexusError
from ..core.models import Task, TaskStatus
from ..core.requests import paged, query_of, takes
from ..evaluations.requests import CreateEvaluation, GetEvaluation, GetEvaluationResults, ListDatasets, ListEvaluations
from ..evaluations.service import EvaluationService
from .principal import current_principal
from .progress import follow_to_end, progress_token
from .schemas import DatasetList, EvaluationDetail, EvaluationPage, EvaluationResults, ScorerList
from .task_logs import TaskLogs
from .tools import client_errors, result

JSON = "application/json"


def describe_evaluation(view: dict[str, Any]) -> str:
    text = f"Evaluation {view['evaluation_id']} ({view['type']} on {view['dataset']}) is {view['status']}"
    if view["total_items"]:
        text += f", {view['processed_items']}/{view['total_items']} items scored"
    if view.get("remaining_seconds") is not None and view["status"] in ("SETUP", "RUNNING"):
        text += f", about {round(view['remaining_seconds'])} s left"
    for name, m in (view.get("metrics") or {}).items():
        if m.get("accuracy") is not None:
            text += f"; {name}: accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}"
        elif m.get("mean_pairwise_agreement") is not None:
            text += f"; {name}: agreement {m['mean_pairwise_agreement']:.3f}, unanimous {m['unanimous_share']:.3f}"
    for name, c in (view.get("counts") or {}).items():
        if c.get("errors"):
            text += f"; {name}: {c['errors']} item(s) could not be scored"
    if view["error_message"]:
        text += f": {view['error_message']}"
    if view.get("items_pruned_at"):
        text += "; its per-item results were pruned"
    return text + "."


def evaluation_outcome(service: EvaluationService, task: Task) -> CallToolResult:
    """What create_evaluation answers once its task has ended (a streamed call, or an MCP task's result)."""
    view = service.view_of_task(task)
    if view is None:  # its record could not be written when it was created: say so, as a tool error
        missing = result(f"Task {task.id} has no evaluation record.", {})
        missing.is_error = True
        return missing
    outcome = result(describe_evaluation(view), view)
    outcome.is_error = task.status is not TaskStatus.COMPLETED
    return outcome


def _dump(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)


def register_evaluation_tools(server: MCPServer, service: EvaluationService, logs: TaskLogs | None = None) -> None:
    max_page = service.manager.max_page_size
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(
        title="Create an evaluation",
        description=(
            "Evaluate predictions against labels on a dataset and return the evaluation (status SETUP) at once; "
            "follow it with get_evaluation, then read metrics there and the items it got wrong with "
            "get_evaluation_results(only_mismatches=true). type: accuracy (a scorer, or prediction_column, vs "
            "label_column), feedback (earlier predictions in prediction_column vs corrected labels in "
            "label_column), consistency (a scorer run `runs` times: agreement between runs). dataset: "
            "'example:sentiment' (see list_datasets), 'registered:<name>' or a file path under the Jupyter root "
            "(.csv, .parquet, .jsonl). scorer: 'column:<col>', 'python:<module>:<function>', or a rules object "
            "(see list_scorers). Or give scorecard: a YAML file naming the dataset and several scores. With a "
            "progress token the call streams progress until the evaluation ends and returns it; it can also run "
            "as an MCP task. Next: get_evaluation(evaluation_id) until COMPLETED, then get_evaluation_results."
        ),
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False),
    )
    @takes(CreateEvaluation)  # the tool's arguments are the request model's fields
    @client_errors
    async def create_evaluation(ctx: Context, **fields: Any) -> Annotated[CallToolResult, EvaluationDetail]:
        principal = current_principal()
        request = CreateEvaluation.parse(fields)
        view, task = await service.create(
            request, owner=principal.owner, trusted=principal.is_admin, role=principal.role.value
        )
        if logs is not None:
            logs.started(ctx, [task.id])
        if progress_token(ctx) is not None:
            return evaluation_outcome(service, await follow_to_end(ctx, service.manager, task.id, logs))
        return result(
            f"Started evaluation {view['evaluation_id']} ({request.type} on {view['dataset']}); follow "
            "it with get_evaluation.",
            view,
        )

    @server.tool(
        title="Get an evaluation",
        description=(
            "Status, progress (processed/total items, elapsed and remaining seconds), definition and, once "
            "completed, metrics per score; the text sums them up. Next: call again until it ends, then "
            "get_evaluation_results(only_mismatches=true) for the items it got wrong."
        ),
        annotations=read_only,
    )
    @takes(GetEvaluation)
    @client_errors
    async def get_evaluation(**fields: Any) -> Annotated[CallToolResult, EvaluationDetail]:
        view = await service.get(GetEvaluation.parse(fields).evaluation_id, current_principal().viewer)
        return result(describe_evaluation(view), view)

    @server.tool(
        title="Get evaluation results",
        description=(
            "Per-item results in dataset order (id, input excerpt, label, prediction, correct, explanation, "
            "error), optionally only the mismatches (wrong or unscored) or one label; paginated (pass next_cursor "
            "back as cursor). Item ids come from the dataset's id column when it has one. Next: explain the "
            "mismatches, or compare with another evaluation (the compare_evaluations prompt)."
        ),
        annotations=read_only,
    )
    @takes(paged(GetEvaluationResults, max_page))  # its limit bounded by this server's max_page_size
    @client_errors
    async def get_evaluation_results(**fields: Any) -> Annotated[CallToolResult, EvaluationResults]:
        request = paged(GetEvaluationResults, max_page).parse(fields)
        # In the catalog's threads: a page may read several item files (evaluations/item_files.py).
        items, next_cursor, asked = await service.catalog.run(service.results, request, current_principal().viewer)
        more = " (more: pass next_cursor)" if next_cursor else ""
        return result(f"{len(items)} item(s){more}.", {**asked, "items": items, "next_cursor": next_cursor})

    @server.tool(
        title="List evaluations",
        description="Evaluations, newest first, optionally by status and type; paginated. The text lists the full "
        "evaluation ids. Next: get_evaluation(evaluation_id).",
        annotations=read_only,
    )
    @takes(paged(ListEvaluations, max_page))
    @client_errors
    async def list_evaluations(**fields: Any) -> Annotated[CallToolResult, EvaluationPage]:
        request = paged(ListEvaluations, max_page).parse(fields)
        views, next_cursor = await service.list_evaluations(request, viewer=current_principal().viewer)
        lines = "; ".join(f"{v['evaluation_id']} {v['type']} {v['status']}" for v in views[:10])
        more = " (more: pass next_cursor)" if next_cursor else ""
        return result(
            f"{len(views)} evaluation(s){more}" + (f": {lines}" if lines else ""),
            {"evaluations": views, "next_cursor": next_cursor},
        )

    @server.tool(
        title="List datasets",
        description=(
            "Datasets an evaluation can use: shipped examples, DataFrames registered from notebooks, and data "
            "files under the Jupyter root, with rows, columns and label_column (the default label column: 'label' "
            "when the dataset has one). Next: create_evaluation(dataset=<ref>, ...)."
        ),
        annotations=read_only,
    )
    @takes(ListDatasets)
    @client_errors
    async def list_datasets(**fields: Any) -> Annotated[CallToolResult, DatasetList]:
        request = ListDatasets.parse(fields)
        # Walking the root and peeking at files is I/O: off the event loop, in the catalog's few threads.
        datasets = await service.catalog.run(service.datasets, include_files=request.include_files)
        return result(
            f"{len(datasets)} dataset(s): " + ", ".join(d["ref"] for d in datasets[:20]), {"datasets": datasets}
        )

    @server.tool(
        title="List scorers",
        description="The kinds of scorer an evaluation can use, their spec forms, example scorers and the kernel "
        "scorers registered from notebooks. Next: create_evaluation(scorer=<spec>, ...).",
        annotations=read_only,
    )
    @client_errors
    async def list_scorers() -> Annotated[CallToolResult, ScorerList]:
        scorers = service.scorers(current_principal().owner)
        return result("Scorer kinds: " + ", ".join(scorers["kinds"]), scorers)

    _register_resources(server, service)


def _register_resources(server: MCPServer, service: EvaluationService) -> None:
    listing = paged(ListEvaluations, service.manager.max_page_size)
    results = paged(GetEvaluationResults, service.manager.max_page_size)

    async def page(query: dict[str, list[str]]) -> str:
        try:
            request = listing.from_query(query)
            views, next_cursor = await service.list_evaluations(request, viewer=current_principal().viewer)
        except PlexusError as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return _dump({"evaluations": views, "next_cursor": next_cursor})

    @server.resource(
        "plexus://evaluations{?status,type,limit,cursor}",
        name="evaluations",
        title="Evaluations",
        description="Evaluations, newest first; status and type take comma-separated names.",
        mime_type=JSON,
    )
    async def evaluations_resource(
        status: str | None = None, type: str | None = None, limit: str | None = None, cursor: str | None = None
    ) -> str:
        # `type` is the URI's variable (the SDK passes variables by name)
        return await page(query_of(status=status, type=type, limit=limit, cursor=cursor))

    @server.resource(
        "plexus://evaluations",
        name="recent-evaluations",
        title="Recent evaluations",
        description="The 20 most recent evaluations.",
        mime_type=JSON,
    )
    async def recent_evaluations() -> str:
        return await page({})

    @server.resource(
        "plexus://evaluations/{evaluation_id}",
        name="evaluation",
        title="Evaluation",
        description="One evaluation: status, progress, definition and metrics.",
        mime_type=JSON,
    )
    async def evaluation_resource(evaluation_id: str) -> str:
        try:
            return _dump(await service.get(evaluation_id, current_principal().viewer))
        except NotFound as exc:
            raise ResourceNotFoundError(str(exc)) from None

    @server.resource(
        "plexus://evaluations/{evaluation_id}/results{?only_mismatches,label,score,limit,cursor}",
        name="evaluation-results",
        title="Evaluation results",
        description="Per-item results, in dataset order; only_mismatches=true for the wrong ones.",
        mime_type=JSON,
    )
    async def results_resource(
        evaluation_id: str,
        only_mismatches: str | None = None,
        label: str | None = None,
        score: str | None = None,
        limit: str | None = None,
        cursor: str | None = None,
    ) -> str:
        query = query_of(only_mismatches=only_mismatches, label=label, score=score, limit=limit, cursor=cursor)
        try:
            request = results.from_query(query, evaluation_id=evaluation_id)
            items, next_cursor, asked = await service.catalog.run(service.results, request, current_principal().viewer)
        except NotFound as exc:
            raise ResourceNotFoundError(str(exc)) from None
        except PlexusError as exc:
            raise MCPError(INVALID_PARAMS, str(exc)) from None
        return _dump({**asked, "items": items, "next_cursor": next_cursor})

    @server.resource(
        "plexus://datasets",
        name="datasets",
        title="Datasets",
        description="Datasets an evaluation can use (examples, registered, files under the root).",
        mime_type=JSON,
    )
    async def datasets_resource() -> str:
        return _dump({"datasets": await service.catalog.run(service.datasets)})
