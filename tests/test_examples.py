"""What the README promises runs: `make demo` shows a cancel end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.processes import ROOT

pytestmark = pytest.mark.e2e


def test_demo_cancels_one_report_and_completes_the_other() -> None:
    result = subprocess.run(
        [sys.executable, "docs/examples/demo.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "r1 is cancelled after" in out
    assert "r2 is completed" in out
    assert "-> already_cancelled, status cancelled" in out
    # The broker's audit line, as the demo prints it from the broker's log.
    (decided,) = [json.loads(line) for line in out.splitlines() if '"cancel.decided"' in line]
    assert (decided["decision"], decided["signals_sent"]) == ("matched", 1)
