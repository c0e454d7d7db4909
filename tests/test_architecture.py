"""docs/architecture.md is the code's: its import graph, the layering it states, and every
``file.py:function`` stop of the life of a cancel exist as written."""

from __future__ import annotations

import ast
import re

from tests.import_graph import ROOT, graph, render

PAGE = ROOT / "docs" / "architecture.md"
BLOCK = re.compile(r"<!-- import-graph:start -->\n(.*?)<!-- import-graph:end -->", re.S)
#: ``sdk/runner.py:Runner.deliver``, ``broker/lua/match_events.lua``, ``lib.lua:cancel_run``
STOP = re.compile(r"`((?:sdk|broker)/[\w/]+\.py):([\w.]+)`")
LUA_STOP = re.compile(r"`(?:lib\.lua|(?:sdk|broker)/lua/\w+\.lua):(\w+)`")


def test_sdk_never_imports_broker() -> None:
    offenders = {
        module: [dep for dep in deps if dep.split(".")[0] == "broker"]
        for module, deps in graph().items()
        if module.split(".")[0] == "sdk"
    }
    assert {module: deps for module, deps in offenders.items() if deps} == {}


def test_the_import_graph_on_the_page_is_the_codes() -> None:
    found = BLOCK.search(PAGE.read_text())
    assert found is not None, "docs/architecture.md lost its import-graph markers"
    assert found.group(1) == f"```text\n{render()}\n```\n", (
        "the graph changed: paste `python -m tests.import_graph` between the markers"
    )


Definition = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _defines(path: str, qualname: str) -> bool:
    """Whether ``path`` defines ``qualname`` (``Class.method`` or a module-level name)."""
    scope: list[ast.stmt] = ast.parse((ROOT / path).read_text()).body
    for part in qualname.split("."):
        found = next((n for n in scope if isinstance(n, Definition) and n.name == part), None)
        if found is None:
            return False
        scope = found.body
    return True


def test_every_stop_the_page_names_exists() -> None:
    text = PAGE.read_text()
    stops = STOP.findall(text)
    assert len(stops) >= 15
    assert [f"{path}:{name}" for path, name in stops if not _defines(path, name)] == []
    lib = (ROOT / "sdk" / "lua" / "lib.lua").read_text()
    for name in LUA_STOP.findall(text):
        assert f"local function {name}(" in lib
