"""A declared function: its trigger, its cancel rules and its body."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sdk.context import Handler, RunContext
from sdk.errors import ConfigurationError, InvalidEventError
from sdk.keys import check_name
from sdk.rules import CancelOn, check_rules
from sdk.wire import check_event_name


@dataclass(frozen=True, slots=True)
class Function:
    """What ``@worker.function(...)`` returns; calling it calls the body."""

    id: str
    trigger: str
    cancel_on: tuple[CancelOn, ...]
    handler: Handler

    @classmethod
    def declare(
        cls, *, id: str, trigger: str, cancel_on: Iterable[CancelOn], handler: Handler
    ) -> Function:
        try:
            check_name("function id", id)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        try:
            check_event_name(trigger)
        except InvalidEventError as exc:
            raise ConfigurationError(f"function {id!r}: trigger {exc.detail}") from None
        if not inspect.iscoroutinefunction(handler):
            raise ConfigurationError(f"function {id!r}: the body must be an `async def`")
        return cls(id=id, trigger=trigger, cancel_on=check_rules(tuple(cancel_on)), handler=handler)

    async def __call__(self, ctx: RunContext) -> Any:
        return await self.handler(ctx)
