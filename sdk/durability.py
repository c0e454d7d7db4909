"""Publishers that wait for replicas before they call a write done (opt-in).

Redis replicates asynchronously: a primary acknowledges a write before any replica has
it, and a failover to a replica that lagged loses what the old primary acknowledged last.
A cancel lost so does nothing. ``Client(wait_replicas=N)`` (``CANCEL_BROKER_WAIT_REPLICAS``)
makes every write of the client wait until N replicas have it, for at most
``wait_timeout``, and raise :class:`~sdk.errors.NotReplicatedError` (with the call's
result) when fewer did.

Redis's ``WAIT`` counts the replicas that have the writes of the connection it is sent
on, and a pooled client's writes go out on any of its connections. So after the call's
writes have been answered, one more write (``SET`` of :attr:`~sdk.keys.Keys.replicated`)
and ``WAIT`` go out together on one connection: Redis replicates writes in the order it
applies them, so a replica that has that write has every write answered before it.
"""

from __future__ import annotations

from typing import Final, TypeVar, cast

from redis.asyncio.cluster import RedisCluster

from sdk.connection import RedisClient
from sdk.errors import ConfigurationError, NotReplicatedError
from sdk.keys import Keys

T = TypeVar("T")

#: How long the marker write is kept: it only has to outlive the WAIT after it.
MARKER_TTL_MS: Final = 60_000


class Replicas:
    """How many replicas a publisher's writes must reach, and how long it waits for them."""

    def __init__(self, redis: RedisClient, keys: Keys, *, wanted: int, timeout: float) -> None:
        if wanted and isinstance(redis, RedisCluster):
            # WAIT counts one node's replicas, and a cluster pipeline sends a command with
            # no key to any node: the count would be another shard's.
            raise ConfigurationError(
                "wait_replicas is not supported on Redis Cluster; each shard's replicas"
                " would have to be asked apart (use 0, or a Sentinel-managed primary)"
            )
        self.redis = redis
        self.keys = keys
        self.wanted = wanted
        self.timeout = timeout

    async def acknowledged(self) -> int:
        """Wait until ``wanted`` replicas have every write answered so far, or ``timeout``;
        return how many had them then."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.replicated, "1", px=MARKER_TTL_MS)
            pipe.execute_command("WAIT", self.wanted, round(self.timeout * 1000))
            _, acknowledged = await pipe.execute()
        return int(cast(int, acknowledged))

    async def check(self, result: T) -> T:
        """``result``, once ``wanted`` replicas have the writes that produced it; raises
        :class:`~sdk.errors.NotReplicatedError` carrying it when fewer do in time."""
        if not self.wanted:
            return result
        acknowledged = await self.acknowledged()
        if acknowledged < self.wanted:
            raise NotReplicatedError(
                result, wanted=self.wanted, acknowledged=acknowledged, timeout=self.timeout
            )
        return result
