"""How every process connects to Redis.

Two kinds of clients, following the Redis Streams traps in FIELD-NOTES:
commands go through a pooled client that retries when a connection fails, but not when
a reply times out (the command may have run: re-sending an XADD would publish twice);
each blocking reader (XREAD/XREADGROUP with BLOCK) gets a client of its own whose socket
timeout outlasts the BLOCK and which never retries by itself, because a re-sent
XREADGROUP hands out entries that then sit unseen in the pending list.

Replies are decoded as UTF-8 with ``surrogateescape``: anyone can XADD bytes that are not
UTF-8, and such an entry must become a dead letter, not an exception in a read loop.

A ``redis+cluster://host:port[,host:port...]`` URL (``rediss+cluster://`` with TLS) gives a
:class:`~redis.asyncio.cluster.RedisCluster` instead, with the same policy: the cluster
client re-sends a command after a connection error, a CLUSTERDOWN reply or a topology it
has not learnt yet, never after a reply timeout; a MOVED or ASK redirection is always
followed (the node refused the command, so it did not run). The scheme says "cluster"
because the client must be chosen before connecting: asking the server costs a round
trip on every connect and turns a wrong guess into silent misrouting.

A ``redis+sentinel://sentinel:26379[,...]/SERVICE`` URL gives clients of the service's
current primary, which ask a Sentinel where it is on every connect (:mod:`sdk.sentinel`),
with the same policy again.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import anyio
import anyio.lowlevel
import redis
import redis.cluster
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdk.errors import InvalidRedisUrlError, RedisUnavailableError
from sdk.local_redis import advertised
from sdk.sentinel import parse_sentinel_url, sentinel_client, sync_sentinel_client
from sdk.urls import redact_url

#: What every factory here returns: a single-node client, or a cluster client for a
#: ``redis+cluster://`` URL. Both speak the same commands; see docs/scaling.md for what a
#: cluster refuses (keys of several slots in one command, script or transaction).
RedisClient: TypeAlias = Redis | RedisCluster
#: What ``RedisClient.pipeline()`` returns.
RedisPipeline: TypeAlias = Pipeline | ClusterPipeline

DEFAULT_REDIS_URL: Final = "redis://localhost:6379/0"
#: Read by the SDK, the client and the broker alike when no URL is passed.
REDIS_URL_ENV: Final = "CANCEL_BROKER_REDIS_URL"

#: Delay between reconnection attempts of a read loop: 50 ms doubling to 5 s, jittered.
RECONNECT_BACKOFF: Final = ExponentialWithJitterBackoff(cap=5.0, base=0.05)


#: Errors after which a connection is re-established and the command tried again later.
CONNECTION_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)
#: Anything talking to Redis can raise: loops that must survive an outage catch this.
REDIS_ERRORS: Final = (*CONNECTION_ERRORS, RedisError)


def unavailable(exc: BaseException, url: str) -> RedisUnavailableError | None:
    """What to say, in one line, when Redis cannot be reached or refuses the credentials
    as a process starts; None for any other error (it is raised as it is)."""
    where = redact_url(url)
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, AuthenticationError):
        return RedisUnavailableError(
            f"Redis at {where} refused the credentials: {detail}",
            "put the user and password in the URL: redis://USER:PASSWORD@HOST:PORT/0"
            f" (or {REDIS_URL_ENV})",
        )
    if isinstance(exc, CONNECTION_ERRORS):
        return RedisUnavailableError(
            f"cannot reach Redis at {where}: {detail}",
            f"is Redis running there? pass its URL or set {REDIS_URL_ENV}; `cancel-broker run`"
            " with no URL starts an embedded one that processes on this machine find",
        )
    return None


#: Error replies that say "not now" rather than "never": the server is loading, out of
#: memory, a read-only replica after a failover, busy running a script, or has no master.
_TRANSIENT_REPLIES: Final = (
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    MasterDownError,
    # A cluster changing under the command: a slot moving (redirections until redis-py's
    # own retries ran out: "TTL exhausted"), or no node serving it for the moment.
    ClusterError,
    ClusterDownError,
    SlotNotCoveredError,
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

    async def failed(self, exc: BaseException, *, pause: bool = True) -> None:
        """Count and log one failure, then wait (``pause=False``: try again at once, for a
        read that timed out on a dead connection: the next one gets a new connection)."""
        self.failures += 1
        self._hooks.on_failure()
        (self._log.warning if is_transient(exc) else self._log.error)(
            f"{self._event}.retrying", error=repr(exc), attempt=self.failures, **self._context
        )
        if not pause:
            await anyio.lowlevel.checkpoint()
            return
        delay = RECONNECT_BACKOFF.compute(self.failures)
        await anyio.sleep(delay if self._cap is None else min(delay, self._cap))

    def succeeded(self) -> None:
        if self.failures:
            self._log.info(f"{self._event}.recovered", attempts=self.failures, **self._context)
            self.failures = 0
            self._hooks.on_recovery()


async def redis_now_ms(redis: RedisClient) -> int:
    """Redis server time (ms): the one clock every process agrees on."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


