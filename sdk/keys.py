"""The Redis key layout, defined once.

Every process (SDK, client, broker) and every Lua script gets its key names from
here; the Lua scripts receive prefixes built by this module instead of spelling
them out. ``docs/protocol.md`` describes each key.

Every key starts with a Redis Cluster hash tag, so that every script and MULTI, whatever
keys it touches, runs in one slot on one node:

- the namespace's shared state (sync and registration records, rules, dead letters) is
  tagged with the namespace: ``{cancel}:workers``;
- run state (the events stream, runs, the cancel index, tombstones, signal streams) is
  split into the namespace's *partitions*, each its own tag: ``{cancel}:run:...`` in
  partition 0 (the only one by default, so one partition is the same layout), and
  ``{cancel:3}:run:...`` in partition 3. A run, its index entries and the tombstones that
  guard its registration share its partition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sdk.errors import InvalidIdError

DEFAULT_NAMESPACE: Final = "cancel"

#: Consumer group through which brokers share the cancel events.
BROKER_GROUP = "broker"

#: Stream entry field that carries the event's JSON body.
EVENT_FIELD = "event"
#: Stream entry field naming the partition a publisher placed the entry in. With several
#: partitions, an entry without it (a plain ``XADD``, an outcome event) is moved to its
#: partition by a broker, and only there handled.
PARTITION_FIELD = "partition"
#: Stream entry field of a moved entry: the id it was published under, which stays its id.
ORIGIN_FIELD = "origin"

#: Hash shared by every namespace on one Redis: ``worker:{namespace}`` and
#: ``broker:{namespace}`` -> until when (ms, Redis clock) a worker / a broker of that
#: namespace counts as present. The one key outside any namespace: through it a broker
#: sees workers that it never will, because they use another namespace (sdk/config.py).
PRESENCE: Final = "cancel-broker:presence"


#: Field prefixes of :attr:`Keys.placements`: ``place:{name}`` -> the event name's placement
#: path; ``broadcast:{name}`` -> ``1`` for a cancel event looked up in every partition.
PLACEMENT_PATH: Final = "place:"
PLACEMENT_BROADCAST: Final = "broadcast:"


def run_config_field(function_id: str, config_hash: str) -> str:
    """The field of :meth:`Keys.run_configs` for one function configuration (``FIELD``
    in lib.lua writes the same)."""
    return f"{function_id}:{config_hash}"


def parse_run_config_field(field: str) -> tuple[str, str]:
    """(function id, config hash) of a :func:`run_config_field` (a function id has no ``:``)."""
    function_id, _, config_hash = field.partition(":")
    return function_id, config_hash


def finished_field(app_id: str, function_id: str, outcome: str) -> str:
    """The field of :attr:`Keys.finished_stats` counting one function's runs that ended so."""
    return f"{app_id}/{function_id}/{outcome}"


def parse_finished_field(field: str) -> tuple[str, str, str]:
    """(app id, function id, outcome) of a :func:`finished_field`: an app id has no ``/``,
    an outcome has none, a function id may."""
    app_id, _, rest = field.partition("/")
    function_id, _, outcome = rest.rpartition("/")
    return app_id, function_id, outcome


def delivery_field(bucket: str) -> str:
    """A field of :attr:`Keys.signal_stats`' delivery-time histogram: bucket ``1`` .. ``n``
    (per bucket, not cumulative), ``inf``, ``count`` or ``sum``."""
    return f"delivery:{bucket}"


def uncancellable_field(app_id: str, function_id: str, event_name: str, path: str) -> str:
    """The field of :attr:`Keys.uncancellable` for one function's rule (without suffix)."""
    return f"{app_id}/{function_id}|{event_name}|{path}"


def presence_field(role: str, namespace: str) -> str:
    """The field of :data:`PRESENCE` for ``role`` (``worker`` or ``broker``) in ``namespace``."""
    return f"{role}:{namespace}"


