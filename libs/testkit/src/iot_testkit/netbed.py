"""Several hosts on one machine: a network namespace per host, each with its own address on one switch (a
bridge in a namespace of its own), for the scale-out test (tests/scale). Needs root and iproute2.

Every host is ``{tag}-{name}`` with the address ``10.231.{net}.{10 + index}/24``; the machine itself is
on the switch too (``.1``), so the test drives the hosts and reads their databases from outside.
:meth:`NetBed.cut` takes a host's cable out (its switch port goes down: packets are dropped silently, its
TCP connections stall as on a real network failure, nothing is reset) and :meth:`NetBed.restore` puts it
back. :meth:`NetBed.down` removes every namespace and link, and with them what ran inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
ETC_NETNS = Path("/etc/netns")


def available() -> str | None:
    """Why the test bed cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and veth links)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"iotprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def enter(namespace: str) -> None:
    """Move this (single-threaded) process into ``namespace``'s network: for a process the bed spawns
    with multiprocessing, which cannot be started through ``ip netns exec``."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str
    port_link: str
    """The switch's end of the host's cable."""

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]


class NetBed:
    """The hosts of ``names`` on one switch, with the machine at ``gateway``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.tag = f"iot{secrets.token_hex(2)}"
        net = secrets.randbelow(200) + 20
        self.gateway = f"10.231.{net}.1"
        self.switch = f"{self.tag}-sw"
        self.hosts = {
            name: Host(name, f"{self.tag}-{name}", f"10.231.{net}.{10 + i}", f"{self.tag}p{i}")
            for i, name in enumerate(names)
        }
        self._up = False

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def up(self) -> NetBed:
        self._up = True
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        # The machine's own port: the test reads the database and the services' endpoints through it.
        _ip("link", "add", f"{self.tag}m", "type", "veth", "peer", "name", f"{self.tag}M")
        _ip("link", "set", f"{self.tag}M", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", f"{self.tag}M", "master", "br0", "up")
        _ip("addr", "add", f"{self.gateway}/24", "dev", f"{self.tag}m")
        _ip("link", "set", f"{self.tag}m", "up")
        for i, host in enumerate(self.hosts.values()):
            # The machine's name servers are not reachable from a host: name look-ups must fail at once
            # (`ip netns exec` mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf), not time out.
            etc = ETC_NETNS / host.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            _ip("netns", "add", host.namespace)
            inside = f"{self.tag}h{i}"
            _ip("link", "add", inside, "type", "veth", "peer", "name", host.port_link)
            _ip("link", "set", inside, "netns", host.namespace)
            _ip("link", "set", host.port_link, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", host.port_link, "master", "br0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "link", "set", inside, "name", "eth0")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
        return self

    def cut(self, name: str) -> None:
        """Unplug ``name``: its switch port goes down; its packets are dropped, its connections stall."""
        _ip("-n", self.switch, "link", "set", self.hosts[name].port_link, "down")

    def restore(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[name].port_link, "up")

    def down(self) -> None:
        """Remove every namespace and link (processes still inside lose their network, not their life:
        the caller stops them first)."""
        if not self._up:
            return
        for host in self.hosts.values():
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.namespace)
            shutil.rmtree(ETC_NETNS / host.namespace, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.switch)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", f"{self.tag}m")
        self._up = False
