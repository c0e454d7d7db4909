"""Whether the Redis we run on can keep what we write: its eviction policy.

Redis is cancel-broker's only state. A Redis with a ``maxmemory`` and any
``maxmemory-policy`` but ``noeviction`` deletes keys when it is full, starting with the
least recently used: the records of long runs, their index entries, tombstones, kept
cancels. A cancel then finds nothing and the run goes on, with no error anywhere. So
every worker and broker reads the policy (``INFO memory``, on every primary of a
cluster) when it starts and every 5 s while it runs (``CANCEL_BROKER_EVICTION_CHECK``):

- ``on_evicting_redis="refuse"`` (the default, ``CANCEL_BROKER_ON_EVICTING_REDIS``): a
  process that starts on an evicting Redis refuses to
  (:class:`EvictingRedisError`);
- ``"warn"``: it runs, degraded. Either way, a process that finds the policy evicting
  while it runs (a ``CONFIG SET``, a failover to a differently configured replica) says
  so loudly: an error line every ``WARN_EVERY_S``, a gauge, the broker's ``/readyz``
  reason and the dashboard's banner. It does not stop the runs it holds.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal, cast

import msgspec
from redis.asyncio.cluster import RedisCluster

from sdk.config import EVICTION_CHECK
from sdk.connection import CONNECTION_ERRORS, REDIS_ERRORS, RedisClient
from sdk.errors import ConfigurationError
from sdk.urls import redact_url

#: The one policy under which Redis never deletes a key to make room.
SAFE_POLICY: Final = "noeviction"
#: Seconds between two error lines while the policy evicts.
WARN_EVERY_S: Final = 60.0

OnEvicting = Literal["refuse", "warn"]
ON_EVICTING: Final[tuple[OnEvicting, ...]] = ("refuse", "warn")


class EvictingRedisError(ConfigurationError):
    """Redis deletes keys when it is full (its ``maxmemory-policy`` is not ``noeviction``),
    so runs and cancels could vanish without a word: this process refuses to start."""


class MemoryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """One Redis node's memory limit and what it does when the limit is reached."""

    node: str
    policy: str
    #: Bytes; 0 for no limit (then the policy never applies).
    maxmemory: int

    @property
    def evicting(self) -> bool:
        return self.maxmemory > 0 and self.policy != SAFE_POLICY


def _policy(node: str, info: dict[str, Any]) -> MemoryPolicy:
    return MemoryPolicy(
        node=node,
        policy=str(info.get("maxmemory_policy", SAFE_POLICY)),
        maxmemory=int(info.get("maxmemory", 0) or 0),
    )


async def memory_policies(redis: RedisClient) -> list[MemoryPolicy]:
    """The memory policy of the Redis (of every primary of a cluster)."""
    if isinstance(redis, RedisCluster):
        replies = cast(
            dict[str, dict[str, Any]],
            await redis.info("memory", target_nodes=RedisCluster.PRIMARIES),
        )
        return [_policy(node, info) for node, info in sorted(replies.items())]
    info = await redis.info("memory")
    return [_policy("redis", info)]


def describe(evicting: list[MemoryPolicy], url: str) -> str:
    """What is wrong, in one sentence a log line, ``/readyz`` and the dashboard can show."""
    nodes = ", ".join(
        f"{p.policy} with maxmemory {p.maxmemory / 2**20:.0f} MiB"
        + (f" on {p.node}" if p.node != "redis" else "")
        for p in evicting
    )
    return (
        f"Redis at {redact_url(url)} evicts keys when full ({nodes}): run records, index"
        f" entries and cancels can vanish and a cancel then does nothing; set"
        f" maxmemory-policy {SAFE_POLICY} (docs/deploy.md)"
    )


class EvictionWatch:
    """What one process knows of its Redis's eviction policy, and what it says of it."""

    def __init__(
        self, url: str, on_evicting: OnEvicting, log: Any, *, every_s: float | None = None
    ) -> None:
        if on_evicting not in ON_EVICTING:
            raise ConfigurationError(
                f"on_evicting_redis must be one of {', '.join(ON_EVICTING)}, not {on_evicting!r}"
            )
        self.url = url
        self.on_evicting = on_evicting
        #: Seconds between two reads of the policy while the process runs
        #: (``$CANCEL_BROKER_EVICTION_CHECK`` unless given, 5 s by default).
        self.every_s = EVICTION_CHECK.resolve(every_s)
        self._log = log
        #: The latest problem found (None: the policy is safe, or not known yet).
        self.problem: str | None = None
        self._warned_at = 0.0

    async def check_at_start(self, redis: RedisClient) -> None:
        """Raise :class:`EvictingRedisError` for an evicting Redis, unless told to warn."""
        try:
            await memory_policies(redis)
        except CONNECTION_ERRORS:
            raise  # no Redis to start with (or its password refused): the caller says so
        except REDIS_ERRORS as exc:
            # Not known, and said once: a managed Redis or an ACL may refuse INFO.
            self._log.warning(
                "redis.policy_unreadable",
                error=repr(exc),
                hint="grant +info, or make sure maxmemory-policy is noeviction",
            )
            return
        await self.check(redis)
        if self.problem is not None and self.on_evicting == "refuse":
            raise EvictingRedisError(
                f"{self.problem}; or start with CANCEL_BROKER_ON_EVICTING_REDIS=warn to run"
                " degraded"
            )

    async def check(self, redis: RedisClient) -> str | None:
        """Read the policy now; log an error (at most every ``WARN_EVERY_S``) while it
        evicts, and once when it stops. Returns the problem, if any. A Redis that cannot
        be read (an outage, an ACL without ``INFO``) leaves what was known."""
        try:
            policies = await memory_policies(redis)
        except REDIS_ERRORS as exc:
            self._log.debug("redis.policy_unreadable", error=repr(exc))
            return self.problem
        evicting = [p for p in policies if p.evicting]
        before, self.problem = self.problem, describe(evicting, self.url) if evicting else None
        now = time.monotonic()
        if self.problem is not None and (before is None or now - self._warned_at >= WARN_EVERY_S):
            self._warned_at = now
            self._log.error(
                "redis.evicting",
                problem=self.problem,
                policies=[msgspec.structs.asdict(p) for p in evicting],
            )
        elif self.problem is None and before is not None:
            self._log.info("redis.evicting_resolved")
        return self.problem
