"""``make run``: the whole development stack under one supervisor, until Ctrl-C.

Redis is found or started first (see :mod:`eventflow.devstack.redis`) and stopped last,
so that it outlives every process writing to it. The Procfile's ``web``, ``worker`` and
``flower`` commands, the SMTP inbox and a webhook receiver (the development key's status
webhooks, printed with their signature checked) run under honcho's manager, each in a process
group of its own: on SIGINT or SIGTERM honcho sends SIGTERM to every group and SIGKILL
to what is left after a few seconds. Once everything answers, the URLs, the development
key and a ready ``curl`` line are printed.

Ports come from ``EVENTFLOW_DEV_API_PORT`` (8000), ``EVENTFLOW_DEV_SMTP_PORT`` (8025),
``EVENTFLOW_DEV_FLOWER_PORT`` (5555), ``EVENTFLOW_DEV_WEBHOOK_PORT`` (8026) and
``EVENTFLOW_DEV_REDIS_PORT`` (6379, where an already running Redis is looked for and the
embedded one listens).
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from honcho.manager import KILL_WAIT, Manager
from honcho.printer import Message, Printer

from eventflow.devstack import credentials as dev_credentials
from eventflow.devstack.credentials import DevCredentials
from eventflow.devstack.processes import read_procfile
from eventflow.devstack.redis import RedisHandle, RedisUnavailable, ensure_redis, port_is_free
from eventflow.settings import ConfigError, Settings, parse_smtp_url

#: The Procfile's process types that the stack runs, in the order they are started.
PROCFILE_TYPES = ("web", "worker", "flower")
#: Address the servers listen on: loopback, since the stack prints an admin key.
BIND_HOST = "127.0.0.1"
#: Seconds to wait for everything to answer before printing what still does not.
READY_TIMEOUT = 90.0
#: Signals that stop the stack.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Seconds honcho's runners get to report the pid of the process each started.
PID_TIMEOUT = 10.0
#: Name under which the supervisor's own announcements reach the printer.
BANNER = "devstack"
#: The contract's example event, posted by the printed ``curl`` line.
EXAMPLE_EVENT = {
    "user_id": "user-123",
    "event_type": "USER_NOTIFICATION",
    "payload": {"to_email": "test@example.com", "message": "Hello"},
}


@dataclass(frozen=True)
class DevPorts:
    """The ports of the development stack."""

    api: int = 8000
    smtp: int = 8025
    flower: int = 5555
    redis: int = 6379
    webhook: int = 8026

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DevPorts:
        """Defaults, overridden by ``EVENTFLOW_DEV_<NAME>_PORT``."""
        values = {}
        for name in ("api", "smtp", "flower", "redis", "webhook"):
            variable = f"EVENTFLOW_DEV_{name.upper()}_PORT"
            raw = environ.get(variable, "").strip()
            if raw:
                if not raw.isdigit() or not 0 < int(raw) < 65536:
                    raise SystemExit(f"{variable}: expected a port number, got {raw!r}")
                values[name] = int(raw)
        return cls(**values)


@dataclass(frozen=True)
class ProcessSpec:
    """One process for honcho: its name, shell command and environment."""

    name: str
    command: str
    env: dict[str, str]


def stack_environment(
    environ: Mapping[str, str],
    ports: DevPorts,
    redis_url: str,
    credentials: DevCredentials,
    bin_dir: Path,
) -> dict[str, str]:
    """The environment every process of the stack shares."""
    env = dict(environ)
    env.pop("PORT", None)  # set per process below; a stray one must not leak to the worker
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)])
    env["PYTHONUNBUFFERED"] = "1"
    env["REDIS_URL"] = redis_url
    env.setdefault("SMTP_URL", f"smtp://{BIND_HOST}:{ports.smtp}")
    env["EVENTFLOW_API_KEYS"] = with_key(env.get("EVENTFLOW_API_KEYS", ""), credentials.api_key)
    env["EVENTFLOW_ADMIN_KEYS"] = with_key(env.get("EVENTFLOW_ADMIN_KEYS", ""), credentials.api_key)
    env.setdefault("FLOWER_BASIC_AUTH", credentials.flower_basic_auth)
    # The development key's status webhooks go to the stack's receiver, on loopback.
    env["EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE"] = "true"
    name = credentials.key_name
    env["EVENTFLOW_WEBHOOKS"] = with_entry(env.get("EVENTFLOW_WEBHOOKS", ""), name,
                                           webhook_url(ports))
    env["EVENTFLOW_WEBHOOK_SECRETS"] = with_entry(env.get("EVENTFLOW_WEBHOOK_SECRETS", ""),
                                                  name, credentials.webhook_secret)
    env["EVENTFLOW_DEV_WEBHOOK_SECRET"] = credentials.webhook_secret
    # The worker's soft shutdown must end before honcho's SIGKILL (KILL_WAIT seconds after
    # its SIGTERM), so that tasks in hand go back to the queue rather than die mid-send.
    env.setdefault("EVENTFLOW_WORKER_SHUTDOWN_TIMEOUT", str(max(1, KILL_WAIT - 2)))
    return env


def with_key(keys: str, key: str) -> str:
    """``keys`` (comma-separated) with ``key`` added unless it is already there."""
    present = [item.strip() for item in keys.split(",") if item.strip()]
    return ",".join(present if key in present else [*present, key])


def with_entry(entries: str, name: str, value: str) -> str:
    """``entries`` (``name=value,...``) with ``name=value`` added unless ``name`` has one."""
    present = [item.strip() for item in entries.split(",") if item.strip()]
    if any(item.partition("=")[0].strip() == name for item in present):
        return ",".join(present)
    return ",".join([*present, f"{name}={value}"])


def webhook_url(ports: DevPorts) -> str:
    """Where the stack's webhook receiver listens."""
    return f"http://{BIND_HOST}:{ports.webhook}/hooks"


