"""Plain functions the process-step tests run in child processes: kept in a module of their
own, light to import, because a child imports the module its function lives in."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def spin(pid_file: str) -> str:
    """Ignore SIGTERM and burn CPU for ever: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


def crash(pid_file: str) -> str:
    """Die as the OOM killer would kill it."""
    Path(pid_file).write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def square(value: int) -> int:
    return value * value


def fail(message: str) -> None:
    raise ValueError(message)
