"""Helpers for the security tests: certificates, a TLS-only redis-server, and the ACL rules
of ``docs/security.md`` read from the document itself (so the tested rules are the
documented ones, character for character)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import redis

from broker.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent
SECURITY_DOC = ROOT / "docs" / "security.md"
#: The HTML comment that precedes the fenced block of ACL rules in docs/security.md.
ACL_MARKER = "<!-- acl-rules:"


# -- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def certificate_tool_missing() -> str | None:
    """Why certificates cannot be made here, or None when the ``openssl`` CLI is present."""
    if shutil.which("openssl"):
        return None
    return (
        "cannot generate test certificates: no `openssl` on PATH (the `cryptography` package"
        " is not a dependency of this project); install openssl to run the TLS tests"
    )


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _signed(name: str, subject: str, extensions: str, directory: Path) -> None:
    """``{name}.key`` and ``{name}.crt`` signed by ``ca.key``."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
             cwd=directory)  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=directory)  # fmt: skip


def make_certificates(directory: Path) -> Certificates:
    """A self-signed CA, a server certificate for 127.0.0.1/localhost and a client one."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=cancel-broker test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    _signed(
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        directory,
    )
    _signed("client", "/CN=cancel-broker test client", "extendedKeyUsage=clientAuth\n", directory)
    return Certificates(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


# -- a TLS-only redis-server ----------------------------------------------------------


def redis_tls_unsupported(executable: str | None = None) -> str | None:
    """Why this redis-server cannot serve TLS, or None when it can.

    A build without TLS refuses the ``tls-port`` directive ("Bad directive"); a build with
    it accepts it and, asked to listen nowhere, exits saying so.
    """
    exe = executable or find_redis_server()
    result = subprocess.run(
        [exe, "--port", "0", "--tls-port", "0", "--save", "", "--daemonize", "no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    output = result.stdout + result.stderr
    if "not listen anywhere" in output:
        return None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return (
        f"{exe} ({version.stdout.strip()}) was built without TLS support:"
        f" `--tls-port` is refused ({output.strip()[-300:]!r}). Install a redis-server built"
        " with TLS (Debian's redis-server 7.x is) or point CANCEL_BROKER_REDIS_SERVER at one"
    )


def tls_url(
    port: int,
    certs: Certificates,
    *,
    username: str | None = None,
    password: str | None = None,
    client_cert: bool = True,
    ca: bool = True,
) -> str:
    """A ``rediss://`` URL carrying every TLS option in its query string."""
    params = {"ssl_cert_reqs": "required", "ssl_check_hostname": "true"}
    if ca:
        params["ssl_ca_certs"] = str(certs.ca)
    if client_cert:
        params["ssl_certfile"] = str(certs.client_cert)
        params["ssl_keyfile"] = str(certs.client_key)
    auth = ""
    if username is not None:
        auth = f"{quote(username, safe='')}:{quote(password or '', safe='')}@"
    return f"rediss://{auth}127.0.0.1:{port}/0?{urlencode(params)}"


class TlsRedis:
    """A private redis-server that listens on TLS only (``port 0``), client certificates
    required (``tls-auth-clients yes``, the Redis default).

    Started through :class:`EmbeddedRedis`: its plain port serves the readiness check
    only, and is closed (``CONFIG SET port 0``) before the server is handed out.
    """

    def __init__(self, certs: Certificates) -> None:
        self.certs = certs
        self.tls_port = 0
        self._server: EmbeddedRedis | None = None

    def start(self) -> None:
        last: Exception | None = None
        for _attempt in range(3):  # another process may take the free port first
            self.tls_port = free_port()
            server = EmbeddedRedis(
                extra_args=(
                    "--tls-port", str(self.tls_port),
                    "--tls-cert-file", str(self.certs.server_cert),
                    "--tls-key-file", str(self.certs.server_key),
                    "--tls-ca-cert-file", str(self.certs.ca),
                    "--tls-auth-clients", "yes",
                )
            )  # fmt: skip
            try:
                server.start()
            except EmbeddedRedisError as exc:
                server.close()
                last = exc
                continue
            self._server = server
            break
        else:
            raise EmbeddedRedisError(f"no TLS redis-server could start: {last}")
        plain = redis.Redis(host="127.0.0.1", port=self._server.port, socket_timeout=5)
        try:
            plain.config_set("port", 0)
        except redis.ConnectionError:
            pass  # the listener closed under this very connection's reply: that is the goal
        finally:
            plain.close()

    @property
    def plain_port(self) -> int:
        assert self._server is not None
        return self._server.port

    def url(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        client_cert: bool = True,
        ca: bool = True,
    ) -> str:
        return tls_url(
            self.tls_port,
            self.certs,
            username=username,
            password=password,
            client_cert=client_cert,
            ca=ca,
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


# -- ACL rules from docs/security.md --------------------------------------------------

_VARIABLE = re.compile(r"\$([A-Z_][A-Z0-9_]*)")


def documented_acl_block(doc: Path = SECURITY_DOC) -> str:
    """The fenced block that follows the ``acl-rules`` marker in docs/security.md."""
    text = doc.read_text()
    start = text.index(ACL_MARKER)
    match = re.compile(r"```[a-z]*\n(.*?)\n```", re.DOTALL).search(text, start)
    if match is None:
        raise ValueError(f"no fenced block after {ACL_MARKER!r} in {doc}")
    return match.group(1)


def documented_acl_rules(
    passwords: Mapping[str, str], doc: Path = SECURITY_DOC
) -> dict[str, list[str]]:
    """``{username: [rule, ...]}``: the arguments of each ``ACL SETUSER`` in the block.

    The block is shell: lines continued with a backslash, single-quoted rules, and
    ``"$VARIABLE"`` references, which are replaced from ``passwords`` (an unknown
    variable is an error, so the doc and the test cannot silently disagree).
    """

    def expand(token: str) -> str:
        def value(match: re.Match[str]) -> str:
            if match.group(1) not in passwords:
                raise KeyError(f"{match.group(1)} is used in docs/security.md; give its value")
            return passwords[match.group(1)]

        return _VARIABLE.sub(value, token)

    users: dict[str, list[str]] = {}
    for line in documented_acl_block(doc).replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        upper = [word.upper() for word in words]
        if words[0] != "redis-cli" or upper[1:3] != ["ACL", "SETUSER"] or len(words) < 4:
            raise ValueError(f"not a `redis-cli ACL SETUSER user rules...` line: {line!r}")
        users[words[3]] = [expand(word) for word in words[4:]]
    return users
