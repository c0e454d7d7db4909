"""`cancel-broker` as a person and a script use it: --help with examples that parse, tables
with rich on a terminal (a real pseudo-terminal) and plain text or --json otherwise, a
progress bar for cancel-many on a terminal only, and errors as one line with a hint (the
traceback only with --debug)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pty
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta

import anyio
import pytest
import structlog

import broker.cli
from broker import EmbeddedRedis
from broker.cli import EXAMPLES, build_parser, main
from broker.cli_errors import EXIT_ERROR, EXIT_INTERNAL
from sdk import Client
from sdk.connection import REDIS_URL_ENV, command_client
from sdk.keys import Keys
from tests.benchmarks.registered import register_runs, run_id
from tests.processes import ROOT

#: Commands that print a table or a record, and so must take --json.
TABLE_COMMANDS = {"sync status", "cancel", "cancel-many", "wait", "get-run", "runs", "dead-letters"}


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() configures structlog for the whole process, caching loggers: in this process
    that would outlive the test. The same levels without the cache, undone afterwards
    (subprocess tests check the real set-up)."""
    saved = structlog.get_config()

    def configure(level: str = "info", fmt: str = "auto") -> None:
        structlog.configure(
            processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelNamesMapping()[level.upper()]
            ),
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            cache_logger_on_first_use=False,
        )

    monkeypatch.setattr(broker.cli, "configure_logging", configure)
    yield
    structlog.configure(**saved)


def register(redis_url: str, namespace: str, n: int) -> list[str]:
    """``n`` running runs of reports/generate-report whose worker never answers."""

    async def go() -> None:
        redis = command_client(redis_url)
        try:
            await register_runs(redis, Keys(namespace), n)
        finally:
            await redis.aclose()

    anyio.run(go)
    return [run_id(i) for i in range(n)]


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    def walk(
        parser: argparse.ArgumentParser, prefix: str
    ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    full = f"{prefix} {name}".strip()
                    if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                        yield from walk(sub, full)
                    else:
                        yield full, sub

    yield from walk(build_parser(), "")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def in_terminal(*args: str) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; everything it wrote."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "TERM": "xterm"},
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
    )
    os.close(secondary)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(primary, 65536):
            chunks.append(chunk)
    os.close(primary)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


# -- help --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_help_shows_examples_that_parse(name: str) -> None:
    parser = dict(commands())[name]
    text = parser.format_help()
    assert "examples:" in text
    assert "--debug" in text
    examples = [line.strip() for line in EXAMPLES[name].splitlines() if line.strip()]
    assert examples
    for example in examples:
        words = shlex.split(example, comments=True)
        while "=" in words[0]:  # VAR=value before the command
            words.pop(0)
        words = words[: words.index("|")] if "|" in words else words
        assert words[0] == "cancel-broker", example
        args = build_parser().parse_args(words[1:])
        assert " ".join([args.command, getattr(args, "sync_command", "")]).strip() == name


def test_every_command_has_help_with_examples() -> None:
    assert {name for name, _ in commands()} == set(EXAMPLES)


def test_every_table_command_takes_json() -> None:
    for name, parser in commands():
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert ("--json" in flags) == (name in TABLE_COMMANDS), name


# -- output ------------------------------------------------------------------------------


