"""FastAPI / Starlette: the cancel route and streams cancelled by a client's disconnect,
served by a real uvicorn on a free port and driven by an httpx client over TCP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from broker import Broker
from sdk import OPERATOR, CancelOn, Client, Event, RunCancelled, RunContext, Worker
from sdk.integrations.starlette import CancellingStreamingResponse, cancel_route
from tests.helpers import run_of, serving, wait_for_status

pytestmark = pytest.mark.anyio

TRIGGER = "report/generate.requested"
CANCEL = "report/cancel.requested"


def make_worker(redis_url: str, namespace: str) -> Worker:
    worker = Worker("reports", redis_url, namespace=namespace)

    @worker.function(
        id="generate-report",
        trigger=TRIGGER,
        cancel_on=[CancelOn(event=CANCEL, match="data.reportId")],
        owner="data.accountId",
    )
    async def generate_report(ctx: RunContext) -> None:
        await anyio.sleep(60)

    @worker.function(id="chat", trigger="chat/requested")
    async def chat(ctx: RunContext) -> None:  # run in the web process, by worker.run
        raise NotImplementedError

    return worker


def make_app(client: Client, worker: Worker, observed: list[str]) -> FastAPI:
    app = FastAPI()
    app.router.routes.append(
        cancel_route(
            client,
            # A real app reads its session; the header stands in for it.
            actor=lambda request: (
                OPERATOR if request.headers.get("x-operator") else request.headers.get("x-account")
            ),
        )
    )

    @app.post("/reports/{report_id}")
    async def generate(report_id: str) -> CancellingStreamingResponse:
        # The run is executed by a worker elsewhere; the stream reports its progress.
        await client.send(TRIGGER, {"reportId": report_id, "accountId": "a1"})

        async def progress() -> AsyncIterator[bytes]:
            yield b"started\n"
            while True:  # waiting for the next chunk: nothing is written meanwhile
                await anyio.sleep(60)
                yield b"still working\n"  # pragma: no cover

        return CancellingStreamingResponse(
            progress(),
            # A cancel event, not a cancel by id: it also reaches a run still queued.
            on_disconnect=lambda: client.send(CANCEL, {"reportId": report_id}),
            media_type="text/plain",
        )

    @app.post("/chat/{chat_id}")
    async def chat(chat_id: str, request: Request) -> CancellingStreamingResponse:
        run_id = f"chat-{chat_id}"

        async def tokens() -> AsyncIterator[bytes]:
            # The run is held by this process, around the stream it produces.
            async with worker.run("chat", Event(name="chat/requested"), run_id=run_id):
                try:
                    yield b"token\n"
                    await anyio.sleep(60)  # an LLM call, interrupted by the cancel
                    yield b"more\n"  # pragma: no cover
                except anyio.get_cancelled_exc_class():
                    observed.append("llm call cancelled")
                    raise

        return CancellingStreamingResponse(
            tokens(),
            on_disconnect=lambda: client.cancel(
                run_id, reason="client disconnected", actor=OPERATOR
            ),
            media_type="text/plain",
        )

    return app


@pytest.fixture
async def served(
    broker: Broker, client: Client, redis_url: str, namespace: str
) -> AsyncIterator[tuple[str, list[str]]]:
    """The app on uvicorn (port 0: a free one) and its worker, in this test's loop."""
    worker = make_worker(redis_url, namespace)
    observed: list[str] = []
    config = uvicorn.Config(
        make_app(client, worker, observed), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    async with serving(worker.serve), anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", observed
        server.should_exit = True


async def read_first_line_and_disconnect(url: str) -> float:
    """POST, read the first line, then drop the connection (the user's Ctrl+C)."""
    async with httpx.AsyncClient(timeout=10) as http, http.stream("POST", url) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            assert line
            break
    return time.monotonic()


async def test_a_disconnect_cancels_the_run_behind_the_stream(
    served: tuple[str, list[str]], client: Client
) -> None:
    base, _ = served
    events_before = await client._redis.xlen(client.keys.events)
    disconnected = await read_first_line_and_disconnect(f"{base}/reports/r1")
    trigger_id = (await client._redis.xrange(client.keys.events, count=events_before + 1))[-1][0]
    run_id = await run_of(client, trigger_id)
    info = await wait_for_status(client, run_id, "cancelled", timeout=5)
    assert time.monotonic() - disconnected < 5
    assert info.cancel_reason == f"cancel event {CANCEL}"


async def test_a_disconnect_interrupts_a_run_held_by_the_stream(
    served: tuple[str, list[str]], client: Client
) -> None:
    base, observed = served
    await read_first_line_and_disconnect(f"{base}/chat/c1")
    info = await wait_for_status(client, "chat-c1", "cancelled", timeout=5)
    assert info.cancel_reason == "client disconnected"
    assert observed == ["llm call cancelled"]


async def test_a_stream_read_to_its_end_cancels_nothing(
    broker: Broker, client: Client, redis_url: str, namespace: str
) -> None:
    calls: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            yield f"{n}\n".encode()

    async def on_disconnect() -> None:
        calls.append("disconnect")  # pragma: no cover

    app = FastAPI()

    @app.get("/numbers")
    async def numbers() -> CancellingStreamingResponse:
        return CancellingStreamingResponse(chunks(), on_disconnect=on_disconnect)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"http://127.0.0.1:{port}/numbers")
        server.should_exit = True
    assert response.text == "0\n1\n2\n"
    assert calls == []


