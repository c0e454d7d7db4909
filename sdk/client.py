"""Publish events, read runs and cancel them by id."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from sdk.connection import command_client, resolve_url
from sdk.keys import DEFAULT_NAMESPACE, EVENT_FIELD, Keys, check_id
from sdk.store import RunStore
from sdk.wire import MAX_EVENT_BYTES, CancelResult, RunInfo, encode_event


class Client:
    """The app-side API: ``async with Client(url) as client: await client.send(...)``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self.redis_url = resolve_url(redis_url)
        self.keys = Keys(namespace)
        self.max_event_bytes = max_event_bytes
        self._redis = command_client(self.redis_url)
        self._store = RunStore(self._redis, self.keys)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def send(self, name: str, data: dict[str, Any] | None = None) -> str:
        """Publish an event; returns its id (the stream entry id).

        Raises :class:`~sdk.errors.InvalidEventError` for an event the broker would refuse.
        """
        body = encode_event(name, data, max_bytes=self.max_event_bytes)
        return str(await self._redis.xadd(self.keys.events, {EVENT_FIELD: body}))

    async def get_run(self, run_id: str) -> RunInfo | None:
        """The run's record, or None if there is no such run (or it expired)."""
        return await self._store.get(check_id("run id", run_id))

    async def runs_for_event(self, event_id: str) -> list[RunInfo]:
        """The runs an event triggered."""
        return await self._store.runs_for_event(check_id("event id", event_id))

    async def cancel(self, run_id: str, reason: str | None = None) -> CancelResult:
        """Cancel one run by id.

        The result says what happened: ``signalled`` (its worker is stopping it),
        ``already_cancelling``, ``already_finished`` (terminal states are final) or
        ``not_found``.
        """
        (result,) = await self._store.request_cancel(
            run_ids=[check_id("run id", run_id)],
            reason=reason or "cancelled by request",
            cancelled_by="api",
        )
        return result