def plan_processes(
    procfile: Mapping[str, str],
    ports: DevPorts,
    env: Mapping[str, str],
    python: str,
) -> list[ProcessSpec]:
    """The Procfile's own ``web``, ``worker`` and ``flower`` commands, plus the SMTP inbox.

    The only change to the Procfile's commands is the listening address: ``0.0.0.0``
    becomes loopback, because the development stack is protected by a printed key only.
    """
    missing = [name for name in PROCFILE_TYPES if name not in procfile]
    if missing:
        raise SystemExit(f"Procfile: no {', '.join(missing)} process type")
    per_process_port = {"web": ports.api, "flower": ports.flower}
    specs = []
    for name in PROCFILE_TYPES:
        command = procfile[name].replace("0.0.0.0", BIND_HOST)
        process_env = dict(env)
        if name in per_process_port:
            process_env["PORT"] = str(per_process_port[name])
        specs.append(ProcessSpec(name, command, process_env))
    inbox = (
        f"{shlex.quote(python)} -m eventflow.devstack.smtp "
        f"--host {BIND_HOST} --port {ports.smtp} --outbox var/outbox"
    )
    specs.append(ProcessSpec("inbox", inbox, dict(env)))
    receiver = (
        f"{shlex.quote(python)} -m eventflow.devstack.webhooks "
        f"--host {BIND_HOST} --port {ports.webhook}"
    )
    specs.append(ProcessSpec("webhooks", receiver, dict(env)))
    return specs


def check_configuration(env: Mapping[str, str]) -> None:
    """Stop with the settings' own one-line message rather than a traceback per process."""
    try:
        Settings.from_env(env)
    except ConfigError as error:
        raise SystemExit(f"configuration: {error}") from None


def curl_line(api_port: int, api_key: str) -> str:
    """A ``curl`` command posting the contract's example event with ``api_key``."""
    return (
        f"curl -sS -X POST http://{BIND_HOST}:{api_port}/api/v1/events "
        f"-H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' "
        f"-d '{json.dumps(EXAMPLE_EVENT)}'"
    )


