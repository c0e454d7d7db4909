"""The dashboard's HTTP routes: the page at ``/``, its script and style, and the JSON it
polls (``/v1/runs``, ``/v1/functions``, ``/v1/decisions``); ``POST
/v1/runs/{run_id}/cancel`` is the one that changes anything (see
:mod:`broker.dashboard_access`).

The page is server-rendered HTML with one small script and one style sheet shipped in
the package (``broker/web``): no CDN, no external font, so it works offline and behind a
firewall. Its Content-Security-Policy allows nothing but this origin.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from importlib import resources
from string import Template
from typing import Any, Final

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

import sdk
from broker.dashboard import DashboardData
from broker.dashboard_access import REQUEST_HEADER, TOKEN_HEADER, CancelAccess, CancelRefused
from broker.run_listing import STATUSES, InvalidQueryError, RunsQuery
from sdk.connection import REDIS_ERRORS
from sdk.errors import InvalidIdError, NotReplicatedError

CANCEL_REASON: Final = "cancelled from the dashboard"
#: Only this origin, no inline script or style, never inside a frame (clickjacking).
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none';"
    " form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSETS: Final = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

log = structlog.get_logger("broker.dashboard")


def _asset(name: str) -> str:
    return (resources.files("broker") / "web" / name).read_text(encoding="utf-8")


def _json(value: Any, status_code: int = 200) -> Response:
    return Response(
        msgspec.json.encode(value),
        status_code=status_code,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(message: str, status_code: int) -> Response:
    return JSONResponse({"error": message}, status_code=status_code, headers=SECURITY_HEADERS)


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidQueryError(f"{name} must be an integer") from None


def _text(request: Request, name: str) -> str | None:
    return request.query_params.get(name) or None


def dashboard_routes(
    access: CancelAccess, data: Callable[[], DashboardData], *, namespace: str
) -> list[BaseRoute]:
    """The dashboard's routes; none when it is off. ``data`` raises RuntimeError while the
    broker is not running."""
    if not access.enabled:
        return []
    page = Template(_asset("index.html"))
    assets = {name: _asset(name) for name in ASSETS}

    async def guarded(call: Callable[[DashboardData], Awaitable[Response]]) -> Response:
        try:
            return await call(data())
        except InvalidQueryError as exc:
            return _error(str(exc), 400)
        except (RuntimeError, *REDIS_ERRORS) as exc:
            return _error(f"unavailable: {exc}", 503)

    async def index(request: Request) -> Response:
        reason = access.cancel_disabled_reason
        body = page.substitute(
            version=html.escape(sdk.__version__),
            namespace=html.escape(namespace),
            cancel="on" if reason is None else "off",
            cancel_reason=html.escape(reason or ""),
            token_needed="yes" if access.token and reason is None else "no",
            token_header=TOKEN_HEADER,
            request_header=REQUEST_HEADER,
            status_options="".join(
                f'<option value="{status}">{status}</option>' for status in STATUSES
            ),
        )
        return HTMLResponse(body, headers=SECURITY_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return _error("not found", 404)
        return Response(assets[name], media_type=ASSETS[name], headers=SECURITY_HEADERS)

    async def runs(request: Request) -> Response:
        async def read(dashboard: DashboardData) -> Response:
            query = RunsQuery(
                app=_text(request, "app"),
                function=_text(request, "function"),
                status=_text(request, "status"),
                limit=_int(request, "limit", RunsQuery().limit),
            )
            return _json(await dashboard.runs(query))

        return await guarded(read)

    async def functions(request: Request) -> Response:
        async def read(dashboard: DashboardData) -> Response:
            return _json(await dashboard.functions())

        return await guarded(read)

    async def activity(request: Request) -> Response:
        async def read(dashboard: DashboardData) -> Response:
            return _json(await dashboard.activity())

        return await guarded(read)

    async def decisions(request: Request) -> Response:
        async def read(dashboard: DashboardData) -> Response:
            return _json({"decisions": await dashboard.decisions(_int(request, "limit", 50))})

        return await guarded(read)

    async def post_cancel(request: Request) -> Response:
        try:
            access.check(request)
        except CancelRefused as exc:
            log.warning(
                "dashboard.cancel_refused",
                client=request.client.host if request.client else None,
                reason=exc.message,
            )
            return _error(exc.message, exc.status)

        async def act(dashboard: DashboardData) -> Response:
            try:
                result = await dashboard.cancel(request.path_params["run_id"], reason=CANCEL_REASON)
            except InvalidIdError as exc:
                return _error(str(exc), 400)
            except NotReplicatedError as exc:
                log.warning("dashboard.cancel_not_replicated", error=str(exc))
                return _json({"result": exc.result, "error": str(exc)}, status_code=503)
            log.info(
                "dashboard.cancel",
                run_id=result.run_id,
                outcome=result.outcome,
                client=request.client.host if request.client else None,
            )
            return _json({"result": result})

        return await guarded(act)

    return [
        Route("/", index),
        Route("/dashboard/{name}", asset),
        Route("/v1/runs", runs),
        Route("/v1/functions", functions),
        Route("/v1/decisions", decisions),
        Route("/v1/activity", activity),
        Route("/v1/runs/{run_id}/cancel", post_cancel, methods=["POST"]),
    ]
