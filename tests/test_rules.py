"""Cancel rules and event validation: pure logic, no Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.findings import is_cancel_like
from sdk import CancelOn, ConfigurationError, Event, InvalidEventError, Worker
from sdk.expressions import (
    MAX_EXPRESSION_CHARS,
    ExpressionError,
    compile_rule_expression,
    compile_trigger_filter,
)
from sdk.function import canonical_config
from sdk.keys import Keys
from sdk.rules import Path, Selector, index_entries, lookups, value_token
from sdk.urls import redact_url
from sdk.wire import config_hash, decode_event, encode_event


def test_match_rule_indexes_the_trigger_value() -> None:
    rules = (CancelOn(event="report/cancel.requested", match="data.reportId"),)
    trigger = Event(name="report/generate.requested", data={"reportId": "r1"}, id="1-0")
    (entry,) = index_entries(rules, trigger, Keys("ns"))
    assert entry.key == '{ns}:idx:report/cancel.requested:data.reportId:"r1"'
    assert entry.tombstone == '{ns}:tomb:report/cancel.requested:data.reportId:"r1"'
    assert entry.expression is None
    cancel = Event(name="report/cancel.requested", data={"reportId": "r1"}, id="2-0")
    (lookup,) = lookups(cancel, ["data.reportId"], Keys("ns"))
    assert (lookup.key, lookup.tombstone) == (entry.key, entry.tombstone)


def test_nested_paths_and_missing_values() -> None:
    rules = (CancelOn(event="x/cancel", match="data.user.id"),)
    keys = Keys("ns")
    assert index_entries(rules, Event(name="x", data={"user": {"id": 3}}), keys)
    # A trigger without the value cannot be matched by anything, so it is not indexed.
    assert index_entries(rules, Event(name="x", data={"user": {}}), keys) == []
    assert index_entries(rules, Event(name="x", data={"user": None}), keys) == []
    assert index_entries(rules, Event(name="x", data={"user": "flat"}), keys) == []


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        ("r1", "r1", True),
        (1, 1.0, True),
        (1, "1", False),
        (True, 1, False),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True),
        ([1, 2], [2, 1], False),
    ],
)
def test_value_tokens_follow_json_equality(left: object, right: object, equal: bool) -> None:
    assert (value_token(left) == value_token(right)) is equal


def test_long_values_are_hashed() -> None:
    token = value_token("x" * 500)
    assert token is not None
    assert token.startswith("sha256:")
    assert len(token) == len("sha256:") + 64
    assert value_token(None) is None


def test_rule_without_match_is_refused_unless_all_runs() -> None:
    with pytest.raises(ConfigurationError, match="would cancel every run"):
        CancelOn(event="report/cancel.requested")
    rule = CancelOn(event="app/shutdown", all_runs=True)
    (entry,) = index_entries((rule,), Event(name="x"), Keys("ns"))
    assert entry.key == "{ns}:idx:app/shutdown:*:*"
    (lookup,) = lookups(Event(name="app/shutdown"), ["*"], Keys("ns"))
    assert lookup.key == entry.key
    with pytest.raises(ConfigurationError, match="contradicts match"):
        CancelOn(event="app/shutdown", match="data.id", all_runs=True)
    with pytest.raises(ConfigurationError, match="contradicts if_"):
        CancelOn(event="app/shutdown", if_="async.data.all", all_runs=True)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("data..id", "empty path segment at position 5"),
        ("reportId", "starts with 'data.' .* at position 0"),
        ("data.report id", "character ' ' is not allowed in a path at position 11"),
        ("", "non-empty"),
    ],
)
def test_invalid_paths_fail_at_definition_with_the_position(path: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CancelOn(event="x/cancel", match=path)


def test_error_message_points_at_the_column() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Path.parse("data..id")
    assert str(caught.value).splitlines()[1:] == ["  data..id", "       ^"]


def test_a_rule_becomes_a_selector_with_its_expression_and_timeout() -> None:
    keys = Keys("ns")
    trigger = Event(name="x/start", data={"id": "a", "plan": "pro"}, id="1-0")
    rule = CancelOn(
        event="x/cancel", match="data.id", if_="async.data.plan == event.data.plan", timeout="30m"
    )
    expression = compile_rule_expression("async.data.plan == event.data.plan")
    assert rule.selector == Selector("data.id", expression.id, 1_800_000)
    assert rule.selector.text == f"data.id|if={expression.id}|ttl=1800000"
    assert Selector.parse(rule.selector.text) == rule.selector
    (entry,) = index_entries((rule,), trigger, keys)
    assert entry.key == f'{{ns}}:idx:x/cancel:data.id|if={expression.id}|ttl=1800000:"a"'
    assert entry.expression == expression
    # A rule with only an expression listens under "*": every run of the function.
    only_if = CancelOn(event="x/cancel", if_="async.data.plan == event.data.plan")
    (entry,) = index_entries((only_if,), trigger, keys)
    assert entry.key == f"{{ns}}:idx:x/cancel:*|if={expression.id}:*"
    # Timeouts: seconds, timedelta, or text; never zero or negative.
    assert CancelOn(event="x/cancel", match="data.id", timeout=90).selector.timeout_ms == 90_000
    assert CancelOn(event="x/cancel", match="data.id", timeout=timedelta(hours=2)).timeout_s == 7200
    for bad in ("soon", 0, -5):
        with pytest.raises(ConfigurationError, match="timeout"):
            CancelOn(event="x/cancel", match="data.id", timeout=bad)


def test_selectors_written_by_a_newer_sdk_are_skipped_not_misread() -> None:
    assert Selector.parse("data.id|unknown=1") is None
    assert Selector.parse("not a path") is None
    assert Selector.parse("*") == Selector(None)
    event = Event(name="x/cancel", data={"id": 1}, id="5-0")
    found = lookups(event, ["data.id|whatever", "data.id", "*|if=abc"], Keys("ns"))
    # Plain selectors first: their runs need no expression.
    assert [lookup.selector.text for lookup in found] == ["data.id", "*|if=abc"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("event.data.x ==", "(?s)1:16: Syntax error.*\\^"),
        ("evnt.data.x == 1", "unknown variable 'evnt' .* at position 0"),
        ("event.data.x == asink.data.x", "unknown variable 'asink' .* at position 16"),
        ("lower(event.data.x) == 'a'", "'lower' is not a standard CEL function at position 0"),
        (
            "event.data.a.exists(x, async.data.b.exists(y, y == x))",
            "a comprehension nested in another at position 42",
        ),
        ("1 == " + "1" * MAX_EXPRESSION_CHARS, "at most 1024"),
        ("", "non-empty"),
    ],
)
def test_invalid_expressions_fail_at_definition_with_the_position(
    source: str, message: str
) -> None:
    with pytest.raises(ExpressionError, match=message):
        CancelOn(event="x/cancel", if_=source)


def test_a_field_an_event_lacks_is_null_but_has_still_tells() -> None:
    """Inngest's expression engine: an absent field is ``null`` and never an error."""
    empty = {"event": {"data": {}}, "async": {"data": {}}}
    assert compile_rule_expression("event.data.orgID == null").evaluate(empty)
    assert compile_rule_expression("async.data.reason != 'keep'").evaluate(empty)
    assert compile_rule_expression("event.data.user.id == null").evaluate(empty)  # nested
    assert compile_rule_expression("event.data.a == async.data.a").evaluate(empty)
    assert not compile_rule_expression("has(event.data.orgID)").evaluate(empty)
    guarded = compile_rule_expression("has(event.data.a) && event.data.a == async.data.a")
    assert not guarded.evaluate(empty)
    # The events themselves are left as they were.
    trigger = {"data": {"tags": []}}
    compile_rule_expression("event.data.tier == null").evaluate({"event": trigger})
    assert trigger == {"data": {"tags": []}}
    # Bulk cancels' filters too.
    assert compile_trigger_filter("event.data.orgID == null").evaluate({"event": {"data": {}}})
    # A method's receiver is a field; the method is not.
    assert compile_rule_expression("event.data.tags.exists(t, t == 'x')").null_paths == (
        ("event", "data", "tags"),
    )


