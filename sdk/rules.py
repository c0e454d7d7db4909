"""Cancel rules (``CancelOn``) and how a rule turns into index entries.

A rule ``CancelOn(event="report/cancel.requested", match="data.reportId")`` means:
an event named ``report/cancel.requested`` cancels the run when its ``data.reportId``
equals the run trigger's ``data.reportId``. When a run registers, each rule becomes
one index entry keyed by (event name, path, value); a cancel event costs one lookup
per path that rules listen on, never a scan over running runs.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import msgspec

from sdk.errors import ConfigurationError, InvalidEventError
from sdk.keys import Keys
from sdk.wire import Event, check_event_name, encode_json

#: Inngest allows at most five cancel rules per function; so do we.
MAX_RULES_PER_FUNCTION: Final = 5
#: Value tokens longer than this are replaced by their SHA-256 to keep keys short.
MAX_TOKEN_CHARS: Final = 96

_ROOTS: Final = ("data",)
#: Path and token of the index entry an ``all_runs=True`` rule registers under.
ALL_RUNS: Final = "*"


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
                if ch.isspace() or ord(ch) < 32 or ch in "[]:":
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


def _parse_timeout(value: float | timedelta | str | None) -> None:
    if value is not None:
        raise ConfigurationError(
            "CancelOn(timeout=...) is not supported yet; rules listen for the whole run"
        )


class CancelOn(msgspec.Struct, frozen=True):
    """Cancel a run when ``event`` arrives and matches it.

    ``match`` is a dotted path (``data.reportId``) whose value must be equal in the
    run's trigger and in the cancel event. A rule without ``match`` would cancel every
    run of the function, so it is refused unless ``all_runs=True`` says that is meant.
    """

    event: str
    match: str | None = None
    if_: str | None = None
    timeout: float | timedelta | str | None = None
    all_runs: bool = False

    def __post_init__(self) -> None:
        try:
            check_event_name(self.event)
        except InvalidEventError as exc:
            raise ConfigurationError(f"CancelOn(event={self.event!r}): {exc.detail}") from None
        if self.if_ is not None:
            raise ConfigurationError(
                "CancelOn(if_=...) is not supported yet; use match='data.<key>'"
            )
        _parse_timeout(self.timeout)
        if self.match is not None:
            Path.parse(self.match)
            if self.all_runs:
                raise ConfigurationError("CancelOn: all_runs=True contradicts match=...")
        elif not self.all_runs:
            raise ConfigurationError(
                f"CancelOn(event={self.event!r}) has no match, so it would cancel every run of the"
                " function; pass match='data.<key>', or all_runs=True if that is what you want"
            )


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One (event, path, value) under which a run waits to be cancelled."""

    event_name: str
    path: str
    key: str
    listeners_key: str


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
        token: str | None
        if rule.match is None:  # all_runs=True, checked by CancelOn
            path_text, token = ALL_RUNS, ALL_RUNS
        else:
            path_text = rule.match
            token = value_token(parse_path(path_text).lookup(trigger))
        if token is None:
            continue
        key = keys.index(rule.event, path_text, token)
        entries[key] = IndexEntry(rule.event, path_text, key, keys.listeners(rule.event))
    return list(entries.values())


def lookup_keys(event: Event, paths: list[str], keys: Keys) -> list[str]:
    """Index keys a cancel event hits, given the paths rules listen on for its name."""
    found: list[str] = []
    for text in paths:
        if text == ALL_RUNS:
            found.append(keys.index(event.name, ALL_RUNS, ALL_RUNS))
            continue
        try:
            path = parse_path(text)
        except ConfigurationError:
            continue  # written by a newer SDK with other path syntax: not ours to match
        token = value_token(path.lookup(event))
        if token is not None:
            found.append(keys.index(event.name, path.text, token))
    return found
