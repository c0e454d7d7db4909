"""How every process connects to Redis.

Two kinds of clients, following the Redis Streams traps in FIELD-NOTES:
commands go through a pooled client that retries when a connection fails, but not when
a reply times out (the command may have run: re-sending an XADD would publish twice);
each blocking reader (XREAD/XREADGROUP with BLOCK) gets a client of its own whose socket
timeout outlasts the BLOCK and which never retries by itself, because a re-sent
XREADGROUP hands out entries that then sit unseen in the pending list.

Replies are decoded as UTF-8 with ``surrogateescape``: anyone can XADD bytes that are not
UTF-8, and such an entry must become a dead letter, not an exception in a read loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DEFAULT_REDIS_URL: Final = "redis://localhost:6379/0"
#: Read by the SDK, the client and the broker alike when no URL is passed.
REDIS_URL_ENV: Final = "CANCEL_BROKER_REDIS_URL"

#: Delay between reconnection attempts of a read loop: 50 ms doubling to 5 s, jittered.
RECONNECT_BACKOFF: Final = ExponentialWithJitterBackoff(cap=5.0, base=0.05)


#: Errors after which a connection is re-established and the command tried again later.
CONNECTION_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)
#: Anything talking to Redis can raise: loops that must survive an outage catch this.
REDIS_ERRORS: Final = (*CONNECTION_ERRORS, RedisError)
#: Error replies that say "not now" rather than "never": the server is loading, out of
#: memory, a read-only replica after a failover, busy running a script, or has no master.
_TRANSIENT_REPLIES: Final = (
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    MasterDownError,
)
_TRANSIENT_PREFIXES: Final = ("BUSY", "LOADING", "OOM", "READONLY", "MASTERDOWN", "NOREPLICAS")


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same command again later may succeed."""
    if isinstance(exc, (*CONNECTION_ERRORS, *_TRANSIENT_REPLIES)):
        return True
    return isinstance(exc, RedisError) and str(exc).startswith(_TRANSIENT_PREFIXES)


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class BackoffHooks:
    """Called on every failure and on the first success after failures (for metrics)."""

    on_failure: Callable[[], None] = _nothing
    on_recovery: Callable[[], None] = _nothing


class Backoff:
    """The consecutive failures of one loop talking to Redis.

    Each failure is logged (``{event}.retrying``) and followed by a jittered exponential
    pause (50 ms doubling to 5 s, or ``cap``): no busy loop during an outage. The first
    success after failures is logged once (``{event}.recovered``).
    """

    def __init__(
        self,
        log: Any,
        event: str,
        *,
        cap: float | None = None,
        hooks: BackoffHooks | None = None,
        **context: Any,
    ):
        self._log = log
        self._event = event
        self._cap = cap
        self._hooks = hooks or BackoffHooks()
        self._context = context
        self.failures = 0

    async def failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._hooks.on_failure()
        (self._log.warning if is_transient(exc) else self._log.error)(
            f"{self._event}.retrying", error=repr(exc), attempt=self.failures, **self._context
        )
        pause = RECONNECT_BACKOFF.compute(self.failures)
        await anyio.sleep(pause if self._cap is None else min(pause, self._cap))

    def succeeded(self) -> None:
        if self.failures:
            self._log.info(f"{self._event}.recovered", attempts=self.failures, **self._context)
            self.failures = 0
            self._hooks.on_recovery()


def redact_url(url: str) -> str:
    """``url`` fit for a log line: the password and any ``ssl_password`` replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = "&".join(
        f"{key}=***" if key == "ssl_password" else f"{key}={value}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def resolve_url(url: str | None) -> str:
    return url or os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


#: Connections one process opens for commands; beyond that, callers wait for a free one.
MAX_CONNECTIONS: Final = 64


def command_client(url: str) -> Redis:
    # A blocking pool: a burst of concurrent commands (thousands of runs registering at
    # once) waits for a connection instead of failing with MaxConnectionsError.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=30,
        decode_responses=True,
        encoding_errors="surrogateescape",
        protocol=2,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(
            ExponentialWithJitterBackoff(cap=0.5, base=0.01),
            retries=3,
            supported_errors=(RedisConnectionError,),
        ),
    )
    return Redis.from_pool(pool)  # closing the client closes its pool


def blocking_client(url: str, block_ms: int) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="surrogateescape",
        protocol=2,
        socket_timeout=block_ms / 1000 + 10.0,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), retries=0),
    )
