"""Property-based: whatever arrives on the stream, nothing raises out of the consumer loop."""

from __future__ import annotations

import json
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from broker import Broker, EmbeddedRedis
from sdk import CancelOn, ConfigurationError, Event, InvalidEventError
from sdk.keys import Keys
from sdk.rules import MAX_TOKEN_CHARS, index_entries, lookups, value_token
from sdk.store import RunStore
from sdk.wire import decode_event

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


def test_the_broker_handles_any_entry_without_raising(redis_server: EmbeddedRedis) -> None:
    @given(fields=entries)
    @SETTINGS
    def check(fields: dict[str, str]) -> None:
        anyio.run(handle_once, redis_server.url, fields)

    check()


async def handle_once(url: str, fields: dict[str, str]) -> None:
    broker = Broker(url, namespace="props")
    redis = Redis.from_url(url, decode_responses=True, encoding_errors="surrogateescape")
    try:
        before = _handled(broker)
        await broker._handle(RunStore(redis, broker.keys), "1700000000000-0", fields)
        assert _handled(broker) - before == 1  # every entry ends in exactly one outcome
    finally:
        await redis.aclose()


def _handled(broker: Broker) -> float:
    return sum(
        sample.value
        for metric in broker.metrics.events.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
