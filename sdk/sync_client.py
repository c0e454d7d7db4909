""":class:`Client` for synchronous code: Django and Flask views, scripts, Celery tasks.

Every method blocks the calling thread and returns what the same :class:`Client` method
returns. They all go to one :class:`Client` living in an event loop of its own (a
background thread, through an anyio blocking portal), so the logic is the Client's and
its connection pool is shared by every thread of the process.
"""

from __future__ import annotations

import functools
import threading
from contextlib import ExitStack
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import anyio.from_thread

from sdk.client import Actor, Client
from sdk.wire import MAX_EVENT_BYTES, BulkCancelResult, CancelResult, RunInfo


class SyncClient:
    """``with SyncClient(url) as client: client.send(...)``; safe to share across threads.

    Create one per process (a module-level client in a web app) and ``close()`` it at
    exit; after a fork, the child needs its own.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        partitions: int | None = None,
        pending_cancel_lookback: float | timedelta | str | None = None,
        wait_replicas: int | None = None,
        wait_timeout: float | timedelta | str | None = None,
    ) -> None:
        stack = ExitStack()
        try:
            portal = stack.enter_context(
                anyio.from_thread.start_blocking_portal(name="cancel-broker-client")
            )
            # Created in the portal's loop: its connections belong to that loop.
            client = portal.call(
                functools.partial(
                    self._create,
                    redis_url,
                    namespace=namespace,
                    max_event_bytes=max_event_bytes,
                    partitions=partitions,
                    pending_cancel_lookback=pending_cancel_lookback,
                    wait_replicas=wait_replicas,
                    wait_timeout=wait_timeout,
                )
            )
            stack.callback(portal.call, client.aclose)
        except BaseException:
            stack.close()
            raise
        self._stack: ExitStack | None = stack
        self._portal = portal
        self._client = client
        self._lock = threading.Lock()
        self.redis_url = client.redis_url
        self.keys = client.keys

    @staticmethod
    async def _create(redis_url: str | None, **options: Any) -> Client:
        return Client(redis_url, **options)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the background thread (idempotent)."""
        with self._lock:
            stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def send(self, name: str, data: dict[str, Any] | None = None) -> str:
        """:meth:`Client.send`."""

        async def call() -> str:
            return await self._client.send(name, data)

        return self._portal.call(call)

    def get_run(self, run_id: str) -> RunInfo | None:
        """:meth:`Client.get_run`."""
        return self._portal.call(self._client.get_run, run_id)

    def runs_for_event(self, event_id: str) -> list[RunInfo]:
        """:meth:`Client.runs_for_event`."""
        return self._portal.call(self._client.runs_for_event, event_id)

    def cancel(
        self, run_id: str, *, reason: str | None = None, actor: Actor = None
    ) -> CancelResult:
        """:meth:`Client.cancel`."""

        async def call() -> CancelResult:
            return await self._client.cancel(run_id, reason=reason, actor=actor)

        return self._portal.call(call)

    def cancel_many(
        self,
        function_id: str,
        *,
        app_id: str | None = None,
        started_after: datetime | None = None,
        started_before: datetime | None = None,
        if_: str | None = None,
        reason: str | None = None,
    ) -> BulkCancelResult:
        """:meth:`Client.cancel_many`."""

        async def call() -> BulkCancelResult:
            return await self._client.cancel_many(
                function_id,
                app_id=app_id,
                started_after=started_after,
                started_before=started_before,
                if_=if_,
                reason=reason,
            )

        return self._portal.call(call)

    def wait(self, run_id: str, timeout: float | None = None) -> RunInfo:
        """:meth:`Client.wait`: blocks the calling thread until the run has ended."""
        return self._portal.call(self._client.wait, run_id, timeout)
