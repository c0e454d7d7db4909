"""Redis URLs fit to show: the secrets in them masked."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

#: Query options whose value is a secret.
_SECRET_OPTIONS = frozenset({"ssl_password", "sentinel_password", "password"})


def redact_url(url: str) -> str:
    """``url`` fit for a log line: the password, and any ``ssl_password`` or
    ``sentinel_password`` in its query, replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = "&".join(
        f"{key}=***" if key in _SECRET_OPTIONS else f"{key}={value}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
