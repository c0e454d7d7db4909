"""Matching a cancel event as it is published (``Client.send``).

The broker matches every event it reads; for a cancel event, that costs its read of the
stream, a read of the declared rules and a script before any worker is signalled. An SDK
publisher knows the same rules (it reads ``{ns}:rules:{name}``, cached for a moment) and
computes the same index keys: it publishes the event and cancels the runs those keys name
in one script (``publish_event.lua``), so a cancel by event costs what a cancel by run
id does.

This is an accelerator, never the authority: the broker still handles the entry
(tombstones for runs that register later, rules with an expression, the decision and its
metrics), and a rule the cached selectors do not know yet is matched there a moment later.
Skipped, the event published by one plain ``XADD`` as before, when the namespace has
several partitions (the broker moves and broadcasts), when no selector the key alone
decides has a value in the event, and for good once Redis refuses the reads or the script
to this client's user (a publisher's ACL reaches the events stream only: docs/security.md).
"""

from __future__ import annotations

import time
from typing import Any, Final, cast

from redis.exceptions import ClusterError, NoPermissionError, ResponseError

from sdk.connection import RedisClient
from sdk.keys import Keys
from sdk.rules import Lookup, lookups
from sdk.scripts import publish_event
from sdk.wire import Event

#: Seconds a cancel event name's declared selectors are cached: a rule declared since is
#: matched by the broker until then.
SELECTORS_CACHED_S: Final = 2.0
_NAMES_CACHED: Final = 4096
#: Seconds of plain publishing after Redis Cluster kept redirecting the script.
PAUSE_AFTER_REDIRECTS_S: Final = 5.0


class NotPublishedError(Exception):
    """The script failed before it appended the event (the ACL refused it, a slot was
    moving): nothing was written."""


def _refused(error: str) -> bool:
    """Whether a script's error is the ACL's (Redis words it so inside a script)."""
    return "NOPERM" in error or "user executing the script can't" in error


class EarlyMatch:
    """One client's matching on publish: the selectors it has read, and whether Redis lets
    it match at all."""

    def __init__(self, redis: RedisClient, keys: Keys, *, log: Any) -> None:
        self.redis = redis
        self.keys = keys
        self._log = log
        #: False once Redis refused this client a read or the script.
        self.enabled = True
        self._selectors: dict[str, tuple[float, list[str]]] = {}
        self._paused_until = 0.0

    async def lookups(self, event: Event) -> list[Lookup]:
        """The lookups a published event can be matched by at once (none: publish it
        plainly)."""
        now = time.monotonic()
        if not self.enabled or now < self._paused_until:
            return []
        cached = self._selectors.get(event.name)
        if cached is None or cached[0] < now:
            try:
                selectors = cast(list[str], await self.redis.hkeys(self.keys.rules(event.name)))
            except NoPermissionError as exc:
                self._disable(exc)
                return []
            if len(self._selectors) >= _NAMES_CACHED:
                self._selectors.clear()
            cached = self._selectors[event.name] = (now + SELECTORS_CACHED_S, selectors)
        if not cached[1]:
            return []
        found = lookups(event, cached[1], self.keys)
        return [lookup for lookup in found if lookup.selector.expression_id is None]

    async def publish(self, body: bytes, event: Event, found: list[Lookup]) -> str:
        """Publish ``event`` (encoded: ``body``) and cancel the runs ``found`` names;
        returns its id. Raises :class:`NotPublishedError` when the script failed before it
        appended the event."""
        try:
            published = await publish_event(self.redis, self.keys, body, event, found)
        except ResponseError as exc:
            # An error reply from the call itself, not from inside its pcall: the event was
            # not appended (it is the script's first write). The caller publishes it
            # plainly; only the ACL's refusal turns matching off.
            if isinstance(exc, NoPermissionError) or _refused(str(exc)):
                self._disable(exc)
            raise NotPublishedError(str(exc)) from exc
        except ClusterError as exc:
            # Redirected until redis-py gave up: a slot migrating answers TRYAGAIN to a call
            # on several of its keys for as long as it moves (one XADD is never refused
            # so). Nothing ran; plain publishing for a while spares each event the retries.
            self._paused_until = time.monotonic() + PAUSE_AFTER_REDIRECTS_S
            raise NotPublishedError(str(exc)) from exc
        if _refused(published.error):
            self._disable(published.error)
        elif published.error:  # a slot moving, a key of the wrong type: this event only
            self._log.warning(
                "client.match_on_publish_failed", event_id=published.event_id, error=published.error
            )
        return published.event_id

    def _disable(self, error: object) -> None:
        if self.enabled:
            self.enabled = False
            self._log.info(
                "client.match_on_publish_off",
                reason="Redis refuses this client's user the rules or run state; the broker"
                " matches its cancel events (a publisher's ACL)",
                error=str(error),
            )
