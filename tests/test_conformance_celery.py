"""Celery's own revoke cases, end to end against our Celery integration: a real prefork
``celery worker`` (one pool process), a broker process, the test as the app. Each test
names the Celery test it takes its case from (celery/celery ``t/integration/test_tasks.py``,
``t/unit/worker/test_control.py``) and checks the outcome Celery's test expects, or, where
we differ on purpose, ours and the line of the guide that says so."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from sdk import OPERATOR
from tests.celery_workers import (
    BLOCKING,
    Setup,
    celery_queue,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def queue(celery_app: Setup) -> Iterator[str]:
    with celery_queue(celery_app, "prefork", "conformance", 1) as name:
        yield name


def test_revoked(celery_app: Setup, queue: str) -> None:
    """t/integration/test_tasks.py::test_tasks::test_revoked: the queue is busy, a task
    waiting in it is revoked (no terminate): REVOKED, it never ran."""
    busy = celery_app.send(BLOCKING, queue, report_id="cr-busy", seconds=30)
    celery_app.wait_observed("cr-busy", "started", timeout=20)
    waiting = celery_app.send(BLOCKING, queue, report_id="cr-waiting", seconds=0)
    assert celery_app.client.cancel(waiting.id, actor=OPERATOR).outcome == "pending"
    assert celery_app.client.cancel(busy.id, actor=OPERATOR).outcome == "signalled"
    celery_app.wait_state(waiting, "REVOKED")
    assert (waiting.ready(), waiting.failed(), waiting.successful()) == (True, False, False)
    assert celery_app.observed("cr-waiting") == []


def test_revoke_terminate(celery_app: Setup, queue: str) -> None:
    """t/unit/worker/test_control.py::test_ControlPanel::test_revoke_terminate: a running
    task revoked with terminate is terminated, and its id stays revoked (``tid in
    revoked``): the same id sent again never runs."""
    task_id = f"cr-{uuid.uuid4().hex}"
    running = celery_app.send(BLOCKING, queue, task_id=task_id, report_id="ct-1", seconds=30)
    celery_app.wait_observed("ct-1", "started", timeout=20)
    assert celery_app.client.cancel(running.id, actor=OPERATOR).outcome == "signalled"
    celery_app.wait_state(running, "REVOKED")
    assert celery_app.wait_observed("ct-1", "cancelled")["exception"].endswith("TaskCancelled")
    again = celery_app.send(BLOCKING, queue, task_id=task_id, report_id="ct-1-again", seconds=0)
    celery_app.wait_state(again, "REVOKED")
    assert celery_app.observed("ct-1-again") == []


def test_revoke_by_stamped_headers_terminates_matching_request(
    celery_app: Setup, queue: str
) -> None:
    """t/unit/worker/test_control.py::test_ControlPanel::
    test_revoke_by_stamped_headers_terminates_matching_request: the running task whose
    stamp matches is terminated. Ours: the key is in the task's arguments, and a cancel
    event matched on it (docs/migrate/celery.md, `revoke_by_stamped_headers`)."""
    running = celery_app.send(BLOCKING, queue, report_id="cs-test-123", seconds=30)
    celery_app.wait_observed("cs-test-123", "started", timeout=20)
    celery_app.client.send("report/cancel.requested", {"report_id": "cs-other"})
    celery_app.client.send("report/cancel.requested", {"report_id": "cs-test-123"})
    celery_app.wait_state(running, "REVOKED")
    assert celery_app.wait_observed("cs-test-123-revoked", "revoked_signal")["terminated"] is True


def test_revoked_by_headers_simple_canvas(celery_app: Setup, queue: str) -> None:
    """t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_simple_canvas:
    Celery flags a stamp as revoked *before* the task is sent, and the matching task is
    REVOKED when it arrives. We differ on purpose: a cancel event cancels the runs
    triggered before it (Cancel, then Regenerate, keeps the new run), so the task sent
    after it runs (docs/migrate/celery.md, "A cancel event does not revoke tasks sent
    after it").
    What does refuse a task before it is sent is a cancel by its id, which Celery's other
    cases use."""
    celery_app.client.send("report/cancel.requested", {"report_id": "cs-canvas"})
    later = celery_app.send(BLOCKING, queue, report_id="cs-canvas", seconds=0)
    assert later.get(timeout=20) == "report"  # Celery: TaskRevokedError
    task_id = f"cs-{uuid.uuid4().hex}"
    assert celery_app.client.cancel(task_id, actor=OPERATOR).outcome == "pending"
    refused = celery_app.send(BLOCKING, queue, task_id=task_id, report_id="cs-by-id", seconds=0)
    celery_app.wait_state(refused, "REVOKED")
    assert celery_app.observed("cs-by-id") == []