def parse_presence_field(field: str) -> tuple[str, str]:
    """(role, namespace) of a :func:`presence_field`."""
    role, _, namespace = field.partition(":")
    return role, namespace


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_name(kind: str, value: str) -> str:
    """Validate an id that becomes part of a key (namespace, app id, function id)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    return value


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """Validate a run or event id before it becomes part of a key name."""
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidIdError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', ':' or '-',"
            " starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace (``cancel`` unless configured)."""

    namespace: str = DEFAULT_NAMESPACE
    #: The partition whose run state these keys name (shared keys ignore it).
    partition: int = 0

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        if self.partition < 0:
            raise ValueError(f"invalid partition {self.partition}")

    def in_partition(self, partition: int) -> Keys:
        """The same namespace's keys for another partition."""
        return self if partition == self.partition else Keys(self.namespace, partition)

    @property
    def prefix(self) -> str:
        """What the namespace's shared keys start with: the namespace as a hash tag."""
        return f"{{{self.namespace}}}:"

    @property
    def shard(self) -> str:
        """What this partition's keys start with: the namespace's own tag for partition 0,
        ``{namespace:N}:`` for partition N."""
        if self.partition == 0:
            return self.prefix
        return f"{{{self.namespace}:{self.partition}}}:"

    # -- shared by every partition ------------------------------------------------------

    @property
    def partitions(self) -> str:
        """String: the namespace's number of partitions, stored by the first process."""
        return f"{self.prefix}partitions"

    @property
    def epoch(self) -> str:
        """String: a random id the namespace's first process stores. Every worker and broker
        remembers it; finding it gone (or another) means Redis lost its data (a restart
        without persistence), and they rebuild what they hold instead of giving it up."""
        return f"{self.prefix}epoch"

    @property
    def replicated(self) -> str:
        """String a publisher that waits for replicas writes after its writes, then WAITs
        for: the replicas that have it have everything written before it (sdk/durability.py)."""
        return f"{self.prefix}replicated"

    @property
    def placements(self) -> str:
        """Hash ``place:{name}`` -> the path whose value decides an event's partition (its
        placement path), ``broadcast:{name}`` -> ``1`` for a cancel event looked up in every
        partition (:data:`PLACEMENT_PATH`, :data:`PLACEMENT_BROADCAST`, written by
        ``declare_placements.lua``)."""
        return f"{self.prefix}placements"

    # -- one partition's run state ------------------------------------------------------

    @property
    def events(self) -> str:
        """Stream of published events (triggers and cancel events alike) in this
        partition; partition 0's is also where plain ``XADD`` publishers write."""
        return f"{self.shard}events"

    @property
    def dead_letters(self) -> str:
        """Stream of malformed events, each with the reason it was refused."""
        return f"{self.prefix}events:dead"

    @property
    def run_prefix(self) -> str:
        return f"{self.shard}run:"

    def run(self, run_id: str) -> str:
        """Hash holding one run's state."""
        return self.run_prefix + run_id

    @property
    def active_runs(self) -> str:
        """Sorted set of runs not yet finished, scored by start time (ms)."""
        return f"{self.shard}runs:active"

    @property
    def finished_runs(self) -> str:
        """Sorted set of the most recently finished runs, scored by when each ended (ms);
        capped (``FINISHED_RUNS_KEPT``): what the dashboard lists besides running runs."""
        return f"{self.shard}runs:finished"

    @property
    def cancelling_runs(self) -> str:
        """Sorted set of runs whose cancel signal is not yet acknowledged, by when sent (ms)."""
        return f"{self.shard}runs:cancelling"

    def worker_runs(self, worker_id: str) -> str:
        """Set of the unfinished runs one worker holds (to reap them if the worker dies)."""
        return f"{self.shard}worker-runs:{worker_id}"

    def event_runs(self, event_id: str) -> str:
        """Set of run ids one trigger event started."""
        return f"{self.shard}event-runs:{event_id}"

    def function_runs(self, app_id: str, function_id: str) -> str:
        """Sorted set of one function's unfinished runs, scored by start time (ms)."""
        return f"{self.shard}fn-runs:{app_id}/{function_id}"

    @property
    def pending_cancels(self) -> str:
        """Hash run id -> a cancel by id of a run not registered yet (JSON: reason, actor,
        when, until when), kept for the run to be cancelled when it registers."""
        return f"{self.shard}pending-cancels"

    @property
    def pending_cancel_deadlines(self) -> str:
        """Sorted set of the run ids of :attr:`pending_cancels`, scored by when each stops
        counting (ms): how the broker finds those that expired, and reports them."""
        return f"{self.shard}pending-cancels:until"

    def bulk_cancels(self, function_id: str) -> str:
        """Sorted set of recent bulk cancels of a function (``Client.cancel_many``; JSON),
        scored by when each stops counting (ms): runs of it triggered in the cancel's time
        range that register later are cancelled by it."""
        return f"{self.shard}bulk-cancels:{function_id}"

    def children(self, run_id: str) -> str:
        """Set of the runs started inside this run: cancelling it cancels them too."""
        return f"{self.shard}children:{run_id}"

    def finished(self, run_id: str) -> str:
        """Pub/Sub channel told when the run reaches a terminal status (``Client.wait``)."""
        return f"{self.prefix}finished:{run_id}"

    # -- the cancel index ---------------------------------------------------------------

    def rules(self, event_name: str) -> str:
        """Hash of the selectors declared for this cancel event -> when last declared (ms)."""
        return f"{self.prefix}rules:{event_name}"

    @property
    def expressions(self) -> str:
        """Hash of rule expression id -> its CEL source."""
        return f"{self.prefix}expressions"

    def index(self, event_name: str, selector: str, token: str) -> str:
        """Set of run ids whose rule (event_name, selector) has this value token."""
        return f"{self.shard}idx:{event_name}:{selector}:{token}"

    def tombstone(self, event_name: str, selector: str, token: str) -> str:
        """Sorted set of recent cancel event ids for (event_name, selector, token), scored by
        when each stops counting (ms): runs that register later are cancelled by them."""
        return f"{self.shard}tomb:{event_name}:{selector}:{token}"

    def tombstone_event(self, event_id: str) -> str:
        """A tombstoned cancel event's JSON, for rules whose expression needs its data."""
        return f"{self.shard}tomb-event:{event_id}"

    def early_match(self, event_id: str) -> str:
        """String: the runs an SDK publisher signalled as it published this cancel event
        (JSON; ``publish_event.lua``), for the broker's decision on it, which takes it."""
        return f"{self.shard}early-match:{event_id}"

    @property
    def decisions(self) -> str:
        """Capped list of the brokers' recent cancel decisions (JSON, newest first), one per
        cancel event: what it matched or tombstoned, or why it was dead-lettered. The
        dashboard's record."""
        return f"{self.prefix}decisions"

    @property
    def signal_prefix(self) -> str:
        return f"{self.shard}signals:"

    def signals(self, worker_id: str) -> str:
        """Stream of cancel signals for one worker process."""
        return self.signal_prefix + worker_id

    # -- statistics (the cluster's view, exported by every broker) ----------------------

    @property
    def finished_stats(self) -> str:
        """Hash ``app/function/outcome`` -> runs that finished so (since the namespace began)."""
        return f"{self.shard}stats:runs-finished"

    @property
    def signal_stats(self) -> str:
        """Hash: signals acknowledged, and a histogram of their delivery time (Redis clock)."""
        return f"{self.shard}stats:signals"

    # -- sync and registration state ------------------------------------------------

    @property
    def workers(self) -> str:
        """Sorted set of worker ids, scored by their last heartbeat (ms, Redis time)."""
        return f"{self.prefix}workers"

    def worker(self, worker_id: str) -> str:
        """Hash: one worker's registration (what it serves, its versions, its heartbeat)."""
        return f"{self.prefix}worker:{worker_id}"

    def config(self, config_hash: str) -> str:
        """A function configuration's canonical JSON, addressed by its SHA-256."""
        return f"{self.prefix}config:{config_hash}"

    @property
    def syncs(self) -> str:
        """Stream of sync notices: a worker started and declared its functions."""
        return f"{self.prefix}syncs"

    @property
    def apps(self) -> str:
        """Set of app ids that ever synced."""
        return f"{self.prefix}apps"

    def app_functions(self, app_id: str) -> str:
        """Hash function id -> config hash, as of the app's latest sync."""
        return f"{self.prefix}app:{app_id}:functions"

    def app_history(self, app_id: str) -> str:
        """Stream of an app's syncs that changed something, with what they changed."""
        return f"{self.prefix}app:{app_id}:history"

    def run_configs(self, app_id: str) -> str:
        """Hash ``function_id:config_hash`` -> number of active runs with that config."""
        return f"{self.shard}app:{app_id}:run-configs"

    @property
    def rule_events(self) -> str:
        """Hash event name -> when a rule first listened to it (ms)."""
        return f"{self.prefix}rule-events"

    @property
    def event_last_seen(self) -> str:
        """Hash event name -> when the broker last consumed it (ms), for watched names."""
        return f"{self.prefix}event-last-seen"

    @property
    def orphan_events(self) -> str:
        """Hash cancel-like event name -> how many arrived while no live rule listened."""
        return f"{self.prefix}orphan-events"

    @property
    def uncancellable(self) -> str:
        """Hash of the rules runs were registered under with no value at the rule's path (no
        cancel event can ever match them by it): ``{app}/{function}|{event}|{path}#runs`` ->
        how many, ``...#last`` -> JSON of the latest (when, run id, the trigger's keys
        there, a suggested path)."""
        return f"{self.prefix}uncancellable"

    def rule_functions(self, event_name: str) -> str:
        """Hash ``{selector} {app}/{function}`` -> when last declared (ms): which functions
        declared each selector of a cancel event (what a decision names when a cancel event
        has no value at a selector's path)."""
        return f"{self.prefix}rule-functions:{event_name}"

    @property
    def unserved_events(self) -> str:
        """Hash event name -> how many arrived while no declared function triggered on it
        and no rule listened to it (nothing ran or cancelled because of them)."""
        return f"{self.prefix}unserved-events"

    @staticmethod
    def function_group(app_id: str, function_id: str) -> str:
        """Consumer group through which the workers declaring a function share its triggers."""
        return f"fn:{app_id}/{function_id}"