def test_get_run_plain_in_a_pipe_and_json_on_request(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = register(redis_url, namespace, 1)
    base = ["--redis-url", redis_url, "--namespace", namespace]
    assert main(["get-run", run, *base]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run_id", run]
    assert ["status", "running"] in [line.split() for line in lines]
    assert not any(ch in "".join(lines) for ch in "┃│━\x1b")

    assert main(["get-run", run, "--json", *base]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["run_id"], record["status"]) == (run, "running")


def test_cancel_json_is_the_whole_of_stdout(redis_url: str, namespace: str) -> None:
    # Before, the SDK's info log lines went to stdout ahead of the JSON.
    (run,) = register(redis_url, namespace, 1)
    result = cli("cancel", run, "--json", "--redis-url", redis_url, "--namespace", namespace)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outcome"] == "signalled"
    assert "cancel.requested" not in result.stdout + result.stderr  # info: not shown


def test_cancel_of_an_id_no_run_has_yet_says_it_is_kept(redis_url: str, namespace: str) -> None:
    """`revoke` of a queued job: the answer is not "not found", and the run that registers
    with the id later is cancelled before its body runs."""
    base = ("--redis-url", redis_url, "--namespace", namespace)
    result = cli("cancel", "job-42", *base)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert rows["outcome"] == "pending"
    assert "kept_until" in rows
    assert "no run job-42 yet: the cancel is kept until" in result.stderr
    kept = json.loads(cli("cancel", "job-43", "--json", *base).stdout)
    assert (kept["outcome"], kept["status"]) == ("pending", None)
    assert kept["kept_until"]
    # With keeping turned off, the same cancel finds nothing, and fails.
    off = cli("cancel", "job-44", "--pending-cancel-lookback", "0", *base)
    assert off.returncode == 1
    assert "not_found" in off.stdout


def test_a_cancel_no_replica_acknowledged_is_an_error_that_says_it_was_applied(
    redis_url: str, namespace: str
) -> None:
    """`--wait-replicas 1` on a Redis with no replica: the primary applied the cancel, and
    the command says so, and that it is not replicated, in one line."""
    base = ("--redis-url", redis_url, "--namespace", namespace)
    result = cli("cancel", "job-45", "--wait-replicas", "1", "--wait-timeout", "50ms", *base)
    assert result.returncode == 2
    assert "0 of 1 replica(s) acknowledged it within 0.05 s" in result.stderr
    assert "outcome='pending'" in result.stderr
    assert "running the command again is safe" in result.stderr


def test_tables_render_with_rich_on_a_terminal(redis_url: str, namespace: str) -> None:
    (run,) = register(redis_url, namespace, 1)
    base = ["--redis-url", redis_url, "--namespace", namespace]
    code, screen = in_terminal("get-run", run, *base)
    assert code == 0, screen
    assert "│" in screen  # a rich table's box drawing
    assert run in screen
    code, screen = in_terminal("sync", "status", *base)
    assert code == 0, screen
    assert "Workers (0 live)" in screen
    assert "┏" in screen
    code, screen = in_terminal("get-run", run, "--json", *base)
    assert code == 0, screen
    assert "│" not in screen
    assert json.loads(screen)["run_id"] == run


# -- progress ----------------------------------------------------------------------------


def test_cancel_many_reports_progress_per_batch(redis_url: str, namespace: str) -> None:
    register(redis_url, namespace, 1200)
    calls: list[tuple[int, int]] = []

    async def go() -> int:
        async with Client(redis_url, namespace=namespace) as client:
            results = await client.cancel_many(
                "generate-report", app_id="reports", progress=lambda d, t: calls.append((d, t))
            )
        return len(results.results)

    assert anyio.run(go) == 1200
    assert calls == [(0, 1200), (500, 1200), (1000, 1200), (1200, 1200)]


def test_cancel_many_draws_a_bar_on_a_terminal_only(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    register(redis_url, namespace, 600)
    base = ["generate-report", "--app", "reports", "--redis-url", redis_url]
    code, screen = in_terminal("cancel-many", *base, "--namespace", namespace)
    assert code == 0, screen
    assert "cancelling generate-report" in screen
    assert "600/600" in screen
    assert "signalled" in screen

    register(redis_url, namespace + "b", 600)
    assert main(["cancel-many", *base, "--namespace", namespace + "b", "--json"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert (printed["runs"], printed["outcomes"]) == (600, {"signalled": 600})
    # Kept for the runs of the function not registered yet, until the lookback's end.
    assert printed["started_after"] is None
    kept_for = datetime.fromisoformat(printed["kept_until"]) - datetime.fromisoformat(
        printed["started_before"]
    )
    assert kept_for == timedelta(minutes=10)
    assert err == ""


# -- errors ------------------------------------------------------------------------------


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("cancel-broker: error: ")
    assert "(hint: " in line
    return line


def test_redis_refused_is_one_line_with_a_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with EmbeddedRedis() as server:
        url = server.url
    # The server is gone: nothing listens on its port any more.
    assert main(["get-run", "r1", "--redis-url", url]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot reach Redis at {url}" in line
    assert "--redis-url" in line
    assert REDIS_URL_ENV in line


def test_debug_adds_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--debug", "get-run", "r1", "--redis-url", "http://nowhere/0"],
        ["get-run", "r1", "--redis-url", "http://nowhere/0", "--debug"],
    ):
        assert main(argv) == EXIT_ERROR
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err
        assert err.splitlines()[-1].startswith("cancel-broker: error: Redis URL must specify")


def test_bad_url_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "a/b", "--redis-url", "http://nowhere/0"]) == EXIT_ERROR
    assert "redis://HOST:6379/0" in one_error_line(capsys.readouterr().err)


def test_wrong_password_is_one_line(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(acl_user, redis_url, namespace, "+@all")
    url = redis_url.replace("redis://", f"redis://{namespace}:wrong@")
    assert main(["get-run", "r1", "--redis-url", url]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "refused the credentials" in line
    assert "wrong" not in line, "the password is redacted"


async def acl_user(redis_url: str, name: str, *rules: str) -> None:
    """A Redis user ``name`` with password ``pw`` and these ACL rules."""
    redis = command_client(redis_url)
    try:
        await redis.execute_command("ACL", "SETUSER", name, "on", ">pw", "~*", *rules)
    finally:
        await redis.aclose()


def test_missing_permission_is_one_line(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(acl_user, redis_url, namespace, "+ping")
    url = redis_url.replace("redis://", f"redis://{namespace}:pw@")
    assert main(["get-run", "r1", "--redis-url", url]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "lacks a permission" in line
    assert "docs/security.md" in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["send", "a/b", "{not json"], "DATA is not JSON"),
        (["get-run", "no such id!"], "invalid run id"),
        (["cancel-many", "f", "--if", "event.data.x =="], "invalid CEL expression"),
        (["wait", "r-never", "--timeout", "0.1"], "did not finish within 0.1 s"),
    ],
)
def test_bad_input_is_one_line(
    argv: list[str],
    expected: str,
    redis_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*argv, "--redis-url", redis_url, "--namespace", namespace]) == EXIT_ERROR
    assert expected in one_error_line(capsys.readouterr().err)


def test_an_unexpected_error_says_to_use_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: argparse.Namespace, settings: object) -> int:
        raise KeyError("boom")

    monkeypatch.setattr(broker.cli, "send_command", broken)
    assert main(["send", "a/b"]) == EXIT_INTERNAL
    line = one_error_line(capsys.readouterr().err)
    assert "unexpected KeyError" in line
    assert "--debug" in line


def test_errors_in_a_real_process_are_one_line() -> None:
    result = cli("get-run", "r1", "--redis-url", "redis://127.0.0.1:1/0")
    assert result.returncode == EXIT_ERROR
    assert result.stdout == ""
    one_error_line(result.stderr)


def test_a_taken_http_port_stops_run_with_one_line(redis_url: str, namespace: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = cli("run", "--redis-url", redis_url, "--namespace", namespace, "--http-port", port)
    assert result.returncode == EXIT_ERROR
    line = one_error_line(result.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "--http-port" in line
