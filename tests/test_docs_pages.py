"""Pages of docs/ that must follow the code: the operations runbook has a section for every
alert and every stale-finding kind, and the migration guides' cancel-broker code uses
only names the SDK has. (The site's links and anchors are checked by `make docs`, strict.)"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from broker.findings import FINDING_KINDS, FindingKind
from sdk import CancelOn, Client, RunContext, Worker
from sdk.context import Step
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


# -- migration guides ---------------------------------------------------------------------

MIGRATIONS = sorted((DOCS / "migrate").glob("*.md"))
OURS = re.compile(r'^```python title="cancel-broker"\n(.*?)^```$', re.MULTILINE | re.DOTALL)
#: The variable names the guides use for SDK objects, and what they hold.
TYPES: dict[str, type] = {"client": Client, "worker": Worker, "ctx": RunContext}


def instance_attributes(cls: type) -> set[str]:
    """Public attributes ``cls`` has, including those its ``__init__`` assigns."""
    names = {name for name in dir(cls) if not name.startswith("_")}
    tree = ast.parse(inspect.getsource(cls))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and isinstance(node.ctx, ast.Store)
        ):
            names.add(node.attr)
    return names


def keywords_of(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_there_are_migration_guides_with_our_code() -> None:
    names = {page.stem for page in MIGRATIONS}
    assert names == {"inngest", "celery", "arq", "dramatiq"}
    for page in MIGRATIONS:
        assert OURS.findall(page.read_text()), page.name


@pytest.mark.parametrize("page", MIGRATIONS, ids=lambda page: page.name)
def test_migration_code_uses_only_what_the_sdk_has(page: Path) -> None:
    attributes = {var: instance_attributes(cls) for var, cls in TYPES.items()}
    step = instance_attributes(Step)
    for block in OURS.findall(page.read_text()):
        flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        tree = compile(block, page.name, "exec", flags=flags)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in attributes
            ):
                assert node.attr in attributes[node.value.id], (page.name, ast.unparse(node))
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "ctx.step":
                assert node.attr in step, (page.name, ast.unparse(node))
            if isinstance(node, ast.Call):
                callee = ast.unparse(node.func)
                signature = {
                    "CancelOn": CancelOn,
                    "worker.function": Worker.function,
                    "client.cancel": Client.cancel,
                    "client.cancel_many": Client.cancel_many,
                    "client.wait": Client.wait,
                }.get(callee)
                if signature is not None:
                    allowed = keywords_of(signature)
                    for keyword in node.keywords:
                        assert keyword.arg in allowed, (page.name, callee, keyword.arg)


def _test_names() -> set[str]:
    names = set()
    for module in (ROOT / "tests").glob("test_*.py"):
        names |= set(re.findall(r"^(?:async )?def (test_\w+)", module.read_text(), re.M))
    return names


@pytest.mark.parametrize("page", sorted((DOCS / "migrate").glob("*.md")), ids=lambda p: p.name)
def test_the_tests_a_migration_guide_cites_exist(page: Path) -> None:
    """A guide's row that says which test runs it must name a test that exists."""
    cited = set(re.findall(r"`(?:tests/[\w/]+\.py::)?(test_\w+)", page.read_text()))
    assert cited <= _test_names(), cited - _test_names()
