"""Hosts of their own on one Linux machine: network namespaces on a virtual bridge.

Each :class:`Host` is a network namespace (``ip netns``) with one veth pair: its own
end, ``eth0`` with an address of its own, and the other end a port of a bridge in the
machine's namespace. The bridge has an address too (``.254``): what runs in the test's
own process (an SMTP server, the test's Redis and HTTP clients) is reached from the
hosts there. Nothing in a host reaches the machine's loopback: a Redis in a host of its
own is reachable only over the virtual network.

A process runs on a host through the project's one runner (:class:`Process`) as
``ip netns exec <namespace> <command line>``; :meth:`Host.cut` takes the host's cable
out (its bridge port goes down: every packet it sends is dropped, established
connections stay open and TCP retransmits) and :meth:`Host.restore` puts it back;
:meth:`Host.blackhole` cuts it off one address only.

Root only (creating namespaces needs ``CAP_NET_ADMIN`` and ``CAP_SYS_ADMIN``); every
name starts with ``efns`` (namespaces) or ``efh-`` (links), and :meth:`Network.create`
removes what a run that died left behind, so two runs never trip over each other's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import redis

from eventflow.devstack.processes import Process
from eventflow.devstack.redis import find_redis_server

#: Every namespace of these tests is named ``efns-<host>``; the bridge ``efns-br0``.
NAMESPACE_PREFIX = "efns-"
BRIDGE = "efns-br0"
#: The machine-side end of each host's veth pair is ``efh-<host>``.
LINK_PREFIX = "efh-"
#: The private subnet of the virtual network (a /24); the bridge is ``.254`` on it.
SUBNET = "10.203.0"
BRIDGE_ADDRESS = f"{SUBNET}.254"


def why_not_available() -> str | None:
    """Why namespaces cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, veth pairs): run as root"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, check=False).returncode != 0:
        return "iproute2's `ip netns` does not work here"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip <args>`` in the machine's namespace."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                            check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


class Host:
    """A network namespace with one address on the bridge."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.namespace = NAMESPACE_PREFIX + name
        self.address = address
        self.link = (LINK_PREFIX + name)[:15]  # the kernel's limit on a link's name
        self.processes: list[Process] = []

    def create(self) -> Host:
        ip("netns", "add", self.namespace)
        ip("link", "add", self.link, "type", "veth", "peer", "name", "eth0",
           "netns", self.namespace)
        ip("link", "set", self.link, "master", BRIDGE, "up")
        self.exec("ip", "addr", "add", f"{self.address}/24", "dev", "eth0")
        self.exec("ip", "link", "set", "eth0", "up")
        self.exec("ip", "link", "set", "lo", "up")
        return self

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a short command in the namespace and wait for it."""
        result = subprocess.run(["ip", "netns", "exec", self.namespace, *args],
                                capture_output=True, text=True, timeout=10, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{self.namespace}: {' '.join(args)}: {result.stderr.strip()}")
        return result

    def run(self, command: str, env: Mapping[str, str], log: Path) -> Process:
        """Start ``command`` (a Procfile-style line) on this host, through the one runner."""
        process = Process(f"ip netns exec {self.namespace} {command}", env, log)
        self.processes.append(process)
        return process

    def cut(self) -> None:
        """Pull the cable: the host's bridge port goes down, and what it sends is lost."""
        ip("link", "set", self.link, "down")

    def restore(self) -> None:
        """Plug the cable back in."""
        ip("link", "set", self.link, "up")

    def blackhole(self, address: str) -> None:
        """Drop what the host sends to ``address`` only (a partial partition: the host
        still reaches the rest), with a blackhole route in its namespace."""
        self.exec("ip", "route", "add", "blackhole", f"{address}/32")

    def unblackhole(self, address: str) -> None:
        self.exec("ip", "route", "del", "blackhole", f"{address}/32")

    def destroy(self) -> None:
        for process in self.processes:
            process.stop(timeout=5)
        _kill_everything_in(self.namespace)
        ip("link", "del", self.link, check=False)
        ip("netns", "del", self.namespace, check=False)


class Network:
    """A bridge with an address in the machine's namespace, and hosts on it."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}

    def create(self) -> Network:
        remove_stale()
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        return self

    def add_host(self, name: str, number: int) -> Host:
        """A new host ``name`` at ``<subnet>.<number>``."""
        host = Host(name, f"{SUBNET}.{number}").create()
        self.hosts[name] = host
        return host

    def destroy(self) -> None:
        for host in self.hosts.values():
            host.destroy()
        ip("link", "del", BRIDGE, check=False)


def remove_stale() -> None:
    """Remove the namespaces, links and bridge a run that died left behind."""
    listed = ip("netns", "list", check=False).stdout.split("\n")
    for namespace in (line.split()[0] for line in listed if line.strip()):
        if namespace.startswith(NAMESPACE_PREFIX):
            _kill_everything_in(namespace)
            ip("netns", "del", namespace, check=False)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(LINK_PREFIX) or name == BRIDGE:
            ip("link", "del", name, check=False)


def _kill_everything_in(namespace: str) -> None:
    """SIGKILL what is still running in ``namespace`` (a test's own processes only: the
    namespace is one these tests made)."""
    found = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                           text=True, check=False)
    for pid in found.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def network() -> Iterator[Network]:
    """A new virtual network, removed with everything on it at the end."""
    net = Network()
    try:
        yield net.create()
    finally:
        net.destroy()


def start_redis(host: Host, log_dir: Path, port: int = 6379, timeout: float = 15) -> Process:
    """A ``redis-server`` on ``host``, listening on the host's address only."""
    process = host.run(
        f"{find_redis_server()} --bind {host.address} --port {port} --save '' "
        "--appendonly no --protected-mode no --daemonize no",
        {}, log_dir / f"redis-{host.name}.log",
    )
    client = redis.Redis(host=host.address, port=port, socket_connect_timeout=0.5,
                         socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            process.check_alive()
            try:
                client.ping()
                return process
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"redis on {host.address}: {process.log_tail()}")
                time.sleep(0.05)
    finally:
        client.close()
