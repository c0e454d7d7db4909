"""The benchmarks still run and print their table (their figures are not asserted here)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.processes import ROOT

pytestmark = pytest.mark.e2e


def benchmark(args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script as a user would; it must exit 0 within ``timeout``."""
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True
    )


def test_latency_benchmark_prints_its_table() -> None:
    result = benchmark(
        [sys.executable, "tests/benchmarks/latency.py", "--runs", "5"],
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| s")]
    assert [row.split("|")[1].strip() for row in rows] == ["sleep", "steps"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "5"  # every trial observed its cancellation
        assert cells[-1] == "0"  # no misses


def test_overhead_benchmark_counts_two_round_trips_per_run() -> None:
    result = benchmark(
        [sys.executable, "tests/benchmarks/overhead.py", "--runs", "50", "--active", "200"],
    )
    lines = result.stdout.splitlines()
    overhead = lines[lines.index("| p50 us | p99 us | Redis round trips per run |") + 2]
    round_trips = float(overhead.strip("|").split("|")[2])
    assert round_trips <= 2.1  # register and finish; a heartbeat may fall in the window


def test_throughput_benchmark_prints_its_table() -> None:
    result = benchmark(
        [
            sys.executable,
            "tests/benchmarks/throughput.py",
            *("--sizes", "50,200", "--events", "400", "--targets", "20"),
        ],
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "," in line]
    sizes = [row.split("|")[1].strip() for row in rows if row.split("|")[1].strip()[0].isdigit()]
    assert sizes == ["50", "200"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if cells[0][0].isdigit():
            assert cells[4] == "20"  # each targeted run was cancelled, whatever the size


def test_peers_benchmark_prints_its_table() -> None:
    pytest.importorskip(
        "arq",
        reason="PEERS BENCHMARK NOT RUN: the peer libraries are the `bench` extra, which"
        " `make test` does not install (`pip install -e '.[bench]'` or `make bench`)",
    )
    args = ["--trials", "2", "--systems", "cancel-broker,cancel-broker-by-id,arq"]
    result = benchmark(
        [sys.executable, "tests/benchmarks/peers.py", *args],
    )
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in result.stdout.splitlines()
        if line.startswith(("| cancel-broker ", "| cancel-broker-by-id ", "| arq "))
    ]
    assert [row[:2] for row in rows] == [
        ["cancel-broker", "long"],
        ["cancel-broker", "steps"],
        ["cancel-broker-by-id", "long"],
        ["cancel-broker-by-id", "steps"],
        ["arq", "long"],
        ["arq", "steps"],
    ]
    for row in rows:
        assert row[2] == "2"  # trials
        assert row[7] == "0"  # misses
        assert row[-1] == "CancelledError (BaseException)"  # what the job's code caught


@pytest.mark.parametrize("publisher", ["xadd", "sdk"])
def test_load_benchmark_cancels_every_run_it_names(publisher: str) -> None:
    result = benchmark(
        [
            sys.executable,
            "tests/benchmarks/load.py",
            "--publisher",
            publisher,
            "--seconds",
            "2",
            "--starts",
            "100",
            "--cancels",
            "100",
            "--run-seconds",
            "1",
            "--cancel-after",
            "0.3",
        ],
    )
    lines = result.stdout.splitlines()
    row = lines[lines.index("| runs cancelled | p50 ms | p90 ms | p99 ms | max ms | misses |") + 2]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert int(cells[0].replace(",", "")) >= 50  # ~85 named: 100/s for 2 s, half, after 0.3 s
    assert cells[-1] == "0"


def test_scaling_benchmark_prints_a_row_per_setup() -> None:
    result = benchmark(
        [
            sys.executable,
            "tests/benchmarks/scaling.py",
            "--brokers",
            "1,2",
            "--partitions",
            "1,4",
            "--events",
            "500",
            "--runs",
            "100",
        ],
        timeout=180,
    )
    rows = [
        line for line in result.stdout.splitlines() if line.startswith("| ") and "namespace" in line
    ]
    setups = [re.sub(r", on \d primaries", "", row.split("|")[1].strip()) for row in rows]
    assert setups == [
        "1 namespace, 1 partition(s), 1 broker(s)",
        "1 namespace, 1 partition(s), 2 broker(s)",
        "1 namespace, 4 partition(s), 1 broker(s)",
        "1 namespace, 4 partition(s), 2 broker(s)",
        "3 namespaces on 3 primaries, 1 broker each",
    ]


def test_process_steps_benchmark_prints_its_table() -> None:
    result = benchmark(
        [
            *(sys.executable, "tests/benchmarks/process_steps.py", "--runs", "3"),
            *("--grace", "0.1", "--interrupt-after", "0.1"),
        ],
    )
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    rows = [line.split("|")[1].strip() for line in table[1:]]
    assert rows == [
        "first process step (starts the fork server)",
        "process step",
        "thread step",
        "stop of a child ignoring SIGTERM (grace 0.1 s)",
        "escalation of an awaited step (interrupt_after 0.1 s)",
    ]


def test_hard_stop_benchmark_prints_its_table() -> None:
    result = benchmark(
        [sys.executable, "tests/benchmarks/hard_stop.py", "--trials", "1", "--modes", "swallow"],
    )
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["swallow"]
