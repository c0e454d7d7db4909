"""structlog set-up for the broker and for a worker program (``worker.main()``): JSON lines
off a terminal, a readable console format on one, and never a traceback's locals.

The level and format come from ``CANCEL_BROKER_LOG_LEVEL`` and ``CANCEL_BROKER_LOG_FORMAT``
for both (the broker's ``--log-level`` and ``--log-format`` too)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, BinaryIO, Final, Literal, cast

import msgspec
import structlog

from sdk.errors import ConfigurationError

LogFormat = Literal["auto", "json", "console"]
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("auto", "json", "console")
LEVEL_ENV: Final = "CANCEL_BROKER_LOG_LEVEL"
FORMAT_ENV: Final = "CANCEL_BROKER_LOG_FORMAT"

# msgspec renders a JSON line several times faster than the standard library (the audit
# line of every cancel event is on the broker's hot path); what it cannot encode is
# written as its str().
_encoder = msgspec.json.Encoder(enc_hook=str)


def _json_line(event: object, **_: object) -> bytes:
    return _encoder.encode(event)


class LineWriter:
    """structlog's ``BytesLogger``, one JSON line per call, except inside
    :func:`held_lines`: there the lines wait for the end of the block and go out in one
    write. A line and a flush per cancel event was a tenth of the broker's time."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lock = threading.Lock()

    def msg(self, message: bytes) -> None:
        held = _held.get()
        if held is None:
            self.write((message,))
        else:
            held.append((self, message))

    log = debug = info = warn = warning = error = err = critical = exception = msg

    def write(self, lines: Iterator[bytes] | tuple[bytes, ...]) -> None:
        data = b"".join(line + b"\n" for line in lines)
        with self._lock:
            self._file.write(data)
            self._file.flush()


#: The lines logged in this context inside held_lines(), with the writer of each.
_held: ContextVar[list[tuple[LineWriter, bytes]] | None] = ContextVar(
    "cancel_broker_held_lines", default=None
)


@contextmanager
def held_lines() -> Iterator[None]:
    """Write the JSON lines this task logs in the block together, when it ends (the
    broker's batch of events: its lines are as durable as its acknowledgement, which comes
    after them; a batch handled again after a crash logs again). Other tasks' lines go
    out as they are logged; console lines are never held."""
    held: list[tuple[LineWriter, bytes]] = []
    token = _held.set(held)
    try:
        yield
    finally:
        _held.reset(token)
        writers: dict[LineWriter, list[bytes]] = {}
        for writer, line in held:
            writers.setdefault(writer, []).append(line)
        for writer, lines in writers.items():
            writer.write(tuple(lines))


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
        writer = LineWriter(sys.stderr.buffer)
        logger_factory = lambda *_: writer  # noqa: E731  (one writer for every logger)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )


def configure_from_environment() -> None:
    """For a worker program whose code configured no logging: ``info`` (or
    ``CANCEL_BROKER_LOG_LEVEL``), JSON off a terminal (or ``CANCEL_BROKER_LOG_FORMAT``).
    An app that configured structlog itself keeps its configuration."""
    if structlog.is_configured():
        return
    level = os.environ.get(LEVEL_ENV, "info").lower()
    fmt = os.environ.get(FORMAT_ENV, "auto").lower()
    for name, value, allowed in ((LEVEL_ENV, level, LOG_LEVELS), (FORMAT_ENV, fmt, LOG_FORMATS)):
        if value not in allowed:
            raise ConfigurationError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    configure_logging(level, cast(LogFormat, fmt))
