"""Hosts for multi-node tests: network namespaces on one bridge, with partitions on demand.

``Cluster(n)`` makes a "head" namespace holding a bridge (node 0 and the
coordinator live there) and ``n`` node namespaces, each with a veth pair whose
far end is a port of the bridge, all on one private /24. ``partition(k)``
takes node k's port off the bridge: its packets go nowhere and nothing
reaches it, with no reset or error on either side (what a real partition
looks like to TCP); ``heal(k)`` puts it back. ``close()`` kills every process
left in any namespace (returning their pids, so a test can assert there were
none) and deletes the namespaces, whatever happened before.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import pytest

__all__ = ["Cluster", "require_netns"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def require_netns() -> None:
    """Skip the test, saying why, where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests need root to create network namespaces (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("multi-host tests need the `ip` command (iproute2)")
    name = f"rwprobe{os.getpid()}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    _ip("netns", "del", name, check=False)


class Cluster:
    def __init__(self, nodes: int) -> None:
        require_netns()
        tag = f"{random.Random().getrandbits(24):06x}"
        self.head = f"rw{tag}h"
        self.nodes = [f"rw{tag}n{k}" for k in range(1, nodes + 1)]
        self._ports = [f"rw{tag}p{k}" for k in range(1, nodes + 1)]
        rng = random.Random()
        self.subnet = f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 250)}"
        self.head_addr = f"{self.subnet}.1"
        self.addrs = [f"{self.subnet}.{k + 1}" for k in range(1, nodes + 1)]
        try:
            _ip("netns", "add", self.head)
            _ip("-n", self.head, "link", "set", "lo", "up")
            _ip("-n", self.head, "link", "add", "br0", "type", "bridge")
            # A bridge takes the lowest MAC of its ports unless given one: taking a port off
            # (a partition) could change it, and every other node's ARP entry for the head
            # would point nowhere until it expires: one cut-off node would cut off others.
            _ip("-n", self.head, "link", "set", "br0", "address", "02:72:77:00:00:01")
            _ip("-n", self.head, "addr", "add", f"{self.head_addr}/24", "dev", "br0")
            _ip("-n", self.head, "link", "set", "br0", "up")
            # Strict reverse-path filtering: once a port leaves the bridge, what arrives on it
            # is dropped. Without it Linux (weak host model) still accepts the cut-off node's
            # packets for the head's address, and the partition is one-way for a while.
            subprocess.run(["ip", "netns", "exec", self.head, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"],
                           check=True, capture_output=True, timeout=30)
            for ns, port, addr in zip(self.nodes, self._ports, self.addrs):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.head)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.head, "link", "set", port, "master", "br0")
                _ip("-n", self.head, "link", "set", port, "up")
        except subprocess.CalledProcessError as exc:
            self.close()
            pytest.skip(f"cannot build the test network: {' '.join(exc.cmd)}: {exc.stderr.strip()}")

    def namespace(self, node: int) -> str:
        """Node 0 is the head (with the coordinator); node k >= 1 has its own namespace."""
        return self.head if node == 0 else self.nodes[node - 1]

    def address(self, node: int) -> str:
        return self.head_addr if node == 0 else self.addrs[node - 1]

    def popen(self, node: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``node`` (``ip netns exec`` execs it: the pid is the command's own)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(node), *argv], **kwargs)

    def partition(self, node: int) -> None:
        _ip("-n", self.head, "link", "set", self._ports[node - 1], "nomaster")

    def heal(self, node: int) -> None:
        _ip("-n", self.head, "link", "set", self._ports[node - 1], "master", "br0")

    def pids(self) -> dict[str, list[int]]:
        found = {}
        for ns in [self.head, *self.nodes]:
            result = _ip("netns", "pids", ns, check=False)
            pids = [int(p) for p in result.stdout.split()] if result.returncode == 0 else []
            if pids:
                found[ns] = pids
        return found

    def close(self) -> dict[str, list[int]]:
        """Kill what is left in every namespace, delete them all; return what was left."""
        left = self.pids()
        for pids in left.values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        for ns in [*self.nodes, self.head]:
            _ip("netns", "del", ns, check=False)
        return left
