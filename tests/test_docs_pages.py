"""Pages of docs/ that must follow the code: the operations runbook has a section for every
alert and every stale-finding kind. (The site's links and anchors are checked by `make
docs`, strict.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from broker.findings import FINDING_KINDS, FindingKind
from tests.processes import ROOT

DOCS = ROOT / "docs"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RUNBOOK_PARTS = ("**What it means.**", "**What to do.**")


def sections(page: Path) -> dict[str, str]:
    """``### heading`` -> the text up to the next heading of any level."""
    found: dict[str, str] = {}
    heading: str | None = None
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            heading = line[4:].strip() if line.startswith("### ") else None
            if heading is not None:
                found[heading] = ""
        elif heading is not None:
            found[heading] += line + "\n"
    return found


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: str(rule["alert"]))
def test_every_alert_has_its_own_runbook_section(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    body = sections(DOCS / "operations.md").get(name)
    assert body is not None, f"docs/operations.md has no '### {name}' section"
    for part in RUNBOOK_PARTS:
        assert part in body, (name, part)
    # The annotation points at this alert's own section, not a shared one.
    assert rule["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}"


def test_the_finding_kinds_are_the_ones_the_type_allows() -> None:
    assert set(get_args(FindingKind)) == set(FINDING_KINDS)


@pytest.mark.parametrize("kind", FINDING_KINDS)
def test_every_finding_kind_has_a_runbook_section(kind: str) -> None:
    body = sections(DOCS / "operations.md").get(f"`{kind}`")
    assert body is not None, f"docs/operations.md has no '### `{kind}`' section"
    for part in RUNBOOK_PARTS:
        assert part in body, (kind, part)
