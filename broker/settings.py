"""Every option of ``cancel-broker``: flag, environment variable, default and help, once.

The argparse flags, the environment lookup, ``cancel-broker run --help`` and the table in
docs/cli.md are all generated from :class:`Settings`, so they cannot disagree. A value
comes from the flag if one is given, else from its environment variable (an empty
variable counts as unset), else from the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sdk.config import (
    ENV_PREFIX,
    EVICTION_CHECK,
    NAMESPACE,
    ON_EVICTING_REDIS,
    PENDING_CANCEL_LOOKBACK,
    TRIGGER_LOOKBACK,
    WAIT_REPLICAS,
    WAIT_TIMEOUT,
    SharedSetting,
)
from sdk.durations import parse_duration
from sdk.partitions import check_partitions

#: Which commands take a setting: ``connection`` every command, ``broker`` only ``run``,
#: ``detection`` ``run`` and ``sync status``.
Group = Literal["connection", "broker", "detection"]
GROUP_TITLES: Final[dict[Group, str]] = {
    "connection": "Redis and what workers and clients read too (every command)",
    "broker": "broker",
    "detection": "detection of stale configurations",
}


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take."""

    def __init__(self, env: str, raw: str, reason: str) -> None:
        super().__init__(f"{env}={raw!r}: {reason}")
        self.env = env
        self.raw = raw
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Spec:
    """How one setting is given, parsed and documented."""

    name: str
    flag: str
    env: str
    help: str
    group: Group
    parse: Callable[[str], Any]
    #: The default as a user would write it ("30s"), or what happens without a value.
    shown: str
    #: Whether ``shown`` is a value one could type (else it describes the absence of one).
    literal: bool
    choices: tuple[str, ...] = ()
    #: A flag given several times (``--cancel-event A --cancel-event B``), a
    #: comma-separated list in the environment.
    repeatable: bool = False
    metavar: str | None = None


def _setting(
    default: str | None,
    *,
    help: str,
    group: Group = "broker",
    parse: Callable[[str], Any] = str,
    unset: str = "",
    choices: tuple[str, ...] = (),
    flag: str = "",
    env: str = "",
    repeatable: bool = False,
    metavar: str | None = None,
) -> Any:
    """A field of :class:`Settings` whose default is ``parse(default)``: written the way a
    user writes it, and parsed by the same code as a flag or an environment variable."""
    spec = {
        "help": help,
        "group": group,
        "parse": parse,
        "shown": default or unset,
        "literal": bool(default),
        "choices": choices,
        "flag": flag,
        "env": env,
        "repeatable": repeatable,
        "metavar": metavar,
    }
    value = None if default is None else parse(default)
    return field(default=value, metadata={"spec": spec})


def _shared(setting: SharedSetting[Any], *, group: Group) -> Any:
    """A field of :class:`Settings` for a setting the SDK reads too (``sdk/config.py``):
    its variable, default, check and help come from that one definition."""
    return _setting(
        setting.default,
        help=setting.help,
        group=group,
        parse=setting.parse,
        env=setting.env,
        metavar=None if setting.choices else setting.metavar,
        choices=setting.choices,
    )


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (0-65535)")
    return port


def _positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError(f"{number} is not a positive integer")
    return number


def _partitions(text: str) -> int:
    count = check_partitions(text)
    if count is None:
        raise ValueError("give a number of partitions")
    return count


