"""TLS servers for tests, with certificates made on the spot by ``trustme``: the project's
SMTP server requiring STARTTLS and taking AUTH only over TLS, and a Redis that speaks only TLS and
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

import trustme

from eventflow.devstack.smtp import SMTPServer

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


def tls_smtp_server(certs: Certificates, user: str = "mailer",
                    password: str = "smtp-pass-Zq81") -> SMTPServer:
    """The project's SMTP server, requiring STARTTLS, taking AUTH (PLAIN/LOGIN) only over
    TLS, for one user."""
    return SMTPServer(free_port_in_range(), tls_context=certs.server_context(),
                      login=(user, password))


def tls_smtp_url(server: SMTPServer, query: str = "starttls=true",
                 credentials: bool = False) -> str:
    """An ``SMTP_URL`` for ``server``, with its user's credentials if asked."""
    auth = f"{server.user}:{server.password}@" if credentials else ""
    return f"smtp://{auth}127.0.0.1:{server.port}?{query}"


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
