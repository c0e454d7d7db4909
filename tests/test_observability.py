"""The deploy artefacts (Prometheus config, alerts, Grafana dashboard) checked with the real
tools, against the metric names the broker promises (docs/metrics.md): promtool on the
files and on a live broker's /metrics, and a real Prometheus scraping a live broker while
runs are cancelled.

Tests that need ``promtool`` or ``prometheus`` skip, loudly, when the binary is absent
(``apt-get install prometheus`` on Debian provides both); with ``CI=true`` they fail
instead, since ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml
from redis.asyncio import Redis

from sdk import Client
from sdk.keys import Keys
from tests.helpers import wait_for_observation, wait_for_status, wait_until
from tests.processes import ProcessHandle, start_broker, start_worker

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

#: The broker's metrics, as Prometheus names them, with their types: the contract the
#: alerts and the dashboard are written against. Renaming a metric breaks these tests.
CONTRACT: dict[str, str] = {
    # per broker process: summed across replicas
    "cancel_broker_events_total": "counter",
    "cancel_broker_events_consumed_total": "counter",
    "cancel_broker_runs_matched_total": "counter",
    "cancel_broker_signals_sent_total": "counter",
    "cancel_broker_signals_resent_total": "counter",
    "cancel_broker_dead_letters_total": "counter",
    "cancel_broker_redis_errors_total": "counter",
    "cancel_broker_redis_reconnects_total": "counter",
    "cancel_broker_event_handling_seconds": "histogram",
    "cancel_broker_cancel_latency_seconds": "histogram",
    "cancel_broker_runs_lost_total": "counter",
    "cancel_broker_workers_lost_total": "counter",
    "cancel_broker_build_info": "gauge",
    # the cluster view read from Redis, the same on every replica: max across replicas
    "cancel_broker_runs_active": "gauge",
    "cancel_broker_runs_finished_total": "counter",
    "cancel_broker_signals_acknowledged_total": "counter",
    "cancel_broker_signal_delivery_seconds": "histogram",
    "cancel_broker_consumer_lag": "gauge",
    "cancel_broker_pending_entries": "gauge",
    "cancel_broker_live_workers": "gauge",
    "cancel_broker_stale_findings": "gauge",
}


def series_names(contract: dict[str, str]) -> set[str]:
    """Every series name a query may use: a histogram's ``_bucket``, ``_sum`` and ``_count``."""
    names = set()
    for name, kind in contract.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


SERIES = series_names(CONTRACT)

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana target's) selects.

    Drops string literals, label matchers, ranges and label lists, then keeps the
    identifiers that are not functions, aggregations or keywords.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables outside matchers
    names = set()
    for match in re.finditer(r"(?<![\w.:$])[a-zA-Z_:][\w:]*", text):
        name = match.group(0)
        if name.lower() in _PROMQL_KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue
        names.add(name)
    return names


def test_metric_names_parses_what_the_artefacts_use() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(cancel_broker_cancel_latency_seconds_bucket"
        '{job="cancel-broker", le!="+Inf"}[$__rate_interval])))'
        " > 0.5 and on () max without (instance) (cancel_broker_live_workers offset 10m) == bool 0"
        ' or sum(increase(cancel_broker_dead_letters_total{reason=~"a|b"}[10m])) > 1e3'
        ' unless label_replace(up, "x", "$1", "job", "(.*)")'
    )
    assert metric_names(expr) == {
        "cancel_broker_cancel_latency_seconds_bucket",
        "cancel_broker_live_workers",
        "cancel_broker_dead_letters_total",
        "up",
    }


def require(binary: str) -> str:
    """The binary's path; skip loudly without it (on CI, where .ci/run installs it, fail)."""
    path = shutil.which(binary)
    if path is None:
        reason = (
            f"{binary} not installed: apt-get install -y --no-install-recommends"
            " prometheus (Debian) to run this test; .ci/run installs it"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, yet CI=true: CI must run it")
        pytest.skip(reason)
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("promtool"), *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- Prometheus: config, rules and their unit tests ---------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "deploy/prometheus/prometheus.yml"),
        ("check", "rules", "deploy/prometheus/alerts.yml"),
        ("test", "rules", "deploy/prometheus/alerts_test.yml"),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_the_prometheus_artefacts(args: tuple[str, ...]) -> None:
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_scrape_config_uses_the_job_the_alerts_select() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cancel-broker"
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"] == [{"targets": ["cancel-broker:8750"]}]
    assert config["rule_files"] == ["alerts.yml"]


def test_alerts_name_only_contract_metrics() -> None:
    rules = alert_rules()
    used: set[str] = set()
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= SERIES | {"up"}, (rule["alert"], names - SERIES)
        used |= names
    assert "up" in used


