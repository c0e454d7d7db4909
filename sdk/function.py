"""A declared function: its trigger, its cancel rules and its body."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, overload

from sdk.context import CANCEL_MODES, CancelMode, FunctionBody, RunContext, is_async_callable
from sdk.durations import parse_duration
from sdk.errors import ConfigurationError, InvalidEventError
from sdk.expressions import Expression, ExpressionError, compile_trigger_filter
from sdk.keys import check_name
from sdk.rules import CancelOn, Path, check_rules
from sdk.wire import FunctionConfig, RuleConfig, check_event_name, config_hash, encode_json


def canonical_config(
    id: str,
    trigger: str,
    rules: tuple[CancelOn, ...],
    cancel_mode: CancelMode = "immediate",
    *,
    owner: str | None = None,
    interrupt_after_s: float | None = None,
    trigger_if: str | None = None,
) -> FunctionConfig:
    """The configuration as data; rule order does not change what a function does."""
    configs = (
        RuleConfig(
            event=rule.event,
            match=rule.match,
            if_=rule.if_,
            timeout_s=rule.timeout_s,
            all_runs=rule.all_runs,
            until_ms=rule.until_ms,
        )
        for rule in rules
    )
    return FunctionConfig(
        id=id,
        trigger=trigger,
        cancel_on=tuple(sorted(configs, key=encode_json)),
        cancel_mode=cancel_mode,
        owner=owner,
        interrupt_after_s=interrupt_after_s,
        trigger_if=trigger_if,
    )


def check_interrupt_after(
    id: str, cancel_mode: CancelMode, interrupt_after: float | timedelta | str | None
) -> float | None:
    """``interrupt_after`` in seconds: positive, and only for ``between_steps`` runs."""
    if interrupt_after is None:
        return None
    if cancel_mode != "between_steps":
        raise ConfigurationError(
            f"function {id!r}: interrupt_after applies to cancel_mode='between_steps' only"
            " (an immediate run is interrupted at once)"
        )
    try:
        seconds = parse_duration(interrupt_after)
    except ValueError as exc:
        raise ConfigurationError(f"function {id!r}: interrupt_after: {exc}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(
            f"function {id!r}: interrupt_after must be a positive duration, not {interrupt_after!r}"
        )
    return seconds


async def _held_by_its_caller(ctx: RunContext) -> None:
    raise RuntimeError(
        f"function {ctx.function_id!r} has no body: its runs are held by their caller"
        " (BlockingWorker.run, worker.run), never started by a trigger"
    )


OnCancelHook = Callable[[RunContext, str], Awaitable[None]]
#: Seconds an ``on_cancel`` hook gets unless ``@fn.on_cancel(timeout=...)`` says otherwise.
DEFAULT_ON_CANCEL_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True)
class OnCancel:
    """A function's cleanup after a cancelled run, and how long it may take."""

    hook: OnCancelHook
    timeout: float


@dataclass(slots=True)
class _Hooks:
    # Hooks are attached after the function is declared (``@fn.on_cancel``); a mutable
    # holder keeps the rest of the declaration (and its config hash) frozen.
    on_cancel: OnCancel | None = None


