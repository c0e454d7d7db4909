"""Cases taken from the peers' own tests and documentation, as trigger, cancel event,
rule and the outcome the peer gives. ``tests/apps/conformance.py`` declares one function
per case; ``tests/test_conformance.py`` runs each end to end.

Each case says where it comes from (repository, file, test). A case where we differ on
purpose has ``differs`` pointing at the documentation line that says why and what to
write instead; its ``expected`` is our outcome, ``peer`` the peer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["cancelled", "running"]


@dataclass(frozen=True)
class Case:
    id: str
    source: str
    trigger: dict[str, Any]
    cancel: dict[str, Any]
    expected: Outcome
    match: str | None = None
    if_: str | None = None
    timeout: str | None = None
    #: The peer's outcome, when we differ on purpose (``differs`` says where it is written).
    peer: Outcome | None = None
    differs: str | None = None
    #: What the run's record must say about the rule (a substring of ``rule_error``).
    rule_error: str | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def trigger_name(self) -> str:
        return f"conformance/{self.id}.requested"

    @property
    def cancel_name(self) -> str:
        return f"conformance/{self.id}.cancelled"


EXPR = "inngest/expr expr_test.go"
JS_CONFIG = "inngest/inngest-js packages/inngest/src/components/InngestFunction.ts getConfig"
JS_TEST = "inngest/inngest-js packages/inngest/src/components/InngestFunction.test.ts"
NULL_ENGINE = (
    "inngest/expr engine_null.go nullLookup.Match (an absent path is null: 'This isn't"
    " present, which matches null in our overloads')"
)

CASES: tuple[Case, ...] = (
    Case(
        id="py-cancel",
        source="inngest/inngest-py tests/test_function/cases/cancel.py",
        if_="event.data.id == async.data.id",
        trigger={"id": 123},
        cancel={"id": 123},
        expected="cancelled",
    ),
    Case(
        id="py-no-cancel-if-exp-not-match",
        source="inngest/inngest-py tests/test_function/cases/no_cancel_if_exp_not_match.py",
        if_="event.data.id == async.data.id",
        trigger={"id": 123},
        cancel={"id": 456},
        expected="running",
    ),
    Case(
        id="go-event-cancellation",
        source="inngest/inngest tests/golang/cancel_test.go TestEventCancellation"
        " 'should cancel run'",
        if_="async.data.cancel == event.data.cancel",
        trigger={"cancel": 1},
        cancel={"cancel": 1},
        expected="cancelled",
    ),
    Case(
        id="sdk-cancel-if",
        source="inngest/inngest tests/js/src/inngest/sdk_cancel_test.ts (cancel-test)",
        if_="async.data.request_id == event.data.request_id",
        trigger={"request_id": "q1"},
        cancel={"request_id": "q1"},
        expected="cancelled",
    ),
    Case(
        id="sdk-cancel-if-other",
        source="inngest/inngest tests/js/src/inngest/sdk_cancel_test.ts (cancel-test)",
        if_="async.data.request_id == event.data.request_id",
        trigger={"request_id": "q1"},
        cancel={"request_id": "q2"},
        expected="running",
    ),
    Case(
        id="strings",
        source=f"{EXPR} TestEvaluate_Strings 'It matches items'",
        if_='async.data.account_id == "yes" && async.data.match == "true"',
        trigger={},
        cancel={"account_id": "yes", "match": "true"},
        expected="cancelled",
    ),
    Case(
        id="strings-other",
        source=f"{EXPR} TestEvaluate_Strings 'It handles non-matching data'",
        if_='async.data.account_id == "yes" && async.data.match == "true"',
        trigger={},
        cancel={"account_id": "yes", "match": "no"},
        expected="running",
    ),
    Case(
        id="floats",
        source=f"{EXPR} TestEvaluate_Numbers 'With annoying floats' 'It matches items'",
        if_="4.797009e+06 == async.data.id"
        " && (async.data.ts == null || async.data.ts > 1715211850340)",
        trigger={},
        cancel={"id": 4797009, "ts": 2015211850340},
        expected="cancelled",
    ),
    Case(
        id="floats-other",
        source=f"{EXPR} TestEvaluate_Numbers 'With annoying floats' 'It handles non-matching data'",
        if_="4.797009e+06 == async.data.id"
        " && (async.data.ts == null || async.data.ts > 1715211850340)",
        trigger={},
        cancel={"account_id": "yes", "ts": "???", "match": "no"},
        expected="running",
    ),
    Case(
        id="floats-absent-ts",
        source=f"{EXPR} TestEvaluate_Numbers 'With annoying floats', without ts; {NULL_ENGINE}",
        if_="4.797009e+06 == async.data.id"
        " && (async.data.ts == null || async.data.ts > 1715211850340)",
        trigger={},
        cancel={"id": 4797009},
        expected="cancelled",
    ),
    Case(
        id="macros",
        source=f"{EXPR} TestMacros 'It doesn't evaluate macros'",
        if_="async.data.ok == \"true\" || async.data.ids.exists(id, id == 'c')",
        trigger={},
        cancel={"ok": None, "ids": ["a", "b", "c"]},
        expected="cancelled",
    ),
    Case(
        id="macros-failing",
        source=f"{EXPR} TestMacros 'Failing match'",
        if_="async.data.ok == \"true\" || async.data.ids.exists(id, id == 'c')",
        trigger={},
        cancel={"ok": None, "ids": ["nope"]},
        expected="running",
    ),
    Case(
        id="macros-partial",
        source=f"{EXPR} TestMacros 'Partial macro'",
        if_="async.data.ok == \"true\" || async.data.ids.exists(id, id == 'c')",
        trigger={},
        cancel={"ok": "true", "ids": ["nope"]},
        expected="cancelled",
    ),
    Case(
        id="array-indexes",
        source=f"{EXPR} TestEvaluate_ArrayIndexes 'It matches arrays'",
        if_='async.data.ids[1] == "id-b" && async.data.ids[2] == "id-c"',
        trigger={},
        cancel={"ids": ["id-a", "id-b", "id-c"]},
        expected="cancelled",
    ),
    Case(
        id="array-indexes-short",
        source=f"{EXPR} TestEvaluate_ArrayIndexes 'It doesn't return if arrays contain"
        " non-matching data'",
        if_='async.data.ids[1] == "id-b" && async.data.ids[2] == "id-c"',
        trigger={},
        cancel={"ids": ["none-match", "nope"]},
        expected="running",
    ),
    Case(
        id="absent-is-null",
        source=f"{NULL_ENGINE}; issue 19: `event.data.orgID == null`",
        if_="event.data.orgID == null && async.data.accountId == event.data.accountId",
        trigger={"accountId": "a1"},
        cancel={"accountId": "a1"},
        expected="cancelled",
    ),
    Case(
        id="absent-not-equal",
        source=f"{NULL_ENGINE}; issue 19: `async.data.reason != 'keep'`",
        if_="async.data.reason != 'keep' && async.data.accountId == event.data.accountId",
        trigger={"accountId": "a1"},
        cancel={"accountId": "a1"},
        expected="cancelled",
    ),
    Case(
        id="absent-on-both-sides-if",
        source=f"{NULL_ENGINE}: null == null",
        if_="event.data.reportId == async.data.reportId",
        trigger={"other": 1},
        cancel={"other": 2},
        expected="cancelled",
    ),
    Case(
        id="absent-on-both-sides-match",
        source=f"{JS_CONFIG}: a `match` is the expression"
        " `event.data.reportId == async.data.reportId`; absent on both sides, null == null"
        f" ({NULL_ENGINE})",
        match="data.reportId",
        trigger={"other": 1},
        cancel={"other": 2},
        expected="running",
        peer="cancelled",
        differs="docs/migrate/inngest.md#match-never-matches-a-value-that-is-absent",
    ),
    Case(
        id="match-registers",
        source=f"{JS_TEST} runFn > cancellation > 'specifying a cancellation event registers"
        " correctly' (match data.title is `event.data.title == async.data.title`)",
        match="data.title",
        trigger={"title": "t1"},
        cancel={"title": "t1"},
        expected="cancelled",
    ),
    Case(
        id="match-registers-other",
        source=f"{JS_TEST} runFn > cancellation > 'specifying a cancellation event registers"
        " correctly', another title",
        match="data.title",
        trigger={"title": "t1"},
        cancel={"title": "t2"},
        expected="running",
    ),
    Case(
        id="match-and-if",
        source=f"{JS_CONFIG}: with `match`, the `if` is dropped (`if (match) ret.if = ...;"
        " else if (ifStr) ret.if = ifStr`)",
        match="data.title",
        if_="async.data.hard == true",
        trigger={"title": "t1"},
        cancel={"title": "t1", "hard": False},
        expected="running",
        peer="cancelled",
        differs="docs/migrate/inngest.md#match-and-if-together",
    ),
    Case(
        id="timeout-compound",
        source=f"{JS_CONFIG}: `ret.timeout = timeStr(timeout)` (durations such as 1h30m)",
        match="data.title",
        timeout="1h30m",
        trigger={"title": "t1"},
        cancel={"title": "t1"},
        expected="cancelled",
    ),
    Case(
        id="timeout-instant-future",
        source=f"{JS_CONFIG}: `timeStr(timeout)` of a Date (an RFC 3339 time)",
        match="data.title",
        timeout="2100-01-01T00:00:00Z",
        trigger={"title": "t1"},
        cancel={"title": "t1"},
        expected="cancelled",
    ),
    Case(
        id="timeout-instant-past",
        source=f"{JS_CONFIG}: `timeStr(timeout)` of a Date that has passed: the rule no"
        " longer listens",
        match="data.title",
        timeout="2020-01-01T00:00:00+00:00",
        trigger={"title": "t1"},
        cancel={"title": "t1"},
        expected="running",
    ),
    Case(
        id="match-equivalent-if",
        source="our documented `if_` equivalent of `match`, absent on both sides",
        if_="event.data.reportId != null && event.data.reportId == async.data.reportId",
        trigger={"other": 1},
        cancel={"other": 2},
        expected="running",
        peer="running",
    ),
)
