"""The broker's one small HTTP server: /healthz, /readyz, /metrics, /v1/sync, and the
dashboard's routes (:mod:`broker.dashboard_routes`)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from typing import Protocol

import anyio
import msgspec
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from broker.findings import SyncState
from sdk.connection import REDIS_ERRORS


class HttpBindError(OSError):
    """The HTTP port could not be bound."""


class BrokerStatus(Protocol):
    async def readiness(self) -> tuple[bool, str]: ...

    async def sync_state(self) -> SyncState: ...


def create_app(
    registry: CollectorRegistry,
    broker: BrokerStatus | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    async def readyz(request: Request) -> Response:
        if broker is None:
            return JSONResponse({"status": "ready"})
        ready, reason = await broker.readiness()
        status = "not ready" if not ready else "ready" if reason == "ready" else "degraded"
        return JSONResponse({"status": status, "reason": reason}, status_code=200 if ready else 503)

    async def sync(request: Request) -> Response:
        if broker is None:
            return JSONResponse({"error": "sync state is not available"}, status_code=404)
        try:
            state = await broker.sync_state()
        except (RuntimeError, *REDIS_ERRORS) as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        body = msgspec.json.encode(state)
        return Response(body, media_type="application/json")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/v1/sync", sync),
            *extra_routes,
        ]
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The broker decides when to stop; uvicorn must not take over SIGTERM/SIGINT.
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HttpBindError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


async def serve_http(
    app: Starlette,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; reports the bound port (useful with port 0)."""
    sock = bind(host, port)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    server = _Server(config)

    async def serve() -> None:
        # Shielded so cancellation becomes a graceful shutdown (should_exit) below.
        with anyio.CancelScope(shield=True):
            await server.serve(sockets=[sock])

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            with anyio.fail_after(10):
                # uvicorn offers no event to wait on
                while not server.started:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            task_status.started(sock.getsockname()[1])
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
    finally:
        sock.close()
