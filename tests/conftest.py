"""Fixtures: a private redis-server per session (never the machine's own Redis), and a
fresh key namespace per test so tests cannot see each other's keys."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from broker import Broker, BrokerMetrics, EmbeddedRedis
from sdk import Client
from sdk.connection import RedisClient, command_client
from sdk.local_redis import RUNTIME_DIR_ENV
from sdk.partitions import PARTITIONS_ENV
from tests.celery_workers import Setup, app_with_broker
from tests.cluster import RedisClusterServer
from tests.helpers import PARTITIONS, serving, topology_url


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


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, topology: str) -> str:
    return topology_url(request, topology)


@pytest.fixture(scope="module")
def celery_app(redis_server: EmbeddedRedis) -> Iterator[Setup]:
    """The app's side of the Celery tests (sends tasks, cancels them) and a broker of its
    own, shared by a module's tests; its workers: ``tests.celery_workers.celery_queue``."""
    with app_with_broker(redis_server.url) as app:
        yield app


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


@pytest.fixture
async def broker(redis_url: str, namespace: str) -> AsyncIterator[Broker]:
    """A broker running in this test's event loop."""
    broker = Broker(redis_url, namespace=namespace, metrics=BrokerMetrics())
    async with serving(broker.run):
        yield broker
