"""Run the broker and workers as separate processes, the way users run them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
#: The broker's command line: `cancel-broker`, run from this checkout.
BROKER = (sys.executable, "-m", "broker")


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/{pid}/stat`` after the command name, None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux ``/proc``)."""
    fields = _stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped (the process table)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (the process table)."""
    found = set()
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


class ProcessHandle:
    """A child process whose stderr JSON log lines are collected as they arrive."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, *, new_session: bool = False
    ) -> None:
        self.args = args
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # A session (and process group) of its own: see stop_group.
            start_new_session=new_session,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def logs(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
        return found

    def wait_for_log(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.logs(event)
                if found:
                    return found[-1]
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"{self.args} exited ({self.process.returncode}):\n{self.output}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {event!r} log from {self.args}:\n{self.output}")
                self._changed.wait(remaining)

    def wait_for_line(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first output line matching the regular expression ``pattern`` (for
        processes that do not log JSON: uvicorn, a Celery worker, an example)."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in list(self.lines):
                    if found := compiled.search(line):
                        return found
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(
                        f"{self.args} exited ({self.process.returncode}):\n{self.output}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no line matching {pattern!r} from {self.args}:\n{self.output}"
                    )
                self._changed.wait(remaining)

    @property
    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def terminate(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop_group(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,), timeout: float = 10.0
    ) -> int:
        """For a process started with ``new_session=True`` (a worker with pool processes):
        send ``signals`` to its process group, 0.2 s apart; wait up to ``timeout`` for it to
        exit; then SIGKILL whatever is left of the group (children that outlived it)."""
        group = self.process.pid
        for number, sig in enumerate(signals):
            if number:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        return self.process.wait()


def start_broker(
    redis_url: str, namespace: str, *extra: str, env: dict[str, str] | None = None
) -> tuple[ProcessHandle, str]:
    """`cancel-broker run` on a free HTTP port; returns the handle and its base URL."""
    args = [sys.executable, "-m", "broker", "run", "--redis-url", redis_url]
    args += ["--namespace", namespace, "--http-port", "0", "--log-format", "json", *extra]
    handle = ProcessHandle(args, env=env)
    ready = handle.wait_for_log("broker.ready")
    return handle, str(ready["http"])


@contextlib.contextmanager
def broker_and_worker(
    redis_url: str, namespace: str, *, app: str = "reports", **worker_env: str
) -> Iterator[tuple[ProcessHandle, ProcessHandle]]:
    """A broker and a worker serving ``namespace``, for a module's tests that share them;
    both must exit cleanly at the end."""
    broker, _http = start_broker(redis_url, namespace)
    worker = start_worker(redis_url, namespace, app=app, **worker_env)
    yield broker, worker
    assert worker.terminate() == 0, worker.output
    assert broker.terminate() == 0, broker.output


def start_worker(
    redis_url: str, namespace: str, *, app: str = "reports", **env: str
) -> ProcessHandle:
    """A worker process running ``tests/apps/{app}.py`` (the report worker by default)."""
    handle = ProcessHandle(
        [sys.executable, "-m", f"tests.apps.{app}", redis_url, namespace],
        env={key.upper(): value for key, value in env.items()},
    )
    handle.wait_for_log("worker.started")
    return handle


async def sync_status(redis_url: str, namespace: str) -> tuple[int, dict[str, Any]]:
    """`cancel-broker sync status --json`, as a process: its exit code and its JSON."""
    done = await anyio.run_process(
        [*BROKER, "sync", "status", "--json", "--redis-url", redis_url, "--namespace", namespace],
        cwd=ROOT,
        check=False,
    )
    return done.returncode, json.loads(done.stdout)
