"""``cancel-broker sync status``: the sync state as text for a pipe, or tables for a terminal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.findings import COMPARED_FIELDS, SyncState


def _ago(now: int, then: int | None) -> str:
    if not then:
        return "never"
    seconds = max(0, (now - then) / 1000)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _changes(changes: dict[str, Any]) -> list[str]:
    lines = [f"+ rule {rule}" for rule in changes.get("rules_added", [])]
    lines += [f"- rule {rule}" for rule in changes.get("rules_removed", [])]
    lines += [
        f"~ {field}: {changes[field][0]!r} -> {changes[field][1]!r}"
        for field in COMPARED_FIELDS
        if field in changes
    ]
    return lines or ["(same rules)"]


def format_status(state: SyncState, namespace: str) -> str:
    now = state.generated_at
    at = datetime.fromtimestamp(now / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [f"cancel-broker sync status: namespace {namespace!r}, {at}", ""]

    out.append(f"WORKERS ({len(state.workers)} live)")
    for w in state.workers:
        version = f"app {w.app_version}" if w.app_version else "no app_version"
        out.append(
            f"  {w.app_id:<16} {w.worker_id:<32} {version}, sdk {w.sdk_version},"
            f" {w.host} pid {w.pid}, heartbeat {_ago(now, w.heartbeat_at)}"
        )
    if not state.workers:
        out.append("  (none)")

    out += ["", "FUNCTIONS"]
    for f in state.functions:
        served = ", ".join(f"{h[:12]} on {len(ws)} worker(s)" for h, ws in f.served.items())
        runs = sum(f.active_runs.values())
        out.append(
            f"  {f.app_id + '/' + f.function_id:<40} {served or 'served by no live worker'};"
            f" {runs} active run(s)"
        )
    if not state.functions:
        out.append("  (none)")

    out.append("")
    if not state.findings:
        out.append("OK: no stale configuration")
        return "\n".join(out)
    out.append(f"STALE ({len(state.findings)} finding(s))")
    for finding in state.findings:
        out.append(f"  {finding.kind:<20} {finding.message}")
        for config, changes in finding.details.get("differences", {}).items():
            base = finding.details.get("compared_with") or finding.details.get("config_hash")
            out.append(f"  {'':<20}   {config[:12]} vs {str(base)[:12]}:")
            out += [f"  {'':<20}     {line}" for line in _changes(changes)]
    return "\n".join(out)


def print_status_rich(state: SyncState, namespace: str, console: Console) -> None:
    """The same state as :func:`format_status`, as tables for a terminal."""
    now = state.generated_at
    at = datetime.fromtimestamp(now / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    console.print(f"[bold]cancel-broker sync status[/]: namespace {escape(repr(namespace))}, {at}")

    workers = Table(title=f"Workers ({len(state.workers)} live)", title_justify="left")
    for column in ("app", "worker", "app version", "sdk", "host", "pid", "heartbeat"):
        workers.add_column(column)
    for w in state.workers:
        workers.add_row(
            *map(
                escape,
                (
                    w.app_id,
                    w.worker_id,
                    w.app_version or "-",
                    w.sdk_version,
                    w.host,
                    str(w.pid),
                    _ago(now, w.heartbeat_at),
                ),
            )
        )
    console.print(workers)

    functions = Table(title="Functions", title_justify="left")
    for column in ("function", "configurations served", "active runs"):
        functions.add_column(column)
    for f in state.functions:
        served = ", ".join(f"{h[:12]} on {len(ws)} worker(s)" for h, ws in f.served.items())
        functions.add_row(
            escape(f"{f.app_id}/{f.function_id}"),
            escape(served) if served else "[red]served by no live worker[/]",
            str(sum(f.active_runs.values())),
        )
    console.print(functions)

    if not state.findings:
        console.print("[green]OK: no stale configuration[/]")
        return
    findings = Table(
        title=f"[red]STALE ({len(state.findings)} finding(s))[/]", title_justify="left"
    )
    findings.add_column("kind", style="red")
    findings.add_column("finding", overflow="fold")
    for finding in state.findings:
        lines = [finding.message]
        for config, changes in finding.details.get("differences", {}).items():
            base = finding.details.get("compared_with") or finding.details.get("config_hash")
            lines.append(f"  {config[:12]} vs {str(base)[:12]}:")
            lines += [f"    {line}" for line in _changes(changes)]
        findings.add_row(finding.kind, escape("\n".join(lines)))
    console.print(findings)
