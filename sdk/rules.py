"""Cancel rules (``CancelOn``) and how a rule turns into index entries.

A rule ``CancelOn(event="report/cancel.requested", match="data.reportId")`` means:
an event named ``report/cancel.requested`` cancels the run when its ``data.reportId``
equals the run trigger's ``data.reportId``. ``if_`` adds a CEL condition over both
events, ``timeout`` bounds how long after the run started the rule listens.

In Redis a rule is a :class:`Selector`: the match path (or ``*``), the id of its
expression and its timeout, as one string. When a run registers, each rule becomes one
index entry keyed by (event name, selector, the trigger's value at the path); a cancel
event costs one lookup per selector declared for its name, never a scan over running
runs. Expressions are evaluated only on the runs those lookups return.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec

from sdk.durations import parse_duration
from sdk.errors import ConfigurationError, InvalidEventError
from sdk.expressions import Expression, compile_rule_expression
from sdk.keys import Keys
from sdk.wire import Event, check_event_name, encode_json

#: Inngest allows at most five cancel rules per function; so do we.
MAX_RULES_PER_FUNCTION: Final = 5
#: Value tokens longer than this are replaced by their SHA-256 to keep keys short.
MAX_TOKEN_CHARS: Final = 96

_ROOTS: Final = ("data",)
#: What starts an RFC 3339 time (a duration never starts with a four-digit year and '-').
_RFC3339_START: Final = re.compile(r"^\s*\d{4}-\d{2}-\d{2}")
#: Path and token of the index entry of a rule without ``match``.
ALL_RUNS: Final = "*"
#: Separates the parts of a selector; never part of a path.
_SELECTOR_SEPARATOR: Final = "|"


@dataclass(frozen=True, slots=True)
class Path:
    """A dotted path into an event, such as ``data.reportId`` or ``data.user.id``."""

    text: str
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Path:
        if not isinstance(text, str) or not text:
            raise ConfigurationError(
                "match path must be a non-empty string such as 'data.reportId'"
            )
        parts = tuple(text.split("."))
        position = 0
        for part in parts:
            if not part:
                raise ConfigurationError(_point(text, position, "empty path segment"))
            for offset, ch in enumerate(part):
                if ch.isspace() or ord(ch) < 32 or ch in "[]:|*":
                    raise ConfigurationError(
                        _point(
                            text, position + offset, f"character {ch!r} is not allowed in a path"
                        )
                    )
            position += len(part) + 1
        if parts[0] not in _ROOTS or len(parts) < 2:
            raise ConfigurationError(
                _point(text, 0, "a match path starts with 'data.' (for example 'data.reportId')")
            )
        return cls(text=text, parts=parts)

    def lookup(self, event: Event) -> Any:
        """The value at this path, or None when any segment is missing."""
        value: Any = event.data
        for part in self.parts[1:]:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
            if value is None:
                return None
        return value


#: Rules are parsed once per distinct path, not once per run.
parse_path = functools.lru_cache(maxsize=4096)(Path.parse)


def _point(text: str, position: int, message: str) -> str:
    caret = " " * position + "^"
    return f"invalid match path {text!r}: {message} at position {position}\n  {text}\n  {caret}"


def value_token(value: Any) -> str | None:
    """A canonical string for an indexed value, or None if it cannot match anything.

    Missing and null values never match: two events both lacking ``reportId`` are not
    about the same report. Integral floats equal their ints (``1.0 == 1``), booleans
    stay distinct from numbers, and objects compare by content whatever their key order.
    """
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    token = encode_json(value).decode()
    if len(token) > MAX_TOKEN_CHARS:
        token = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    return token


Timeout = float | timedelta | str | datetime


def _absolute(value: Timeout) -> datetime | None:
    """The instant ``value`` names (an aware datetime, or an RFC 3339 time as Inngest
    accepts), None when it is a duration."""
    if isinstance(value, str) and _RFC3339_START.match(value):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigurationError(
                f"CancelOn(timeout={value!r}): not an RFC 3339 time"
                " (use '2026-12-31T23:00:00Z' or a duration)"
            ) from None
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        raise ConfigurationError(
            f"CancelOn(timeout={value!r}): a time needs its offset ('Z', '+02:00'):"
            " a naive time means a different instant on every machine"
        )
    return value


def _timeout_seconds(value: float | timedelta | str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigurationError(f"CancelOn(timeout={value!r}): {exc}") from None
    if seconds <= 0:
        raise ConfigurationError(f"CancelOn(timeout={value!r}): a timeout must be positive")
    return seconds


class CancelOn(msgspec.Struct, frozen=True):
    """Cancel a run when ``event`` arrives and matches it.

    - ``match``: a dotted path (``data.reportId``) whose value must be equal in the run's
      trigger and in the cancel event (``event.data.reportId == async.data.reportId``).
    - ``if_``: a CEL expression over ``event`` (the run's trigger) and ``async`` (the
      cancel event) that must be true. With ``match``, both must hold.
    - ``timeout``: seconds, a timedelta or ``"30m"``, ``"1h30m"``: the rule stops
      listening that long after the run started; or an instant (an aware ``datetime``,
      an RFC 3339 string such as ``"2026-12-31T23:00:00Z"``): it stops listening then.

    A rule with neither ``match`` nor ``if_`` would cancel every run of the function, so it
    is refused unless ``all_runs=True`` says that is meant.
    """

    event: str
    match: str | None = None
    if_: str | None = None
    timeout: Timeout | None = None
    all_runs: bool = False

    def __post_init__(self) -> None:
        try:
            check_event_name(self.event)
        except InvalidEventError as exc:
            raise ConfigurationError(f"CancelOn(event={self.event!r}): {exc.detail}") from None
        if self.match is not None:
            Path.parse(self.match)
        if self.if_ is not None:
            compile_rule_expression(self.if_)
        if self.timeout is not None and _absolute(self.timeout) is None:
            _timeout_seconds(self.timeout)  # type: ignore[arg-type]  # not a datetime
        if self.all_runs and (self.match is not None or self.if_ is not None):
            given = "match=..." if self.match is not None else "if_=..."
            raise ConfigurationError(f"CancelOn: all_runs=True contradicts {given}")
        if self.match is None and self.if_ is None and not self.all_runs:
            raise ConfigurationError(
                f"CancelOn(event={self.event!r}) has neither match nor if_, so it would cancel"
                " every run of the function; pass match='data.<key>' or if_='<CEL>', or"
                " all_runs=True if that is what you want"
            )

    @property
    def timeout_s(self) -> float | None:
        """The timeout after the run's start, in seconds (None: none, or an instant)."""
        if self.timeout is None or isinstance(self.timeout, datetime):
            return None
        if _absolute(self.timeout) is not None:
            return None
        return _timeout_seconds(self.timeout)

    @property
    def until_ms(self) -> int | None:
        """The instant the rule stops listening, in Unix ms (None: no instant)."""
        at = None if self.timeout is None else _absolute(self.timeout)
        return None if at is None else round(at.timestamp() * 1000)

    @property
    def expression(self) -> Expression | None:
        return None if self.if_ is None else compile_rule_expression(self.if_)

    @property
    def selector(self) -> Selector:
        expression = self.expression
        timeout_s = self.timeout_s
        return Selector(
            path=self.match,
            expression_id=None if expression is None else expression.id,
            timeout_ms=None if timeout_s is None else max(1, round(timeout_s * 1000)),
            until_ms=self.until_ms,
        )


