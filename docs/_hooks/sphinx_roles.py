"""mkdocs hook: the SDK's docstrings use Sphinx roles (:class:`~sdk.errors.RunCancelled`),
which mkdocstrings renders literally. Show them as the code they name: the last dotted
component with ``~``, the whole name without it."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|data|meth|func|attr|exc|mod):<code>(~?)([\w.]+)</code>")


def _code(match: re.Match[str]) -> str:
    tilde, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"


def on_page_content(html: str, **_: Any) -> str:
    return ROLE.sub(_code, html)
