"""Settings the SDK and the broker both read: each defined once, here.

A worker, a client and a broker meet in Redis only if they agree on where to meet (the
namespace) and on how far back each looks for what was published before it started (the
lookbacks). Each such setting is defined once, with its environment variable, its
default and its check: the SDK's constructors read it when no argument is given, and
``broker/settings.py`` builds the ``cancel-broker`` flag from the same definition, so no
process reads a variable differently from another. (The Redis URL and the number of
partitions are shared too; they live with what they configure: ``sdk.connection`` and
``sdk.partitions``.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Generic, TypeVar

from sdk.durations import parse_duration
from sdk.errors import ConfigurationError
from sdk.keys import DEFAULT_NAMESPACE, check_name

T = TypeVar("T")

#: What every variable of cancel-broker starts with.
ENV_PREFIX: Final = "CANCEL_BROKER_"


@dataclass(frozen=True, slots=True)
class SharedSetting(Generic[T]):
    """One setting read the same way by every process."""

    #: The setting's name; the broker's flag is ``--`` and this, dashed.
    name: str
    #: The default, as a user would write it (``"10m"``).
    default: str
    parse: Callable[[str], T]
    help: str
    metavar: str
    #: The only values it takes, if it is a choice.
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def resolve(self, value: str | T | None = None, environ: Mapping[str, str] | None = None) -> T:
        """``value`` if given (text is parsed), else the environment's, else the default.

        An empty variable counts as unset. Raises :class:`~sdk.errors.ConfigurationError`
        naming the variable when its value cannot be used.
        """
        if value is not None and not isinstance(value, str):
            return value
        if isinstance(value, str):
            return self._parse(value, f"{self.name}={value!r}")
        raw = (os.environ if environ is None else environ).get(self.env, "")
        if raw.strip():
            return self._parse(raw, f"{self.env}={raw!r}")
        return self.parse(self.default)

    def _parse(self, text: str, source: str) -> T:
        try:
            return self.parse(text)
        except ValueError as exc:
            raise ConfigurationError(f"{source}: {exc}") from None


def _namespace(text: str) -> str:
    return check_name("namespace", text.strip())


def _seconds(text: str) -> float:
    return parse_duration(text)


NAMESPACE: Final = SharedSetting(
    "namespace",
    DEFAULT_NAMESPACE,
    _namespace,
    help="prefix of every key; workers, clients and brokers must use the same one",
    metavar="PREFIX",
)
TRIGGER_LOOKBACK: Final = SharedSetting(
    "trigger_lookback",
    "10m",
    _seconds,
    help="a function's first worker also runs the triggers published for it up to this long"
    " before it started (the events stream keeps that long of events); 0: only later ones",
    metavar="DURATION",
)
PENDING_CANCEL_LOOKBACK: Final = SharedSetting(
    "pending_cancel_lookback",
    "10m",
    _seconds,
    help="a cancel by run id of a run that has not registered yet (or a cancel-many's cancel"
    " of runs not registered yet) is kept this long, and cancels the run when it registers;"
    " 0 keeps none (the cancel answers not_found)",
    metavar="DURATION",
)


def _on_evicting(text: str) -> str:
    value = text.strip()
    if value not in ("refuse", "warn"):
        raise ValueError(f"must be refuse or warn, not {value!r}")
    return value


ON_EVICTING_REDIS: Final = SharedSetting(
    "on_evicting_redis",
    "refuse",
    _on_evicting,
    help="what a worker or broker does when it starts on a Redis that evicts keys when full"
    " (maxmemory-policy other than noeviction): refuse to start, or warn and run degraded",
    metavar="refuse|warn",
    choices=("refuse", "warn"),
)


def _positive_seconds(text: str) -> float:
    value = parse_duration(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"must be a positive duration, not {text}")
    return value


EVICTION_CHECK: Final = SharedSetting(
    "eviction_check",
    "5s",
    _positive_seconds,
    help="how often a running worker or broker reads the Redis's maxmemory-policy again"
    " (a CONFIG SET or a failover to a replica configured otherwise can change it)",
    metavar="DURATION",
)


def _replicas(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return value


#: The longest a publisher waits for its replicas: below the 5 s reply timeout of its
#: connection, so that a slow replica is reported as such, not as a dead connection.
MAX_WAIT_TIMEOUT_S: Final = 4.0


def _wait_timeout(text: str | float | timedelta) -> float:
    value = parse_duration(text)
    if not 0 < value <= MAX_WAIT_TIMEOUT_S:
        raise ValueError(f"must be more than 0 and at most {MAX_WAIT_TIMEOUT_S:g}s, not {text}")
    return value


WAIT_REPLICAS: Final = SharedSetting(
    "wait_replicas",
    "0",
    _replicas,
    help="publishers (Client.send, cancel, cancel-many, the dashboard's Cancel) wait until"
    " this many replicas have each write (Redis WAIT) and report one that fewer acknowledged;"
    " 0: the primary's acknowledgement is enough",
    metavar="N",
)
WAIT_TIMEOUT: Final = SharedSetting(
    "wait_timeout",
    "1s",
    _wait_timeout,
    help="how long a publisher waits for its replicas (--wait-replicas), at most 4s",
    metavar="DURATION",
)


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be on or off (1/0, true/false), not {text!r}")


MATCH_ON_PUBLISH: Final = SharedSetting(
    "match_on_publish",
    "on",
    _flag,
    help="Client.send matches a cancel event in the script that publishes it, so that its runs"
    " are signalled without waiting for the broker (sdk/early_match.py); off for a client whose"
    " Redis user may only publish (docs/security.md), which Redis would refuse once",
    metavar="on|off",
)


def resolve_namespace(namespace: str | None) -> str:
    """The namespace to use: ``namespace``, else ``CANCEL_BROKER_NAMESPACE``, else ``cancel``."""
    return NAMESPACE.resolve(namespace)


def resolve_lookback(
    setting: SharedSetting[float], value: float | timedelta | str | None
) -> timedelta:
    """A lookback as a timedelta: ``value`` (seconds, a timedelta or ``"10m"``), else the
    setting's variable, else its default."""
    if value is None:
        return timedelta(seconds=setting.resolve())
    try:
        return timedelta(seconds=parse_duration(value))
    except ValueError as exc:
        raise ConfigurationError(f"{setting.name}={value!r}: {exc}") from None


def resolve_wait(
    replicas: int | None, timeout: float | timedelta | str | None
) -> tuple[int, float]:
    """How many replicas a publisher waits for, and how long (seconds): the arguments,
    else ``CANCEL_BROKER_WAIT_REPLICAS`` and ``CANCEL_BROKER_WAIT_TIMEOUT``, else 0 and 1 s."""
    wanted = WAIT_REPLICAS.resolve(None if replicas is None else str(replicas))
    if timeout is None or isinstance(timeout, str):
        return wanted, WAIT_TIMEOUT.resolve(timeout)
    try:
        return wanted, _wait_timeout(timeout)
    except ValueError as exc:
        raise ConfigurationError(f"{WAIT_TIMEOUT.name}={timeout!r}: {exc}") from None
