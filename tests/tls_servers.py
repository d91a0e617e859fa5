"""TLS servers for tests, with certificates made on the spot by ``trustme``: an SMTP server
that requires STARTTLS and takes AUTH only over TLS, and a Redis that speaks only TLS and
wants a password. Both on 127.0.0.1, on this file's own ports (16600-16619).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

PORTS = range(16600, 16620)


def free_port_in_range() -> int:
    """A free port of ours on 127.0.0.1."""
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 16600-16619")


@dataclass
class Certificates:
    """A test CA and a server certificate it issued for localhost and 127.0.0.1."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        certs = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        ca.cert_pem.write_to_path(str(certs.ca_file))
        server.cert_chain_pems[0].write_to_path(str(certs.cert_file))
        server.private_key_pem.write_to_path(str(certs.key_file))
        return certs

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass
class Delivered:
    rcpt_tos: list[str]
    content: bytes
    login: str | None
    tls: bool


@dataclass
class TlsSMTPServer:
    """aiosmtpd requiring STARTTLS; AUTH (PLAIN/LOGIN) only over TLS, for one user."""

    certs: Certificates
    user: str = "mailer"
    password: str = "smtp-pass-Zq81"
    port: int = field(default_factory=free_port_in_range)
    received: list[Delivered] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    _controller: Controller | None = None

    def url(self, query: str = "starttls=true", credentials: bool = False) -> str:
        auth = f"{self.user}:{self.password}@" if credentials else ""
        return f"smtp://{auth}127.0.0.1:{self.port}?{query}"

    def start(self) -> TlsSMTPServer:
        self._controller = Controller(
            _TlsHandler(self), hostname="127.0.0.1", port=self.port, ready_timeout=10,
            tls_context=self.certs.server_context(), require_starttls=True,
            authenticator=self._authenticate, auth_require_tls=True, auth_required=False,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            login, password = auth_data.login.decode(), auth_data.password.decode()
            self.logins.append((login, password))
            return AuthResult(success=login == self.user and password == self.password,
                              auth_data=auth_data)
        return AuthResult(success=False)


class _TlsHandler:
    def __init__(self, server: TlsSMTPServer) -> None:
        self.server = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.server.received.append(Delivered(
            list(envelope.rcpt_tos), envelope.original_content or envelope.content,
            session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword)
            else None,
            session.ssl is not None,
        ))
        return "250 2.0.0 Message accepted"


@dataclass
class TlsRedis:
    """``redis-server`` listening only on a TLS port, with a password."""

    certs: Certificates
    directory: Path
    password: str = "redis-pass-Jx42"
    port: int = field(default_factory=free_port_in_range)
    _process: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        return (f"rediss://:{self.password}@localhost:{self.port}/0"
                f"?ssl_cert_reqs=required&ssl_ca_certs={self.certs.ca_file}")

    def start(self) -> TlsRedis:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed on PATH for the rediss:// test"
        self._process = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(self.certs.cert_file),
             "--tls-key-file", str(self.certs.key_file),
             "--tls-ca-cert-file", str(self.certs.ca_file), "--tls-auth-clients", "no",
             "--requirepass", self.password, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=(self.directory / "redis.log").open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            assert self._process.poll() is None, (self.directory / "redis.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, "redis-server --tls-port did not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
