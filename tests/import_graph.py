"""The first-party import graph of sdk/ and broker/: which module imports which.

``python -m tests.import_graph`` prints it as docs/architecture.md shows it;
tests/test_architecture.py checks that page against the code, and that the graph keeps
its rules (sdk never imports broker; only the script modules run Lua).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("sdk", "broker")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports(path: pathlib.Path) -> set[str]:
    """The first-party modules ``path`` imports (``from sdk import x`` names ``sdk.x`` when
    ``x`` is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            submodules = {f"{node.module}.{a.name}" for a in node.names}
            modules = {name for name in submodules if _is_module(name)}
            found |= modules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found - {module_name(path)}


def graph() -> dict[str, list[str]]:
    """Module -> the first-party modules it imports, both sorted."""
    return {
        module_name(path): sorted(imports(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def render() -> str:
    return "\n".join(f"{mod} -> {', '.join(deps) or '-'}" for mod, deps in graph().items())


if __name__ == "__main__":
    print(render())