@dataclass(frozen=True, slots=True)
class Function:
    """What ``@worker.function(...)`` returns; calling it calls the body."""

    id: str
    trigger: str
    cancel_on: tuple[CancelOn, ...]
    handler: FunctionBody
    cancel_mode: CancelMode
    #: Path in the trigger naming who owns a run: a cancel by run id must come from them.
    owner: str | None
    #: Seconds after its cancel that a between_steps run is interrupted where it is.
    interrupt_after: float | None
    #: The condition a trigger must meet to start a run (``trigger_if``), compiled.
    trigger_filter: Expression | None
    #: The canonical configuration, and its SHA-256: what syncs and every run carry.
    config: FunctionConfig
    config_hash: str
    #: Declared without a body (``worker.declare``): its runs are held by their caller
    #: (``BlockingWorker.run``, ``worker.run``); no trigger event starts one.
    held: bool = False
    _hooks: _Hooks = field(default_factory=_Hooks, init=False, repr=False, compare=False)

    @classmethod
    def declare(
        cls,
        *,
        id: str,
        trigger: str,
        cancel_on: Iterable[CancelOn],
        handler: FunctionBody | None,
        cancel_mode: CancelMode = "immediate",
        owner: str | None = None,
        interrupt_after: float | timedelta | str | None = None,
        trigger_if: str | None = None,
    ) -> Function:
        try:
            check_name("function id", id)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        try:
            check_event_name(trigger)
        except InvalidEventError as exc:
            raise ConfigurationError(f"function {id!r}: trigger {exc.detail}") from None
        if handler is not None and not inspect.iscoroutinefunction(handler):
            raise ConfigurationError(f"function {id!r}: the body must be an `async def`")
        if cancel_mode not in CANCEL_MODES:
            raise ConfigurationError(
                f"function {id!r}: cancel_mode must be one of"
                f" {', '.join(map(repr, CANCEL_MODES))}, not {cancel_mode!r}"
            )
        interrupt_after_s = check_interrupt_after(id, cancel_mode, interrupt_after)
        try:
            trigger_filter = None if trigger_if is None else compile_trigger_filter(trigger_if)
        except ExpressionError as exc:
            raise ExpressionError(f"function {id!r}: trigger_if: {exc}") from None
        rules = check_rules(tuple(cancel_on))
        if owner is not None:
            owner = Path.parse(owner).text
        config = canonical_config(
            id,
            trigger,
            rules,
            cancel_mode,
            owner=owner,
            interrupt_after_s=interrupt_after_s,
            trigger_if=trigger_if,
        )
        return cls(
            id=id,
            trigger=trigger,
            cancel_on=rules,
            handler=_held_by_its_caller if handler is None else handler,
            held=handler is None,
            cancel_mode=cancel_mode,
            owner=owner,
            interrupt_after=interrupt_after_s,
            trigger_filter=trigger_filter,
            config=config,
            config_hash=config_hash(config),
        )

    async def __call__(self, ctx: RunContext) -> Any:
        return await self.handler(ctx)

    @property
    def cancel_hook(self) -> OnCancel | None:
        """The ``on_cancel`` hook, if one is attached."""
        return self._hooks.on_cancel

    @overload
    def on_cancel(self, hook: OnCancelHook, /) -> OnCancelHook: ...

    @overload
    def on_cancel(
        self, hook: None = None, /, *, timeout: float = DEFAULT_ON_CANCEL_TIMEOUT
    ) -> Callable[[OnCancelHook], OnCancelHook]: ...

    def on_cancel(
        self, hook: OnCancelHook | None = None, /, *, timeout: float = DEFAULT_ON_CANCEL_TIMEOUT
    ) -> OnCancelHook | Callable[[OnCancelHook], OnCancelHook]:
        """Attach ``async def cleanup(ctx, reason)``, run after a cancelled run's body stopped.

        ``@fn.on_cancel`` or ``@fn.on_cancel(timeout=10)``. The hook runs shielded from
        cancellation, for at most ``timeout`` seconds; its failure is recorded in the
        run's ``on_cancel_error`` and never changes the outcome from ``cancelled``.
        """
        if isinstance(timeout, bool) or not (
            isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0
        ):
            raise ConfigurationError(
                f"function {self.id!r}: on_cancel timeout must be a positive number of"
                f" seconds, not {timeout!r}"
            )

        def attach(hook: OnCancelHook) -> OnCancelHook:
            if not is_async_callable(hook):
                raise ConfigurationError(
                    f"function {self.id!r}: the on_cancel hook must be an `async def`"
                )
            if self._hooks.on_cancel is not None:
                raise ConfigurationError(f"function {self.id!r} already has an on_cancel hook")
            self._hooks.on_cancel = OnCancel(hook, float(timeout))
            return hook

        return attach if hook is None else attach(hook)
