"""The cheaper code paths give exactly what the straightforward ones gave."""

from __future__ import annotations

import json
import logging
import time

from plexus_mcp_jupyter.core.models import ProgressSample, Stage, StageStatus, Task, TaskStatus
from plexus_mcp_jupyter.core.store import Store, TaskFilter
from plexus_mcp_jupyter.endpoint.schemas import TaskDetail, TaskListRow, TaskSummary
from plexus_mcp_jupyter.handlers.mcp import debug_emitted


def _tasks() -> list[Task]:
    t0 = 1_767_225_600.123456
    stages = [
        Stage(
            name="Setup",
            order=0,
            status=StageStatus.COMPLETED,
            total_items=1,
            processed_items=1,
            started_at=t0,
            completed_at=t0 + 0.5,
        ),
        Stage(
            name="Processing",
            order=1,
            status=StageStatus.RUNNING,
            total_items=3,
            processed_items=1,
            started_at=t0 + 0.5,
            estimated_completion_at=t0 + 9.9996,
        ),
        Stage(name="Finalizing", order=2),
    ]
    return [
        Task(id="a", type="demo", status=TaskStatus.QUEUED, created_at=t0),
        Task(
            id="b",
            type="demo",
            status=TaskStatus.RUNNING,
            priority=-3,
            owner="jupyter",
            created_at=t0 + 1,
            started_at=t0 + 1.0005,
            current_stage="Processing",
            params={"items": 3, "seed": None},
            stages=stages,
            description="a demo",
        ),
        Task(
            id="c",
            type="demo",
            status=TaskStatus.FAILED,
            created_at=t0 + 2,
            completed_at=t0 + 3,
            error_message="boom",
            error_details={"item": 2, "trace": ["x"]},
            output=[1, {"k": 2.5}],
            stdout_tail="out",
            stderr_tail="err",
            worker="w",
            cancel_requested=True,
            stages=stages[:2],
        ),
    ]


def test_summaries_and_details_are_what_the_models_dump_key_for_key():
    for task in _tasks():
        summary = task.summary()
        assert json.dumps(summary) == json.dumps(TaskSummary.model_validate(summary).model_dump(mode="json"))
        for history in (None, [ProgressSample(at=time.time(), stage="Setup", processed=1, total=None)]):
            data = task.to_dict()
            data["history"] = [s.to_dict() for s in history] if history else None
            data["history_total"] = len(history) if history else None
            data["resource_uri"] = f"plexus://tasks/{task.id}"
            data.update(
                queue=None,
                retention_seconds=2_592_000.0,
                expires_at=None,  # TaskManager.queue_fields
                dashboard_url=None,
            )
            assert json.dumps(data) == json.dumps(TaskDetail.model_validate(data).model_dump(mode="json"))


def test_a_listing_row_is_the_summary_without_what_says_nothing_about_the_task():
    """Task.list_row: TaskListRow's JSON form key for key (nulls left out); every field it keeps is the summary's; it
    leaves out the nulls, a description that is the type's own text and a current stage that progress names."""
    for task in _tasks():
        summary = task.summary()
        for type_text in (None, "a demo", "other"):
            row = task.list_row(type_text)
            dumped = TaskListRow.model_validate(row).model_dump(mode="json", exclude_none=True)
            assert json.dumps(row) == json.dumps(dumped)
            assert {k: v for k, v in row.items() if k != "progress"} == {k: summary[k] for k in row if k != "progress"}
            assert row["progress"] == {k: v for k, v in summary["progress"].items() if v is not None}
            left_out = set(summary) - set(row)
            assert all(summary[k] is None for k in left_out - {"description", "current_stage"})
            assert ("description" in row) == (summary["description"] not in (None, type_text))
            assert "current_stage" not in row
    running = _tasks()[1]
    running.current_stage = "Cleanup"  # not among its stages: progress names the last one
    assert running.list_row(None)["current_stage"] == "Cleanup"
    assert running.list_row(None)["progress"]["stage"] == "Finalizing"


def test_listing_with_prebuilt_statements_matches_filters_and_cursors(store_url):
    store = Store(store_url)
    tasks = _tasks()
    for task in tasks:
        store.create_task(task)
    assert [store.get_task(t.id).to_dict() for t in tasks] == [t.to_dict() for t in tasks]  # one joined read each
    page, key = store.list_tasks(TaskFilter(), limit=2)
    assert [t.id for t in page] == ["c", "b"] and key == (tasks[1].created_at, "b")
    assert [s.to_dict() for s in page[1].stages] == [s.to_dict() for s in tasks[1].stages]
    assert page[0].to_dict() == tasks[2].to_dict()
    rest, key = store.list_tasks(TaskFilter(), limit=2, after=key)
    assert [t.id for t in rest] == ["a"] and key is None and rest[0].stages == []
    statuses = (TaskStatus.QUEUED, TaskStatus.FAILED)
    flt = TaskFilter(statuses=statuses, types=("demo",), since=tasks[0].created_at)
    assert [t.id for t in store.list_tasks(flt, limit=10)[0]] == ["c", "a"]
    assert [t.id for t in store.list_tasks(TaskFilter(owner="jupyter"), limit=10)[0]] == ["b"]
    assert store.list_tasks(TaskFilter(types=("other",)), limit=10)[0] == []
    store.close()


def test_debug_emitted_looks_at_handler_levels_not_only_the_logger():
    logger = logging.getLogger("plexus-test-debug-emitted")
    logger.propagate = False
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.DEBUG)
        handler.setLevel(logging.WARNING)
        assert not debug_emitted(logger)  # how traitlets configures Jupyter's logger
        handler.setLevel(logging.DEBUG)
        assert debug_emitted(logger)
        logger.setLevel(logging.INFO)
        assert not debug_emitted(logger)
    finally:
        logger.removeHandler(handler)
