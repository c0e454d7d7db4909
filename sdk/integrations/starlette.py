"""FastAPI and Starlette: the Cancel button's route, and streams that cancel their run
when the client goes away.

- :func:`cancel_route`: ``POST /runs/{run_id}/cancel``, checked against the run's owner,
  answering with the detailed :class:`~sdk.CancelResult`.
- :class:`CancellingStreamingResponse`: a ``StreamingResponse`` that listens for the
  client's disconnect the whole time (a Ctrl+C, a closed tab) and then runs
  ``on_disconnect`` (cancel the run) and stops the stream at once, even while the stream
  waits for its next chunk. Starlette's own ``StreamingResponse`` notices a disconnect
  only when it next writes (ASGI 2.4 servers such as uvicorn), which may be never.

Both are plain Starlette objects; FastAPI apps use them as they are (FastAPI is
Starlette): ``app.router.routes.append(cancel_route(...))`` and ``return
CancellingStreamingResponse(...)`` from an endpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Any, Final

import anyio
import msgspec
import structlog
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from sdk.client import Actor, Client
from sdk.errors import InvalidIdError, NotReplicatedError, traceback_text
from sdk.wire import CancelOutcome

log = structlog.get_logger("sdk.integrations.starlette")

#: The HTTP status of each cancel outcome: accepted (202: being stopped, or kept for a run
#: not registered yet), already done (200), a run that cannot be cancelled any more
#: (409), not yours (403), unknown (404).
HTTP_STATUS: Final[Mapping[CancelOutcome, int]] = {
    "signalled": 202,
    "pending": 202,
    "already_cancelling": 202,
    "already_cancelled": 200,
    "already_completed": 409,
    "already_failed": 409,
    "lost": 409,
    "forbidden": 403,
    "not_found": 404,
}
#: Seconds ``on_disconnect`` may take (it usually publishes one event).
DISCONNECT_TIMEOUT_S: Final = 10.0
DEFAULT_REASON: Final = "cancelled by the user"

#: Who asks, from the request (a session, a verified token): the ``actor`` of
#: :meth:`Client.cancel`, checked against the owner of functions that declare one.
ActorOf = Callable[[Request], Actor | Awaitable[Actor]]


class _CancelBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: str | None = None


def cancel_route(
    client: Client,
    *,
    actor: ActorOf | None = None,
    path: str = "/runs/{run_id}/cancel",
    reason: str = DEFAULT_REASON,
    name: str = "cancel_run",
) -> Route:
    """``POST {path}``: cancel the run ``run_id`` on behalf of ``actor(request)``.

    ``actor`` returns who asks (sync or async); for a function that declares an ``owner``,
    only that owner (or :data:`sdk.OPERATOR`) may cancel, others get ``403 forbidden``.
    Without ``actor``, the caller is nobody in particular: the runs of functions without an
    ``owner`` can be cancelled (keep the route behind the app's own authentication), those
    of a function with one cannot.
    An optional JSON body ``{"reason": "..."}`` replaces ``reason``. The answer is the
    :class:`~sdk.CancelResult` as JSON (``run_id``, ``outcome``, ``previous_status``,
    ``status``, ``cascaded``) with the status in :data:`HTTP_STATUS`; ``400`` for an
    invalid run id or body.
    """

    async def cancel_run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        body = await request.body()
        try:
            given = msgspec.json.decode(body, type=_CancelBody) if body.strip() else _CancelBody()
        except msgspec.DecodeError as exc:
            return JSONResponse({"error": "invalid_body", "detail": str(exc)}, status_code=400)
        who = None if actor is None else actor(request)
        if inspect.isawaitable(who):
            who = await who
        try:
            result = await client.cancel(run_id, reason=given.reason or reason, actor=who)
        except InvalidIdError as exc:
            return JSONResponse({"error": "invalid_run_id", "detail": str(exc)}, status_code=400)
        except NotReplicatedError as exc:
            # Applied by the primary, not yet by enough replicas: sending again is safe.
            failure = {"error": "not_replicated", "detail": str(exc), "result": exc.result}
            return Response(msgspec.json.encode(failure), 503, media_type="application/json")
        return Response(
            msgspec.json.encode(result),
            status_code=HTTP_STATUS.get(result.outcome, 200),
            media_type="application/json",
        )

    return Route(path, cancel_run, methods=["POST"], name=name)


OnDisconnect = Callable[[], Awaitable[Any]]


class CancellingStreamingResponse(StreamingResponse):
    """A streaming response that runs ``on_disconnect`` when the client disconnects.

    It listens for ``http.disconnect`` for as long as it streams. On a disconnect (or a
    write that fails because the client is gone) it awaits ``on_disconnect()`` once,
    shielded and for at most :data:`DISCONNECT_TIMEOUT_S`, and then stops the stream: the
    content iterator is cancelled at its current await. ``on_disconnect`` is what cancels
    the run, for example ``lambda: client.send("report/cancel.requested", {"reportId":
    rid})`` (a cancel event also reaches a run still queued, through the broker's
    tombstones) or ``lambda: client.cancel(run_id, reason="client disconnected")``. A
    stream that ends normally does not call it.
    """

    def __init__(
        self,
        content: AsyncIterable[str | bytes],
        *,
        on_disconnect: OnDisconnect,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(content, status_code, headers, media_type, background)
        self.on_disconnect = on_disconnect
        #: True once the client disconnected before the stream ended.
        self.disconnected = False

    async def _disconnected(self) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        with anyio.move_on_after(DISCONNECT_TIMEOUT_S, shield=True):
            try:
                await self.on_disconnect()
            except Exception as exc:
                log.error("stream.on_disconnect_failed", exception=traceback_text(exc))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        complete = False

        async def send_noting_the_end(message: Message) -> None:
            nonlocal complete
            # Set before the last write: the server reports a disconnect as soon as the
            # response is complete, which is the normal end, not the client leaving.
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        async with anyio.create_task_group() as tg:

            async def listen() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not complete:
                    await self._disconnected()
                tg.cancel_scope.cancel()

            async def stream() -> None:
                try:
                    await self.stream_response(send_noting_the_end)
                except OSError:  # the server noticed the client is gone as it wrote
                    await self._disconnected()
                tg.cancel_scope.cancel()

            tg.start_soon(listen)
            tg.start_soon(stream)
        if self.background is not None and not self.disconnected:
            await self.background()
