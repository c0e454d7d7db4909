"""The Redis protocol has one home: the scripts are called from sdk/scripts.py and
broker/scripts.py alone, each with the shared library in front, and what the scripts
write (composite fields, reasons) is what the Python side reads."""

from __future__ import annotations

import ast
import pathlib
from importlib import resources

import pytest
from redis.asyncio import Redis

from broker import scripts as broker_scripts
from broker.scripts import match_events
from sdk import CancelOn, Event
from sdk import scripts as sdk_scripts
from sdk.keys import (
    Keys,
    delivery_field,
    finished_field,
    parse_finished_field,
    parse_run_config_field,
    run_config_field,
)
from sdk.registration import declare_rules
from sdk.rules import index_entries, lookups
from sdk.scripts import Registered, RegisterRequest, Script, event_reason
from sdk.store import RunStore

pytestmark = pytest.mark.anyio

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULE = CancelOn(event="report/cancel.requested", match="data.reportId")
#: The modules allowed to run a Lua script (EVALSHA, SCRIPT LOAD, register_script).
SCRIPT_CALLERS = {"sdk/scripts.py", "broker/scripts.py"}


def _calls(path: pathlib.Path) -> set[str]:
    """Names of the script-running attributes and strings a module uses."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in {
            "register_script",
            "evalsha",
            "script_load",
            "eval",
        }:
            found.add(node.attr)
        if isinstance(node, ast.Constant) and node.value in {"EVALSHA", "EVAL"}:
            found.add(str(node.value))
    return found


def test_only_the_script_modules_run_lua() -> None:
    offenders = {
        str(path.relative_to(ROOT)): calls
        for package in ("sdk", "broker")
        for path in (ROOT / package).rglob("*.py")
        if (calls := _calls(path)) and str(path.relative_to(ROOT)) not in SCRIPT_CALLERS
    }
    assert offenders == {}


def test_every_script_file_has_one_typed_home() -> None:
    defined = {
        (script.name, package)
        for package, module in (("sdk", sdk_scripts), ("broker", broker_scripts))
        for script in vars(module).values()
        if isinstance(script, Script)
    }
    on_disk = {
        (entry.name, package)
        for package in ("sdk", "broker")
        for entry in (resources.files(package) / "lua").iterdir()
        if entry.name.endswith(".lua") and entry.name != "lib.lua"
    }
    assert defined == on_disk


async def test_every_script_compiles_with_the_library_in_front(redis: Redis) -> None:
    scripts = [
        script
        for module in (sdk_scripts, broker_scripts)
        for script in vars(module).values()
        if isinstance(script, Script)
    ]
    for script in scripts:
        assert await redis.script_load(script.source) == script.sha


async def test_what_the_scripts_write_is_what_python_reads(redis: Redis, namespace: str) -> None:
    keys = Keys(namespace)
    store = RunStore(redis, keys)
    async with redis.pipeline(transaction=True) as pipe:
        declare_rules(pipe, keys, (RULE,), 0)
        await pipe.execute()
    trigger = Event(name="report/generate.requested", data={"reportId": "r1"}, id="1-0")
    registration = await store.register(
        RegisterRequest(
            run_id="run-1",
            app_id="reports",
            function_id="generate-report",
            config_hash="abc",
            worker_id="w1",
            event=trigger,
            entries=index_entries((RULE,), trigger, keys),
        )
    )
    assert isinstance(registration, Registered)
    (field,) = await redis.hkeys(keys.run_configs("reports"))
    assert field == run_config_field("generate-report", "abc")
    assert parse_run_config_field(field) == ("generate-report", "abc")

    cancel = Event(name=RULE.event, data={"reportId": "r1"}, id="2-0")
    (reply,) = await match_events(
        redis, [(keys, cancel, lookups(cancel, [RULE.selector.text], keys))], tombstone_ms=0
    )
    assert not isinstance(reply, Exception)
    assert [r.outcome for r in reply[0]] == ["signalled"]
    assert await redis.hget(keys.run("run-1"), "cancel_reason") == event_reason(RULE.event)

    sent_at = int((await redis.xrange(keys.signals("w1")))[0][1]["sent_at"])
    await store.acknowledge_signals([("run-1", sent_at)], worker_id="w1", read_up_to="0-0")
    stats = await redis.hgetall(keys.signal_stats)
    assert {delivery_field("count"), delivery_field("sum")} <= set(stats)

    await store.finish(
        "run-1",
        "cancelled",
        [e.key for e in index_entries((RULE,), trigger, keys)],
        app_id="reports",
        function_id="generate-report",
        worker_id="w1",
        stopped_ago_ms=0,
    )
    (finished,) = await redis.hkeys(keys.finished_stats)
    assert finished == finished_field("reports", "generate-report", "cancelled")
    assert parse_finished_field(finished) == ("reports", "generate-report", "cancelled")