def test_expressions_evaluate_over_both_events_and_only_true_matches() -> None:
    rule = compile_rule_expression(
        "event.data.user == async.data.user && async.data.reason in ['abuse', 'refund']"
        " && event.data.tags.exists(t, t == 'video')"
    )
    trigger = {"data": {"user": "u1", "tags": ["video"]}}
    assert rule.evaluate({"event": trigger, "async": {"data": {"user": "u1", "reason": "abuse"}}})
    assert not rule.evaluate({"event": trigger, "async": {"data": {"user": "u2", "reason": "x"}}})
    # A missing field is null, as in Inngest: `null in [...]` is false.
    assert not rule.evaluate({"event": trigger, "async": {"data": {"user": "u1"}}})
    # A type error is an evaluation error, never a match.
    with pytest.raises(TypeError):
        compile_rule_expression("async.data.pages > 100").evaluate({"event": {}, "async": {}})
    # Strings inside literals are not mistaken for variables or comprehensions.
    assert compile_rule_expression("async.data.note == 'evnt.all(x, y.all(z, 1))'")
    # A non-boolean result is not a match.
    assert not compile_rule_expression("async.data.user").evaluate(
        {"event": {}, "async": {"data": {"user": "u1"}}}
    )
    # Bulk cancel filters see only the trigger.
    with pytest.raises(ExpressionError, match="unknown variable 'async'"):
        compile_trigger_filter("async.data.x == 1")


