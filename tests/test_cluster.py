"""Redis Cluster groundwork: the test cluster itself, and connecting to a cluster through
``redis+cluster://`` URLs with the SDK's client factories.

The broker does not run on a cluster yet (its keys span slots); these tests pin down the
fixture later cluster tests stand on, and the connection layer they will go through.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdk.connection import (
    RedisClient,
    blocking_client,
    command_client,
    parse_cluster_url,
)
from sdk.errors import InvalidRedisUrlError
from sdk.urls import redact_url
from tests.cluster import SLOTS, RedisClusterServer

pytestmark = pytest.mark.anyio


def tag() -> str:
    """A hash tag of its own per test: every key with it lands in one slot."""
    return f"{{t{uuid.uuid4().hex[:10]}}}"


@pytest.fixture
async def cluster_client(redis_cluster_url: str) -> AsyncIterator[RedisClient]:
    client = command_client(redis_cluster_url)
    yield client
    await client.aclose()


def keys_on_distinct_slots(count: int) -> list[str]:
    return [f"k{i}:{uuid.uuid4().hex[:6]}" for i in range(count)]


# -- the fixture ------------------------------------------------------------------------


def test_every_node_reports_ok_and_three_masters_cover_every_slot(
    redis_cluster: RedisClusterServer,
) -> None:
    assert len(redis_cluster.ports) == 3
    assert [redis_cluster.cluster_state(port) for port in redis_cluster.ports] == ["ok"] * 3
    masters = redis_cluster.masters()
    assert len(masters) == 3
    covered = [slot for master in masters for slot in master.slots]
    assert sorted(covered) == list(range(SLOTS))  # every slot once


async def test_keys_land_on_all_three_masters(
    redis_cluster: RedisClusterServer, cluster_client: RedisClient
) -> None:
    keys = keys_on_distinct_slots(30)
    for key in keys:
        await cluster_client.set(key, "v", ex=60)
    owners = {redis_cluster.owner_of(redis_cluster.slot_of(key)).port for key in keys}
    assert owners == set(redis_cluster.ports)
    for key in keys:  # each key is stored on the master that owns its slot
        owner = redis_cluster.owner_of(redis_cluster.slot_of(key)).port
        with redis_cluster.node(owner) as node:
            assert node.execute_command("EXISTS", key) == 1


async def test_a_slot_moves_live_and_its_key_survives(
    redis_cluster: RedisClusterServer, cluster_client: RedisClient
) -> None:
    key = f"{tag()}:moving"
    await cluster_client.set(key, "before", ex=60)
    slot = redis_cluster.slot_of(key)
    source = redis_cluster.owner_of(slot).port
    target = next(port for port in redis_cluster.ports if port != source)
    try:
        await anyio.to_thread.run_sync(redis_cluster.begin_slot_migration, slot, target)
        moved = await anyio.to_thread.run_sync(
            redis_cluster.migrate_slot_keys, slot, source, target
        )
        assert moved == 1
        # Half way: the key lives on the target, the source answers ASK, the client follows.
        assert await cluster_client.get(key) == "before"
        await anyio.to_thread.run_sync(redis_cluster.finish_slot_migration, slot, target)

        assert redis_cluster.owner_of(slot).port == target
        with redis_cluster.node(source) as old, pytest.raises(MovedError):
            old.get(key)
        # The client still thinks the slot is on the source: MOVED, and it follows.
        assert await cluster_client.get(key) == "before"
        await cluster_client.set(key, "after", ex=60)
        with redis_cluster.node(target) as new:
            assert new.get(key) == "after"
    finally:
        if redis_cluster.owner_of(slot).port != source:  # leave the shared cluster as found
            await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, source)
    assert redis_cluster.owner_of(slot).port == source
    assert await cluster_client.get(key) == "after"


async def test_failovers_are_observed_and_acknowledged_writes_survive(
    redis_cluster_with_replicas: RedisClusterServer,
) -> None:
    cluster = redis_cluster_with_replicas
    assert len(cluster.masters()) == 3
    assert len(cluster.ports) == 6
    client = command_client(cluster.url)
    try:
        # A manual failover: the replica catches up, then takes over; nothing is lost.
        first = f"{tag()}:manual"
        await client.set(first, "kept", ex=300)
        slot = cluster.slot_of(first)
        old_master = cluster.owner_of(slot).port
        (replica,) = cluster.replicas_of(old_master)
        await anyio.to_thread.run_sync(cluster.failover, replica.port)
        assert cluster.owner_of(slot).port == replica.port
        assert cluster.replicas_of(replica.port)[0].port == old_master  # roles swapped
        assert await client.get(first) == "kept"

        # A crash: a master is SIGKILLed; after the node timeout its replica is elected.
        second = f"{tag()}:killed"
        slot = cluster.slot_of(second)
        doomed = cluster.owner_of(slot).port
        (heir,) = cluster.replicas_of(doomed)
        with cluster.node(doomed) as node:
            node.set(second, "replicated", ex=300)
            assert node.execute_command("WAIT", 1, 5000) == 1  # the replica has it
        cluster.kill(doomed)
        promoted = await anyio.to_thread.run_sync(
            lambda: cluster.wait_for_promotion(slot, old_master_port=doomed)
        )
        assert promoted == heir.port
        assert all(cluster.cluster_state(port) == "ok" for port in cluster.ports)
        # The client's map still names the dead node: a connection error, a fresh map, the
        # command re-sent (it cannot have run) to the new master.
        assert await client.get(second) == "replicated"
    finally:
        await client.aclose()


# -- redis+cluster:// URLs ----------------------------------------------------------------


def test_cluster_urls_are_taken_apart() -> None:
    parts = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001/0?x=1")
    assert parts is not None
    assert parts.url == "redis://u:p%40ss@10.0.0.1:7000/0?x=1"
    assert parts.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))

    tls = parse_cluster_url("rediss+cluster://[::1]:7000, cache:7001?ssl_cert_reqs=required")
    assert tls is not None
    assert tls.url == "rediss://[::1]:7000/0?ssl_cert_reqs=required"
    assert tls.nodes == (("::1", 7000), ("cache", 7001))

    assert parse_cluster_url("redis://127.0.0.1:6379/0") is None
    assert parse_cluster_url("rediss://127.0.0.1:6379/0") is None


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://u:secret@host",
        "redis+cluster://host:7000,host:notaport",
        "redis+cluster://host:70000",
        "redis+cluster://host:7000/1",
    ],
)
def test_malformed_cluster_urls_are_refused_without_showing_the_password(url: str) -> None:
    with pytest.raises(InvalidRedisUrlError) as caught:
        parse_cluster_url(url)
    assert "secret" not in str(caught.value)


def test_a_cluster_url_is_logged_without_its_password() -> None:
    assert (
        redact_url("rediss+cluster://cancel:secret@a:7000,b:7001/0")
        == "rediss+cluster://cancel:***@a:7000,b:7001/0"
    )


async def test_the_factories_give_cluster_clients_for_cluster_urls_only(
    redis_cluster_url: str, redis_url: str
) -> None:
    clients = [command_client(redis_cluster_url), blocking_client(redis_cluster_url, 1000)]
    plain = [command_client(redis_url), blocking_client(redis_url, 1000)]
    try:
        assert all(isinstance(c, RedisCluster) for c in clients)
        assert all(isinstance(c, Redis) for c in plain)
        for client in clients:  # every one of them reaches the whole cluster
            assert await client.ping() is True
            assert len(await client.cluster_nodes()) == 3  # type: ignore[union-attr]
    finally:
        for client in (*clients, *plain):
            await client.aclose()


async def test_a_stream_and_its_group_work_through_the_factories(
    redis_cluster_url: str, cluster_client: RedisClient
) -> None:
    stream = f"{tag()}:events"
    await cluster_client.xgroup_create(stream, "broker", id="$", mkstream=True)
    reader = blocking_client(redis_cluster_url, 5_000)
    try:
        replies: list[object] = []

        async def read() -> None:
            replies.extend(
                await reader.xreadgroup("broker", "c1", {stream: ">"}, count=10, block=5_000)
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.sleep(0.2)  # the reader is blocked when the entry arrives
            entry_id = await cluster_client.xadd(stream, {"event": "{}"})
        assert replies == [[stream, [(entry_id, {"event": "{}"})]]]
        assert await cluster_client.xack(stream, "broker", entry_id) == 1
    finally:
        await reader.aclose()


async def test_a_script_runs_on_a_hash_tagged_key_set_and_refuses_keys_of_several_slots(
    cluster_client: RedisClient,
) -> None:
    move = cluster_client.register_script(
        "local v = redis.call('GET', KEYS[1]); redis.call('SET', KEYS[2], v);"
        " redis.call('DEL', KEYS[1]); return v"
    )
    same_slot = tag()
    await cluster_client.set(f"{same_slot}:from", "value", ex=60)
    assert await move(keys=[f"{same_slot}:from", f"{same_slot}:to"]) == "value"
    assert await cluster_client.get(f"{same_slot}:to") == "value"

    # redis-py refuses before sending; a server would answer CROSSSLOT.
    with pytest.raises((RedisClusterException, ResponseError), match=r"same key slot|CROSSSLOT"):
        await move(keys=[f"{tag()}:from", f"{tag()}:to"])


async def test_a_reply_timeout_is_not_resent_on_a_cluster(
    redis_cluster: RedisClusterServer, cluster_client: RedisClient
) -> None:
    """The single-node rule, on a cluster: a command whose reply times out (5 s) may have
    run, so it is raised, not sent again.

    The node is paused for writes for 6 s. The INCR times out at 5 s and its connection is
    closed, which drops it. The stock cluster client would re-send it on a new connection,
    where it would run when the pause ends.
    """
    key = f"{tag()}:counter"
    owner = redis_cluster.owner_of(redis_cluster.slot_of(key)).port
    with redis_cluster.node(owner) as node:
        node.execute_command("CLIENT", "PAUSE", 6_000, "WRITE")
    try:
        with pytest.raises(RedisTimeoutError):
            await cluster_client.incr(key)
        await anyio.sleep(1.5)  # past the end of the pause: a re-sent INCR would have run
    finally:
        with redis_cluster.node(owner) as node:
            node.execute_command("CLIENT", "UNPAUSE")
    assert await cluster_client.get(key) is None


#: What redis-py's cluster client sends besides the caller's commands: CLUSTER SLOTS to
#: learn the slot map, COMMAND (and COMMAND GETKEYS) to find the keys of a command, and
#: ASKING before following an ASK redirection.
CLUSTER_CLIENT_COMMANDS = ("+cluster|slots", "+command", "+asking")


async def test_an_acl_user_needs_the_cluster_clients_own_commands(
    redis_cluster: RedisClusterServer, redis_cluster_url: str
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    url = redis_cluster_url.replace("redis+cluster://", f"redis+cluster://{user}:pw@")
    key = f"{tag()}:acl"
    await anyio.to_thread.run_sync(lambda: _set_user(redis_cluster, user, ()))
    client = command_client(url)
    try:
        with pytest.raises(RedisClusterException):  # "Cluster mode is not enabled"...
            await client.get(key)
    finally:
        await client.aclose()

    await anyio.to_thread.run_sync(lambda: _set_user(redis_cluster, user, CLUSTER_CLIENT_COMMANDS))
    client = command_client(url)
    slot = redis_cluster.slot_of(key)
    source = redis_cluster.owner_of(slot).port
    target = next(port for port in redis_cluster.ports if port != source)
    try:
        await client.set(key, "v", ex=60)
        redis_cluster.begin_slot_migration(slot, target)
        redis_cluster.migrate_slot_keys(slot, source, target)
        assert await client.get(key) == "v"  # through ASK: needs +asking
    finally:
        await anyio.to_thread.run_sync(redis_cluster.finish_slot_migration, slot, target)
        await anyio.to_thread.run_sync(redis_cluster.move_slot, slot, source)
        await client.aclose()
        for port in redis_cluster.ports:
            with redis_cluster.node(port) as node:
                node.execute_command("ACL", "DELUSER", user)


def _set_user(cluster: RedisClusterServer, user: str, extra: tuple[str, ...]) -> None:
    """ACL users are per node: the same rules go to every one of them."""
    for port in cluster.ports:
        with cluster.node(port) as node:
            node.execute_command(
                "ACL", "SETUSER", user, "reset", "on", ">pw", "~*", "+get", "+set", "+ping",
                *extra,
            )  # fmt: skip
