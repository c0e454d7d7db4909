"""Fixtures: a private redis-server per session (never the machine's own Redis), and a
fresh key namespace per test so tests cannot see each other's keys."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from broker import Broker, BrokerMetrics, EmbeddedRedis
from sdk import CancelOn, Client, RunContext, RunInfo, Worker
from sdk.connection import RedisClient, command_client
from sdk.keys import Keys
from sdk.local_redis import RUNTIME_DIR_ENV
from sdk.partitions import PARTITIONS_ENV
from tests.cluster import RedisClusterServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dashboard-screenshot",
        default=None,
        metavar="PATH",
        help="tests/test_dashboard_browser.py also saves a screenshot of the dashboard here",
    )


@pytest.fixture(scope="session", autouse=True)
def _private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite's own directory for the embedded Redis a `cancel-broker run` advertises
    (sdk/local_redis.py), inherited by every process it starts: a developer's `make run`
    beside the suite is never found by it, nor the reverse."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RUNTIME_DIR_ENV, str(tmp_path_factory.mktemp("runtime")))
        yield


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


#: One redis-server; a 3-master Redis Cluster; the same cluster with every namespace split
#: into PARTITIONS partitions (spread over its masters).
TOPOLOGIES = ("single", "cluster", "partitioned")
PARTITIONS = 4


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``topologies`` run on each of ``TOPOLOGIES``: one redis-server, a real
    3-master Redis Cluster (every process then connects with a ``redis+cluster://`` URL),
    and that cluster with partitioned namespaces. Grouped by module, so a module's own
    processes serve one topology at a time."""
    if metafunc.definition.get_closest_marker("topologies") and (
        "topology" in metafunc.fixturenames
    ):
        metafunc.parametrize("topology", TOPOLOGIES, indirect=True, scope="module")


@pytest.fixture(scope="module")
def topology(request: pytest.FixtureRequest) -> Iterator[str]:
    name = str(getattr(request, "param", "single"))
    with pytest.MonkeyPatch.context() as patch:
        if name == "partitioned":
            # Every process of the module, in this one or started from it, asks for them.
            patch.setenv(PARTITIONS_ENV, str(PARTITIONS))
        yield name


def topology_url(request: pytest.FixtureRequest, topology: str) -> str:
    """The URL of the session's redis-server or Redis Cluster (for module fixtures too)."""
    if topology in ("cluster", "partitioned"):
        cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, topology: str) -> str:
    return topology_url(request, topology)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A 3-master Redis Cluster shared by the session, started only for tests that ask for
    it. A test that moves a slot moves it back; one that breaks nodes uses its own cluster."""
    with RedisClusterServer(masters=3) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServer) -> str:
    """``redis+cluster://`` with every node of the session's cluster."""
    return redis_cluster.url


@pytest.fixture
def redis_cluster_with_replicas() -> Iterator[RedisClusterServer]:
    """A cluster of this test's own (3 masters, one replica each) that it may break.

    A 2 s node timeout: a killed master is replaced within a few seconds, and a loaded
    machine still does not mistake a slow node for a dead one.
    """
    with RedisClusterServer(masters=3, replicas=1, node_timeout_ms=2_000) as cluster:
        yield cluster


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    """A connection for the test's own reads and writes (a cluster client on a cluster)."""
    client = command_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def client(redis_url: str, namespace: str) -> AsyncIterator[Client]:
    async with Client(redis_url, namespace=namespace) as client:
        yield client


@asynccontextmanager
async def serving(start: Callable[..., Awaitable[Any]]) -> AsyncIterator[None]:
    """Run ``start`` (``broker.run``, ``worker.serve``) in this test's event loop until the
    block ends; the block begins once it reports that it is listening."""
    async with anyio.create_task_group() as tg:
        await tg.start(start)
        yield
        tg.cancel_scope.cancel()


