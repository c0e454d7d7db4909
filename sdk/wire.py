"""Wire types: everything that crosses Redis, as msgspec Structs, validated at the edge.

An event travels as one stream entry whose ``event`` field holds JSON::

    XADD '{cancel}:events' '*' event '{"name": "report/cancel.requested", "data": {...}}'

(the braces are part of the stream's name: ``cancel:events`` is another stream, which no
broker reads). The stream entry id is the event id; ``ts`` defaults to the entry's
timestamp.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

from sdk.errors import InvalidEventError, InvalidIdError
from sdk.keys import EVENT_FIELD, ORIGIN_FIELD, PARTITION_FIELD, check_id

#: The only event format version this release reads.
EVENT_VERSION: Final = 1
#: Largest accepted ``event`` field, in bytes (UTF-8 JSON).
MAX_EVENT_BYTES: Final = 64 * 1024
#: Deepest accepted nesting of ``data`` (objects and arrays).
MAX_DATA_DEPTH: Final = 32

RunStatus = Literal["running", "cancelling", "cancelled", "completed", "failed", "lost"]
TERMINAL_STATUSES: Final[frozenset[str]] = frozenset({"cancelled", "completed", "failed", "lost"})

CancelOutcome = Literal[
    "signalled",  # the run was running; its worker has been told to stop it
    "already_cancelling",  # an earlier request is still being carried out
    "already_completed",  # terminal states are final: nothing changes
    "already_cancelled",
    "already_failed",
    "lost",  # its worker died; the run was recorded lost
    "pending",  # no such run yet: the cancel is kept, and cancels it when it registers
    "not_found",  # no such run, and the cancel was not kept (keeping is off)
    "forbidden",  # the function declares an owner and the actor is not it
    "own_trigger",  # the cancel event is the run's own trigger, which never cancels it
    "started_after_cancel",  # the run's trigger is newer than the cancel event
    "rule_expired",  # the rule's timeout had passed when the cancel event was published
    "condition_false",  # the rule's expression did not hold
    "rule_error",  # the rule's expression failed to evaluate (recorded on the run)
]

#: Published (on the events stream) each time a run ends cancelled; functions may trigger
#: on it, like Inngest's ``inngest/function.cancelled``.
RUN_CANCELLED_EVENT: Final = "cancel/run.cancelled"
#: Event names under this prefix are cancel-broker's own.
SYSTEM_EVENT_PREFIX: Final = "cancel/"


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One published event. ``id`` is its stream entry id, ``ts`` milliseconds since epoch.

    ``parent`` is the id of the run that published it (``ctx.spawn``): the runs it triggers
    are that run's children, and are cancelled with it.
    """

    name: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str = ""
    ts: int = 0
    parent: str | None = None


class _EventBody(msgspec.Struct, kw_only=True):
    """The JSON body publishers write; unknown fields are ignored for forward compatibility."""

    name: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: int | None = None
    v: int = EVENT_VERSION
    parent: str | None = None


class Signal(msgspec.Struct, frozen=True, kw_only=True):
    """A request, sent to the worker holding ``run_id``, to stop that run."""

    run_id: str
    reason: str = ""
    event_id: str = ""
    sent_at: int = 0
    #: Sent again because the first was not acknowledged in time.
    resent: bool = False


class RunInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A run as recorded in Redis."""

    run_id: str
    app_id: str
    function_id: str
    worker_id: str
    status: RunStatus
    event: Event
    started_at: datetime
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    cancel_reason: str | None = None
    #: Id of the cancel event that matched, or ``api`` for a cancel by run id.
    cancelled_by: str | None = None
    error: str | None = None
    #: The configuration the run's code declared; its rules are the ones that apply.
    config_hash: str | None = None
    #: The run this one was started inside; cancelling that run cancels this one.
    parent_run_id: str | None = None
    #: For a cancelled run: from the cancel's publication to the body stopping (Redis clock).
    cancel_latency_ms: float | None = None
    #: The last error of a rule expression evaluated against this run (it did not match).
    rule_error: str | None = None
    #: A cancelled run's thread step ignored the cancel past the grace and was left running.
    abandoned_thread: bool = False
    #: A cancelled ``between_steps`` run had not stopped within its ``interrupt_after`` and
    #: was interrupted at its current await (a process step killed); False when it stopped
    #: at a step boundary.
    escalated: bool = False
    #: A cancelled run's body was stopped by force after the grace: its Celery prefork pool
    #: process terminated, or (``BlockingWorker(raise_in_thread=True)``) the cancellation
    #: raised in its thread.
    terminated: bool = False
    #: How the ``on_cancel`` hook failed (``"ValueError: boom"``), None if it did not.
    on_cancel_error: str | None = None
    #: The run that continues this one, which ended (a job queue's retry): a cancel by
    #: this run's id is passed on to it.
    continued_by: str | None = None


class CancelResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a cancel request did to one run."""

    run_id: str
    outcome: CancelOutcome
    #: The run's status after the request, None when the run does not exist.
    status: RunStatus | None
    #: Its status before the request, None when the run does not exist.
    previous_status: RunStatus | None = None
    #: Runs started inside this one (at any depth) that the request cancelled with it.
    cascaded: tuple[str, ...] = ()
    #: ``pending``: until when the cancel is kept; a run registering with this id by then
    #: is cancelled at once (its body never runs).
    kept_until: datetime | None = None

    @property
    def accepted(self) -> bool:
        """Whether this request will stop the run: its worker was signalled, or the cancel
        waits for the run to register."""
        return self.outcome in ("signalled", "pending")


class BulkCancel(msgspec.Struct, frozen=True, kw_only=True):
    """A bulk cancel of one function (``Client.cancel_many``), kept for runs of it that
    have not registered yet: each registering run triggered in ``[after, before]`` (ms) is
    cancelled, if ``if_`` (CEL over its trigger) holds."""

    id: str
    function_id: str
    #: The app whose runs it cancels; ``""``: every app declaring the function.
    app: str = ""
    after: int | None = None
    before: int
    if_: str = msgspec.field(default="", name="if")
    reason: str
    #: When it was requested (ms, Redis clock).
    at: int


