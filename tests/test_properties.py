"""Property-based: whatever arrives on the stream, nothing raises out of the consumer loop."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from broker import Broker, EmbeddedRedis
from sdk import CancelOn, ConfigurationError, Event, InvalidEventError
from sdk.keys import Keys
from sdk.partitions import Partitions
from sdk.registration import declare_rules
from sdk.rules import MAX_TOKEN_CHARS, index_entries, lookups, value_token
from sdk.scripts import RegisterRequest
from sdk.store import RunStore
from sdk.wire import decode_event, encode_event


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A server of this module's own: each example cleans up after itself with a SCAN,
    which over the suite's shared server (every other test's keys) costs seconds."""
    with EmbeddedRedis() as server:
        yield server


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# What redis-py hands us: text, where bytes that were not UTF-8 became lone surrogates.
wire_text = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
event_bodies = st.one_of(
    wire_text,
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"name": st.one_of(st.text(max_size=30), json_values)},
        optional={"data": json_values, "ts": json_values, "v": json_values},
    ).map(json.dumps),
)
entries = st.one_of(
    st.dictionaries(wire_text, wire_text, max_size=3),
    event_bodies.map(lambda body: {"event": body}),
)
paths = st.one_of(
    st.text(max_size=20), st.lists(st.text(min_size=1, max_size=6), max_size=3).map(".".join)
)


@given(fields=entries)
@SETTINGS
def test_decoding_an_entry_either_succeeds_or_says_why(fields: dict[str, str]) -> None:
    result = _decode(fields)
    if isinstance(result, InvalidEventError):
        assert result.reason
        assert result.detail
    else:
        assert result.name
        assert isinstance(result.data, dict)


def _decode(fields: dict[str, str]) -> Event | InvalidEventError:
    try:
        return decode_event("1700000000000-0", fields)
    except InvalidEventError as exc:  # the only error allowed: a clear reason
        return exc


@given(data=st.dictionaries(st.text(max_size=8), json_values, max_size=4), path=paths)
@SETTINGS
def test_rule_evaluation_never_raises_on_any_data(data: dict[str, Any], path: str) -> None:
    keys = Keys("p")
    event = Event(name="x/cancel.requested", data=data, id="1-0")
    try:
        rule = CancelOn(event="x/cancel.requested", match=path)
    except ConfigurationError:
        rule = None  # refused at definition time, with the position: fine
    if rule is not None:
        for entry in index_entries((rule,), event, keys):
            assert entry.key.startswith("p:idx:x/cancel.requested:")
            token = entry.key.rsplit(":", 1)[-1]
            assert len(token) <= max(MAX_TOKEN_CHARS, len("sha256:") + 64)
    # The broker side: whatever selectors were declared (any text), lookups do not raise.
    assert isinstance(lookups(event, [path, "*", f"{path}|if=x|ttl=5", "*|bad"], keys), list)
    value_token(data)


@contextmanager
def connected(url: str) -> Iterator[tuple[BlockingPortal, Redis]]:
    """One event loop (in a thread) and one connection for all of a test's examples: an
    event loop and a connection per example cost more than the example itself, and under
    load added up to the test's timeout."""
    with start_blocking_portal() as portal:
        redis = Redis.from_url(url, decode_responses=True, encoding_errors="surrogateescape")
        try:
            yield portal, redis
        finally:
            portal.call(redis.aclose)


def test_the_broker_handles_any_entry_without_raising(redis_server: EmbeddedRedis) -> None:
    with connected(redis_server.url) as (portal, redis):

        @given(fields=entries)
        @SETTINGS
        def check(fields: dict[str, str]) -> None:
            portal.call(handle_once, redis, redis_server.url, fields)

        check()


async def handle_once(redis: Redis, url: str, fields: dict[str, str]) -> None:
    broker = Broker(url, namespace="props")  # never started: only its matcher is used
    before = _handled(broker)
    await broker.matcher(Partitions(redis, broker.keys, 1), [RunStore(redis, broker.keys)]).handle(
        [("1700000000000-0", fields)]
    )
    assert _handled(broker) - before == 1  # every entry ends in exactly one outcome


def _handled(broker: Broker) -> float:
    return sum(
        sample.value
        for metric in broker.metrics.events.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


# -- rule expressions ----------------------------------------------------------------------

EXPRESSION_RULES = (
    CancelOn(event="x/cancel.requested", match="data.id"),
    CancelOn(event="x/cancel.requested", match="data.id", if_="async.data.n > event.data.n"),
    CancelOn(
        event="x/cancel.requested",
        if_="event.data.id == async.data.id && async.data.tags.exists(t, t == 'all')",
    ),
)
# JSON as a publisher may send it: any values, including integers far outside 64 bits,
# text with lone surrogates (bytes that were not UTF-8), and deep nesting.
hostile_values = st.recursive(
    st.one_of(
        json_scalars,
        st.integers(min_value=-(2**80), max_value=2**80),
        wire_text,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
hostile_data = st.fixed_dictionaries(
    {}, optional={"id": hostile_values, "n": hostile_values, "tags": hostile_values}
)


@given(trigger=hostile_data, cancel=hostile_data)
@SETTINGS
def test_an_expression_evaluates_or_raises_an_ordinary_error(
    trigger: dict[str, Any], cancel: dict[str, Any]
) -> None:
    """Never a BaseException (a panic in the CEL binding would be one), never a non-bool
    counted as a match."""
    for rule in EXPRESSION_RULES:
        if rule.expression is None:
            continue
        try:
            result = rule.expression.evaluate(
                {"event": {"data": trigger}, "async": {"data": cancel}}
            )
        except Exception:
            continue
        assert isinstance(result, bool)


def test_the_broker_evaluates_rules_on_any_data_without_raising(
    redis_server: EmbeddedRedis,
) -> None:
    with connected(redis_server.url) as (portal, redis):

        @given(trigger=hostile_data, cancel=hostile_data)
        @SETTINGS
        def check(trigger: dict[str, Any], cancel: dict[str, Any]) -> None:
            portal.call(match_once, redis, redis_server.url, trigger, cancel)

        check()


async def match_once(
    redis: Redis, url: str, trigger: dict[str, Any], cancel: dict[str, Any]
) -> None:
    namespace = f"px{uuid.uuid4().hex[:10]}"  # a fresh namespace per example
    broker = Broker(url, namespace=namespace)  # never started: only its matcher is used
    store = RunStore(redis, broker.keys)
    try:
        try:
            body = encode_event("x/cancel.requested", cancel)
            event = Event(name="x/start", data=trigger, id="1700000000000-0")
            encode_event("x/start", trigger)
        except InvalidEventError:
            return  # refused at the edge: the publisher is told why
        async with redis.pipeline(transaction=True) as pipe:
            declare_rules(pipe, broker.keys, EXPRESSION_RULES, 0)
            await pipe.execute()
        await store.register(
            RegisterRequest(
                run_id="r1",
                app_id="props",
                function_id="f",
                config_hash="c",
                worker_id="w1",
                event=event,
                entries=index_entries(EXPRESSION_RULES, event, broker.keys),
            )
        )
        before = _handled(broker)
        await broker.matcher(Partitions(redis, broker.keys, 1), [store]).handle(
            [("1700000000001-0", {"event": body.decode()})]
        )
        assert _handled(broker) - before == 1
        run = await store.get("r1")
        assert run is not None
        assert run.status in ("running", "cancelling")
        assert run.rule_error is None or "x/cancel.requested" in run.rule_error
    finally:
        keys = [key async for key in redis.scan_iter(match=f"{Keys(namespace).prefix}*")]
        if keys:
            await redis.delete(*keys)
