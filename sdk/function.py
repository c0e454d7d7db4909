"""A declared function: its trigger, its cancel rules and its body."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sdk.context import CANCEL_MODES, CancelMode, Handler, RunContext
from sdk.durations import parse_duration
from sdk.errors import ConfigurationError, InvalidEventError
from sdk.keys import check_name
from sdk.rules import CancelOn, check_rules
from sdk.wire import FunctionConfig, RuleConfig, check_event_name, config_hash, encode_json


def canonical_config(
    id: str, trigger: str, rules: tuple[CancelOn, ...], cancel_mode: CancelMode = "immediate"
) -> FunctionConfig:
    """The configuration as data; rule order does not change what a function does."""
    configs = (
        RuleConfig(
            event=rule.event,
            match=rule.match,
            if_=rule.if_,
            timeout_s=None if rule.timeout is None else parse_duration(rule.timeout),
            all_runs=rule.all_runs,
        )
        for rule in rules
    )
    return FunctionConfig(
        id=id,
        trigger=trigger,
        cancel_on=tuple(sorted(configs, key=encode_json)),
        cancel_mode=cancel_mode,
    )


@dataclass(frozen=True, slots=True)
class Function:
    """What ``@worker.function(...)`` returns; calling it calls the body."""

    id: str
    trigger: str
    cancel_on: tuple[CancelOn, ...]
    handler: Handler
    cancel_mode: CancelMode
    #: The canonical configuration, and its SHA-256: what syncs and every run carry.
    config: FunctionConfig
    config_hash: str

    @classmethod
    def declare(
        cls,
        *,
        id: str,
        trigger: str,
        cancel_on: Iterable[CancelOn],
        handler: Handler,
        cancel_mode: CancelMode = "immediate",
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
        if cancel_mode not in CANCEL_MODES:
            raise ConfigurationError(
                f"function {id!r}: cancel_mode must be one of"
                f" {', '.join(map(repr, CANCEL_MODES))}, not {cancel_mode!r}"
            )
        rules = check_rules(tuple(cancel_on))
        config = canonical_config(id, trigger, rules, cancel_mode)
        return cls(
            id=id,
            trigger=trigger,
            cancel_on=rules,
            handler=handler,
            cancel_mode=cancel_mode,
            config=config,
            config_hash=config_hash(config),
        )

    async def __call__(self, ctx: RunContext) -> Any:
        return await self.handler(ctx)