def _duration(text: str) -> float:
    return parse_duration(text)


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The configuration of ``cancel-broker run`` (and the Redis options of every command)."""

    redis_url: str | None = _setting(
        None,
        group="connection",
        unset="run: an embedded Redis; other commands: the one a running `run` advertises,"
        " else redis://localhost:6379/0",
        metavar="URL",
        help="Redis URL (redis://, rediss:// for TLS, redis+cluster://host:port,... for a"
        " Redis Cluster, redis+sentinel://host:port,.../SERVICE for a primary that Redis"
        " Sentinel fails over); without one, `run` starts a private redis-server on a free port,"
        " prints its URL and advertises it while it runs, so that other commands, workers"
        " and clients on this machine given no URL use it too",
    )
    namespace: str = _shared(NAMESPACE, group="connection")
    partitions: int | None = _setting(
        None,
        group="connection",
        parse=_partitions,
        unset="as stored, else 1",
        metavar="N",
        help="partitions of the namespace's run state, each its own Redis Cluster hash slot;"
        " the first process stores the number in Redis and every process must agree (give"
        " workers and clients the same CANCEL_BROKER_PARTITIONS)",
    )
    pending_cancel_lookback: float = _shared(PENDING_CANCEL_LOOKBACK, group="connection")
    wait_replicas: int = _shared(WAIT_REPLICAS, group="connection")
    wait_timeout: float = _shared(WAIT_TIMEOUT, group="connection")
    http_host: str = _setting(
        "127.0.0.1",
        metavar="HOST",
        help="address of /healthz, /readyz, /metrics and the dashboard (0.0.0.0 in a container)",
    )
    http_port: int = _setting(
        "8750",
        parse=_port,
        metavar="PORT",
        help="port of /healthz, /readyz, /metrics and the dashboard; 0 for any free port",
    )
    dashboard: str = _setting(
        "on",
        choices=("on", "readonly", "off"),
        help="the live dashboard at / and its JSON endpoints; readonly: no Cancel button;"
        " on an address other than loopback, Cancel also needs --dashboard-token",
    )
    dashboard_token: str | None = _setting(
        None,
        unset="none",
        metavar="TOKEN",
        help="a secret the dashboard's Cancel must send (X-Cancel-Broker-Token); give it"
        " through the environment, not on a command line others can read",
    )
    consumer: str | None = _setting(
        None,
        unset="host-pid",
        metavar="NAME",
        help="this broker's name in the broker consumer group (its second reader: NAME#1)",
    )
    log_level: str = _setting(
        "info", choices=("debug", "info", "warning", "error"), help="least severe log line kept"
    )
    log_format: str = _setting(
        "auto",
        choices=("auto", "json", "console"),
        help="structlog lines on stderr; auto = console on a terminal, JSON otherwise",
    )
    claim_idle: float = _setting(
        "30s",
        parse=_duration,
        metavar="DURATION",
        help="take over events another broker read and left unacknowledged this long (it died)",
    )
    dead_letter_maxlen: int = _setting(
        "100000",
        parse=_positive_int,
        metavar="N",
        help="dead letters kept (about: trimmed with MAXLEN ~)",
    )
    history_length: int = _setting(
        "100", parse=_positive_int, metavar="N", help="syncs kept in each app's history"
    )
    tombstone_lookback: float = _setting(
        "10m",
        parse=_duration,
        metavar="DURATION",
        help="a cancel event also cancels a matching run that registers up to this long after"
        " it was handled, if the run's trigger is older (it was queued); 0 turns it off",
    )
    trigger_lookback: float = _shared(TRIGGER_LOOKBACK, group="broker")
    on_evicting_redis: str = _shared(ON_EVICTING_REDIS, group="broker")
    eviction_check: float = _shared(EVICTION_CHECK, group="broker")
    dead_rule_window: float = _setting(
        "24h",
        group="detection",
        parse=_duration,
        metavar="DURATION",
        help="a rule whose event has not been published this long is reported dead",
    )
    orphan_window: float = _setting(
        "1h",
        group="detection",
        parse=_duration,
        metavar="DURATION",
        help="how long cancel events nobody listened to stay reported",
    )
    sync_rescan: float = _setting(
        "5s",
        parse=_duration,
        metavar="DURATION",
        help="how often the broker computes the stale findings again (at once when a worker"
        " syncs): how soon a worker gone quiet or a rule gone dead shows",
    )
    cancel_events: tuple[str, ...] = _setting(
        "",
        parse=_names,
        unset="none",
        flag="--cancel-event",
        repeatable=True,
        metavar="NAME",
        help="an event name that means 'cancel' besides those ending in cancelled, canceled"
        " or cancel.requested; repeatable (comma-separated in the environment)",
    )

    @classmethod
    def specs(cls, groups: Iterable[Group] | None = None) -> Iterator[Spec]:
        """The settings in declaration order, only those of ``groups`` if given."""
        wanted = None if groups is None else set(groups)
        for f in dataclasses.fields(cls):
            spec = _spec(f)
            if wanted is None or spec.group in wanted:
                yield spec

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, groups: Iterable[Group]) -> None:
        """One flag per setting of ``groups``; its help names the env var and the default.

        Flags default to None (not given), so :meth:`resolve` can tell a flag from an
        environment variable.
        """
        sections: dict[Group, Any] = {}
        for spec in cls.specs(groups):
            if spec.group not in sections:
                sections[spec.group] = parser.add_argument_group(GROUP_TITLES[spec.group])
            help_text = f"{spec.help} (env {spec.env}; default: {spec.shown})"
            kwargs: dict[str, Any] = {
                "dest": spec.name,
                "default": None,
                "help": help_text.replace("%", "%%"),
                "metavar": spec.metavar,
            }
            if spec.choices:
                kwargs["choices"] = spec.choices
            else:
                kwargs["type"] = _argument_type(spec)
            if spec.repeatable:
                kwargs["action"] = "append"
            sections[spec.group].add_argument(spec.flag, **kwargs)

    @classmethod
    def resolve(
        cls,
        given: argparse.Namespace | Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        groups: Iterable[Group] | None = None,
    ) -> Settings:
        """Flag, else environment variable, else default, for every setting of ``groups``
        (the others keep their defaults, and their variables are not even read)."""
        values = vars(given) if isinstance(given, argparse.Namespace) else dict(given or {})
        env = os.environ if environ is None else environ
        chosen: dict[str, Any] = {}
        for spec in cls.specs(groups):
            flag_value = values.get(spec.name)
            if flag_value is not None:
                if spec.repeatable:
                    # Each repeated flag is parsed like the variable: a tuple of names.
                    flag_value = tuple(item for value in flag_value for item in value)
                chosen[spec.name] = flag_value
                continue
            raw = env.get(spec.env, "")
            if raw.strip():
                chosen[spec.name] = _from_env(spec, raw)
        return cls(**chosen)


def _spec(f: dataclasses.Field[Any]) -> Spec:
    meta = f.metadata["spec"]
    return Spec(
        name=f.name,
        flag=meta["flag"] or "--" + f.name.replace("_", "-"),
        env=meta["env"] or ENV_PREFIX + f.name.upper(),
        help=meta["help"],
        group=meta["group"],
        parse=meta["parse"],
        shown=meta["shown"],
        literal=meta["literal"],
        choices=meta["choices"],
        repeatable=meta["repeatable"],
        metavar=meta["metavar"],
    )


def _argument_type(spec: Spec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    # argparse names the type in "invalid <type> value"; a readable name helps.
    parse.__name__ = getattr(spec.parse, "__name__", "value").lstrip("_")
    return parse


def _from_env(spec: Spec, raw: str) -> Any:
    if spec.choices and raw not in spec.choices:
        raise SettingsError(spec.env, raw, f"must be one of {', '.join(spec.choices)}")
    try:
        return spec.parse(raw)
    except ValueError as exc:
        raise SettingsError(spec.env, raw, str(exc)) from None


def markdown_table(groups: Iterable[Group] | None = None) -> str:
    """The settings as the Markdown table of docs/cli.md (tests keep the two in sync)."""
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for spec in Settings.specs(groups):
        flag = f"`{spec.flag} {spec.metavar}`" if spec.repeatable else f"`{spec.flag}`"
        rows.append(f"| {flag} | `{spec.env}` | {_shown(spec)} | {spec.help} |")
    return "\n".join(rows)


def _shown(spec: Spec) -> str:
    shown = f"`{spec.shown}`" if spec.literal else spec.shown
    others = [f"`{choice}`" for choice in spec.choices if choice != spec.shown]
    return f"{shown} (or {', '.join(others)})" if others else shown
