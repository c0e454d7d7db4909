"""`cancel-broker run`: the broker process put together from its settings: an embedded
Redis when none is given, the broker, its HTTP server (metrics, health, dashboard), and
the signals that stop it."""

from __future__ import annotations

import argparse
import signal
from contextlib import ExitStack
from typing import Final, cast

import anyio
import structlog

import sdk
from broker.dashboard_access import CancelAccess, DashboardMode, is_loopback
from broker.dashboard_routes import dashboard_routes
from broker.embedded import EmbeddedRedis
from broker.findings import Windows
from broker.http import create_app, serve_http
from broker.metrics import BrokerMetrics
from broker.service import Broker
from broker.settings import Settings
from sdk.connection import REDIS_URL_ENV
from sdk.local_redis import advertise
from sdk.logs import LogFormat, configure_logging
from sdk.redis_health import OnEvicting
from sdk.urls import redact_url

#: The longest a broker takes to stop after SIGTERM.
STOP_TIMEOUT_S: Final = 5.0

log = structlog.get_logger("broker")


def windows(settings: Settings) -> Windows:
    return Windows(
        dead_rule_after_s=settings.dead_rule_window,
        orphan_window_s=settings.orphan_window,
        rescan_s=settings.sync_rescan,
    )


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log_level, cast(LogFormat, settings.log_format))
    with ExitStack() as stack:
        url = settings.redis_url
        if not url:
            server = stack.enter_context(EmbeddedRedis())
            url = server.url
            stack.enter_context(advertise(url))
            print(
                f"cancel-broker: started an embedded Redis at {url}\n"
                "  workers, clients and cancel-broker commands on this machine that are given"
                " no Redis URL use it while this broker runs\n"
                f"  (elsewhere: export {REDIS_URL_ENV}={url})",
                flush=True,
            )
        anyio.run(serve, url, settings)
    return 0


async def serve(url: str, settings: Settings) -> None:
    metrics = BrokerMetrics()
    broker = Broker(
        url,
        namespace=settings.namespace,
        consumer=settings.consumer,
        metrics=metrics,
        windows=windows(settings),
        cancel_event_names=frozenset(settings.cancel_events),
        claim_idle_ms=int(settings.claim_idle * 1000),
        dead_letter_maxlen=settings.dead_letter_maxlen,
        history_length=settings.history_length,
        tombstone_lookback_s=settings.tombstone_lookback,
        partitions=settings.partitions,
        pending_cancel_lookback_s=settings.pending_cancel_lookback,
        wait_replicas=settings.wait_replicas,
        wait_timeout_s=settings.wait_timeout,
        trigger_lookback_s=settings.trigger_lookback,
        on_evicting_redis=cast(OnEvicting, settings.on_evicting_redis),
        eviction_check_s=settings.eviction_check,
    )
    access = CancelAccess(
        mode=cast(DashboardMode, settings.dashboard),
        token=settings.dashboard_token,
        loopback=is_loopback(settings.http_host),
    )
    if access.mode == "on" and not access.cancel_enabled:
        log.warning("dashboard.cancel_off", reason=access.cancel_disabled_reason)
    routes = dashboard_routes(access, broker.dashboard, namespace=settings.namespace)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, broker, tg.cancel_scope)
        port = await tg.start(
            serve_http,
            create_app(metrics.registry, broker, routes),
            settings.http_host,
            settings.http_port,
        )
        await tg.start(broker.run)
        http = f"http://{settings.http_host}:{port}"
        log.info(
            "broker.ready",
            redis_url=redact_url(url),
            namespace=settings.namespace,
            http=http,
            dashboard=settings.dashboard,
            version=sdk.__version__,
        )
        if settings.dashboard != "off":
            # On a line of its own, on stdout: what a person who ran `make run` looks for.
            local = settings.http_host in ("0.0.0.0", "::", "")
            where = f"http://127.0.0.1:{port}" if local else http
            print(f"cancel-broker: dashboard at {where}/", flush=True)


async def _stop_on_signals(broker: Broker, scope: anyio.CancelScope) -> None:
    """SIGTERM/SIGINT: stop reading, finish and acknowledge the batch in hand, exit.

    Within ``STOP_TIMEOUT_S`` in any case; a second signal stops at once.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("broker.stopping", signal=signum.name)
            broker.stop()
            with anyio.move_on_after(STOP_TIMEOUT_S):
                async with anyio.create_task_group() as tg:

                    async def second_signal() -> None:
                        async for _ in signals:
                            tg.cancel_scope.cancel()

                    tg.start_soon(second_signal)
                    await broker.stopped.wait()
                    tg.cancel_scope.cancel()
            scope.cancel()
            return