def banner(
    ports: DevPorts,
    redis: RedisHandle,
    credentials: DevCredentials,
    stack_env: Mapping[str, str],
    waiting_for: list[str],
) -> str:
    """What ``make run`` prints once the stack answers."""
    flower_auth = stack_env["FLOWER_BASIC_AUTH"]
    inbox = f"smtp://{BIND_HOST}:{ports.smtp}"
    if stack_env["SMTP_URL"] == inbox:
        mail = f"  SMTP inbox   {inbox}   messages kept in var/outbox/"
    else:
        server = parse_smtp_url(stack_env["SMTP_URL"], stack_env).describe()
        mail = f"  SMTP         {server}   (from SMTP_URL: real mail, the inbox gets none)"
    api = f"http://{BIND_HOST}:{ports.api}"
    user, _, password = flower_auth.partition(":")
    redis_where = {
        "REDIS_URL": "from REDIS_URL",
        "listening": "already running",
        "embedded": f"embedded, append-only file in {redis.data_dir}",
    }[redis.origin]
    lines = [
        "",
        "EventFlow development stack is up."
        if not waiting_for
        else f"EventFlow development stack started; not answering yet: {', '.join(waiting_for)}",
        f"  API          {api}/api/v1/events   (OpenAPI: {api}/api/v1/openapi.json)",
        f"  Health       {api}/health",
        f"  Stats        {api}/stats",
        f"  Metrics      {api}/metrics",
        f"  Flower       http://{BIND_HOST}:{ports.flower}/   user {user!r}, password {password!r}",
        f"  Redis        {redis.url}   ({redis_where})",
        mail,
        f"  Webhooks     {webhook_url(ports)}   (the dev key's status webhooks, printed here)",
        f"  API key      {credentials.api_key}   (producer and admin; kept in var/dev.env)",
        f"  FLOWER_BASIC_AUTH={flower_auth}",
        "",
        "Send the example event:",
        f"  {curl_line(ports.api, credentials.api_key)}",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status ``url`` answers with, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def smtp_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether an SMTP server greets on 127.0.0.1:``port``."""
    try:
        with socket.create_connection((BIND_HOST, port), timeout=timeout) as conn:
            greeting = conn.recv(3)
            conn.sendall(b"QUIT\r\n")
            return greeting == b"220"
    except OSError:
        return False


class StackPrinter(Printer):
    """honcho's printer; prints the supervisor's banner as is and notices the worker ready."""

    def __init__(self, output: TextIO) -> None:
        super().__init__(output)
        self.worker_ready = threading.Event()

    def write(self, message: Message) -> None:
        """Print ``message``; remember when the worker says it is ready."""
        if message.name == BANNER:
            print(message.data, file=self.output, flush=True)
            return
        if message.name == "worker" and b" ready." in _as_bytes(message.data):
            self.worker_ready.set()
        super().write(message)


def _as_bytes(data: bytes | str) -> bytes:
    return data if isinstance(data, bytes) else data.encode()


class StackManager(Manager):
    """honcho's manager, with a safe start and a hook once every process has been forked.

    honcho learns each process's pid from its event queue, and a Ctrl-C that came before
    it knew them all would fail inside honcho and leave processes running; so signals are
    held until every pid is known, then handled. The readiness watcher is a thread, and
    threads must not exist while honcho forks its runners: hence ``on_started``.
    """

    def __init__(self, printer: Printer, on_started: Callable[[StackManager], None]) -> None:
        super().__init__(printer)
        self._on_started = on_started

    def _start(self) -> None:
        held: list[signal.Signals] = []
        handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: held.append(signal.Signals(signum)))
        try:
            super()._start()
            self._wait_for_pids(PID_TIMEOUT)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if held:
            handler = handlers[held[0]]
            if callable(handler):
                handler(held[0], None)
            return
        self._on_started(self)

    def _wait_for_pids(self, timeout: float) -> None:
        """Take "started" events off the queue until every pid is known, then put all back."""
        taken = []
        deadline = time.monotonic() + timeout
        while not self._all_started() and time.monotonic() < deadline:
            try:
                message = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if message.type == "start":
                self._processes[message.name]["pid"] = message.data["pid"]
            taken.append(message)
        for message in taken:  # honcho's loop still reports each of them
            self.events.put(message)

    @property
    def stopping(self) -> bool:
        """Whether the stack is being stopped (a signal, or a process that ended)."""
        return bool(self._terminating)

    def announce(self, text: str) -> None:
        """Print ``text`` through the manager's event queue (in order with the rest)."""
        self.events.put(
            Message(type="line", data=text, time=datetime.datetime.now(), name=BANNER, colour=None)
        )


def watch_readiness(
    manager: StackManager,
    printer: StackPrinter,
    ports: DevPorts,
    announce: Callable[[list[str]], str],
    timeout: float,
) -> None:
    """Poll every part until it answers (or ``timeout``), then announce the stack."""
    checks: dict[str, Callable[[], bool]] = {
        "api": lambda: http_status(f"http://{BIND_HOST}:{ports.api}/health") == 200,
        "worker": printer.worker_ready.is_set,
        "flower": lambda: http_status(f"http://{BIND_HOST}:{ports.flower}/healthcheck") is not None,
        "smtp inbox": lambda: smtp_answers(ports.smtp),
        "webhook receiver": lambda: http_status(webhook_url(ports)) is not None,
    }
    waiting = list(checks)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        if manager.stopping:
            return
        waiting = [name for name in waiting if not checks[name]()]
        if waiting:
            time.sleep(0.25)
    manager.announce(announce(waiting))


def run(
    environ: Mapping[str, str] | None = None, root: Path | None = None, output: TextIO | None = None
) -> int:
    """Start the stack from ``root`` (the repository) and block until it is stopped."""
    # Until honcho's handlers take over, Ctrl-C or SIGTERM unwinds through the cleanup
    # below (and a SIGINT ignored by a launching shell is heard again).
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt)
    env = dict(os.environ if environ is None else environ)
    root = Path.cwd() if root is None else root
    output = sys.stdout if output is None else output
    procfile_path = root / "Procfile"
    if not procfile_path.is_file():
        raise SystemExit(f"{procfile_path} not found: run `make run` from the repository root")
    ports = DevPorts.from_env(env)
    busy = [
        f"{name} port {port} (EVENTFLOW_DEV_{name.upper()}_PORT)"
        for name, port in (("api", ports.api), ("smtp", ports.smtp), ("flower", ports.flower),
                           ("webhook", ports.webhook))
        if not port_is_free(port)
    ]
    if busy:
        raise SystemExit(f"already in use: {'; '.join(busy)}; stop what uses it or pick another")
    var_dir = root / "var"
    credentials = dev_credentials.load_or_create(var_dir)
    (var_dir / "outbox").mkdir(parents=True, exist_ok=True)
    try:
        redis = ensure_redis(ports.redis, var_dir, root / "deploy" / "redis.conf", environ=env)
    except RedisUnavailable as error:
        raise SystemExit(f"redis: {error}") from None
    try:
        stack_env = stack_environment(
            env, ports, redis.url, credentials, Path(sys.executable).parent
        )
        check_configuration(stack_env)
        specs = plan_processes(read_procfile(procfile_path), ports, stack_env, sys.executable)
        printer = StackPrinter(output)
        timeout = float(env.get("EVENTFLOW_DEV_READY_TIMEOUT", READY_TIMEOUT))

        def announce(waiting: list[str]) -> str:
            return banner(ports, redis, credentials, stack_env, waiting)

        def on_started(manager: StackManager) -> None:
            threading.Thread(
                target=watch_readiness,
                name="readiness",
                daemon=True,
                args=(manager, printer, ports, announce, timeout),
            ).start()

        manager = StackManager(printer, on_started)
        print(f"redis: {redis.url} ({redis.origin})", file=output, flush=True)
        for spec in specs:
            manager.add_process(spec.name, spec.command, env=spec.env, cwd=str(root))
        manager.loop()
    finally:
        if redis.process is not None:
            print("redis: stopping the embedded Redis", file=output, flush=True)
        redis.stop()
    # Stopped by Ctrl-C or SIGTERM is a normal end; otherwise a process died first.
    return 0 if manager.returncode in (130, 143) else int(manager.returncode or 0)


def interrupt(signum: int, frame: object) -> None:
    """Turn a stop signal that comes during start-up into :class:`KeyboardInterrupt`."""
    raise KeyboardInterrupt


def main() -> None:
    """Entry point of ``python -m eventflow.devstack``."""
    try:
        sys.exit(run())
    except KeyboardInterrupt:
        print("stopped before the stack was up", file=sys.stderr)
        sys.exit(130)
