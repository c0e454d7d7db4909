"""structlog set-up for the broker process: JSON lines, or a readable console format."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import structlog

LogFormat = Literal["auto", "json", "console"]

# msgspec renders a JSON line several times faster than the standard library (the audit
# line of every cancel event is on the broker's hot path); what it cannot encode is
# written as its str().
_encoder = msgspec.json.Encoder(enc_hook=str)


def _json_line(event: object, **_: object) -> bytes:
    return _encoder.encode(event)


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    logger_factory: Callable[..., Any]
    if fmt == "console":
        # Plain tracebacks: the rich one shows each frame's locals, a trigger's data too.
        processors.append(
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        )
        logger_factory = structlog.PrintLoggerFactory(sys.stderr)
    else:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_json_line),
        ]
        logger_factory = structlog.BytesLoggerFactory(sys.stderr.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
