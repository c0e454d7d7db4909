"""Noticing that Redis lost its data: a restart without persistence, a flushed database.

Every worker and broker stores a random id in ``{ns}:epoch`` when it starts (the first
one to do so wins) and remembers it. A worker's heartbeat that finds its registration
gone, or a broker's periodic look, then tells two things apart: the epoch is still
there (the worker was reaped after missed heartbeats: its runs were recorded lost), or it
is gone or another (Redis lost everything). In the second case nothing was recorded
against anyone: the processes rebuild what they hold (the partition count, their
registration, their groups, the runs they run) and go on.
"""

from __future__ import annotations

import uuid
from typing import Any

from sdk.connection import RedisClient
from sdk.keys import Keys


class Epoch:
    """The epoch one process knows."""

    def __init__(self, redis: RedisClient, keys: Keys, log: Any) -> None:
        self.redis = redis
        self.keys = keys
        self._log = log
        self.known: str | None = None

    async def join(self) -> str:
        """Store an epoch if none is, and remember the one stored."""
        await self.redis.set(self.keys.epoch, uuid.uuid4().hex, nx=True)
        stored = await self.redis.get(self.keys.epoch)
        self.known = str(stored) if stored is not None else await self.join()
        return self.known

    async def lost(self) -> bool:
        """Whether Redis lost its data since this process joined (the epoch it knows is
        gone, or another process stored a new one since); joins the new epoch if so."""
        stored = await self.redis.get(self.keys.epoch)
        if stored is not None and str(stored) == self.known:
            return False
        before = self.known
        await self.join()
        self._log.error(
            "redis.data_lost",
            namespace=self.keys.namespace,
            epoch_before=before,
            epoch_now=self.known,
            hint="Redis lost its data (a restart without persistence, a flush): every"
            " worker re-registers the runs it still runs, brokers recreate their groups;"
            " configure persistence (docs/deploy.md#redis)",
        )
        return True
