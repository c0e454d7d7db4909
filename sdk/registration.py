"""A worker's registration: it syncs its app when it starts, heartbeats, and leaves.

There is no manual sync step to forget: entering a worker declares, for every function,
its canonical configuration and hash, so the broker can tell when running code and
declared configuration disagree (see ``broker/sync.py``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any, Final, cast

import anyio

from sdk.connection import (
    REDIS_ERRORS,
    Backoff,
    RedisClient,
    RedisPipeline,
    SyncRedisClient,
    redis_now_ms,
)
from sdk.epoch import Epoch
from sdk.function import Function
from sdk.keys import PRESENCE, Keys, presence_field
from sdk.partitions import declare_placements
from sdk.rules import CancelOn
from sdk.scripts import heartbeat, heartbeat_blocking
from sdk.version import __version__
from sdk.wire import WorkerInfo, encode_config, encode_json

DEFAULT_HEARTBEAT_INTERVAL: Final = 5.0
#: A worker is live while its last heartbeat is younger than this many intervals; then the
#: broker records its runs as lost (within three intervals of its last heartbeat).
LIVE_INTERVALS: Final = 2.5
#: Registrations of workers that vanished without leaving expire after this.
REGISTRATION_TTL: Final = timedelta(days=1)
#: Function configurations stay readable this long after the last sync that declared them.
CONFIG_TTL: Final = timedelta(days=30)
_REGISTRATION_TTL_S: Final = int(REGISTRATION_TTL.total_seconds())
#: Approximate cap on the sync notices stream.
SYNCS_MAXLEN: Final = 10_000
#: Environment variable read for ``app_version`` (a git SHA, a release tag).
APP_VERSION_ENV: Final = "CANCEL_APP_VERSION"


def declare_rules(
    pipe: RedisPipeline,
    keys: Keys,
    rules: Iterable[CancelOn],
    now: int,
    *,
    function: str | None = None,
) -> None:
    """Tell the broker what to look up (and tombstone) for each rule's cancel event, and
    which function (``app/function``) declared it.

    Part of the sync, so it is in Redis before the worker can read a trigger.
    """
    for rule in rules:
        selector = rule.selector.text
        pipe.hsetnx(keys.rule_events, rule.event, now)
        pipe.hset(keys.rules(rule.event), selector, now)
        if function is not None:
            pipe.hset(keys.rule_functions(rule.event), f"{selector} {function}", now)
        if (expression := rule.expression) is not None:
            pipe.hset(keys.expressions, expression.id, expression.source)


def deregister(pipe: RedisPipeline, keys: Keys, worker_id: str) -> None:
    """Queue the commands that take a worker out of the registry (its clean stop, or its
    process found dead): the broker no longer counts it, nor waits for its heartbeat."""
    pipe.zrem(keys.workers, worker_id)
    pipe.delete(keys.worker(worker_id))


class WorkerRegistration:
    """Declares one worker process and keeps it marked live."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        app_id: str,
        worker_id: str,
        app_version: str | None,
        heartbeat_interval: float,
        log: Any,
        on_lost: Callable[[], None] = lambda: None,
        epoch: Epoch | None = None,
        on_data_lost: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.app_id = app_id
        self.worker_id = worker_id
        self.app_version = app_version or os.environ.get(APP_VERSION_ENV) or None
        self.heartbeat_interval = heartbeat_interval
        self._log = log
        self._on_lost = on_lost
        self._epoch = epoch
        self._on_data_lost = on_data_lost
        self._functions: tuple[Function, ...] = ()
        self._presence_failed = False

    async def sync(self, functions: Iterable[Function]) -> WorkerInfo:
        """Declare this worker and its functions' configurations; notify the broker."""
        self._functions = tuple(functions)
        now = await redis_now_ms(self.redis)
        info = WorkerInfo(
            app_id=self.app_id,
            worker_id=self.worker_id,
            sdk_version=__version__,
            app_version=self.app_version,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            heartbeat_interval_s=self.heartbeat_interval,
            functions={fn.id: fn.config_hash for fn in self._functions},
        )
        body = encode_json(info)
        # Where the functions' events go among the partitions, before any trigger is read.
        await declare_placements(self.redis, self.keys, self._functions)
        async with self.redis.pipeline(transaction=True) as pipe:
            for fn in self._functions:
                pipe.set(self.keys.config(fn.config_hash), encode_config(fn.config), ex=CONFIG_TTL)
                declare_rules(pipe, self.keys, fn.cancel_on, now, function=f"{self.app_id}/{fn.id}")
            pipe.hset(self.keys.worker(self.worker_id), mapping={"info": body, "heartbeat_at": now})
            pipe.expire(self.keys.worker(self.worker_id), REGISTRATION_TTL)
            pipe.zadd(self.keys.workers, {self.worker_id: now})
            pipe.sadd(self.keys.apps, self.app_id)
            pipe.xadd(self.keys.syncs, {"worker": body}, maxlen=SYNCS_MAXLEN, approximate=True)
            await pipe.execute()
        self._log.info(
            "worker.synced",
            app_version=self.app_version,
            functions={fn.id: fn.config_hash[:12] for fn in self._functions},
        )
        await self._announce(now)
        return info

    async def _announce(self, now: int) -> None:
        """Say that this namespace has a live worker, for brokers of any namespace to see
        (a broker in another namespace reports the split: ``namespace_mismatch``)."""
        until = now + round(LIVE_INTERVALS * self.heartbeat_interval * 1000)
        try:
            await self.redis.hset(PRESENCE, presence_field("worker", self.keys.namespace), until)
        except REDIS_ERRORS as exc:
            # Only the report of a namespace split depends on it (an ACL from before it
            # existed refuses it): never the worker's own work.
            if not self._presence_failed:
                self._log.warning("worker.presence_failed", key=PRESENCE, error=repr(exc))
            self._presence_failed = True

    async def check_broker_present(self) -> None:
        """Log when no broker reads this worker's namespace: its cancel events would wait
        unread. A warning when brokers read other namespaces (a namespace set differently on
        the two sides), a note when there is no broker at all (it may be starting)."""
        try:
            now = await redis_now_ms(self.redis)
            presence = cast(dict[str, str], await self.redis.hgetall(PRESENCE))
        except REDIS_ERRORS as exc:
            self._log.debug("worker.presence_unreadable", error=repr(exc))
            return
        brokers = sorted(
            field.removeprefix("broker:")
            for field, until in presence.items()
            if field.startswith("broker:") and int(until) > now
        )
        if self.keys.namespace in brokers:
            return
        if brokers:
            self._log.warning(
                "worker.no_broker",
                namespace=self.keys.namespace,
                brokers_read=brokers,
                hint="no broker reads this namespace, so no cancel event reaches its runs;"
                " give workers and brokers the same CANCEL_BROKER_NAMESPACE",
            )
        else:
            self._log.info("worker.no_broker_yet", namespace=self.keys.namespace)

    async def heartbeat_forever(self) -> None:
        # Back off, but never past half an interval: once Redis is back, the heartbeat must
        # land before the broker counts this worker as gone.
        backoff = Backoff(self._log, "worker.heartbeat", cap=self.heartbeat_interval / 2)
        while True:
            await anyio.sleep(self.heartbeat_interval if not backoff.failures else 0)
            try:
                alive = await heartbeat(
                    self.redis, self.keys, self.worker_id, ttl_s=_REGISTRATION_TTL_S
                )
                if not alive:
                    await self._registration_gone()
                else:
                    await self._announce(int(alive))
            except REDIS_ERRORS as exc:
                await backoff.failed(exc)
                continue
            backoff.succeeded()

    def heartbeat_from(self, client: SyncRedisClient) -> Callable[[], None]:
        """A heartbeat to send from another thread, with a blocking ``client``: while the
        event loop is blocked (sdk/loop_watch.py). A registration found gone is left to
        the loop's own heartbeat, once it runs again."""

        def beat() -> None:
            heartbeat_blocking(client, self.keys, self.worker_id, ttl_s=_REGISTRATION_TTL_S)

        return beat

    async def _registration_gone(self) -> None:
        """The registration vanished: Redis lost its data (nothing was recorded against
        this worker: it rebuilds and goes on), or the broker reaped this worker after
        missed heartbeats (its runs were recorded lost: they are given up)."""
        lost = self._epoch is not None and await self._epoch.lost()
        if lost and self._on_data_lost is not None:
            await self._on_data_lost()
            return
        self._log.error("worker.declared_lost")
        self._on_lost()
        await self.sync(self._functions)

    async def leave(self) -> None:
        """Deregister (a clean stop): this worker no longer serves anything."""
        with anyio.move_on_after(5, shield=True):
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    deregister(pipe, self.keys, self.worker_id)
                    pipe.zcard(self.keys.workers)
                    *_, remaining = await pipe.execute()
            except REDIS_ERRORS as exc:
                self._log.warning("worker.deregister_failed", error=repr(exc))
                return
            if remaining:
                return
            try:  # the namespace's last worker: it has none now
                await self.redis.hdel(PRESENCE, presence_field("worker", self.keys.namespace))
            except REDIS_ERRORS as exc:
                self._log.debug("worker.presence_clear_failed", error=repr(exc))
