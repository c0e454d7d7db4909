"""`cancel-broker runs`, `dead-letters` (and `--republish`), and the commands that must
fail loudly rather than do nothing: `cancel-many` of a function nobody declares, `wait` on
a run that does not exist. Through the real command, in a process of its own."""

from __future__ import annotations

import json
import subprocess
import time

import anyio
import pytest
from redis.asyncio import Redis

from sdk.connection import command_client
from sdk.keys import EVENT_FIELD, Keys
from sdk.streams import DEAD_LETTER_KEPT_BYTES, dead_letter
from sdk.wire import decode_event, encode_event
from tests.benchmarks.registered import register_runs, run_id, trigger
from tests.processes import start_broker
from tests.test_cli import cli, one_error_line

pytestmark = pytest.mark.e2e


def base(redis_url: str, namespace: str) -> list[str]:
    return ["--redis-url", redis_url, "--namespace", namespace]


def registered(redis_url: str, namespace: str, n: int) -> None:
    async def go() -> None:
        redis = command_client(redis_url)
        try:
            await register_runs(redis, Keys(namespace), n)
            # What a broker records of the app's sync: it declares generate-report.
            await redis.sadd(Keys(namespace).apps, "reports")
            await redis.hset(Keys(namespace).app_functions("reports"), "generate-report", "h")
        finally:
            await redis.aclose()

    anyio.run(go)


def test_runs_lists_filters_and_finds_an_events_runs(redis_url: str, namespace: str) -> None:
    registered(redis_url, namespace, 3)
    done = cli("runs", "--function", "generate-report", "--json", *base(redis_url, namespace))
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert sorted(run["run_id"] for run in listed) == sorted(run_id(i) for i in range(3))
    assert {run["status"] for run in listed} == {"running"}
    none = cli("runs", "--status", "completed", "--json", *base(redis_url, namespace))
    assert json.loads(none.stdout) == []
    by_event = cli("runs", "--event", trigger(1).id, "--json", *base(redis_url, namespace))
    assert [run["run_id"] for run in json.loads(by_event.stdout)] == [run_id(1)]
    table = cli("runs", *base(redis_url, namespace))
    assert table.returncode == 0
    assert run_id(2) in table.stdout
    assert "reports/generate-report" in table.stdout
    bad = cli("runs", "--status", "sleeping", *base(redis_url, namespace))
    assert bad.returncode == 2  # argparse: an invalid choice


async def letters(redis: Redis, namespace: str) -> list[str]:
    keys = Keys(namespace)
    valid = {EVENT_FIELD: encode_event("report/cancel.requested", {"reportId": "r9"}).decode()}
    huge = {EVENT_FIELD: "x" * 5_000_000}  # a hostile 5 MB entry
    for fields, reason in [
        (valid, "poison"),
        ({"nope": "1"}, "missing_field"),
        (huge, "too_large"),
    ]:
        await dead_letter(
            redis, keys.dead_letters, "1-1", fields, reason=reason, detail="d", consumer="c"
        )
    entries = await redis.xrange(keys.dead_letters)
    return [entry_id for entry_id, _ in entries]


@pytest.mark.anyio
async def test_dead_letters_are_listed_bounded_and_one_is_published_again(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    valid, invalid, huge = await letters(redis, namespace)

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await anyio.to_thread.run_sync(lambda: cli(*args, *base(redis_url, namespace)))

    done = await run("dead-letters", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [letter["id"] for letter in listed] == [huge, invalid, valid]  # newest first
    assert [letter["reason"] for letter in listed] == ["too_large", "missing_field", "poison"]
    assert listed[0]["truncated"] is True
    assert len(done.stdout) < 10_000  # the hostile entry is an excerpt, everywhere
    ((_, stored),) = await redis.xrange(Keys(namespace).dead_letters, huge, huge)
    assert len(stored["fields"]) <= DEAD_LETTER_KEPT_BYTES
    assert int(stored["fields_bytes"]) > 5_000_000
    assert listed[2]["event_name"] == "report/cancel.requested"

    again = await run("dead-letters", "--republish", valid)
    assert again.returncode == 0, again.stderr
    new_id = again.stdout.strip()
    ((entry_id, fields),) = await redis.xrange(Keys(namespace).events, new_id, new_id)
    assert decode_event(entry_id, fields).data == {"reportId": "r9"}
    remaining = json.loads((await run("dead-letters", "--json")).stdout)
    assert valid not in [letter["id"] for letter in remaining]

    refused = await run("dead-letters", "--republish", invalid)
    assert refused.returncode == 2
    assert "not a valid event" in one_error_line(refused.stderr)
    unknown = await run("dead-letters", "--republish", "1-99")
    assert "no dead letter 1-99" in one_error_line(unknown.stderr)


def test_cancel_many_of_a_function_nobody_declares_fails_with_the_close_names(
    redis_url: str, namespace: str
) -> None:
    registered(redis_url, namespace, 2)
    done = cli("cancel-many", "generate-reprot", *base(redis_url, namespace))
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "no function 'generate-reprot'" in line
    assert "did you mean 'generate-report'" in line
    ok = cli("cancel-many", "generate-report", "--json", *base(redis_url, namespace))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["outcomes"] == {"signalled": 2}


def test_wait_on_a_run_that_does_not_exist_fails_at_once(redis_url: str, namespace: str) -> None:
    done = cli("wait", "r-never", *base(redis_url, namespace))
    assert done.returncode == 2
    assert "no run r-never" in one_error_line(done.stderr)


def test_the_broker_prints_its_dashboard_url_on_a_line_of_its_own(
    redis_url: str, namespace: str
) -> None:
    broker, http = start_broker(redis_url, namespace)
    try:
        deadline = time.monotonic() + 10
        while f"cancel-broker: dashboard at {http}/" not in broker.lines:
            assert time.monotonic() < deadline, broker.lines[-5:]
            time.sleep(0.02)
    finally:
        broker.terminate()