@pytest.fixture
async def broker(redis_url: str, namespace: str) -> AsyncIterator[Broker]:
    """A broker running in this test's event loop."""
    broker = Broker(redis_url, namespace=namespace, metrics=BrokerMetrics())
    async with serving(broker.run):
        yield broker


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.005
) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(interval)


async def count_keys(redis: Redis, pattern: str) -> int:
    return len([key async for key in redis.scan_iter(match=pattern, count=1000)])


def partition_keys(namespace: str) -> list[Keys]:
    """The keys of each partition the test's topology splits a namespace into."""
    count = int(os.environ.get(PARTITIONS_ENV) or 1)
    return [Keys(namespace, partition) for partition in range(count)]


async def count_run_keys(redis: Redis, namespace: str, pattern: str) -> int:
    """Keys matching ``pattern`` (``idx:*``) in every partition of the namespace."""
    return sum(
        [await count_keys(redis, keys.shard + pattern) for keys in partition_keys(namespace)]
    )


async def keys_of_run(redis: Redis, namespace: str, run_id: str) -> Keys:
    """The keys of the partition holding the run."""
    for keys in partition_keys(namespace):
        if await redis.exists(keys.run(run_id)):
            return keys
    raise AssertionError(f"run {run_id} is in no partition")


async def broker_drained(redis: Redis, namespace: str) -> bool:
    """The broker group has read every entry of every partition's events stream and
    acknowledged them all.

    (Compares ids rather than XINFO's ``lag``, which Redis 6.2 does not report.)
    """
    for keys in partition_keys(namespace):
        if not await redis.exists(keys.events):
            continue
        last_id = (await redis.xinfo_stream(keys.events))["last-generated-id"]
        groups = {group["name"]: group for group in await redis.xinfo_groups(keys.events)}
        group = groups.get("broker")
        # A group created the trigger lookback back on an empty stream starts after its
        # last id: caught up too.
        if group is None or group["pending"] or _id(group["last-delivered-id"]) < _id(last_id):
            return False
    return True


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


RULE = CancelOn(event="report/cancel.requested", match="data.reportId")


def report_worker(redis_url: str, namespace: str, **options: Any) -> Worker:
    """An in-process report worker; its runs take ``data.seconds`` (default 60)."""
    worker = Worker("reports", redis_url, namespace=namespace, **options)

    @worker.function(id="generate-report", trigger="report/generate.requested", cancel_on=[RULE])
    async def generate_report(ctx: RunContext) -> None:
        await anyio.sleep(float(ctx.event.data.get("seconds", 60)))

    return worker


async def run_of(client: Client, event_id: str) -> str:
    """The id of the run ``event_id`` started, once it is registered."""
    found: list[str] = []

    async def registered() -> bool:
        found[:] = [run.run_id for run in await client.runs_for_event(event_id)]
        return bool(found)

    await wait_until(registered)
    return found[0]


async def status_is(client: Client, run_id: str, status: str) -> bool:
    info = await client.get_run(run_id)
    return info is not None and info.status == status


# -- what a worker process observed (tests/apps record it in Redis) ------------------------


async def observed(redis: Redis, namespace: str, report_id: str) -> list[dict[str, Any]]:
    raw = await redis.lrange(f"{namespace}:test:observed:{report_id}", 0, -1)
    return [json.loads(item) for item in raw]


async def wait_for_observation(
    redis: Redis, namespace: str, report_id: str, what: str, timeout: float = 10.0
) -> dict[str, Any]:
    async def seen() -> bool:
        return any(o["what"] == what for o in await observed(redis, namespace, report_id))

    await wait_until(seen, timeout=timeout)
    return next(o for o in await observed(redis, namespace, report_id) if o["what"] == what)


async def wait_for_status(
    client: Client, run_id: str, status: str, timeout: float = 10.0
) -> RunInfo:
    async def reached() -> bool:
        info = await client.get_run(run_id)
        return info is not None and info.status == status

    await wait_until(reached, timeout=timeout)
    info = await client.get_run(run_id)
    assert info is not None
    return info
