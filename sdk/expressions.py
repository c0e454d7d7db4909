"""CEL expressions for cancel rules (``CancelOn(if_=...)``) and bulk cancels.

Expressions are compiled once by the ``common-expression-language`` package (a Rust CEL
implementation), never evaluated with Python's ``eval``. Everything that can be checked
before an event arrives is checked at definition time, with the position of the error:
syntax, unknown variables, functions outside CEL's standard definitions, and the bounds
that keep one evaluation cheap (length, no comprehension nested in another).

At run time a field the expression reads that the event does not have is ``null``, as in
Inngest's expression engine (``event.data.orgID == null`` holds when ``orgID`` is absent;
``has(event.data.orgID)`` still tells absent from present). An expression matches only
when it evaluates to exactly ``true``: a type error or any other evaluation error is a
non-match, reported to the caller so it can be recorded, never a match by accident.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sdk.errors import ConfigurationError
from sdk.wire import Event

#: Longest accepted expression, in characters.
MAX_EXPRESSION_CHARS: Final = 1024
#: Variables of a cancel rule: the run's trigger and the incoming cancel event.
RULE_VARIABLES: Final = frozenset({"event", "async"})
#: Variables of a bulk cancel's filter: only the run's trigger.
TRIGGER_VARIABLES: Final = frozenset({"event"})

#: CEL's standard definitions (cel-spec, "List of Standard Definitions"). Operators are
#: reported as ``_==_``, ``!_``, ``@in`` and so on and are always allowed.
STANDARD_FUNCTIONS: Final = frozenset(
    {
        "size", "contains", "startsWith", "endsWith", "matches", "has",
        "all", "exists", "exists_one", "map", "filter",
        "int", "uint", "double", "string", "bytes", "bool", "dyn", "type",
        "timestamp", "duration",
        "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getFullYear",
        "getHours", "getMilliseconds", "getMinutes", "getMonth", "getSeconds",
    }
)  # fmt: skip
_STRING: Final = re.compile(
    r"""(?:[rR]?(?:'''.*?'''|\"\"\".*?\"\"\"|'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"))""", re.S
)
_BINDER: Final = re.compile(r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_MACRO_CALL: Final = re.compile(r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(")
#: A dotted field path from a variable: ``event.data.user.id``.
#: (A segment followed by ``(`` is a method, ``items.exists(...)``: not a field.)
_FIELD_PATH: Final = re.compile(r"(?<![\w.])(event|async)((?:\s*\.\s*[A-Za-z_]\w*+(?!\s*\())+)")
_HAS_ARGUMENT: Final = re.compile(r"\bhas\s*\(\s*((?:event|async)(?:\s*\.\s*[A-Za-z_]\w*)+)\s*\)")
_MISSING: Final = object()

Path = tuple[str, ...]


class ExpressionError(ConfigurationError):
    """An expression that cannot be used: the message points at the position."""


def _pointer(source: str, position: int, message: str) -> str:
    return (
        f"invalid CEL expression: {message} at position {position}\n  {source}\n  {' ' * position}^"
    )


def _blank_strings(source: str) -> str:
    """``source`` with the contents of string literals replaced by spaces (same length)."""
    return _STRING.sub(lambda found: " " * len(found.group(0)), source)


def _check_nesting(code: str, source: str) -> None:
    """Refuse a comprehension inside another: its cost would grow with the product of sizes."""
    open_macros: list[int] = []  # paren depth at which each enclosing macro call opened
    depth = 0
    macro_starts = {found.end() - 1 for found in _MACRO_CALL.finditer(code)}
    for position, char in enumerate(code):
        if char == "(":
            depth += 1
            if position in macro_starts:
                if open_macros:
                    raise ExpressionError(
                        _pointer(source, position, "a comprehension nested in another")
                    )
                open_macros.append(depth)
        elif char == ")":
            if open_macros and open_macros[-1] == depth:
                open_macros.pop()
            depth -= 1


def _first_use(code: str, name: str) -> int:
    found = re.search(rf"(?<![\w.]){re.escape(name)}\b", code)
    return found.start() if found else 0


def _dotted(text: str) -> Path:
    return tuple(part.strip() for part in text.split("."))


def _null_paths(code: str) -> tuple[Path, ...]:
    """The field paths the expression reads, but not those it tests with ``has()``: an
    absent one is given as ``null`` (a path under ``has()`` keeps CEL's meaning)."""
    tested = {_dotted(found.group(1)) for found in _HAS_ARGUMENT.finditer(code)}
    paths = {_dotted(found.group(0)) for found in _FIELD_PATH.finditer(code)}
    # A path also read as the prefix of a tested one keeps its meaning too.
    return tuple(sorted(p for p in paths if not any(t[: len(p)] == p for t in tested)))


def _absent(root: Mapping[str, Any], path: Path) -> bool:
    node: Any = root
    for key in path:
        if not isinstance(node, Mapping):
            return False  # not a field access CEL can make: its own error stands
        node = node.get(key, _MISSING)
        if node is _MISSING:
            return True
    return False


def _with_nulls(variables: Mapping[str, Any], paths: tuple[Path, ...]) -> dict[str, Any]:
    """``variables`` with every absent path of ``paths`` present as None (copied where
    written: the events themselves are never changed)."""
    missing = [path for path in paths if _absent(variables, path)]
    root = dict(variables)
    for path in missing:
        node = root
        for depth, key in enumerate(path):
            if depth == len(path) - 1:
                node.setdefault(key, None)
                break
            child = node.get(key, _MISSING)
            if child is _MISSING or child is None:
                child = {}
            elif not isinstance(child, Mapping):
                break
            node[key] = child = dict(child)
            node = child
    return root


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled CEL expression. ``id`` names it in keys (a prefix of its SHA-256)."""

    source: str
    id: str
    program: Any
    #: The field paths given as ``null`` when the event lacks them (see the module).
    null_paths: tuple[Path, ...] = ()

    def evaluate(self, variables: Mapping[str, Any]) -> bool:
        """True only if the expression evaluates to ``true``; raises on evaluation errors."""
        return self.program.execute(_with_nulls(variables, self.null_paths)) is True


def expression_id(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _compile(source: str, variables: frozenset[str]) -> Expression:
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("a CEL expression must be a non-empty string")
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(
            f"CEL expression is {len(source)} characters long, at most {MAX_EXPRESSION_CHARS}"
        )
    # Imported at the first expression: the package also loads its command line (and
    # prompt_toolkit), a fifth of a second every worker and broker would pay at start.
    import cel

    try:
        program = cel.compile(source)
    except ValueError as exc:
        # The library's message already carries the line, column and a caret.
        raise ExpressionError(f"invalid CEL expression {source!r}: {exc}") from None
    code = _blank_strings(source)
    references = program.references()
    binders = set(_BINDER.findall(code))
    for name in references["variables"]:
        if name not in variables and name not in binders:
            allowed = " and ".join(f"'{v}'" for v in sorted(variables))
            raise ExpressionError(
                _pointer(
                    source, _first_use(code, name), f"unknown variable {name!r} (use {allowed})"
                )
            )
    for name in references["functions"]:
        if name[0] in "_@!" or name in STANDARD_FUNCTIONS:
            continue
        raise ExpressionError(
            _pointer(source, _first_use(code, name), f"{name!r} is not a standard CEL function")
        )
    _check_nesting(code, source)
    return Expression(
        source=source, id=expression_id(source), program=program, null_paths=_null_paths(code)
    )


@functools.lru_cache(maxsize=4096)
def compile_rule_expression(source: str) -> Expression:
    """A cancel rule's ``if_``: over ``event`` (the run's trigger) and ``async`` (the cancel)."""
    return _compile(source, RULE_VARIABLES)


@functools.lru_cache(maxsize=256)
def compile_trigger_filter(source: str) -> Expression:
    """A bulk cancel's ``if_``: over ``event``, the run's trigger."""
    return _compile(source, TRIGGER_VARIABLES)


def event_variable(event: Event) -> dict[str, Any]:
    """How an event looks to an expression: ``name``, ``data``, ``id``, ``ts``."""
    return {"name": event.name, "data": event.data, "id": event.id, "ts": event.ts}


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