UrlSource = Literal["argument", "environment", "embedded", "default"]


def resolve_url_source(url: str | None) -> tuple[str, UrlSource]:
    """The Redis URL a process uses, and where it comes from: ``url`` if given, else
    ``$CANCEL_BROKER_REDIS_URL``, else the embedded Redis a ``cancel-broker run`` on this
    machine advertises while it runs (:mod:`sdk.local_redis`), else
    ``redis://localhost:6379/0``."""
    if url:
        return url, "argument"
    if from_env := os.environ.get(REDIS_URL_ENV):
        return from_env, "environment"
    if (embedded := advertised()) is not None:
        return embedded.url, "embedded"
    return DEFAULT_REDIS_URL, "default"


def resolve_url(url: str | None) -> str:
    """The URL of :func:`resolve_url_source`."""
    return resolve_url_source(url)[0]


#: URL schemes that select Redis Cluster, and the redis-py scheme each stands for.
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    """A ``redis+cluster://`` URL taken apart: the first node as a plain redis-py URL
    (credentials, TLS and other options in its query string apply to every node), and all
    the startup nodes. The client learns the rest of the cluster from any one of them."""

    url: str
    nodes: tuple[tuple[str, int], ...]


def _host_port(address: str, url: str) -> tuple[str, int]:
    if address.startswith("["):  # [IPv6]:port
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65_536:
        raise InvalidRedisUrlError(
            f"{redact_url(url)}: every node of a cluster URL is host:port, not {address!r}"
        )
    return host, int(port)


def parse_cluster_url(url: str) -> ClusterUrl | None:
    """The parts of a ``redis+cluster://``/``rediss+cluster://`` URL; None for any other."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        return None
    netloc, _, tail = rest.partition("/")
    netloc, _, query = netloc.partition("?")  # "host:port?opt=..." without a path
    userinfo, at, addresses = netloc.rpartition("@")
    nodes = tuple(_host_port(a.strip(), url) for a in addresses.split(",") if a.strip())
    if not nodes:
        raise InvalidRedisUrlError(f"{redact_url(url)}: a cluster URL names at least one node")
    path, _, tail_query = tail.partition("?")
    if path not in ("", "0"):
        raise InvalidRedisUrlError(
            f"{redact_url(url)}: Redis Cluster has only database 0, not /{path}"
        )
    options = query or tail_query
    host, port = nodes[0]
    first = f"[{host}]" if ":" in host else host
    plain = f"{CLUSTER_SCHEMES[scheme.lower()]}://{userinfo}{at}{first}:{port}/0"
    return ClusterUrl(url=plain + (f"?{options}" if options else ""), nodes=nodes)


def is_cluster_url(url: str) -> bool:
    return parse_cluster_url(url) is not None


class _CommandCluster(RedisCluster):
    """A cluster client that re-sends a command only when it cannot have run.

    redis-py's cluster client also re-sends after a reply timeout (``TimeoutError`` is in
    its ``ERRORS_ALLOW_RETRY``), which the single-node path refuses: the timed-out XADD may
    have been applied. Compared by exact type, as redis-py does. Its pipelines read
    ``RedisCluster.ERRORS_ALLOW_RETRY`` itself and still re-send after a timeout.
    """

    ERRORS_ALLOW_RETRY = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]  # redis-py types it as exactly its own four

    _commands_in_flight: anyio.Semaphore | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # Its pool raises MaxConnectionsError at the 65th concurrent command to a node
        # rather than wait: a burst (a thousand runs recording at once) waits here instead,
        # as it does for the single-node pool.
        if self._commands_in_flight is None:
            self._commands_in_flight = anyio.Semaphore(MAX_CONNECTIONS)
        async with self._commands_in_flight:
            for attempt in range(_CLOSED_UNDER_US_RETRIES + 1):
                try:
                    return await super().execute_command(*args, **kwargs)
                except (AttributeError, TypeError) as exc:
                    # redis-py's cluster client can close a node's connection (refreshing
                    # its slot map after MOVED) under a concurrent command, which then
                    # fails inside asyncio with a bare AttributeError/TypeError. Before the
                    # command was written it cannot have run: send it again. After, it
                    # may have: a connection error, which callers already handle.
                    if not _failed_before_sending(exc) or attempt == _CLOSED_UNDER_US_RETRIES:
                        raise RedisConnectionError(
                            f"connection closed under the command: {exc!r}"
                        ) from exc
                    await anyio.sleep(0.01)
            raise AssertionError("unreachable")


#: Times a command is sent again after its connection was closed before it was written.
_CLOSED_UNDER_US_RETRIES: Final = 3


def _failed_before_sending(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while redis-py was writing the command to the socket."""
    frames = traceback.extract_tb(exc.__traceback__)
    return any(frame.name == "_send_packed_command" for frame in frames)


