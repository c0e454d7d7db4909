"""Who may press the dashboard's Cancel: the one action of the dashboard that changes
anything. Everything else it serves is read-only.

- ``--dashboard=off``: no dashboard at all; ``readonly``: no Cancel.
- ``--dashboard-token``: Cancel must send it (``X-Cancel-Broker-Token``).
- Without a token, Cancel is allowed only while the broker listens on loopback: on
  ``0.0.0.0`` anyone who can reach the port could otherwise cancel any run.
- Against cross-site requests (CSRF): a Cancel must carry the header
  ``X-Cancel-Broker-Request``, which a form on another site cannot send and a script on
  another origin cannot send without a CORS preflight (which is never granted); an
  ``Origin`` or ``Sec-Fetch-Site`` that names another site is refused; and without a
  token, the ``Host`` must be a loopback name, so a rebound DNS name cannot pass for us.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

from starlette.requests import Request

DashboardMode = Literal["on", "readonly", "off"]
TOKEN_HEADER: Final = "X-Cancel-Broker-Token"
#: Any value will do: what matters is that a cross-site form cannot send the header.
REQUEST_HEADER: Final = "X-Cancel-Broker-Request"
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})


class CancelRefused(Exception):
    """A Cancel the access rules refuse; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, without port) is this machine only."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """``Host`` without its port (``[::1]:8750`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True, slots=True)
class CancelAccess:
    mode: DashboardMode
    token: str | None
    #: The HTTP server listens on a loopback address only.
    loopback: bool

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def cancel_enabled(self) -> bool:
        return self.mode == "on" and (bool(self.token) or self.loopback)

    @property
    def cancel_disabled_reason(self) -> str | None:
        if self.mode == "off":
            return "the dashboard is off (--dashboard=off)"
        if self.mode == "readonly":
            return "the dashboard is read-only (--dashboard=readonly)"
        if not self.cancel_enabled:
            return (
                "the broker listens on an address other than loopback and has no"
                " --dashboard-token: Cancel is off"
            )
        return None

    def check(self, request: Request) -> None:
        """Raise :class:`CancelRefused` unless ``request`` may cancel a run."""
        reason = self.cancel_disabled_reason
        if reason is not None:
            raise CancelRefused(403, reason)
        headers = request.headers
        if REQUEST_HEADER.lower() not in headers:
            raise CancelRefused(403, f"a Cancel must send the {REQUEST_HEADER} header")
        host = headers.get("host", "")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            raise CancelRefused(403, f"cross-origin Cancel refused (Origin {origin})")
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise CancelRefused(403, "cross-site Cancel refused (Sec-Fetch-Site)")
        if self.token:
            given = headers.get(TOKEN_HEADER.lower(), "")
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                raise CancelRefused(401, f"a Cancel needs the broker's token ({TOKEN_HEADER})")
        elif not is_loopback(_host_name(host)):
            raise CancelRefused(
                403, f"without a token, Cancel answers only to localhost, not {host}"
            )
