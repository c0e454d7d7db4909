"""cancel-broker SDK: run functions that stop the moment a matching cancel event arrives.

from sdk import Worker, Client, CancelOn, RunContext
"""

from sdk.blocking import BlockingRun, BlockingWorker
from sdk.client import OPERATOR, Client
from sdk.context import RunContext
from sdk.errors import (
    CancelBrokerError,
    ConfigurationError,
    DuplicateRunError,
    InvalidBulkCancelError,
    InvalidEventError,
    InvalidIdError,
    InvalidRedisUrlError,
    NotPicklableError,
    NotReplicatedError,
    PartitionCountError,
    ProcessStepCrashed,
    ProcessStepError,
    RedisUnavailableError,
    RunCancelled,
    RunNotFinishedError,
    ThreadCancelled,
    UnknownFunctionError,
    WorkerNotStartedError,
)
from sdk.expressions import ExpressionError
from sdk.function import Function
from sdk.rules import CancelOn
from sdk.sync_client import SyncClient
from sdk.version import __version__
from sdk.wire import (
    RUN_CANCELLED_EVENT,
    BulkCancelResult,
    CancelResult,
    Event,
    RunInfo,
    RunStatus,
)
from sdk.worker import Worker

__all__ = [
    "OPERATOR",
    "RUN_CANCELLED_EVENT",
    "BlockingRun",
    "BlockingWorker",
    "BulkCancelResult",
    "CancelBrokerError",
    "CancelOn",
    "CancelResult",
    "Client",
    "ConfigurationError",
    "DuplicateRunError",
    "Event",
    "ExpressionError",
    "Function",
    "InvalidBulkCancelError",
    "InvalidEventError",
    "InvalidIdError",
    "InvalidRedisUrlError",
    "NotPicklableError",
    "NotReplicatedError",
    "PartitionCountError",
    "ProcessStepCrashed",
    "ProcessStepError",
    "RedisUnavailableError",
    "RunCancelled",
    "RunContext",
    "RunInfo",
    "RunNotFinishedError",
    "RunStatus",
    "SyncClient",
    "ThreadCancelled",
    "UnknownFunctionError",
    "Worker",
    "WorkerNotStartedError",
    "__version__",
]