def test_alerts_select_the_broker_job() -> None:
    # Workers' registries export some of the same names; they must not count.
    for rule in alert_rules():
        selectors = re.findall(r"\b(?:cancel_broker_\w+|up)\b(\{[^}]*\})?", rule["expr"])
        assert selectors, rule["alert"]
        for matchers in selectors:
            assert 'job="cancel-broker"' in matchers, (rule["alert"], rule["expr"])


def test_every_alert_has_what_an_operator_needs() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "CancelBrokerDown",
        "CancelBrokerConsumerLagGrowing",
        "CancelBrokerPendingStuck",
        "CancelBrokerDeadLetters",
        "CancelBrokerStaleConfiguration",
        "CancelBrokerCancelLatencyHigh",
        "CancelBrokerWorkersGone",
        "CancelBrokerNoLiveWorkers",
    }
    headings = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"], rule["alert"]
        assert annotations["description"], rule["alert"]
        path, _, anchor = annotations["runbook"].partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor in headings, (rule["alert"], anchor)


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert fired == alerts
    assert quiet == alerts


# -- Grafana dashboard --------------------------------------------------------------------

DASHBOARD = ROOT / "deploy" / "grafana" / "cancel-broker.json"


def dashboard_panels() -> list[dict[str, Any]]:
    document = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in document["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return panels


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def as_prometheus_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, as Prometheus runs it."""
    return expr.replace("$__rate_interval", "1m").replace("$job", "cancel-broker")


def test_dashboard_names_only_contract_metrics() -> None:
    document = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= SERIES, (expr, names - SERIES)
        used |= names
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert found, variable
            assert found.group(1) in SERIES
    # The panels the issue asks for are there.
    assert {
        "cancel_broker_cancel_latency_seconds_bucket",
        "cancel_broker_events_total",
        "cancel_broker_signals_sent_total",
        "cancel_broker_signals_acknowledged_total",
        "cancel_broker_signals_resent_total",
        "cancel_broker_runs_active",
        "cancel_broker_runs_finished_total",
        "cancel_broker_consumer_lag",
        "cancel_broker_pending_entries",
        "cancel_broker_dead_letters_total",
        "cancel_broker_live_workers",
        "cancel_broker_stale_findings",
        "cancel_broker_redis_errors_total",
        "cancel_broker_redis_reconnects_total",
    } <= used


def test_dashboard_is_importable_as_is() -> None:
    text = DASHBOARD.read_text()
    document = json.loads(text)
    assert 36 <= document["schemaVersion"] <= 39
    assert "http://" not in text
    assert "https://" not in text
    variables = {variable["name"]: variable for variable in document["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    # promtool has no "check query": the expressions become recording rules it parses.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_prometheus_query(expr)}
                    for i, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- a live broker -------------------------------------------------------------------------


@pytest.fixture
def broker_process(redis_url: str, namespace: str) -> Iterator[tuple[ProcessHandle, str]]:
    handle, http = start_broker(redis_url, namespace)
    yield handle, http
    assert handle.terminate() == 0, handle.output


async def scrape_after_traffic(http: str, client: Client, redis: Redis, namespace: str) -> str:
    """/metrics (the text format Prometheus and promtool read) once the broker consumed a
    cancel-like event, a trigger and a malformed entry: labelled series (events by name,
    dead letters by reason) are there too."""
    await client.send("report/cancel.requested", {"reportId": "nobody"})
    await client.send("report/generate.requested", {"reportId": "nobody"})
    await redis.xadd(f"{Keys(namespace).prefix}events", {"event": "{not json"})
    async with httpx.AsyncClient(base_url=http, timeout=5, trust_env=False) as web:

        async def consumed() -> bool:
            body = (await web.get("/metrics")).text
            return 'cancel_broker_dead_letters_total{reason="invalid_json"} 1.0' in body

        await wait_until(consumed, interval=0.05)
        response = await web.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


@pytest.mark.e2e
@pytest.mark.anyio
async def test_live_broker_exports_every_contract_metric(
    broker_process: tuple[ProcessHandle, str], client: Client, redis: Redis, namespace: str
) -> None:
    _, http = broker_process
    body = await scrape_after_traffic(http, client, redis, namespace)
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, flags=re.MULTILINE))
    assert {name: declared.get(name) for name in CONTRACT} == CONTRACT


@pytest.mark.e2e
@pytest.mark.anyio
async def test_live_broker_metrics_pass_promtool_check_metrics(
    broker_process: tuple[ProcessHandle, str], client: Client, redis: Redis, namespace: str
) -> None:
    require("promtool")
    _, http = broker_process
    body = await scrape_after_traffic(http, client, redis, namespace)
    result = promtool("check", "metrics", stdin=body)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# -- a real Prometheus scraping a live broker ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus_binary() -> str:
    return require("prometheus")


@pytest.fixture
def prometheus(
    prometheus_binary: str, broker_process: tuple[ProcessHandle, str], tmp_path: Path
) -> Iterator[tuple[ProcessHandle, str]]:
    """`prometheus` with deploy/prometheus/prometheus.yml (and its alerts), scraping only the
    test's broker, every second, on a free loopback port; its base URL."""
    _, http = broker_process
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [http.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    handle = ProcessHandle(
        [
            prometheus_binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ]
    )
    base = f"http://{address}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if handle.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{handle.output}")
            try:
                if httpx.get(f"{base}/-/ready", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready in 15 s:\n{handle.output}")
            time.sleep(0.1)
    except BaseException:
        handle.kill()
        raise
    yield handle, base
    assert handle.terminate(timeout=10) == 0, handle.output


async def query(web: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
    response = await web.get("/api/v1/query", params={"query": promql})
    body = response.json()
    assert body["status"] == "success", (promql, body)
    return list(body["data"]["result"])


async def scalar(web: httpx.AsyncClient, promql: str) -> float | None:
    result = await query(web, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.e2e
@pytest.mark.anyio
async def test_prometheus_reads_cancellations_from_a_live_broker(
    prometheus: tuple[ProcessHandle, str],
    redis_url: str,
    namespace: str,
    client: Client,
    redis: Redis,
) -> None:
    _, base = prometheus
    worker = start_worker(redis_url, namespace, shutdown_timeout="0.2")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as web:
            # Scraped once before any cancel: the histogram's rate starts from zero.
            async def scraped() -> bool:
                return await scalar(web, 'up{job="cancel-broker"}') == 1

            await wait_until(scraped, timeout=10, interval=0.2)

            reports = [f"p{i}" for i in range(3)]
            for report in reports:
                await client.send("report/generate.requested", {"reportId": report})
            for report in reports:
                await wait_for_observation(redis, namespace, report, "started")
            for report in reports:
                await client.send("report/cancel.requested", {"reportId": report})
            for report in reports:
                seen = await wait_for_observation(redis, namespace, report, "cancelled")
                await wait_for_status(client, seen["run_id"], "cancelled", timeout=5)

            matched = 'sum(cancel_broker_events_total{job="cancel-broker", result="matched"})'
            p99 = (
                "histogram_quantile(0.99, sum by (le)"
                ' (rate(cancel_broker_cancel_latency_seconds_bucket{job="cancel-broker"}[1m])))'
            )
            observed: dict[str, float | None] = {}

            async def scraped_the_cancels() -> bool:
                observed["matched"] = await scalar(web, matched)
                observed["p99"] = await scalar(web, p99)
                latency = observed["p99"]
                return observed["matched"] == len(reports) and (
                    latency is not None and math.isfinite(latency)
                )

            # Bounded; on timeout the assertions below say what Prometheus had.
            with anyio.move_on_after(15):
                while not await scraped_the_cancels():
                    await anyio.sleep(0.25)
            assert observed["matched"] == len(reports), observed
            assert observed["p99"] is not None, observed
            assert 0 < observed["p99"] < 1.0, observed
            count = 'sum(cancel_broker_cancel_latency_seconds_count{job="cancel-broker"})'
            assert await scalar(web, count) == len(reports)
            finished = (
                'max by (outcome) (cancel_broker_runs_finished_total{job="cancel-broker",'
                ' app="reports", function="generate-report"})'
            )

            async def finished_counted() -> bool:
                rows = await query(web, finished)
                values = {row["metric"]["outcome"]: float(row["value"][1]) for row in rows}
                return values.get("cancelled") == len(reports)

            await wait_until(finished_counted, timeout=5, interval=0.25)

            # Every dashboard query runs on the real series without error and shows data
            # (dead letters aside: there are none), once the series that appeared with the
            # cancels have the two samples a rate needs.
            async def two_samples() -> bool:
                counts = await query(
                    web,
                    "count_over_time(cancel_broker_events_consumed_total[1m])"
                    " or count_over_time(cancel_broker_runs_finished_total[1m])",
                )
                return len(counts) >= 3 and all(float(c["value"][1]) >= 2 for c in counts)

            await wait_until(two_samples, timeout=10, interval=0.25)
            empty = [
                expr
                for expr in dashboard_exprs()
                if not await query(web, as_prometheus_query(expr))
            ]
            # Every panel has data, dead letters too: their reasons are exported at 0.
            assert empty == []

            async def rules_evaluated() -> bool:
                response = await web.get("/api/v1/rules")
                rules = [r for g in response.json()["data"]["groups"] for r in g["rules"]]
                return len(rules) == len(alert_rules()) and all(
                    r["health"] != "unknown" for r in rules
                )

            await wait_until(rules_evaluated, timeout=5, interval=0.2)
            groups = (await web.get("/api/v1/rules")).json()["data"]["groups"]
            health = {
                r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]
            }
            assert set(health.values()) == {("ok", "")}, health
            assert await query(web, 'ALERTS{alertstate="firing"}') == []
    finally:
        assert worker.terminate() == 0, worker.output