@dataclass(frozen=True, slots=True)
class Selector:
    """What identifies a rule in the index: ``data.reportId``, ``*|if=3ef9597b4f8403b8``,
    ``data.reportId|ttl=1800000`` (the path or ``*``, the expression id, the timeout in ms),
    ``data.reportId|until=1798758000000`` (the instant it stops listening, Unix ms).
    """

    path: str | None
    expression_id: str | None = None
    timeout_ms: int | None = None
    until_ms: int | None = None

    @property
    def text(self) -> str:
        parts = [self.path or ALL_RUNS]
        if self.expression_id is not None:
            parts.append(f"if={self.expression_id}")
        if self.timeout_ms is not None:
            parts.append(f"ttl={self.timeout_ms}")
        if self.until_ms is not None:
            parts.append(f"until={self.until_ms}")
        return _SELECTOR_SEPARATOR.join(parts)

    @property
    def expiry(self) -> str:
        """How match_events.lua reads the timeout: ms after the run's start, ``u`` and an
        instant, or '' for none."""
        if self.until_ms is not None:
            return f"u{self.until_ms}"
        return "" if self.timeout_ms is None else str(self.timeout_ms)

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def parse(text: str) -> Selector | None:
        """The selector ``text`` spells, or None for one this SDK cannot read (a newer one)."""
        head, *options = text.split(_SELECTOR_SEPARATOR)
        path: str | None = None
        if head != ALL_RUNS:
            try:
                path = parse_path(head).text
            except ConfigurationError:
                return None
        expression_id: str | None = None
        timeout_ms: int | None = None
        until_ms: int | None = None
        for option in options:
            name, _, value = option.partition("=")
            if name == "if" and value.isalnum():
                expression_id = value
            elif name == "ttl" and value.isdigit():
                timeout_ms = int(value)
            elif name == "until" and value.isdigit():
                until_ms = int(value)
            else:
                return None
        return Selector(
            path=path, expression_id=expression_id, timeout_ms=timeout_ms, until_ms=until_ms
        )

    def token(self, event: Event) -> str | None:
        """The index token of ``event`` under this selector; None: it cannot match."""
        if self.path is None:
            return ALL_RUNS
        return value_token(parse_path(self.path).lookup(event))


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One (event, selector, value) under which a run waits to be cancelled."""

    event_name: str
    selector: str
    #: The index set holding the run.
    key: str
    #: Where the broker leaves cancel events that arrived before a run could match them.
    tombstone: str
    #: The rule's expression, when a matching cancel event must also satisfy it.
    expression: Expression | None = None


def check_rules(rules: tuple[CancelOn, ...]) -> tuple[CancelOn, ...]:
    if len(rules) > MAX_RULES_PER_FUNCTION:
        raise ConfigurationError(
            f"{len(rules)} cancel rules declared; at most {MAX_RULES_PER_FUNCTION} per function"
        )
    for rule in rules:
        if not isinstance(rule, CancelOn):
            raise ConfigurationError(f"cancel_on takes CancelOn(...) rules, not {rule!r}")
    return rules


def index_entries(rules: tuple[CancelOn, ...], trigger: Event, keys: Keys) -> list[IndexEntry]:
    """The index entries a run with this trigger is registered under (deduplicated)."""
    entries: dict[str, IndexEntry] = {}
    for rule in rules:
        selector = rule.selector
        token = selector.token(trigger)
        if token is None:
            continue  # the trigger has no value at the path: nothing can match it
        key = keys.index(rule.event, selector.text, token)
        entries[key] = IndexEntry(
            event_name=rule.event,
            selector=selector.text,
            key=key,
            tombstone=keys.tombstone(rule.event, selector.text, token),
            expression=rule.expression,
        )
    return list(entries.values())


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where a cancel event looks for the runs of one selector."""

    selector: Selector
    key: str
    tombstone: str


