"""How ``cancel-broker`` prints: rich tables on a terminal, plain text in a pipe, JSON with
``--json``; a progress bar for long operations, on a terminal only.

A pipe gets plain text rather than rich's rendering so that ``grep`` and log collectors see
stable lines without colour codes or box drawing; scripts use ``--json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any

import msgspec
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

STATUS_STYLES = {
    "running": "cyan",
    "cancelling": "yellow",
    "completed": "green",
    "cancelled": "magenta",
    "failed": "red",
    "lost": "red",
}


def is_tty(stream: IO[str]) -> bool:
    """Whether a person reads ``stream``: the one place that decides rich or plain."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def to_jsonable(value: Any) -> Any:
    return msgspec.to_builtins(value)


def text(value: Any) -> str:
    """A field's value as one plain-text cell."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_jsonable(value), separators=(",", ":"))
    return str(value)


class Output:
    """Where and how one command prints its result."""

    def __init__(self, *, as_json: bool = False) -> None:
        self.as_json = as_json
        self.rich = not as_json and is_tty(sys.stdout)

    def console(self) -> Console:
        return Console(file=sys.stdout, highlight=False)

    def json(self, value: Any) -> None:
        print(json.dumps(to_jsonable(value), indent=2))

    def record(self, title: str, rows: Sequence[tuple[str, Any]]) -> None:
        """One record as a two-column table: field, value."""
        if self.rich:
            table = Table(show_header=False)
            table.add_column("field", style="bold")
            table.add_column("value", overflow="fold")
            for name, value in rows:
                table.add_row(name, styled(name, value))
            # A title above the table, not in it: rich wraps a title wider than its table.
            console = self.console()
            console.print(f"[bold]{escape(title)}[/]")
            console.print(table)
            return
        width = max(len(name) for name, _ in rows)
        print("\n".join(f"{name:<{width}}  {text(value)}" for name, value in rows))

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self.rich:
            table = Table()
            for column in columns:
                table.add_column(column)
            for row in rows:
                table.add_row(*(styled(c, v) for c, v in zip(columns, row, strict=True)))
            console = self.console()
            console.print(f"[bold]{escape(title)}[/]")
            console.print(table)
            return
        cells = [list(columns), *[[text(v) for v in row] for row in rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        print(title)
        for row in cells:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def styled(name: str, value: Any) -> str:
    """A cell for rich: statuses in colour; markup in values is escaped."""
    cell = escape(text(value))
    style = STATUS_STYLES.get(str(value)) if name in {"status", "previous_status"} else None
    return f"[{style}]{cell}[/]" if style else cell


class Ticker:
    """What ``progress(done, total)`` callbacks drive: a bar on a terminal, else nothing."""

    def __init__(self, progress: Progress | None, description: str) -> None:
        self._progress = progress
        self._task = None if progress is None else progress.add_task(description, total=None)

    def __call__(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)


@contextmanager
def progress_bar(description: str) -> Iterator[Ticker]:
    """A progress bar on stderr while the block runs, if stderr is a terminal.

    On stderr so that stdout (the result, maybe ``--json``) stays clean.
    """
    if not is_tty(sys.stderr):
        yield Ticker(None, description)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    with bar:
        yield Ticker(bar, description)
