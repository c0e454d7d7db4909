"""The benchmarks still run and print their table (their figures are not asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.processes import ROOT

pytestmark = pytest.mark.e2e


def test_latency_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "tests/benchmarks/latency.py", "--runs", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| s")]
    assert [row.split("|")[1].strip() for row in rows] == ["sleep", "steps"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "5"  # every trial observed its cancellation
        assert cells[-1] == "0"  # no misses
