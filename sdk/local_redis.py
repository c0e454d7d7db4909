"""The embedded Redis that a ``cancel-broker run`` started on this machine.

``cancel-broker run`` (``make run``) without a Redis URL starts a private redis-server on
a free port. So that a second shell finds it without copying a URL by hand, the broker
*advertises* the URL in a file of the user's runtime directory while it runs, and removes
the file when it stops. A process given no URL at all (no argument, no
``CANCEL_BROKER_REDIS_URL``) uses the advertised Redis while the broker that started it is
alive, and ``redis://localhost:6379/0`` otherwise (:func:`sdk.connection.resolve_url`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec

#: Environment variable naming the directory of the advertisement (tests, several users).
RUNTIME_DIR_ENV: Final = "CANCEL_BROKER_RUNTIME_DIR"
FILE_NAME: Final = "embedded-redis.json"


class Advertised(msgspec.Struct, frozen=True, kw_only=True):
    """What a running ``cancel-broker run`` says about the Redis it started."""

    url: str
    #: The broker process: the advertisement holds while it is alive.
    pid: int
    #: When it started the Redis (ms since the epoch).
    started_at: int


def runtime_dir() -> Path:
    """``$CANCEL_BROKER_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/cancel-broker``, else a
    directory of this user's in the temporary directory."""
    given = os.environ.get(RUNTIME_DIR_ENV)
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "cancel-broker"
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"cancel-broker-{user}"


def _ours(directory: Path) -> bool:
    """Whether ``directory`` is this user's alone: another user's (or a shared one in /tmp)
    could point our clients at a Redis of theirs."""
    try:
        info = directory.stat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return True
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (the directory is ours, though)
        return True
    except OSError:
        return False
    return True


def advertised() -> Advertised | None:
    """The Redis a live ``cancel-broker run`` on this machine advertises, if any."""
    directory = runtime_dir()
    if not _ours(directory):
        return None
    try:
        found = msgspec.json.decode((directory / FILE_NAME).read_bytes(), type=Advertised)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return found if _alive(found.pid) else None


@contextlib.contextmanager
def advertise(url: str) -> Iterator[Path]:
    """Advertise ``url`` while the block runs (``cancel-broker run``'s embedded Redis).

    Yields the file's path. The file is removed at the end if it is still this process's
    (another ``cancel-broker run`` may have advertised its own since).
    """
    directory = runtime_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _ours(directory):
        raise PermissionError(
            f"{directory} is not this user's alone; set {RUNTIME_DIR_ENV} to a directory of yours"
        )
    path = directory / FILE_NAME
    body = msgspec.json.encode(
        Advertised(url=url, pid=os.getpid(), started_at=int(time.time() * 1000))
    )
    # Written whole, then renamed: a reader never sees half a file.
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, prefix=".embedded-") as tmp:
        tmp.write(body)
    os.replace(tmp.name, path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_bytes() == body:
                path.unlink()
