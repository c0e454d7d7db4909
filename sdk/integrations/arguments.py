"""A job's arguments as its run's trigger data, for the job queue integrations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Builds the trigger's ``data`` from a job's arguments (``event_data=`` of the integrations).
EventData = Callable[..., dict[str, Any]]


def keyword_data(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The default trigger data: the job's keyword arguments, and its positional ones as
    ``args`` (rules match paths like ``data.report_id``)."""
    return {**kwargs, "args": list(args)} if args else dict(kwargs)
