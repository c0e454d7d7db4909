"""Redis Sentinel: a primary with replicas, and the Sentinels that fail it over.

``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB][?options]`` names
the Sentinels (any one that answers will do) and the service (``sentinel monitor SERVICE
...``); ``rediss+sentinel://`` connects to the primary with TLS. The user, the password
and the query options are the primary's (as in a ``redis://`` URL); ``sentinel_username``
and ``sentinel_password`` in the query authenticate to the Sentinels themselves.

Every connection asks a Sentinel where the primary is when it connects, and a connection
to a primary demoted by a failover fails (redis-py turns its READONLY into a connection
error), so the next command reconnects to the new primary: the same retry and backoff as
any connection error. redis-py's Sentinel support does the work; this module only reads
the URL and builds its clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlencode

import redis
import redis.sentinel
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from sdk.errors import InvalidRedisUrlError
from sdk.urls import redact_url

#: URL schemes that select Redis Sentinel, and the scheme of the primary's connections.
SENTINEL_SCHEMES: Final = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
#: Query options for the Sentinels themselves, not the primary.
_SENTINEL_OPTIONS: Final = ("sentinel_username", "sentinel_password")
#: How long a Sentinel may take to answer where the primary is.
SENTINEL_TIMEOUT_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A ``redis+sentinel://`` URL taken apart."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    #: The primary's connection options (credentials, database, query options), as
    #: redis-py's ``parse_url`` reads them from a plain URL; ``ssl`` for TLS.
    primary: dict[str, Any]
    #: The Sentinels' own connection options: timeouts, credentials if any.
    sentinel_options: dict[str, Any]


def _address(text: str, url: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65_536:
        raise InvalidRedisUrlError(
            f"{redact_url(url)}: every Sentinel of a sentinel URL is host:port, not {text!r}"
        )
    return host.strip("[]"), int(port)


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The parts of a ``redis+sentinel://`` URL; None for any other."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        return None
    netloc, _, tail = rest.partition("/")
    userinfo, at, addresses = netloc.rpartition("@")
    sentinels = tuple(_address(a, url) for a in addresses.split(",") if a.strip())
    path, _, query = tail.partition("?")
    service, _, db = path.partition("/")
    if not sentinels or not service:
        raise InvalidRedisUrlError(
            f"{redact_url(url)}: a sentinel URL names the Sentinels and the service:"
            " redis+sentinel://host:port[,host:port...]/SERVICE[/DB]"
        )
    if db and not db.isdigit():
        raise InvalidRedisUrlError(f"{redact_url(url)}: the database is a number, not {db!r}")
    options = parse_qsl(query, keep_blank_values=True)
    sentinel_options: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        **{k.removeprefix("sentinel_"): v for k, v in options if k in _SENTINEL_OPTIONS},
    }
    primary_query = urlencode([(k, v) for k, v in options if k not in _SENTINEL_OPTIONS])
    # The primary's options, as redis-py reads them from an ordinary URL of the same kind.
    plain = f"{SENTINEL_SCHEMES[scheme.lower()]}://{userinfo}{at}primary:6379/{db or 0}"
    primary = dict(parse_url(plain + (f"?{primary_query}" if primary_query else "")))
    for where in ("host", "port"):
        primary.pop(where, None)
    # Sentinel pools choose their own connection class (one that asks where the primary
    # is); they take TLS as a flag.
    if primary.pop("connection_class", None) is not None:
        primary["ssl"] = True
    return SentinelUrl(
        sentinels=sentinels,
        service=unquote(service),
        primary=primary,
        sentinel_options=sentinel_options,
    )


def is_sentinel_url(url: str) -> bool:
    return parse_sentinel_url(url) is not None


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel pool that, at its limit, waits for a free connection instead of failing
    (as every process's command pool does: a burst of registrations waits its turn)."""


def sentinel_client(parts: SentinelUrl, *, pooled: bool = False, **options: Any) -> Redis:
    """An asyncio client of the service's current primary. ``options``: the connection
    options of the caller's kind of client (timeouts, retry, decoding, pool size);
    ``pooled``: a pool that waits at ``max_connections`` (for commands)."""
    # Any: redis-py types these calls in some versions and not in others.
    sentinel = cast(Any, Sentinel)(list(parts.sentinels), sentinel_kwargs=parts.sentinel_options)
    pool_class = _BlockingSentinelPool if pooled else SentinelConnectionPool
    client = sentinel.master_for(
        parts.service, connection_pool_class=pool_class, **{**parts.primary, **options}
    )
    return cast(Redis, client)


def sync_sentinel_client(parts: SentinelUrl, **options: Any) -> redis.Redis:
    """:func:`sentinel_client`, blocking (for a thread outside the event loop)."""
    sentinel = cast(Any, redis.sentinel.Sentinel)(
        list(parts.sentinels), sentinel_kwargs=parts.sentinel_options
    )
    client = sentinel.master_for(parts.service, **{**parts.primary, **options})
    return cast(redis.Redis, client)
