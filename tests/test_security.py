"""TLS and Redis ACLs, end to end: the broker and a worker as processes, against private
redis-servers that speak TLS only, or that know only the users of ``docs/security.md``.

The ACL rules are read from ``docs/security.md`` (see ``tests/tls.py``): what is tested is
what is documented.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from broker import EmbeddedRedis
from sdk import CancelOn, Client, Event, NotReplicatedError, RunInfo
from sdk.keys import Keys
from sdk.registration import declare_rules
from sdk.rules import index_entries
from sdk.streams import trim_acknowledged
from tests.helpers import broker_drained, wait_for_status, wait_until
from tests.processes import ProcessHandle, start_broker, start_worker
from tests.tls import (
    Certificates,
    TlsRedis,
    certificate_tool_missing,
    documented_acl_block,
    documented_acl_rules,
    make_certificates,
    redis_tls_unsupported,
)

#: What docs/security.md passes to the Client of a user that may only publish.
ONLY_PUBLISH: Final = {"match_on_publish": False}

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

#: The documented rules name the default namespace; every server here is private.
NAMESPACE = "cancel"
KEYS = Keys(NAMESPACE)
ROLES = ("publisher", "worker", "broker", "operator")
PASSWORDS = {role: secrets.token_urlsafe(16) + "@:/%" for role in ROLES}  # URL-special too
PASSWORD_VARIABLES = {f"CANCEL_{role.upper()}_PASSWORD": PASSWORDS[role] for role in ROLES}
ADMIN, ADMIN_PASSWORD = "admin", secrets.token_urlsafe(16)
#: Not part of the documented rules: the test app (tests/apps/reports.py) records what its
#: bodies observe in a list, with the worker's own connection.
TEST_APP_RULE = "(%W~cancel:test:observed:* +rpush)"


def user_url(port: int, role: str) -> str:
    return f"redis://cancel-{role}:{quote(PASSWORDS[role], safe='')}@127.0.0.1:{port}/0"


def decoded(url: str) -> Redis:
    return Redis.from_url(url, decode_responses=True, encoding_errors="surrogateescape")


def apply_documented_rules(admin: sync_redis.Redis) -> None:
    """The rules of docs/security.md, issued as the documented ``ACL SETUSER`` commands."""
    rules = documented_acl_rules(PASSWORD_VARIABLES)
    assert sorted(rules) == sorted(f"cancel-{role}" for role in ROLES)
    for user, user_rules in rules.items():
        admin.execute_command("ACL", "SETUSER", user, *user_rules)
    admin.execute_command("ACL", "SETUSER", "cancel-worker", TEST_APP_RULE)


def lock_down(port: int, **connection: Any) -> None:
    """Add the documented users and an admin; then switch the all-powerful default user
    off, so a process connecting without its user's credentials is refused."""
    default = sync_redis.Redis(host="127.0.0.1", port=port, **connection)
    try:
        apply_documented_rules(default)
        default.execute_command("ACL", "SETUSER", ADMIN, "on", f">{ADMIN_PASSWORD}", "+@all", "~*")
        default.execute_command("ACL", "SETUSER", "default", "off")
    finally:
        default.close()


# -- the documented block ----------------------------------------------------------------


def test_documented_block_is_what_a_shell_runs(tmp_path: Path) -> None:
    """Pasted into bash, the block issues exactly the commands the tests apply."""
    stub = tmp_path / "redis-cli"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@"; printf "\\n"\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["bash", "-e", "-c", documented_acl_block()],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path), **PASSWORD_VARIABLES},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    from_shell = {}
    for line in result.stdout.splitlines():
        acl, setuser, user, *rules = line.rstrip("\0").split("\0")
        assert (acl, setuser) == ("ACL", "SETUSER")
        from_shell[user] = rules
    assert from_shell == documented_acl_rules(PASSWORD_VARIABLES)
    assert from_shell["cancel-publisher"][2] == f">{PASSWORDS['publisher']}"


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    reason = certificate_tool_missing()
    if reason:
        pytest.skip(reason)
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certificates: Certificates) -> Iterator[TlsRedis]:
    reason = redis_tls_unsupported()
    if reason:
        pytest.skip(reason)
    server = TlsRedis(certificates)
    server.start()
    try:
        yield server
    finally:
        server.close()


