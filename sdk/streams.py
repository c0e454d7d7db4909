"""Reading a stream through a consumer group without losing entries.

The one read loop used by the worker (triggers) and the broker (cancel events):

1. read this consumer's own pending entries (delivered, never acknowledged) from the
   start, so a restart with the same name or a dropped connection loses nothing;
2. then block for new entries (``>``);
3. every so often claim entries another consumer has left idle too long (it died);
4. on an error reading, back off and go back to step 1;
5. on an error *handling* a batch that is not the batch's own (Redis refusing writes:
   OOM, READONLY, LOADING, BUSY; a connection lost; a cluster moving a slot), back off
   and handle the same batch again, as read: reading it again would count one more
   delivery of each entry, and an entry delivered more than ``MAX_DELIVERIES`` times is
   set aside as poison. Only entries that keep failing for a reason of their own, or
   that crash their consumer, get there.

The handler acknowledges what it has handled; what it has not stays pending.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, cast

import anyio
import structlog
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from sdk.connection import (
    REDIS_ERRORS,
    Backoff,
    BackoffHooks,
    RedisClient,
    blocking_client,
    is_transient,
    redis_now_ms,
)
from sdk.wire import MAX_EVENT_BYTES, encode_json, printable

Entry = tuple[str, dict[str, str] | None]
BatchHandler = Callable[[Sequence[Entry]], Awaitable[None]]

#: An entry delivered more often than this without being acknowledged is poison: it is
#: set aside (dead-lettered) instead of failing, or crashing its consumer, forever.
MAX_DELIVERIES: Final = 5


#: Approximate cap on the dead-letter stream.
DEAD_LETTER_MAXLEN: Final = 100_000
#: A refused entry's fields are kept whole up to this many bytes (JSON), else an excerpt.
DEAD_LETTER_KEPT_BYTES: Final = 2 * MAX_EVENT_BYTES
DEAD_LETTER_EXCERPT_BYTES: Final = 4_096
#: The longest pause between two reads after failures: once Redis is back (a restart, a
#: failover), the entries published meanwhile are read within about a second.
RECONNECT_CAP_S: Final = 1.0


async def dead_letter(
    redis: RedisClient,
    stream: str,
    entry_id: str,
    fields: dict[str, str] | None,
    *,
    reason: str,
    detail: str,
    consumer: str,
    maxlen: int = DEAD_LETTER_MAXLEN,
) -> None:
    """Park an entry that cannot be handled, with the reason and the original fields.

    The original is kept whole up to ``DEAD_LETTER_KEPT_BYTES`` (twice the largest valid
    event: whatever can be published again is kept); a larger one, never a valid event,
    is kept as an excerpt with its size and SHA-256, so that one hostile entry cannot make
    the dead letters, and every read of them, megabytes long."""
    original = encode_json({printable(k): printable(v) for k, v in (fields or {}).items()})
    letter: dict[FieldT, EncodableT] = {
        "reason": reason,
        "detail": printable(detail[:2000]),
        "entry_id": entry_id,
        "fields": original,
        "consumer": consumer,
    }
    if len(original) > DEAD_LETTER_KEPT_BYTES:
        letter["fields"] = original[:DEAD_LETTER_EXCERPT_BYTES]
        letter["truncated"] = "1"
        letter["fields_bytes"] = str(len(original))
        letter["fields_sha256"] = hashlib.sha256(original).hexdigest()
    await redis.xadd(stream, letter, maxlen=maxlen, approximate=True)


async def create_group(
    redis: RedisClient, stream: str, group: str, *, lookback_ms: int = 0, from_start: bool = False
) -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists.

    A new group starts ``lookback_ms`` before now (Redis clock): it also sees the entries
    published that long before it existed, as far as the stream still holds them (the
    broker's trimming keeps that long of them, :func:`trim_acknowledged`). A function's
    first worker then runs the triggers published for it before it started (the web app
    was up first, a rolling deploy adds the function), and the broker handles the cancel
    events published before it started. With 0 it starts at the stream's end;
    ``from_start``: at its first entry (a stream rebuilt after Redis lost its data holds
    only what came after).
    """
    start = "0" if from_start else "$"
    if lookback_ms > 0 and not from_start:
        # (Redis reports the group's lag as unknown until it has read to the stream's end.)
        start = f"{max(0, await redis_now_ms(redis) - lookback_ms)}-0"
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP's reply, ``[[stream, [(id, fields), ...]]]``, responses decoded to str."""
    return cast(list[Entry], reply[0][1]) if reply else []


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def trim_acknowledged(
    redis: RedisClient, stream: str, *, approximate: bool = True, keep_ms: int = 0
) -> int:
    """Delete the entries every consumer group has read and acknowledged, and that are
    older than ``keep_ms`` (the trigger lookback: a function's first worker, whose group
    does not exist yet, reads that far back).

    Keeps everything from the oldest entry still needed by any group: its oldest pending
    entry, or its last delivered one. Approximate trimming (the default) drops whole
    internal nodes only, which is cheaper and never deletes more. Returns how many went.
    """
    groups = await redis.xinfo_groups(stream)
    if not groups:
        return 0
    keep_from: tuple[int, int] | None = None
    if keep_ms > 0:
        keep_from = (max(0, await redis_now_ms(redis) - keep_ms), 0)
    for group in groups:
        needed = _id(str(group["last-delivered-id"]))
        if group["pending"]:
            summary = await redis.xpending(stream, group["name"])
            if summary["min"] is not None:  # None: acknowledged since XINFO answered
                needed = min(needed, _id(str(summary["min"])))
        keep_from = needed if keep_from is None else min(keep_from, needed)
    assert keep_from is not None
    minid = f"{keep_from[0]}-{keep_from[1]}"
    return int(await redis.xtrim(stream, minid=minid, approximate=approximate))


