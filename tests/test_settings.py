"""One settings object: every flag of `cancel-broker run` has an environment variable and a
default, both shown by ``run --help``; variables apply, flags win, bad values are named."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

import pytest

from broker.cli import build_parser
from broker.findings import DEFAULT_WINDOWS
from broker.service import CLAIM_IDLE_MS, TOMBSTONE_LOOKBACK_S
from broker.settings import ENV_PREFIX, Settings, SettingsError, Spec, markdown_table
from broker.sync import HISTORY_MAXLEN
from sdk.connection import REDIS_URL_ENV
from sdk.keys import DEFAULT_NAMESPACE
from sdk.streams import DEAD_LETTER_MAXLEN
from tests.processes import ROOT, ProcessHandle

#: Options of the command line itself, not of the broker: they have no variable.
CLI_ONLY = {"-h", "--help", "--debug", "--json"}

#: For each setting, a value to give it that differs from its default, as text, and what
#: it parses to.
SAMPLES: dict[str, tuple[str, Any]] = {
    "redis_url": ("redis://example:6380/2", "redis://example:6380/2"),
    "namespace": ("other", "other"),
    "partitions": ("8", 8),
    "http_host": ("0.0.0.0", "0.0.0.0"),
    "http_port": ("9000", 9000),
    "consumer": ("broker-a", "broker-a"),
    "log_level": ("debug", "debug"),
    "log_format": ("json", "json"),
    "claim_idle": ("2m", 120.0),
    "dead_letter_maxlen": ("50", 50),
    "history_length": ("7", 7),
    "tombstone_lookback": ("0", 0.0),
    "trigger_lookback": ("1m", 60.0),
    "on_evicting_redis": ("warn", "warn"),
    "eviction_check": ("500ms", 0.5),
    "wait_replicas": ("2", 2),
    "wait_timeout": ("500ms", 0.5),
    "pending_cancel_lookback": ("30s", 30.0),
    "dead_rule_window": ("2h", 7200.0),
    "orphan_window": ("90s", 90.0),
    "sync_rescan": ("500ms", 0.5),
    "cancel_events": ("a/stop,b/halt", ("a/stop", "b/halt")),
    "dashboard": ("readonly", "readonly"),
    "dashboard_token": ("s3cret", "s3cret"),
}


def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = commands.choices[name]
    return found


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def specs() -> list[Spec]:
    return list(Settings.specs())


def test_every_run_flag_is_a_setting_with_a_variable() -> None:
    by_flag = {spec.flag: spec for spec in specs()}
    flags = option_strings(subparser("run")) - CLI_ONLY
    assert flags == set(by_flag), "a flag of `run` that is not in Settings, or the reverse"
    for spec in by_flag.values():
        assert spec.env.startswith(ENV_PREFIX), spec
        assert spec.help, spec
        assert spec.shown, spec
    assert len({spec.env for spec in by_flag.values()}) == len(by_flag)
    assert set(SAMPLES) == {spec.name for spec in specs()}, "add the new setting to SAMPLES"


def test_run_help_shows_every_variable_and_default() -> None:
    text = subparser("run").format_help()
    flat = " ".join(text.split())  # argparse wraps lines anywhere
    for spec in specs():
        assert f"(env {spec.env}; default: {spec.shown})" in flat, spec.name


def test_the_redis_url_variable_is_the_one_the_sdk_reads() -> None:
    (spec,) = (s for s in specs() if s.name == "redis_url")
    assert spec.env == REDIS_URL_ENV


def test_defaults_are_the_brokers_own() -> None:
    settings = Settings()
    assert settings.namespace == DEFAULT_NAMESPACE
    assert settings.claim_idle * 1000 == CLAIM_IDLE_MS
    assert settings.dead_letter_maxlen == DEAD_LETTER_MAXLEN
    assert settings.history_length == HISTORY_MAXLEN
    assert settings.tombstone_lookback == TOMBSTONE_LOOKBACK_S
    assert settings.dead_rule_window == DEFAULT_WINDOWS.dead_rule_after_s
    assert settings.orphan_window == DEFAULT_WINDOWS.orphan_window_s
    assert settings.sync_rescan == DEFAULT_WINDOWS.rescan_s
    assert Settings.resolve(build_parser().parse_args(["run"]), environ={}) == settings


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_variable_applies(name: str) -> None:
    (spec,) = (s for s in specs() if s.name == name)
    text, expected = SAMPLES[name]
    args = build_parser().parse_args(["run"])
    settings = Settings.resolve(args, environ={spec.env: text})
    assert getattr(settings, name) == expected
    assert getattr(settings, name) != getattr(Settings(), name)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_flag_wins_over_its_variable(name: str) -> None:
    (spec,) = (s for s in specs() if s.name == name)
    text, expected = SAMPLES[name]
    flag_args: list[str] = []
    for part in text.split(",") if spec.repeatable else [text]:
        flag_args += [spec.flag, part]
    args = build_parser().parse_args(["run", *flag_args])
    # The variable holds the default (or, with no default, another value): the flag's
    # value must be the one kept.
    other = spec.shown if spec.literal else "other-value"
    if spec.choices:
        other = next(choice for choice in spec.choices if choice != text)
    settings = Settings.resolve(args, environ={spec.env: other})
    assert getattr(settings, name) == expected


def test_an_empty_variable_counts_as_unset() -> None:
    settings = Settings.resolve({}, environ={REDIS_URL_ENV: "", "CANCEL_BROKER_HTTP_PORT": " "})
    assert settings.redis_url is None
    assert settings.http_port == 8750


@pytest.mark.parametrize(
    ("env", "raw", "reason"),
    [
        ("CANCEL_BROKER_HTTP_PORT", "http", "invalid literal for int()"),
        ("CANCEL_BROKER_HTTP_PORT", "70000", "not a TCP port"),
        ("CANCEL_BROKER_CLAIM_IDLE", "soon", "soon"),
        ("CANCEL_BROKER_LOG_LEVEL", "loud", "must be one of debug, info, warning, error"),
        ("CANCEL_BROKER_HISTORY_LENGTH", "0", "not a positive integer"),
    ],
)
def test_a_bad_variable_is_named(env: str, raw: str, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.resolve({}, environ={env: raw})
    assert str(caught.value).startswith(f"{env}={raw!r}: ")
    assert reason in str(caught.value)


def test_only_the_commands_settings_are_read() -> None:
    # `send` has no --http-port: a broken CANCEL_BROKER_HTTP_PORT is not its problem.
    args = build_parser().parse_args(["send", "x/y"])
    settings = Settings.resolve(
        args, environ={"CANCEL_BROKER_HTTP_PORT": "nope"}, groups=["connection"]
    )
    assert settings.http_port == 8750
    status = build_parser().parse_args(["sync", "status"])
    assert status.settings_groups == ["connection", "detection"]
    assert (
        Settings.resolve(
            status, {"CANCEL_BROKER_ORPHAN_WINDOW": "5m"}, status.settings_groups
        ).orphan_window
        == 300
    )


def test_a_bad_flag_is_refused_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["run", "--claim-idle", "soon"])
    assert caught.value.code == 2
    assert "argument --claim-idle" in capsys.readouterr().err


def test_docs_table_is_generated_from_the_settings() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    assert markdown_table() in text, (
        "docs/cli.md is out of date: paste"
        " `python -c 'from broker.settings import markdown_table; print(markdown_table())'`"
    )


@pytest.mark.e2e
def test_a_broker_configured_only_by_environment(redis_url: str, namespace: str) -> None:
    handle = ProcessHandle(
        [sys.executable, "-m", "broker", "run"],
        env={
            REDIS_URL_ENV: redis_url,
            "CANCEL_BROKER_NAMESPACE": namespace,
            "CANCEL_BROKER_HTTP_PORT": "0",
            "CANCEL_BROKER_LOG_FORMAT": "json",
        },
    )
    try:
        ready = handle.wait_for_log("broker.ready")
        assert ready["namespace"] == namespace
        assert not ready["http"].endswith(":8750")
    finally:
        assert handle.terminate() == 0


def test_a_bad_variable_stops_run_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "run"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CANCEL_BROKER_HTTP_PORT": "x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "CANCEL_BROKER_HTTP_PORT='x'" in line
    assert "Traceback" not in result.stderr
