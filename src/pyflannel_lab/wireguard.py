"""What the tests and benchmarks look at in a wireguard lab cluster: the devices and peers as
a node's `wg` shows them (through the node's own /run/wireguard, pyflannel_lab.daemons),
the public keys in the leases, and captures on a segment's wire. Reads only."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import TYPE_CHECKING

from pyflannel_lab.capture import Capture, WireReport, encryption_violations

if TYPE_CHECKING:
    from pyflannel_lab.cluster import Cluster, LabNode

WG_DEV, WG_DEV6 = "flannel-wg", "flannel-wg-v6"
WG_PORT, WG_PORT6 = 51820, 51821


def userspace_wireguard_missing() -> str | None:
    """Why the userspace wireguard lab cannot run here, None when it can: wireguard-go,
    wg and tcpdump on PATH, and /dev/net/tun usable."""
    for tool in ("wireguard-go", "wg", "tcpdump"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup.sh installs it)"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        return f"needs TUN (/dev/net/tun: {e.strerror})"
    os.close(fd)
    return None


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    preshared_key: str  # "(none)" when there is none
    endpoint: str  # "(none)" until known
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # Unix seconds, 0: never
    rx: int
    tx: int
    keepalive: str  # "off" or seconds

    @property
    def identity(self) -> tuple[str, str, str, tuple[str, ...], str]:
        """What the daemon configures (not the counters)."""
        return (self.public_key, self.preshared_key, self.endpoint, self.allowed_ips,
                self.keepalive)


@dataclass(frozen=True)
class WgDevice:
    public_key: str
    listen_port: int
    peers: dict[str, WgPeer]  # by public key


def wg_show(cl: Cluster, node: LabNode, dev: str = WG_DEV) -> WgDevice | None:
    """`wg show <dev> dump` as the node sees it; None when the device (or its UAPI socket)
    is not there."""
    r = cl.node_run(node, "wg", "show", dev, "dump", check=False, timeout=20)
    lines = r.stdout.splitlines()
    if r.returncode != 0 or not lines:
        return None
    # interface: private-key public-key listen-port fwmark
    iface = lines[0].split("\t")
    peers = {}
    for line in lines[1:]:
        f = line.split("\t")
        allowed = tuple(sorted(f[3].split(","))) if f[3] != "(none)" else ()
        peers[f[0]] = WgPeer(f[0], f[1], f[2], allowed, int(f[4]), int(f[5]), int(f[6]), f[7])
    return WgDevice(iface[1], int(iface[2]), peers)


def lease_public_keys(cl: Cluster, field: str = "BackendData") -> dict[str, str]:
    """Public IP -> the wireguard public key in its lease (`field` BackendV6Data: the
    IPv6 device's)."""
    return {a["PublicIP"]: a[field]["PublicKey"] for a in cl.leases().values()
            if isinstance(a.get(field), dict) and "PublicKey" in a[field]}


def expected_peer(cl: Cluster, peer: LabNode, keys: dict[str, str],
                  port: int = WG_PORT) -> tuple[str, str, tuple[str, ...]] | None:
    """(public key, endpoint, allowed IPs) another node should have for `peer`."""
    subnet, key = cl.subnet_of(peer), keys.get(str(peer.addr))
    if subnet is None or key is None:
        return None
    return key, f"{peer.addr}:{port}", (str(subnet),)


def peers_converged(cl: Cluster, port: int = WG_PORT) -> bool:
    """Every node's flannel-wg has exactly one peer per other node, with the key of its
    lease, its endpoint and its subnet as the allowed IPs."""
    try:
        keys = lease_public_keys(cl)
    except (RuntimeError, KeyError, ValueError):
        return False
    for node in cl.nodes.values():
        dev = wg_show(cl, node)
        if dev is None or dev.public_key != keys.get(str(node.addr)):
            return False
        want = {expected_peer(cl, o, keys, port) for o in cl.nodes.values() if o is not node}
        have = {(p.public_key, p.endpoint, p.allowed_ips) for p in dev.peers.values()}
        if None in want or have != want:
            return False
    return True


def capture_segment(cl: Cluster, segment: int, name: str) -> Capture:
    """A capture on the router's leg of `segment` (every packet to or from that segment's
    nodes that crosses the router), written to `<lab workdir>/<name>.pcap`."""
    if cl.router is None:
        raise ValueError("capture_segment needs a lab with more than one segment (a router)")
    return Capture(cl.router, f"r{segment}", Path(cl.workdir) / f"{name}.pcap")


def wire_report(cl: Cluster, cap: Capture, port: int | Iterable[int]) -> WireReport:
    """The capture checked against the cluster's nodes, tunnel port(s) and networks."""
    nets = [ip_network(cl.netconf[k]) for k in ("Network", "IPv6Network") if k in cl.netconf]
    nodes = [n.addr for n in cl.nodes.values()] + [n.addr6 for n in cl.nodes.values()
                                                   if n.addr6 is not None]
    return encryption_violations(cap.packets(), nodes, port, nets)
