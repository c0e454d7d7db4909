"""What ``cancel-broker`` says when a command fails: one line with what went wrong and how
to fix it, instead of a traceback (``--debug`` shows the traceback too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from redis.exceptions import AuthenticationError, NoPermissionError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.embedded import EmbeddedRedisError
from broker.http import HttpBindError
from broker.settings import SettingsError
from sdk.config import ENV_PREFIX
from sdk.connection import REDIS_URL_ENV
from sdk.errors import (
    CancelBrokerError,
    ConfigurationError,
    InvalidEventError,
    InvalidIdError,
    NotReplicatedError,
    PartitionCountError,
    RedisUnavailableError,
    RunNotFinishedError,
    UnknownFunctionError,
)
from sdk.redis_health import EvictingRedisError
from sdk.urls import redact_url

#: The exit code of an error the command reports (bad input, configuration, Redis).
EXIT_ERROR: Final = 2
#: The exit code of an error nobody anticipated: a bug to report.
EXIT_INTERNAL: Final = 70


class UsageError(ValueError):
    """An argument that parses but cannot be used (data that is not JSON, ...)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Diagnosis:
    message: str
    hint: str
    exit_code: int = EXIT_ERROR

    def line(self) -> str:
        return f"cancel-broker: error: {self.message} (hint: {self.hint})"


def leaf(exc: BaseException) -> BaseException:
    """The one error inside task-group wrappers (anyio wraps whatever a task raises)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def diagnose(exc: BaseException, redis_url: str | None) -> Diagnosis:
    """The line to print for ``exc``; ``redis_url`` is the URL the command used, if any."""
    exc = leaf(exc)
    if isinstance(exc, RedisUnavailableError) and exc.__cause__ is not None:
        exc = exc.__cause__  # the CLI's own hints name its flags (--redis-url)
    message = _one_line(exc)
    where = f" at {redact_url(redis_url)}" if redis_url else ""
    set_url = f"pass --redis-url or set {REDIS_URL_ENV}"
    # Order matters: AuthenticationError is a ConnectionError, UsageError a ValueError.
    if isinstance(exc, UsageError):
        return Diagnosis(message, exc.hint)
    if isinstance(exc, SettingsError):
        return Diagnosis(
            message, f"fix or unset {exc.env}; `cancel-broker run --help` lists every setting"
        )
    if isinstance(exc, AuthenticationError):
        return Diagnosis(
            f"Redis{where} refused the credentials: {message}",
            "put the user and password in the URL: redis://USER:PASSWORD@HOST:PORT/0",
        )
    if isinstance(exc, NoPermissionError):
        return Diagnosis(
            f"the Redis user lacks a permission{where}: {message}",
            "grant the ACL rules of this role in docs/security.md",
        )
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError)):
        return Diagnosis(
            f"cannot reach Redis{where}: {message}",
            f"is Redis running there? {set_url}, or start `cancel-broker run` (`make run`)"
            " with no URL: commands on this machine then find its embedded Redis",
        )
    if isinstance(exc, RedisError):
        return Diagnosis(f"Redis{where} answered: {message}", "check the Redis server's log")
    if isinstance(exc, ValueError) and "Redis URL" in message:
        return Diagnosis(message, "a Redis URL looks like redis://HOST:6379/0 (rediss:// for TLS)")
    if isinstance(exc, RunNotFinishedError):
        return Diagnosis(
            message, "wait longer with --timeout, or see where it is with `cancel-broker get-run`"
        )
    if isinstance(exc, UnknownFunctionError):
        return Diagnosis(
            message,
            "a function is known once a worker that declares it has started; `cancel-broker"
            " sync status` lists them",
        )
    if isinstance(exc, InvalidIdError):
        return Diagnosis(message, "copy the id as printed by `send`, `get-run` or the logs")
    if isinstance(exc, InvalidEventError):
        return Diagnosis(message, "see docs/protocol.md for what an event may contain")
    if isinstance(exc, PartitionCountError):
        return Diagnosis(message, "docs/scaling.md#partitions says how partitions are set")
    if isinstance(exc, EvictingRedisError):
        return Diagnosis(
            message, "docs/deploy.md#redis says which Redis settings cancel-broker needs"
        )
    if isinstance(exc, NotReplicatedError):
        return Diagnosis(
            f"{message} (the primary applied it: {exc.result!r})",
            "look at the replicas (INFO replication, docs/operations.md#a-failover-to-a-replica-"
            "that-lagged); running the command again is safe",
        )
    if isinstance(exc, ConfigurationError) and message.startswith("wait_replicas"):
        return Diagnosis(message, "unset --wait-replicas (CANCEL_BROKER_WAIT_REPLICAS)")
    if isinstance(exc, ConfigurationError) and message.startswith(ENV_PREFIX):
        variable = message.partition("=")[0]
        return Diagnosis(message, f"fix or unset {variable}")
    if isinstance(exc, ConfigurationError):
        return Diagnosis(
            message, "--if takes a CEL expression over event, e.g. 'event.data.tier == \"free\"'"
        )
    if isinstance(exc, EmbeddedRedisError):
        return Diagnosis(
            message,
            f"install redis-server or `pip install 'cancel-broker[embedded]'`, or {set_url}",
        )
    if isinstance(exc, HttpBindError):
        return Diagnosis(
            message,
            "another process uses that port: choose one with --http-port"
            " (CANCEL_BROKER_HTTP_PORT), or 0 for any free port",
        )
    if isinstance(exc, (CancelBrokerError, ValueError)):
        return Diagnosis(message, "`cancel-broker COMMAND --help` shows the accepted arguments")
    return Diagnosis(
        f"unexpected {type(exc).__name__}: {message}",
        "run again with --debug for the traceback, and report it",
        EXIT_INTERNAL,
    )
