"""Worker apps the end-to-end tests run as separate processes."""

from __future__ import annotations

import os

import anyio
from redis.asyncio import Redis

from sdk import Worker
from sdk.logs import configure_logging


def serve(worker: Worker, recorder: Redis) -> None:
    """Run ``worker`` as this process's app, logging JSON, until SIGTERM; then close the
    connection its bodies record observations with."""

    async def main() -> None:
        # LOG_FORMAT=structlog-default leaves structlog as an app that configures nothing
        # has it (a console with rich tracebacks).
        if os.environ.get("LOG_FORMAT") != "structlog-default":
            configure_logging("info", "json")
        try:
            await worker.serve()
        finally:
            with anyio.CancelScope(shield=True):
                await recorder.aclose()

    anyio.run(main)