def _cluster_client(
    cls: type[RedisCluster], parts: ClusterUrl, *, retries: int, **options: Any
) -> RedisCluster:
    return cls.from_url(
        parts.url,
        # The first node comes from the URL itself; the others are startup nodes too, so
        # the client can start while any one of them answers.
        startup_nodes=[ClusterNode(host, port) for host, port in parts.nodes[1:]],
        # The cluster client retries at its level (re-resolving the topology between
        # attempts); its retry object only gives the number of attempts.
        retry=Retry(NoBackoff(), retries=retries),
        decode_responses=True,
        encoding_errors="surrogateescape",
        protocol=2,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        **options,
    )


#: Connections one process opens for commands; beyond that, callers wait for a free one.
MAX_CONNECTIONS: Final = 64


def command_client(url: str) -> RedisClient:
    """The pooled client of one process's commands (not its blocking reads)."""
    cluster = parse_cluster_url(url)
    if cluster is not None:
        return _cluster_client(
            _CommandCluster,
            cluster,
            retries=3,
            max_connections=MAX_CONNECTIONS,
            socket_timeout=5.0,
            health_check_interval=30,
        )
    # A blocking pool: a burst of concurrent commands (thousands of runs registering at
    # once) waits for a connection instead of failing with MaxConnectionsError.
    options: dict[str, Any] = {
        "max_connections": MAX_CONNECTIONS,
        "timeout": 30,
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "protocol": 2,
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(
            ExponentialWithJitterBackoff(cap=0.5, base=0.01),
            retries=3,
            supported_errors=(RedisConnectionError,),
        ),
    }
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        return sentinel_client(sentinel, pooled=True, **options)
    pool = BlockingConnectionPool.from_url(url, **options)
    return Redis.from_pool(pool)  # closing the client closes its pool


def blocking_client(url: str, block_ms: int, *, margin_s: float = 10.0) -> RedisClient:
    """A client of its own for one blocking reader; it never re-sends a read by itself.

    A read that has not been answered ``margin_s`` after its BLOCK ended fails (a socket
    timeout): the connection is dead (a silent drop, a load balancer that forgot the
    flow) and the reader reconnects. A reader that must not be deaf for long (a worker's
    cancel signals) uses a short BLOCK and a short margin."""
    cluster = parse_cluster_url(url)
    if cluster is not None:
        return _cluster_client(
            RedisCluster, cluster, retries=0, socket_timeout=block_ms / 1000 + margin_s
        )
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "protocol": 2,
        "socket_timeout": block_ms / 1000 + margin_s,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), retries=0),
    }
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        return sentinel_client(sentinel, **options)
    return Redis.from_url(url, **options)


#: What :func:`sync_command_client` returns.
SyncRedisClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster


def sync_command_client(url: str, *, timeout_s: float = 2.0) -> SyncRedisClient:
    """A blocking client for the few commands sent from outside the event loop (a
    watchdog thread's heartbeats while the loop is blocked): short timeouts, no retry."""
    cluster = parse_cluster_url(url)
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
    }
    if cluster is not None:
        return redis.cluster.RedisCluster.from_url(
            cluster.url,
            startup_nodes=[
                redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]  # untyped in redis-py
                for h, p in cluster.nodes[1:]
            ],
            **options,
        )
    sentinel = parse_sentinel_url(url)
    if sentinel is not None:
        return sync_sentinel_client(sentinel, **options)
    return redis.Redis.from_url(url, **options)
