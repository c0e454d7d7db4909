"""Cancel rules and event validation: pure logic, no Redis."""

from __future__ import annotations

import pytest

from broker.findings import is_cancel_like
from sdk import CancelOn, ConfigurationError, Event, InvalidEventError, Worker
from sdk.connection import redact_url
from sdk.keys import Keys
from sdk.rules import Path, index_entries, lookup_keys, value_token
from sdk.wire import decode_event, encode_event


def test_match_rule_indexes_the_trigger_value() -> None:
    rules = (CancelOn(event="report/cancel.requested", match="data.reportId"),)
    trigger = Event(name="report/generate.requested", data={"reportId": "r1"}, id="1-0")
    (entry,) = index_entries(rules, trigger, Keys("ns"))
    assert entry.key == 'ns:idx:report/cancel.requested:data.reportId:"r1"'
    assert entry.listeners_key == "ns:listen:report/cancel.requested"
    cancel = Event(name="report/cancel.requested", data={"reportId": "r1"}, id="2-0")
    assert lookup_keys(cancel, ["data.reportId"], Keys("ns")) == [entry.key]


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
    assert entry.key == "ns:idx:app/shutdown:*:*"
    assert lookup_keys(Event(name="app/shutdown"), ["*"], Keys("ns")) == [entry.key]
    with pytest.raises(ConfigurationError, match="contradicts"):
        CancelOn(event="app/shutdown", match="data.id", all_runs=True)


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


def test_unsupported_options_are_refused_not_ignored() -> None:
    with pytest.raises(ConfigurationError, match="if_"):
        CancelOn(event="x/cancel", match="data.id", if_="event.data.a == async.data.a")
    with pytest.raises(ConfigurationError, match="timeout"):
        CancelOn(event="x/cancel", match="data.id", timeout="30m")


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