def test_function_declarations_are_checked() -> None:
    worker = Worker("app", "redis://localhost:1/0")
    rule = CancelOn(event="x/cancel", match="data.id")
    with pytest.raises(ConfigurationError, match="at most 5"):
        worker.function(id="f", trigger="x/start", cancel_on=[rule] * 6)(_body)
    with pytest.raises(ConfigurationError, match="async def"):
        worker.function(id="f", trigger="x/start")(lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="function id"):
        worker.function(id="bad id", trigger="x/start")(_body)
    worker.function(id="f", trigger="x/start", cancel_on=[rule])(_body)
    with pytest.raises(ConfigurationError, match="declared twice"):
        worker.function(id="f", trigger="x/start")(_body)
    with pytest.raises(ConfigurationError, match="app id"):
        Worker("bad app", "redis://localhost:1/0")


async def _body(ctx: object) -> None:
    return None


def test_events_round_trip_and_get_their_id_and_time_from_the_entry() -> None:
    body = encode_event("report/cancel.requested", {"reportId": "r1"})
    event = decode_event("1700000000123-4", {"event": body.decode()})
    assert event == Event(
        name="report/cancel.requested",
        data={"reportId": "r1"},
        id="1700000000123-4",
        ts=1700000000123,
    )


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("", {}, "invalid_name"),
        ("has space", {}, "invalid_name"),
        ("ok/name", [1], "invalid_shape"),
        ("ok/name", {"x": object()}, "invalid_shape"),
        ("ok/name", {"x": "y" * 70_000}, "too_large"),
        ("ok/name", {"x": "\udc80"}, "invalid_encoding"),  # a lone surrogate
        (
            "ok/name",
            {"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
            "too_deep",
        ),
    ],
)
def test_send_refuses_what_the_broker_would_dead_letter(
    name: str, data: object, reason: str
) -> None:
    with pytest.raises(InvalidEventError) as caught:
        encode_event(name, data)  # type: ignore[arg-type]
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("name", "cancel_like"),
    [
        ("report/cancel.requested", True),  # the first seed's event
        ("report.cancel.requested", True),
        ("order.cancelled", True),
        ("order/canceled", True),
        ("job_cancelled", True),
        ("cancelled", True),
        ("report/generate.requested", False),
        ("notcancelled", False),
        ("report/cancellation.requested", False),
        ("cancel/run.cancelled", False),  # our own outcome event
    ],
)
def test_cancel_like_event_names(name: str, cancel_like: bool) -> None:
    assert is_cancel_like(name) is cancel_like
    assert is_cancel_like("render/stop", frozenset({"render/stop"}))


def test_logged_urls_hide_secrets() -> None:
    assert redact_url("redis://broker:s3cret@host:6379/0") == "redis://broker:***@host:6379/0"
    assert redact_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact_url("rediss://h:6380/0?ssl_password=pw&ssl_cert_reqs=required") == (
        "rediss://h:6380/0?ssl_password=***&ssl_cert_reqs=required"
    )
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_timeouts_are_durations_as_inngest_writes_them_or_instants() -> None:
    assert CancelOn(event="a/b", match="data.id", timeout="1h30m").timeout_s == 5400
    assert CancelOn(event="a/b", match="data.id", timeout="1w").timeout_s == 604800
    at = CancelOn(event="a/b", match="data.id", timeout="2026-12-31T23:00:00Z")
    assert (at.timeout_s, at.until_ms) == (None, 1798758000000)
    assert at.selector.text == "data.id|until=1798758000000"
    assert Selector.parse(at.selector.text) == at.selector
    aware = datetime(2026, 12, 31, 23, tzinfo=UTC)
    assert CancelOn(event="a/b", match="data.id", timeout=aware).until_ms == 1798758000000
    for nonsense, message in [
        ("1h30", "not a duration"),
        ("2026-13-40T00:00:00Z", "not an RFC 3339 time"),
        ("2026-12-31T23:00:00", "needs its offset"),
        (datetime(2026, 12, 31, 23), "needs its offset"),
        ("-1h", "not a duration"),
        ("0s", "must be positive"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            CancelOn(event="a/b", match="data.id", timeout=nonsense)


def test_trigger_if_is_checked_at_definition_and_is_part_of_the_config() -> None:
    worker = Worker("reports", "redis://localhost:1/0")

    async def body(ctx: Any) -> None: ...

    fn = worker.function(id="f", trigger="cancel/run.cancelled", trigger_if="event.data.a == 1")(
        body
    )
    assert fn.config.trigger_if == "event.data.a == 1"
    assert fn.trigger_filter is not None
    assert config_hash(canonical_config("f", "cancel/run.cancelled", ())) != fn.config_hash
    with pytest.raises(ExpressionError, match="unknown variable 'async'"):
        worker.function(id="h", trigger="a/b", trigger_if="async.data.a == 1")(body)
    with pytest.raises(ExpressionError, match="function 'i': trigger_if"):
        worker.function(id="i", trigger="a/b", trigger_if="event.data.a ==")(body)
