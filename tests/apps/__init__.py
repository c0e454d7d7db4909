"""Worker apps the end-to-end tests run as separate processes."""

from __future__ import annotations

import anyio
from redis.asyncio import Redis

from broker.logs import configure_logging
from sdk import Worker


def serve(worker: Worker, recorder: Redis) -> None:
    """Run ``worker`` as this process's app, logging JSON, until SIGTERM; then close the
    connection its bodies record observations with."""

    async def main() -> None:
        configure_logging("info", "json")
        try:
            await worker.serve()
        finally:
            with anyio.CancelScope(shield=True):
                await recorder.aclose()

    anyio.run(main)
