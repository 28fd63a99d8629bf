"""A vxlan node for the kernel tests: flannel.1 on a veth in a namespace, and its peers'
objects (peer i: subnet 10.(1+i/256).(i%256).0/24, its VTEP MAC, public 192.168.x.y)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from pyflannel.backend.base import PeerState
from pyflannel.netlink import FdbEntry, Neighbour, Route
from pyflannel_lab.netns import NetNamespace


def vxlan(ns: NetNamespace) -> int:
    ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ns.ip("addr", "add", "192.168.0.1/16", "dev", "v0")
    ns.ip("link", "set", "v0", "up")
    ns.ip("link", "set", "v1", "up")
    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "v0",
          "local", "192.168.0.1", "nolearning", "dstport", "8472")
    ns.ip("link", "set", "flannel.1", "up")
    return int(ns.ip("-o", "link", "show", "flannel.1").stdout.split(":", 1)[0])


def subnet(i: int) -> IPv4Network:
    return IPv4Network((0x0A000000 + ((i + 256) << 8), 24))


def public(i: int, moved: bool = False) -> IPv4Address:
    return IPv4Address(0xC0A80000 + 2 + i + (1000 if moved else 0))


def mac(i: int) -> str:
    return f"0e:00:00:00:{i >> 8:02x}:{i & 255:02x}"


def peer(vx: int, i: int, moved: bool = False) -> PeerState:
    """Peer i as the vxlan backend wants it: an onlink route via its VTEP, the VTEP's
    neighbour and its FDB entry."""
    net = subnet(i)
    return PeerState(routes=(Route(net, net.network_address, vx, onlink=True),),
                     neighbours=(Neighbour(vx, net.network_address, mac(i)),),
                     fdb=(FdbEntry(vx, mac(i), public(i, moved)),))
