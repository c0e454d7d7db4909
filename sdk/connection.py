"""How every process connects to Redis.

Two kinds of clients, following the Redis Streams traps in FIELD-NOTES:
commands go through a pooled client that retries on connection errors; each
blocking reader (XREAD/XREADGROUP with BLOCK) gets a client of its own whose socket
timeout outlasts the BLOCK and which never retries by itself, because a re-sent
XREADGROUP hands out entries that then sit unseen in the pending list.
"""

from __future__ import annotations

import os
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

DEFAULT_REDIS_URL: Final = "redis://localhost:6379/0"
#: Read by the SDK, the client and the broker alike when no URL is passed.
REDIS_URL_ENV: Final = "CANCEL_BROKER_REDIS_URL"

#: Delay between reconnection attempts of a read loop: 50 ms doubling to 5 s, jittered.
RECONNECT_BACKOFF: Final = ExponentialWithJitterBackoff(cap=5.0, base=0.05)


def resolve_url(url: str | None) -> str:
    return url or os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def command_client(url: str) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=True,
        protocol=2,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.01), retries=3),
    )


def blocking_client(url: str, block_ms: int) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=True,
        protocol=2,
        socket_timeout=block_ms / 1000 + 10.0,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), retries=0),
    )
