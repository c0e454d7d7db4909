"""What the README promises runs: `make demo` shows a cancel end to end."""

from __future__ import annotations

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
    assert '"signals_sent": 1' in out