async def start_report(publisher: Client, reader: Client, report_id: str) -> RunInfo:
    """Publish a trigger (as ``publisher``), wait for its run (read as ``reader``)."""
    event_id = await publisher.send("report/generate.requested", {"reportId": report_id})
    runs: list[RunInfo] = []

    async def registered() -> bool:
        runs[:] = await reader.runs_for_event(event_id)
        return bool(runs)

    await wait_until(registered)
    (run,) = runs
    return run


async def wait_started(redis: Redis, report_id: str) -> None:
    key = f"{NAMESPACE}:test:observed:{report_id}"

    async def started() -> bool:
        return any(json.loads(o)["what"] == "started" for o in await redis.lrange(key, 0, -1))

    await wait_until(started)


def stop(*handles: ProcessHandle) -> None:
    for handle in handles:
        assert handle.terminate() == 0, handle.output


async def test_tls_only_server_refuses_what_is_not_verified_tls(tls_server: TlsRedis) -> None:
    """The URL's query string is what makes TLS work: without the CA, or without the
    client certificate the server requires, or in plain text, nothing connects."""
    async with decoded(tls_server.url()) as ok:
        assert await ok.ping()
        assert await ok.config_get("port") == {"port": "0"}  # TLS only
        assert await ok.config_get("tls-auth-clients") == {"tls-auth-clients": "yes"}
    failing = {
        "no CA": tls_server.url(ca=False),
        "no client certificate": tls_server.url(client_cert=False),
        "plain text on the TLS port": f"redis://127.0.0.1:{tls_server.tls_port}/0",
        "plain port": f"redis://127.0.0.1:{tls_server.plain_port}/0",
    }
    for what, url in failing.items():
        client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        with pytest.raises(sync_redis.ConnectionError):
            await client.ping()
            pytest.fail(f"connected with {what}")
        await client.aclose()
    # The failure without the CA is the certificate check, not something else.
    client = Redis.from_url(tls_server.url(ca=False), socket_connect_timeout=2)
    with pytest.raises(sync_redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await client.ping()
    await client.aclose()


async def test_cancel_end_to_end_over_tls(tls_server: TlsRedis) -> None:
    url = tls_server.url()
    broker, _http = start_broker(url, NAMESPACE)
    try:
        worker = start_worker(url, NAMESPACE, shutdown_timeout="0.2")
    except BaseException:
        broker.kill()
        raise
    try:
        async with Client(url, namespace=NAMESPACE) as client, decoded(url) as redis:
            run = await start_report(client, client, "tls-1")
            await wait_started(redis, "tls-1")
            cancel_id = await client.send("report/cancel.requested", {"reportId": "tls-1"})
            info = await wait_for_status(client, run.run_id, "cancelled")
            assert info.cancelled_by == cancel_id
            assert info.cancel_reason == "cancel event report/cancel.requested"
    finally:
        stop(worker, broker)


async def test_acl_users_over_tls(tls_server: TlsRedis) -> None:
    """``rediss://user:password@...``: the documented users authenticate over TLS."""
    admin_url = tls_server.url()
    async with decoded(admin_url) as admin:
        for user, rules in documented_acl_rules(PASSWORD_VARIABLES).items():
            await admin.execute_command("ACL", "SETUSER", user, *rules)
    for role in ROLES:
        url = tls_server.url(username=f"cancel-{role}", password=PASSWORDS[role])
        async with decoded(url) as as_role:
            assert await as_role.ping()
        wrong = tls_server.url(username=f"cancel-{role}", password="wrong")
        async with decoded(wrong) as as_nobody:
            with pytest.raises(sync_redis.AuthenticationError):
                await as_nobody.ping()
    url = tls_server.url(username="cancel-publisher", password=PASSWORDS["publisher"])
    async with Client(url, namespace="tls-acl") as publisher:
        with pytest.raises(NoPermissionError):  # the rules name the namespace `cancel` only
            await publisher.send("report/cancel.requested", {"reportId": "x"})
    async with Client(url, namespace=NAMESPACE) as publisher, decoded(admin_url) as admin:
        event_id = await publisher.send("report/cancel.requested", {"reportId": "x"})
        assert [entry_id for entry_id, _ in await admin.xrange(KEYS.events)][-1] == event_id


# -- ACLs --------------------------------------------------------------------------------


class AclServer:
    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server
        self.port = server.port

    def url(self, role: str) -> str:
        return user_url(self.port, role)

    @property
    def admin_url(self) -> str:
        return f"redis://{ADMIN}:{ADMIN_PASSWORD}@127.0.0.1:{self.port}/0"


@pytest.fixture(scope="module")
def acl_server() -> Iterator[AclServer]:
    with EmbeddedRedis() as server:
        with sync_redis.Redis(port=server.port) as probe:
            version = probe.info("server")["redis_version"]
        if int(version.split(".")[0]) < 7:
            pytest.skip(
                f"redis-server {version} ({server.executable}) has no ACL selectors, which the"
                " rules in docs/security.md need (Redis 7.0 or newer): install Redis 7 or"
                " point CANCEL_BROKER_REDIS_SERVER at one"
            )
        lock_down(server.port)
        yield AclServer(server)


@pytest.fixture
async def admin(acl_server: AclServer) -> AsyncIterator[Redis]:
    async with decoded(acl_server.admin_url) as client:
        yield client
        # Shown when the test fails: what Redis refused, to whom, and why.
        for entry in await client.execute_command("ACL", "LOG"):
            print(f"ACL LOG: {entry}")


async def test_default_user_is_off(acl_server: AclServer) -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{acl_server.port}/0")
    with pytest.raises(sync_redis.AuthenticationError):
        await client.ping()
    await client.aclose()


async def test_roles_run_and_cancel_end_to_end(acl_server: AclServer, admin: Redis) -> None:
    """Broker and workers as processes, each as its documented user, the publisher and the
    operator as theirs: runs start, are cancelled, a killed worker's run is recorded lost,
    and Redis refused nothing any of them did."""
    await admin.execute_command("ACL", "LOG", "RESET")
    worker_env = {"shutdown_timeout": "0.2", "heartbeat_interval": "0.5"}
    broker, http = start_broker(acl_server.url("broker"), NAMESPACE)
    worker: ProcessHandle | None = None
    try:
        worker = start_worker(acl_server.url("worker"), NAMESPACE, **worker_env)
        async with (
            # As docs/security.md says for users that may only publish: no match on publish.
            Client(acl_server.url("publisher"), namespace=NAMESPACE, **ONLY_PUBLISH) as publisher,
            Client(acl_server.url("operator"), namespace=NAMESPACE, **ONLY_PUBLISH) as operator,
            decoded(acl_server.url("publisher")) as raw_publisher,
        ):
            r1 = await start_report(publisher, operator, "acl-1")
            r2 = await start_report(publisher, operator, "acl-2")
            await wait_started(admin, "acl-1")
            await wait_started(admin, "acl-2")
            worker_id = r1.worker_id

            # A cancel event as one plain XADD, the way any language publishes it.
            body = '{"name": "report/cancel.requested", "data": {"reportId": "acl-1"}}'
            cancel_id = await raw_publisher.xadd(KEYS.events, {"event": body})
            info = await wait_for_status(operator, r1.run_id, "cancelled")
            assert info.cancelled_by == cancel_id

            # Cancel by run id, as the operator.
            result = await operator.cancel(r2.run_id, reason="operator")
            assert result.outcome == "signalled"
            info = await wait_for_status(operator, r2.run_id, "cancelled")
            assert (info.cancelled_by, info.cancel_reason) == ("api", "operator")

            # A malformed event is dead-lettered; a cancel nobody listens to is counted.
            dead_before = await admin.xlen(KEYS.dead_letters)
            await raw_publisher.xadd(KEYS.events, {"event": "{not json"})
            await publisher.send("invoice/cancel.requested", {"invoiceId": "i1"})

            async def noticed() -> bool:
                return bool(
                    await admin.xlen(KEYS.dead_letters) == dead_before + 1
                    and await admin.hget(KEYS.orphan_events, "invoice/cancel.requested")
                )

            await wait_until(noticed)
            await wait_until(lambda: broker_drained(admin, NAMESPACE))

            # A signal no worker acknowledged is re-sent by the broker (resend_signals.lua).
            await admin.hset(
                KEYS.run("ghost-run"), mapping={"status": "cancelling", "worker_id": "ghost"}
            )
            await admin.zadd(KEYS.cancelling_runs, {"ghost-run": 0})

            async def resent() -> bool:
                return bool(await admin.xlen(KEYS.signals("ghost")))

            await wait_until(resent)
            (_, fields), *_ = await admin.xrange(KEYS.signals("ghost"))
            assert (fields["run_id"], fields.get("resent")) == ("ghost-run", "1")
            await admin.delete(KEYS.run("ghost-run"), KEYS.signals("ghost"))

            # The worker heartbeats (heartbeat.lua) as its user.
            first = await admin.zscore(KEYS.workers, worker_id)

            async def heartbeat() -> bool:
                return bool((await admin.zscore(KEYS.workers, worker_id) or 0) > (first or 0))

            await wait_until(heartbeat)

            # The broker's sync state (/v1/sync), its dashboard (runs listed, finished ones
            # too; functions; decisions; Cancel) and trimming, as the broker's user.
            r4 = await start_report(publisher, operator, "acl-4")
            await wait_started(admin, "acl-4")
            # A stream named like the events stream, without the braces: reported.
            await admin.xadd("cancel:events", {"event": body})
            async with httpx.AsyncClient(base_url=http) as web:
                sync = (await web.get("/v1/sync")).json()
                listed = (await web.get("/v1/runs")).json()["runs"]
                functions = (await web.get("/v1/functions")).json()["functions"]
                decided = (await web.get("/v1/decisions")).json()["decisions"]
                cancelled = await web.post(
                    f"/v1/runs/{r4.run_id}/cancel", headers={"X-Cancel-Broker-Request": "1"}
                )
            assert [w["worker_id"] for w in sync["workers"]] == [worker_id]
            assert "misnamed_stream" in {f["kind"] for f in sync["findings"]}
            await admin.delete("cancel:events")
            assert {r1.run_id, r2.run_id, r4.run_id} <= {run["run_id"] for run in listed}
            assert [f["function_id"] for f in functions] == ["generate-report"]
            assert {d["decision"] for d in decided} >= {"matched", "dead_lettered"}
            assert cancelled.json()["result"]["outcome"] == "signalled"
            await wait_for_status(operator, r4.run_id, "cancelled")
            # Cancels of runs not registered yet are kept, by id (the operator, and the
            # dashboard as the broker's user) and in bulk; the broker expires what is kept.
            assert (await operator.cancel("queued-run")).outcome == "pending"
            # Publishers that wait for replicas (this Redis has none: each write is reported).
            for role in ("publisher", "operator"):
                async with Client(
                    acl_server.url(role),
                    namespace=NAMESPACE,
                    wait_replicas=1,
                    wait_timeout=0.05,
                    **ONLY_PUBLISH,
                ) as waiting:
                    with pytest.raises(NotReplicatedError):
                        await waiting.send("report/cancel.requested", {"reportId": "nobody"})
                    if role == "operator":
                        with pytest.raises(NotReplicatedError):
                            await waiting.cancel("queued-run-3")
            async with httpx.AsyncClient(base_url=http) as web:
                kept = await web.post(
                    "/v1/runs/queued-run-2/cancel", headers={"X-Cancel-Broker-Request": "1"}
                )
            assert kept.json()["result"]["outcome"] == "pending"
            bulk = await operator.cancel_many("generate-report")
            assert bulk.kept_until is not None
            async with decoded(acl_server.url("broker")) as as_broker:
                await trim_acknowledged(as_broker, KEYS.events)

            # A clean stop removes what the worker owns (DEL, ZREM, XGROUP DELCONSUMER).
            stop(worker)
            assert await admin.exists(KEYS.signals(worker_id), KEYS.worker(worker_id)) == 0
            assert await admin.zscore(KEYS.workers, worker_id) is None

            # A worker killed with a run in hand: the broker records the run lost.
            worker = start_worker(acl_server.url("worker"), NAMESPACE, **worker_env)
            r3 = await start_report(publisher, operator, "acl-3")
            await wait_started(admin, "acl-3")
            worker.kill()
            info = await wait_for_status(operator, r3.run_id, "lost")
            gone = (KEYS.worker(r3.worker_id), KEYS.worker_runs(r3.worker_id))

            async def forgotten() -> bool:
                # The reaper records the runs lost first, then deletes what the worker had.
                return await admin.exists(*gone, KEYS.signals(r3.worker_id)) == 0

            await wait_until(forgotten)
    finally:
        if worker is not None:
            worker.kill()
        stop(broker)

    # Nothing any process did was refused, not even what the code retries or ignores.
    log = await admin.execute_command("ACL", "LOG")
    assert log == [], log


async def test_a_publisher_that_may_only_publish_is_refused_the_early_match_once(
    acl_server: AclServer, admin: Redis
) -> None:
    """Left on, match on publish (sdk/early_match.py) asks Redis for the rules once; refused,
    the client says so, publishes plainly, and never asks again."""
    await admin.set(KEYS.partitions, 1, nx=True)  # as the first worker does: runs may exist
    await admin.execute_command("ACL", "LOG", "RESET")
    async with Client(acl_server.url("publisher"), namespace=NAMESPACE) as publisher:
        assert publisher.match_on_publish
        for report_id in ("e1", "e2", "e3"):
            await publisher.send("report/cancel.requested", {"reportId": report_id})
        assert not publisher.match_on_publish
    assert len(await admin.xrange(KEYS.events)) >= 3
    log = await admin.execute_command("ACL", "LOG")
    assert [(entry["object"], entry["count"]) for entry in log] == [("hkeys", 1)]


async def test_a_client_refused_run_state_inside_the_script_publishes_once_and_stops_matching(
    acl_server: AclServer, admin: Redis
) -> None:
    """A user that may read the rules and run the script but not read runs: the script
    appends the event, its match is refused inside (after the XADD), and the client
    neither publishes it again nor tries to match again."""
    password = secrets.token_hex(8)
    await admin.execute_command(
        "ACL", "SETUSER", "half-publisher", "reset", "on", f">{password}", "+ping", "+time",
        "+evalsha", "+script|load", "+hkeys", "+xadd", "+smembers", "%R~{cancel}:rules:*",
        f"~{KEYS.events}", f"~{KEYS.cancelling_runs}", "~{cancel}:idx:*", "+get",
        f"%R~{KEYS.partitions}",
    )  # fmt: skip
    url = f"redis://half-publisher:{password}@127.0.0.1:{acl_server.port}/0"
    rule = CancelOn(event="report/cancel.requested", match="data.reportId")
    trigger = Event(name="report/generate.requested", data={"reportId": "h1"}, id="1-0")
    async with decoded(acl_server.admin_url) as as_admin:
        async with as_admin.pipeline(transaction=True) as pipe:
            declare_rules(pipe, KEYS, (rule,), 0)
            await pipe.execute()
        for entry in index_entries((rule,), trigger, KEYS):
            await as_admin.sadd(entry.key, "run-h1")
    await admin.set(KEYS.partitions, 1, nx=True)
    await admin.execute_command("ACL", "LOG", "RESET")
    async with Client(url, namespace=NAMESPACE) as half:
        first = await half.send("report/cancel.requested", {"reportId": "h1"})
        assert not half.match_on_publish
        second = await half.send("report/cancel.requested", {"reportId": "h1"})
    published = [entry_id for entry_id, _ in await admin.xrange(KEYS.events)]
    assert (published.count(first), published.count(second)) == (1, 1)
    # Refused the first thing it does with run state, reading the run it found.
    refused = [entry["object"] for entry in await admin.execute_command("ACL", "LOG")]
    assert refused == ["hmget"]


async def test_publisher_can_only_append_events(acl_server: AclServer, admin: Redis) -> None:
    async with (
        Client(acl_server.url("publisher"), namespace=NAMESPACE) as publisher,
        decoded(acl_server.url("publisher")) as raw,
    ):
        assert await raw.ping()
        event_id = await publisher.send("report/cancel.requested", {"reportId": "p1"})
        assert event_id in [entry_id for entry_id, _ in await admin.xrange(KEYS.events)]
        assert await raw.xadd(KEYS.events, {"event": '{"name": "a/b"}'})

        run_key = KEYS.run("0" * 32)
        await admin.hset(run_key, mapping={"status": "running", "worker_id": "w1"})
        refused: dict[str, Callable[[], Awaitable[Any]]] = {
            "read a run": lambda: raw.hgetall(run_key),
            "read a run with the SDK": lambda: publisher.get_run("0" * 32),
            "cancel a run by id": lambda: publisher.cancel("0" * 32),
            "forge a signal": lambda: raw.xadd(KEYS.signals("w1"), {"run_id": "0" * 32}),
            "read events": lambda: raw.xrange(KEYS.events),
            "read events (XREAD)": lambda: raw.xread({KEYS.events: "0-0"}),
            "consume events": lambda: raw.xreadgroup("broker", "p", {KEYS.events: ">"}),
            "count events": lambda: raw.xlen(KEYS.events),
            "post a sync notice": lambda: raw.xadd(KEYS.syncs, {"worker": "{}"}),
            "write a dead letter": lambda: raw.xadd(KEYS.dead_letters, {"reason": "x"}),
            "delete the stream": lambda: raw.delete(KEYS.events),
            "list keys": lambda: raw.keys("*"),
            "load a script": lambda: raw.script_load("return 1"),
        }
        for what, call in refused.items():
            with pytest.raises(NoPermissionError):
                await call()
                pytest.fail(f"the publisher could {what}")
        assert await admin.hget(run_key, "status") == "running"
        await admin.delete(run_key)


@pytest.mark.parametrize(
    ("role", "what", "command"),
    [
        # (A worker does publish events: the outcome of a cancelled run, ctx.spawn.)
        ("worker", "forge a signal", ("XADD", "{cancel}:signals:w2", "*", "run_id", "r")),
        ("worker", "change a tombstone it only reads", ("SET", "{cancel}:tomb-event:1-0", "x")),
        ("worker", "listen to another channel", ("SUBSCRIBE", "{cancel}:finished:r")),
        ("worker", "read another's registration", ("HGETALL", "{cancel}:worker:w2")),
        ("worker", "send code", ("EVAL", "return 1", "0")),
        ("broker", "forge a sync notice", ("XADD", "{cancel}:syncs", "*", "worker", "{}")),
        ("broker", "read events without a group", ("XRANGE", "{cancel}:events", "-", "+")),
        ("broker", "write a function configuration", ("SET", "{cancel}:config:c", "{}")),
        ("broker", "read a signal stream", ("XREAD", "STREAMS", "{cancel}:signals:w2", "0-0")),
        ("broker", "send code", ("EVAL", "return 1", "0")),
        ("operator", "read events", ("XRANGE", "{cancel}:events", "-", "+")),
        ("operator", "change the index", ("SREM", "{cancel}:idx:a:data.b:1", "r")),
        ("operator", "forge an outcome", ("PUBLISH", "{cancel}:finished:r", "cancelled")),
        ("publisher", "write outside its namespace", ("XADD", "other:events", "*", "a", "b")),
    ],
)
async def test_roles_cannot_step_outside_their_job(
    acl_server: AclServer, role: str, what: str, command: tuple[str, ...]
) -> None:
    async with decoded(acl_server.url(role)) as client:
        with pytest.raises(NoPermissionError):
            await client.execute_command(*command)
            pytest.fail(f"the {role} could {what}")


@pytest.mark.parametrize("role", ["worker", "broker", "operator"])
async def test_a_script_a_role_loads_cannot_exceed_its_rights(
    acl_server: AclServer, role: str
) -> None:
    """SCRIPT LOAD + EVALSHA grants nothing: Redis checks each command a script runs
    against the rules of the user who called it."""
    async with decoded(acl_server.url(role)) as client:
        sha = await client.script_load("return redis.call('DEL', 'cancel:events')")
        with pytest.raises(sync_redis.ResponseError, match="user executing the script can't"):
            await client.evalsha(sha, 0)
            pytest.fail(f"the {role} deleted the events stream from a script")


@pytest.mark.parametrize("role", ROLES)
async def test_every_role_passes_health_checks(
    acl_server: AclServer, admin: Redis, role: str
) -> None:
    """Clients PING idle connections every 30 s: a role without PING fails after a pause."""
    async with decoded(acl_server.url(role)) as client:
        assert await client.ping()
        users = {c["user"] for c in await admin.client_list()}
        assert f"cancel-{role}" in users


def test_the_broker_never_logs_its_password(acl_server: AclServer) -> None:
    broker, _http = start_broker(acl_server.url("broker"), NAMESPACE)
    if broker.terminate() != 0:  # not an AssertionError: this must not count as the xfail
        pytest.fail(broker.output)
    password = PASSWORDS["broker"]
    leaked = [line for line in broker.lines if password in line or quote(password, safe="") in line]
    assert leaked == []