class GroupConsumer:
    """One consumer of one group on one stream."""

    def __init__(
        self,
        redis_url: str,
        commands: RedisClient,
        *,
        stream: str,
        group: str,
        consumer: str,
        block_ms: int = 5_000,
        batch: int = 100,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = MAX_DELIVERIES,
        on_poison: BatchHandler | None = None,
        log: Any = None,
        backoff_hooks: BackoffHooks | None = None,
        lookback_ms: int = 0,
    ) -> None:
        self.redis_url = redis_url
        self.commands = commands
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self._on_poison = on_poison
        self._backoff_hooks = backoff_hooks
        #: Where a group recreated after it vanished starts: as far back as at creation.
        self.lookback_ms = lookback_ms
        self._log = log or structlog.get_logger("sdk.streams")
        self._reread_pending = False
        self._next_claim = 0.0
        self._stopping = False
        self._read_scope: anyio.CancelScope | None = None
        #: The batch being handled (until the handler returns): what to handle again when
        #: the handler fails for a reason that is not the batch's own.
        self._in_hand: list[Entry] = []

    def reread_pending(self) -> None:
        """Read this consumer's pending entries again (a handler left some unacknowledged)."""
        self._reread_pending = True

    def stop(self) -> None:
        """Stop reading; the batch being handled is finished, then :meth:`run` returns."""
        self._stopping = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def ack(self, *entry_ids: str) -> None:
        if entry_ids:
            await self.commands.xack(self.stream, self.group, *entry_ids)

    async def leave(self) -> None:
        """Remove this consumer from the group if nothing is pending for it (a clean stop).

        Consumer names are per process; without this, every restart would leave one behind.
        """
        with anyio.move_on_after(5, shield=True):
            try:
                pending = await self.commands.xpending_range(
                    self.stream, self.group, "-", "+", 1, consumername=self.consumer
                )
                if not pending:
                    await self.commands.xgroup_delconsumer(self.stream, self.group, self.consumer)
            except REDIS_ERRORS as exc:
                self._log.warning("stream.leave_failed", stream=self.stream, error=repr(exc))

    async def run(
        self, handle: BatchHandler, *, capacity: Callable[[], Awaitable[int]] | None = None
    ) -> None:
        """Feed entries to ``handle`` until stopped. ``capacity`` waits for room, says how much."""
        reader = blocking_client(self.redis_url, self.block_ms)
        try:
            await self._loop(reader, handle, capacity)
        finally:
            with anyio.CancelScope(shield=True):
                await reader.aclose()
            await self.leave()

    async def _loop(
        self,
        reader: RedisClient,
        handle: BatchHandler,
        capacity: Callable[[], Awaitable[int]] | None,
    ) -> None:
        pending_from: str | None = "0"
        retry: list[Entry] = []
        backoff = Backoff(
            self._log,
            "stream",
            cap=RECONNECT_CAP_S,
            hooks=self._backoff_hooks,
            stream=self.stream,
            consumer=self.consumer,
        )
        while not self._stopping:
            try:
                if retry:
                    # Handled again as it was read: no delivery is counted for it.
                    entries, retry = retry, []
                    await self._handle(handle, entries)
                    backoff.succeeded()
                    continue
            except REDIS_ERRORS as exc:
                retry = self._retry_or_reread(exc)
                if not retry:
                    pending_from = "0"
                await backoff.failed(exc)
                continue
            count = self.batch if capacity is None else max(1, min(self.batch, await capacity()))
            if self._reread_pending and pending_from is None:
                self._reread_pending, pending_from = False, "0"
            try:
                if pending_from is None and time.monotonic() >= self._next_claim:
                    await self._claim_idle(handle)
                reply = None
                with anyio.CancelScope() as self._read_scope:
                    if self._stopping:
                        break
                    reply = await reader.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.stream: pending_from or ">"},
                        count=count,
                        block=None if pending_from else self.block_ms,
                    )
                self._read_scope = None
                entries = _entries(reply)
                if pending_from is not None:
                    # Entries read again (after a crash or an error) may be poison.
                    pending_from = entries[-1][0] if entries else None
                    entries = await self._without_poison(entries)
                if entries:
                    await self._handle(handle, entries)
            except REDIS_ERRORS as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self._log.warning("stream.group_missing", stream=self.stream, group=self.group)
                    if await self._recreate_group():
                        continue
                # Whatever Redis says (an outage, NOPERM from a wrong ACL, OOM), a read loop
                # backs off and carries on: a crash would only come back at the next start.
                retry = self._retry_or_reread(exc)
                if not retry:
                    pending_from = "0"
                await backoff.failed(exc)
                continue
            backoff.succeeded()
        await self._handle_left_pending(reader, handle)

    async def _handle(self, handle: BatchHandler, entries: list[Entry]) -> None:
        self._in_hand = entries
        await handle(entries)
        self._in_hand = []

    def _retry_or_reread(self, exc: BaseException) -> list[Entry]:
        """After an error: the batch to handle again, if its handling failed for a reason
        that is not its own; else nothing, and this consumer's pending entries are read
        again (an error of the read itself, or of the batch)."""
        in_hand, self._in_hand = self._in_hand, []
        return in_hand if in_hand and is_transient(exc) else []

    async def _handle_left_pending(self, reader: RedisClient, handle: BatchHandler) -> None:
        """After :meth:`stop`: a read it cancelled may have been answered already, and what
        Redis delivered is pending for this consumer. Handle it now, rather than leave it
        to another consumer's claim once idle."""
        last = "0"
        try:
            while True:
                reply = await reader.xreadgroup(
                    self.group, self.consumer, {self.stream: last}, count=self.batch
                )
                entries = _entries(reply)
                if not entries:
                    return
                last = entries[-1][0]
                if entries := await self._without_poison(entries):
                    await handle(entries)
        except REDIS_ERRORS as exc:  # left pending: claimed by another consumer later
            self._log.warning("stream.pending_left", stream=self.stream, error=repr(exc))

    async def _recreate_group(self) -> bool:
        try:
            await create_group(self.commands, self.stream, self.group, lookback_ms=self.lookback_ms)
        except REDIS_ERRORS as exc:
            self._log.error("stream.group_create_failed", stream=self.stream, error=repr(exc))
            return False
        return True

    async def _claim_idle(self, handle: BatchHandler) -> None:
        """Take over entries a vanished consumer read but never acknowledged."""
        self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
        start = "0-0"
        while not self._stopping:
            reply = await self.commands.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, start, count=self.batch
            )
            # Redis 6.2 answers entries deleted meanwhile as (None, None); 7.0 drops them.
            start, claimed = reply[0], [entry for entry in reply[1] if entry[0] is not None]
            if claimed:
                self._log.info("stream.claimed", stream=self.stream, entries=len(claimed))
                claimed = await self._without_poison(claimed)
                if claimed:
                    await self._handle(handle, claimed)
            if start == "0-0":
                return

    async def _without_poison(self, entries: list[Entry]) -> list[Entry]:
        """Set aside entries delivered more than ``max_deliveries`` times (they keep failing)."""
        if not entries or self._on_poison is None:
            return entries
        pending = await self.commands.xpending_range(
            self.stream, self.group, entries[0][0], entries[-1][0], len(entries)
        )
        counts = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        poison = [e for e in entries if counts.get(e[0], 0) > self.max_deliveries]
        if not poison:
            return entries
        self._log.error(
            "stream.poison",
            stream=self.stream,
            entries=[entry_id for entry_id, _ in poison],
            max_deliveries=self.max_deliveries,
        )
        await self._on_poison(poison)
        await self.ack(*(entry_id for entry_id, _ in poison))
        return [e for e in entries if counts.get(e[0], 0) <= self.max_deliveries]
