"""cancel-broker SDK: run functions that stop the moment a matching cancel event arrives.

from sdk import Worker, Client, CancelOn, RunContext
"""

from sdk.client import Client
from sdk.context import RunContext
from sdk.errors import (
    CancelBrokerError,
    ConfigurationError,
    DuplicateRunError,
    InvalidEventError,
    InvalidIdError,
    RunCancelled,
    UnknownFunctionError,
    WorkerNotStartedError,
)
from sdk.function import Function
from sdk.rules import CancelOn
from sdk.version import __version__
from sdk.wire import CancelResult, Event, RunInfo, RunStatus
from sdk.worker import Worker

__all__ = [
    "CancelBrokerError",
    "CancelOn",
    "CancelResult",
    "Client",
    "ConfigurationError",
    "DuplicateRunError",
    "Event",
    "Function",
    "InvalidEventError",
    "InvalidIdError",
    "RunCancelled",
    "RunContext",
    "RunInfo",
    "RunStatus",
    "UnknownFunctionError",
    "Worker",
    "WorkerNotStartedError",
    "__version__",
]
