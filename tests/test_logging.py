"""What the logs say about a failed run: its traceback, never its trigger's data, whatever
the app's logging renders (structlog's default console prints every frame's locals)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import anyio
import pytest
import structlog

from sdk import Client
from sdk.logs import configure_logging, held_lines
from tests.helpers import run_of, status_is, wait_until
from tests.processes import ROOT, ProcessHandle


@pytest.mark.anyio
async def test_a_failed_runs_log_holds_its_traceback_but_not_the_triggers_data(
    redis_url: str, namespace: str
) -> None:
    # An app that configures no logging: structlog's default console, whose rich
    # tracebacks print every frame's locals.
    worker = ProcessHandle(
        [sys.executable, "-m", "tests.apps.reports", redis_url, namespace],
        env={"LOG_FORMAT": "structlog-default"},
    )
    try:
        await wait_until(lambda: _logged(worker, "worker.started"), timeout=15)
        async with Client(redis_url, namespace=namespace) as client:
            card = "4111111111111111"
            data = {"reportId": "f1", "mode": "fail", "card": card}
            run = await run_of(client, await client.send("report/generate.requested", data))
            await wait_until(lambda: status_is(client, run, "failed"), timeout=10)
        # The whole traceback: its source line, then the exception's line after it (the
        # log line before the traceback names the exception too, so it alone proves
        # nothing: the lines are read as they come).
        source, raised = 'raise ValueError(f"payment declined', "ValueError: payment declined"
        await wait_until(lambda: _logged_after(worker, source, raised), timeout=5)
        assert not [line for line in worker.lines if card in line]
    finally:
        worker.terminate()


async def _logged(worker: ProcessHandle, text: str) -> bool:
    return any(text in line for line in worker.lines)


async def _logged_after(worker: ProcessHandle, first: str, then: str) -> bool:
    lines = list(worker.lines)
    at = next((i for i, line in enumerate(lines) if first in line), None)
    return at is not None and any(then in line for line in lines[at + 1 :])


def test_the_console_format_prints_tracebacks_without_locals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved = structlog.get_config()
    try:
        configure_logging("info", "console")
        secret = "4111111111111111"
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("t").exception("failed", note=len(secret))
        err = capsys.readouterr().err
        assert "ValueError: boom" in err
        assert secret not in err
    finally:
        structlog.configure(**saved)


class Writes(io.BytesIO):
    """A binary stderr that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: object) -> int:
        chunk = bytes(data)  # type: ignore[call-overload]
        self.writes.append(chunk)
        return len(chunk)


@pytest.mark.anyio
async def test_lines_held_for_a_batch_go_out_together_and_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker holds the audit lines of a batch of events until the batch is handled:
    one write, in the order logged, even when the batch fails; another task's line is
    not held, and a line outside the block goes out at once."""
    out = Writes()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(out))
    saved = structlog.get_config()
    try:
        configure_logging("info", "json")
        log = structlog.get_logger("t")
        go, logged = anyio.Event(), anyio.Event()

        async def another_task() -> None:
            await go.wait()
            log.info("other.task")
            logged.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(another_task)
            with pytest.raises(RuntimeError), held_lines():
                log.info("cancel.decided", n=1)
                go.set()
                await logged.wait()
                log.info("cancel.decided", n=2)
                assert [json.loads(w)["event"] for w in out.writes] == ["other.task"]
                raise RuntimeError("the batch failed")
        assert len(out.writes) == 2
        assert [json.loads(line)["n"] for line in out.writes[1].splitlines()] == [1, 2]
        log.info("after")
        assert json.loads(out.writes[2])["event"] == "after"
    finally:
        structlog.configure(**saved)


WORKER_PROGRAM = """
import sys
from sdk import Worker
worker = Worker("reports", sys.argv[1], namespace=sys.argv[2])
worker.declare(id="generate-report", trigger="report/generate.requested")
worker.main()
"""


def test_a_worker_program_logs_json_at_info_off_a_terminal(redis_url: str, namespace: str) -> None:
    """``worker.main()`` in a program that configured no logging: JSON lines (stdout is a
    pipe here), at info; ``CANCEL_BROKER_LOG_LEVEL`` and ``_FORMAT`` change them."""
    worker = ProcessHandle([sys.executable, "-c", WORKER_PROGRAM, redis_url, namespace])
    try:
        started = worker.wait_for_log("worker.started")  # parsed as JSON
        assert started["level"] == "info"
    finally:
        assert worker.terminate() == 0
    refused = subprocess.run(
        [sys.executable, "-c", WORKER_PROGRAM, redis_url, namespace],
        env={**os.environ, "PYTHONPATH": str(ROOT), "CANCEL_BROKER_LOG_LEVEL": "loud"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert "CANCEL_BROKER_LOG_LEVEL='loud': use one of debug, info, warning, error" in line
