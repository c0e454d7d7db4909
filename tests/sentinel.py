"""A real Redis Sentinel deployment of private processes: a primary, a replica, three
Sentinels, and what tests do to it.

``SentinelSetup()`` starts the primary and its replica (:class:`broker.EmbeddedRedis`, the
replica with ``--replicaof``), waits until the replica is in sync, then starts three
``redis-server --sentinel`` processes monitoring the primary as :data:`SERVICE` (quorum
2, down after 1 s), and returns once every Sentinel knows the replica and both other
Sentinels: from then on a crash of the primary is failed over. :meth:`fail_over` kills
the primary (SIGKILL, as a crash) and waits until the Sentinels and the replica agree
that the replica is the primary. Everything here is synchronous; async tests call the
slow parts through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from broker.embedded import EmbeddedRedis, find_redis_server, free_port

SERVICE = "cancel"
QUORUM = 2
DOWN_AFTER_MS = 1_000
FAILOVER_TIMEOUT_MS = 5_000


class SentinelSetupError(RuntimeError):
    """The deployment could not be started or failed over in time."""


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise SentinelSetupError(f"timed out after {timeout:g} s waiting for {what}")


class SentinelProcess:
    """One ``redis-server --sentinel`` on a free port, with its own config file (Sentinel
    rewrites it) in a directory of its own."""

    def __init__(self, primary_port: int) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="cancel-broker-sentinel-"))
        config = self._dir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self._dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        with (self._dir / "sentinel.log").open("ab") as log:
            self._process = subprocess.Popen(
                [find_redis_server(), str(config), "--sentinel"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        self.client = redis.Redis(
            host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=2
        )

    def primary_port(self) -> int | None:
        address = self.client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(address[1]) if address else None

    def knows_everyone(self) -> bool:
        replicas = self.client.execute_command("SENTINEL", "REPLICAS", SERVICE)
        sentinels = self.client.execute_command("SENTINEL", "SENTINELS", SERVICE)
        return len(replicas) == 1 and len(sentinels) == 2

    def log(self) -> str:
        path = self._dir / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.client.close()
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class SentinelSetup:
    """``with SentinelSetup() as setup: setup.url``: a primary, a replica, three Sentinels."""

    def __init__(self) -> None:
        # No 5 s wait for more replicas before a full sync (the default of a diskless one).
        self.primary = EmbeddedRedis(extra_args=("--repl-diskless-sync-delay", "0"))
        self.replica: EmbeddedRedis | None = None
        self.sentinels: list[SentinelProcess] = []

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL every component is given."""
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica = EmbeddedRedis(
            extra_args=("--replicaof", "127.0.0.1", str(self.primary.port))
        )
        self.replica.start()
        replica = self.node(self.replica)
        _wait(
            "the replica to sync",
            lambda: replica.info("replication").get("master_link_status") == "up",
            timeout=10,
        )
        # Started once the replica is in sync: each Sentinel finds it in the primary's
        # first INFO reply instead of ten seconds later.
        self.sentinels = [SentinelProcess(self.primary.port) for _ in range(3)]
        _wait(
            "every Sentinel to know the replica and the other Sentinels",
            lambda: all(s.knows_everyone() for s in self.sentinels),
            timeout=20,
        )

    @staticmethod
    def node(server: EmbeddedRedis) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)

    def fail_over(self, *, timeout: float = 20.0) -> float:
        """Kill the primary as a crash would; return the seconds until the replica was
        the primary for the Sentinels and for itself."""
        assert self.replica is not None
        started = time.monotonic()
        self.primary.kill()
        new_port = self.replica.port
        replica = self.node(self.replica)
        _wait(
            "the Sentinels to promote the replica",
            lambda: (
                all(s.primary_port() == new_port for s in self.sentinels)
                and replica.info("replication").get("role") == "master"
            ),
            timeout=timeout,
        )
        replica.close()
        return time.monotonic() - started

    def _signal_replica(self, signum: signal.Signals) -> None:
        pid = None if self.replica is None else self.replica.pid
        if pid is None:
            raise SentinelSetupError("the replica is not running")
        os.kill(pid, signum)

    def pause_replica(self) -> None:
        """SIGSTOP the replica: it acknowledges nothing until :meth:`resume_replica`."""
        self._signal_replica(signal.SIGSTOP)

    def resume_replica(self) -> None:
        self._signal_replica(signal.SIGCONT)

    def logs(self) -> str:
        return "\n".join(s.log()[-2000:] for s in self.sentinels)

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        if self.replica is not None:
            if self.replica.pid is not None:
                self.resume_replica()
            self.replica.close()
        self.primary.close()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
