"""Noticing that another Redis server answers: a failover, or a restart.

A URL names a Redis, not a server: after a Sentinel (or managed) failover the same URL
reaches the promoted replica, which may lack the old primary's last writes; after a
restart, the server holds what its snapshot or append-only file kept. Either way it is
another server process, with another ``run_id`` (``INFO server``). Workers and brokers read
it every ``CHECK_EVERY_S`` and, when it changed, repair what may have been lost (a
worker reconciles its runs, ``sdk/reconcile.py``; a broker re-reads what it had in
hand). A restart that lost everything is told apart by the epoch (``sdk/epoch.py``).
"""

from __future__ import annotations

from typing import Any, Final, cast

from redis.asyncio.cluster import RedisCluster

from sdk.connection import REDIS_ERRORS, RedisClient

#: Seconds between two reads of which server answers.
CHECK_EVERY_S: Final = 1.0


async def server_ids(redis: RedisClient) -> frozenset[str]:
    """The ``run_id`` of the server (of every primary of a cluster)."""
    if isinstance(redis, RedisCluster):
        replies = cast(
            dict[str, dict[str, Any]],
            await redis.info("server", target_nodes=RedisCluster.PRIMARIES),
        )
        return frozenset(str(info["run_id"]) for info in replies.values())
    return frozenset({str((await redis.info("server"))["run_id"])})


class ServerWatch:
    """Which server process answers one process's URL, as far as it knows."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.known: frozenset[str] | None = None

    async def changed(self, redis: RedisClient) -> bool:
        """Whether a server answers now that did not at the last look (the first look only
        learns). A Redis that cannot be read now changes nothing."""
        try:
            now = await server_ids(redis)
        except REDIS_ERRORS as exc:
            self._log.debug("redis.server_unreadable", error=repr(exc))
            return False
        before, self.known = self.known, now
        if before is None or now <= before:
            return False
        self._log.warning(
            "redis.server_changed",
            servers_before=sorted(before),
            servers_now=sorted(now),
            hint="a failover or a restart: whatever the old server acknowledged last may be"
            " missing, so what this process holds is checked against Redis again",
        )
        return True