class BulkCancelResult(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Client.cancel_many`` did: one result per registered run it considered, and the
    cancel it keeps for runs of the function that have not registered yet (their triggers
    wait in the stream behind a full worker): those triggered in the time range are
    cancelled when they register, until ``kept_until``."""

    results: list[CancelResult]
    #: The time range, both bounds included: runs triggered then.
    started_after: datetime | None
    started_before: datetime
    #: None when no cancel is kept (the pending-cancel lookback is 0).
    kept_until: datetime | None


class RuleConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    """One cancel rule, as part of a function's canonical configuration."""

    event: str
    match: str | None = None
    if_: str | None = msgspec.field(default=None, name="if")
    timeout_s: float | None = None
    all_runs: bool = False
    #: The instant (Unix ms) the rule stops listening, for a timeout given as a time.
    #: Left out of the canonical text when None, as ``interrupt_after_s``.
    until_ms: int | None = None


class FunctionConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What a function declares: the configuration runs are matched against."""

    id: str
    trigger: str
    cancel_on: tuple[RuleConfig, ...] = ()
    cancel_mode: str = "immediate"
    owner: str | None = None
    #: Seconds after its cancel that a ``between_steps`` run is interrupted where it is.
    #: Left out of the canonical text when None, so older configurations keep their hash.
    interrupt_after_s: float | None = None
    #: A CEL condition over ``event`` a trigger must meet to start a run (as Inngest's
    #: trigger ``if``). Left out of the canonical text when None.
    trigger_if: str | None = None


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's registration: who it is and what it serves (function id -> config hash)."""

    app_id: str
    worker_id: str
    sdk_version: str
    app_version: str | None = None
    host: str
    pid: int
    started_at: int
    heartbeat_interval_s: float
    functions: dict[str, str] = msgspec.field(default_factory=dict)


_body_decoder = msgspec.json.Decoder(_EventBody)
_encoder = msgspec.json.Encoder(order="sorted")


def encode_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, so equal values always encode alike."""
    return _encoder.encode(value)


#: Whitespace (Unicode's, as str.isspace) and control characters.
_NOT_IN_A_NAME: Final = re.compile(r"[\s\x00-\x1f]")


def check_event_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidEventError("invalid_name", "event name must be a non-empty string")
    if len(name) > 256:
        raise InvalidEventError("invalid_name", f"event name is {len(name)} chars, at most 256")
    if _NOT_IN_A_NAME.search(name):
        raise InvalidEventError("invalid_name", f"event name {name!r} contains whitespace")
    return name


def _check_depth(data: Any) -> None:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DATA_DEPTH:
            raise InvalidEventError("too_deep", f"data nests deeper than {MAX_DATA_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def encode_event(
    name: str,
    data: dict[str, Any] | None = None,
    *,
    max_bytes: int = MAX_EVENT_BYTES,
    parent: str | None = None,
) -> bytes:
    """The ``event`` field for a new event, validated as the broker will validate it."""
    check_event_name(name)
    if parent is not None:
        check_id("parent run id", parent)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidEventError(
            "invalid_shape", f"data must be a mapping, not {type(data).__name__}"
        )
    _check_depth(data)
    try:
        fields: dict[str, Any] = {"name": name, "data": data, "v": EVENT_VERSION}
        if parent is not None:
            fields["parent"] = parent
        body = encode_json(fields)
    except UnicodeEncodeError as exc:  # a lone surrogate: text that was never valid UTF-8
        raise InvalidEventError(
            "invalid_encoding", f"data holds text that is not UTF-8: {exc}"
        ) from exc
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidEventError("invalid_shape", f"data is not JSON-serializable: {exc}") from exc
    if len(body) > max_bytes:
        raise InvalidEventError("too_large", f"event is {len(body)} bytes, at most {max_bytes}")
    return body


def printable(text: str) -> str:
    """``text`` with bytes that were not UTF-8 shown as ``\\xNN`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: An event id: its stream entry id, and its partition when that is not 0.
_EVENT_ID: Final = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}(:[0-9]{1,4})?$")


def event_id(entry_id: str, partition: int) -> str:
    """The id of the event in entry ``entry_id`` of ``partition``'s stream.

    Two partitions' streams can hand out the same entry id; the partition, after a ``:``,
    keeps event ids (and the run ids derived from them) unique, and leaves their order
    (the entry ids') unchanged. Partition 0 (the only one by default) adds nothing.
    """
    return entry_id if partition == 0 else f"{entry_id}:{partition}"


def entry_id_of(event_id: str) -> str:
    """The stream entry id within an event id (for ``XRANGE``)."""
    return event_id.partition(":")[0]


def entry_timestamp(entry_id: str) -> int:
    """Milliseconds part of a stream entry id (``1700000000000-0``) or event id."""
    return int(entry_id.partition("-")[0])


def decode_event(
    entry_id: str,
    fields: dict[str, str] | None,
    *,
    max_bytes: int = MAX_EVENT_BYTES,
    partition: int = 0,
) -> Event:
    """Validate one stream entry of ``partition``'s stream into an :class:`Event`, or raise
    :class:`InvalidEventError`."""
    if not fields or EVENT_FIELD not in fields:
        raise InvalidEventError(
            "missing_field",
            f"stream entry has no {EVENT_FIELD!r} field (fields: {sorted(fields or {})})",
        )
    raw = fields[EVENT_FIELD]
    try:
        size = len(raw.encode())
    except UnicodeEncodeError:  # bytes that are not UTF-8, decoded with surrogateescape
        raise InvalidEventError("invalid_encoding", "the event field is not UTF-8") from None
    if size > max_bytes:
        raise InvalidEventError("too_large", f"event is {size} bytes, at most {max_bytes}")
    try:
        body = _body_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidEventError("invalid_shape", str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise InvalidEventError("invalid_json", str(exc)) from exc
    except RecursionError as exc:
        raise InvalidEventError("too_deep", "JSON nests too deeply") from exc
    if body.v != EVENT_VERSION:
        raise InvalidEventError(
            "unsupported_version",
            f"event version {body.v}; this broker reads version {EVENT_VERSION}",
        )
    check_event_name(body.name)
    _check_depth(body.data)
    if body.parent is not None:
        try:
            check_id("parent run id", body.parent)
        except InvalidIdError as exc:
            raise InvalidEventError("invalid_shape", str(exc)) from None
    # An entry a broker moved to its partition keeps the id it was published under: its
    # runs' ids and its order against other events derive from it.
    # (Only a moved entry carries both fields; without partitions nothing is moved.)
    origin = fields.get(ORIGIN_FIELD) if PARTITION_FIELD in fields else None
    if origin is not None and _EVENT_ID.match(origin):
        id_ = origin
    else:
        id_ = event_id(entry_id, partition)
    ts = body.ts if body.ts is not None else entry_timestamp(id_)
    return Event(name=body.name, data=body.data, id=id_, ts=ts, parent=body.parent)


def encode_stored_event(event: Event) -> bytes:
    """How a run's trigger is kept in its run hash."""
    return encode_json(event)


_stored_event_decoder = msgspec.json.Decoder(Event)


def decode_stored_event(raw: str | bytes) -> Event:
    return _stored_event_decoder.decode(raw)


def _ms_to_datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)


def decode_run(fields: dict[str, str]) -> RunInfo:
    """A run hash (HGETALL) as a :class:`RunInfo`."""
    started = _ms_to_datetime(fields.get("started_at"))
    return RunInfo(
        run_id=fields["run_id"],
        app_id=fields["app_id"],
        function_id=fields["function_id"],
        worker_id=fields["worker_id"],
        status=msgspec.convert(fields["status"], RunStatus),
        event=_stored_event_decoder.decode(fields["event"]),
        started_at=started if started is not None else datetime.fromtimestamp(0, tz=UTC),
        finished_at=_ms_to_datetime(fields.get("finished_at")),
        cancel_requested_at=_ms_to_datetime(fields.get("cancel_requested_at")),
        cancel_reason=fields.get("cancel_reason") or None,
        cancelled_by=fields.get("cancelled_by") or None,
        error=fields.get("error") or None,
        config_hash=fields.get("config_hash") or None,
        parent_run_id=fields.get("parent_run_id") or None,
        cancel_latency_ms=float(fields["cancel_latency_ms"])
        if fields.get("cancel_latency_ms")
        else None,
        rule_error=fields.get("rule_error") or None,
        abandoned_thread=fields.get("abandoned_thread") == "1",
        escalated=fields.get("escalated") == "1",
        terminated=fields.get("terminated") == "1",
        on_cancel_error=fields.get("on_cancel_error") or None,
        continued_by=fields.get("continued_by") or None,
    )


def encode_config(config: FunctionConfig) -> bytes:
    """The canonical text of a configuration: what is stored, and what is hashed. Fields
    added since the first release are left out when unset, so that a configuration that
    does not use them keeps the hash it always had."""
    fields = msgspec.to_builtins(config)
    for name in ("interrupt_after_s", "trigger_if"):
        if fields[name] is None:
            del fields[name]
    for rule in fields["cancel_on"]:
        if rule["until_ms"] is None:
            del rule["until_ms"]
    return encode_json(fields)


def config_hash(config: FunctionConfig) -> str:
    """SHA-256 of the canonical encoding: equal configurations, equal hash."""
    return hashlib.sha256(encode_config(config)).hexdigest()


_config_decoder = msgspec.json.Decoder(FunctionConfig)
_worker_decoder = msgspec.json.Decoder(WorkerInfo)


def decode_config(raw: str | bytes) -> FunctionConfig:
    return _config_decoder.decode(raw)


def decode_worker(raw: str | bytes) -> WorkerInfo:
    return _worker_decoder.decode(raw)


def decode_signal(fields: dict[str, str]) -> Signal:
    return msgspec.convert(fields, Signal, strict=False)
