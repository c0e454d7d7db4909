"""How the client commands of ``cancel-broker`` reach Redis: the URL they use (said on
stderr when it is a running broker's embedded Redis), a ``Client``, or a plain connection."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from broker.settings import Settings
from sdk import Client
from sdk.connection import RedisClient, command_client, resolve_url_source

T = TypeVar("T")


def redis_url(settings: Settings) -> str:
    """The URL a client command uses; says so on stderr when it is the embedded Redis that
    a `cancel-broker run` on this machine advertises (rather than one the user gave)."""
    url, source = resolve_url_source(settings.redis_url)
    if source == "embedded":
        print(
            f"cancel-broker: using the embedded Redis of a running `cancel-broker run`: {url}",
            file=sys.stderr,
        )
    return url


def with_client(settings: Settings, action: Callable[[Client], Awaitable[T]]) -> T:
    """Run ``action`` with a ``Client`` configured as the settings say."""
    url = redis_url(settings)

    async def go() -> T:
        async with Client(
            url,
            namespace=settings.namespace,
            partitions=settings.partitions,
            pending_cancel_lookback=settings.pending_cancel_lookback,
            wait_replicas=settings.wait_replicas,
            wait_timeout=settings.wait_timeout,
        ) as client:
            return await action(client)

    return anyio.run(go)


def with_redis(settings: Settings, action: Callable[[RedisClient], Awaitable[T]]) -> T:
    """Run ``action`` with a plain connection (reads the ``Client`` has no method for)."""
    url = redis_url(settings)

    async def go() -> T:
        redis = command_client(url)
        try:
            return await action(redis)
        finally:
            await redis.aclose()

    return anyio.run(go)