def lookups(event: Event, selectors: list[str], keys: Keys) -> list[Lookup]:
    """Index lookups a cancel event makes, given the selectors declared for its name.

    Plain selectors come first: a run matched by a plain rule needs no expression.
    """
    found: list[Lookup] = []
    for text in selectors:
        selector = Selector.parse(text)
        if selector is None:
            continue  # written by a newer SDK: not ours to match
        token = selector.token(event)
        if token is not None:
            found.append(
                Lookup(
                    selector,
                    keys.index(event.name, text, token),
                    keys.tombstone(event.name, text, token),
                )
            )
    found.sort(key=lambda lookup: lookup.selector.expression_id is not None)
    return found


@dataclass(frozen=True, slots=True)
class Unreachable:
    """A rule that can never cancel a run: its trigger has no value at the rule's path."""

    rule: CancelOn
    #: The trigger's keys where the path found none (``data``'s, for ``data.reportId``).
    keys: tuple[str, ...]
    #: A path the trigger does have that looks like the rule's (``data.report_id``).
    suggestion: str | None


def _normalized(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def unreachable_rules(rules: tuple[CancelOn, ...], trigger: Event) -> list[Unreachable]:
    """The ``match`` rules whose path has no value in ``trigger``: no cancel event can
    match the run by them (``report_id`` in the trigger, ``data.reportId`` in the rule)."""
    found = []
    for rule in rules:
        if rule.match is None:
            continue
        path = parse_path(rule.match)
        if path.lookup(trigger) is not None:
            continue
        # Down to where the path stops finding anything: the keys there, and a near miss.
        value: Any = trigger.data
        depth = 1
        while depth < len(path.parts) and isinstance(value, dict) and path.parts[depth] in value:
            value, depth = value[path.parts[depth]], depth + 1
        keys = tuple(sorted(str(k) for k in value)) if isinstance(value, dict) else ()
        suggestion = None
        if depth < len(path.parts) and keys:
            wanted = path.parts[depth]
            close = [k for k in keys if _normalized(k) == _normalized(wanted)]
            close = close or difflib.get_close_matches(wanted, keys, n=1, cutoff=0.75)
            if close:
                suggestion = ".".join((*path.parts[:depth], close[0], *path.parts[depth + 1 :]))
        found.append(Unreachable(rule, keys, suggestion))
    return found


def without_value(event: Event, selectors: list[str]) -> list[Selector]:
    """The declared selectors with a path at which ``event`` has no value: the cancel
    event can match no run by them (what its decision says, rather than nothing)."""
    missing = []
    for text in selectors:
        selector = Selector.parse(text)
        if selector is not None and selector.path is not None and selector.token(event) is None:
            missing.append(selector)
    return missing