async def test_the_cancel_route_checks_the_owner_and_answers_the_outcome(
    served: tuple[str, list[str]], client: Client
) -> None:
    base, _ = served
    event_id = await client.send(TRIGGER, {"reportId": "r2", "accountId": "a1"})
    run_id = await run_of(client, event_id)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        url = f"/runs/{run_id}/cancel"
        refused = await http.post(url, headers={"x-account": "a2"})
        assert refused.status_code == 403
        assert refused.json()["outcome"] == "forbidden"
        assert (await client.get_run(run_id)).status == "running"  # type: ignore[union-attr]

        accepted = await http.post(
            url, headers={"x-account": "a1"}, json={"reason": "changed my mind"}
        )
        assert accepted.status_code == 202
        assert accepted.json() == {
            "run_id": run_id,
            "outcome": "signalled",
            "status": "cancelling",
            "previous_status": "running",
            "cascaded": [],
            "kept_until": None,
        }
        info = await wait_for_status(client, run_id, "cancelled")
        assert info.cancel_reason == "changed my mind"

        again = await http.post(url, headers={"x-account": "a1"})
        assert (again.status_code, again.json()["outcome"]) == (200, "already_cancelled")
        # A run not registered yet (a job still queued): the cancel is kept for it.
        queued = await http.post("/runs/nope/cancel", headers={"x-operator": "1"})
        assert (queued.status_code, queued.json()["outcome"]) == (202, "pending")
        assert queued.json()["kept_until"] is not None
        invalid = await http.post("/runs/bad%20id/cancel", headers={"x-operator": "1"})
        assert (invalid.status_code, invalid.json()["error"]) == (400, "invalid_run_id")
        garbage = await http.post(url, headers={"x-account": "a1"}, content=b"{not json")
        assert garbage.status_code == 400


async def test_the_cancel_route_says_when_no_replica_acknowledged_the_cancel(
    redis_url: str, namespace: str
) -> None:
    """A client that waits for a replica, on a Redis with none: the cancel is applied by
    the primary, and the route answers 503 with the outcome, for the caller to retry."""
    async with Client(
        redis_url, namespace=namespace, wait_replicas=1, wait_timeout=0.05
    ) as waiting:
        app = FastAPI()
        app.router.routes.append(cancel_route(waiting, actor=lambda request: OPERATOR))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            answer = await http.post("/runs/queued-job/cancel")
    assert answer.status_code == 503
    body = answer.json()
    assert body["error"] == "not_replicated"
    assert "0 of 1 replica(s)" in body["detail"]
    assert body["result"]["outcome"] == "pending"


async def test_a_cancel_route_without_an_actor_cancels_only_functions_without_owners(
    redis_url: str, namespace: str, client: Client
) -> None:
    worker = Worker("web", redis_url, namespace=namespace)

    @worker.function(id="free", trigger="web/free.requested")
    async def free(ctx: RunContext) -> None: ...  # pragma: no cover - held by worker.run

    @worker.function(id="owned", trigger="web/owned.requested", owner="data.accountId")
    async def owned(ctx: RunContext) -> None: ...  # pragma: no cover - held by worker.run

    app = FastAPI()
    app.router.routes.append(cancel_route(client))
    transport = httpx.ASGITransport(app=app)
    async with worker, httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        with pytest.raises(RunCancelled):
            async with worker.run("free", Event(name="web/free.requested")) as ctx:
                answer = await http.post(f"/runs/{ctx.run_id}/cancel")
                assert (answer.status_code, answer.json()["outcome"]) == (202, "signalled")
                await anyio.sleep(10)  # interrupted by the cancel
        event = Event(name="web/owned.requested", data={"accountId": "a1"})
        async with worker.run("owned", event) as ctx:
            answer = await http.post(f"/runs/{ctx.run_id}/cancel")
            assert (answer.status_code, answer.json()["outcome"]) == (403, "forbidden")
