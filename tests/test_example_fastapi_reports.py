"""docs/examples/fastapi_reports.py runs as its docstring says: the broker, the example's
worker and its app on uvicorn, three processes on a private Redis, driven over HTTP the
way its page drives it."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from broker import EmbeddedRedis
from tests.processes import ProcessHandle, start_broker

pytestmark = pytest.mark.e2e

EXAMPLE = "docs/examples/fastapi_reports.py"


@dataclass
class Served:
    url: str
    worker: ProcessHandle


@pytest.fixture(scope="module")
def served(redis_server: EmbeddedRedis) -> Iterator[Served]:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    env = {"CANCEL_BROKER_REDIS_URL": redis_server.url, "CANCEL_BROKER_NAMESPACE": namespace}
    broker, _ = start_broker(redis_server.url, namespace)
    processes = [broker]
    try:
        worker = ProcessHandle([sys.executable, EXAMPLE, "worker"], env=env)
        processes.append(worker)
        worker.wait_for_line("worker.started")
        uvicorn = ["uvicorn", "fastapi_reports:app", "--app-dir", "docs/examples"]
        app = ProcessHandle(
            [sys.executable, "-m", *uvicorn, "--host", "127.0.0.1", "--port", "0"], env=env
        )
        processes.append(app)
        port = app.wait_for_line(r"Uvicorn running on http://127\.0\.0\.1:(\d+)").group(1)
        yield Served(f"http://127.0.0.1:{port}", worker)
    finally:
        for process in reversed(processes):
            process.terminate()


def signed_in(served: Served, account: str) -> httpx.Client:
    # The page's "Sign in" sets this cookie; the app passes it to cancel_route as the actor.
    return httpx.Client(base_url=served.url, cookies={"account": account}, timeout=10)


def report_of(http: httpx.Client, report_id: str) -> dict[str, Any]:
    response = http.get("/reports")
    assert response.status_code == 200, response.text
    (report,) = [r for r in response.json() if r["report_id"] == report_id]
    return dict(report)


def wait_for_report(
    http: httpx.Client, report_id: str, status: str, timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (report := report_of(http, report_id))["status"] != status:
        assert time.monotonic() < deadline, f"{report_id} is {report}, never {status}"
        time.sleep(0.05)
    return report


def test_the_page_is_served_whole(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert "Generate" in page.text
        assert "Cancel" in page.text
        assert "<script src" not in page.text  # inline: nothing fetched from a CDN
        assert http.get("/reports").status_code == 401  # not signed in


def test_cancel_stops_the_report_mid_call_and_only_its_owner_may(served: Served) -> None:
    with signed_in(served, "alice") as alice, signed_in(served, "bob") as bob:
        created = alice.post("/reports")
        assert created.status_code == 201, created.text
        report_id = created.json()["report_id"]
        report = wait_for_report(alice, report_id, "running")
        run_id = report["run_id"]
        # The worker logs JSON off a terminal (worker.main()): the fields in any order.
        served.worker.wait_for_line(f"(?=.*report.started)(?=.*{report_id})")
        assert bob.get("/reports").json() == []  # bob sees only his own reports

        # Bob has the run id, but the function's owner is alice's account.
        refused = bob.post(f"/runs/{run_id}/cancel")
        assert refused.status_code == 403
        assert refused.json()["outcome"] == "forbidden"
        assert report_of(alice, report_id)["status"] == "running"

        pressed = time.monotonic()
        accepted = alice.post(f"/runs/{run_id}/cancel", json={"reason": "changed my mind"})
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["outcome"] == "signalled"
        done = wait_for_report(alice, report_id, "cancelled", timeout=5)
        assert done["reason"] == "changed my mind"
        assert time.monotonic() - pressed < 5  # not the 30-second call running out

        # The worker's body was interrupted inside its long call, and never wrote a report.
        line = served.worker.wait_for_line(f"(?=.*report.interrupted)(?=.*{report_id})").string
        assert json.loads(line)["seconds_into_call"] < 10, line  # of its 30 seconds
        assert not any("report.written" in line for line in served.worker.lines)

        # A second click: already cancelled, nothing happens.
        again = alice.post(f"/runs/{run_id}/cancel")
        assert (again.status_code, again.json()["outcome"]) == (200, "already_cancelled")
