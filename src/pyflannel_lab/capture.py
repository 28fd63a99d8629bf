"""Packet captures on the lab's wires: tcpdump in one of the lab's namespaces writes a pcap
file in the lab's work directory, and a small reader of our own (classic pcap, Ethernet)
turns it into the IP headers the checks look at.

What an encrypted fabric must show on the wire (`encryption_violations`): between two nodes
only UDP to or from the tunnel's port, and no cluster (pod) address in any IP header that
can be read, the outer one or one carried inside in clear (vxlan's, ipip's): every offset
of every frame is tried as an IPv4 header, and one with a valid header checksum that names
a pod address counts (inside wireguard's ciphertext such a header turns up by chance with a
probability of about 2^-40 per offset); for IPv6, which has no header checksum, the pod
network's prefix bytes where an IPv6 header's source or destination would be.
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from pyflannel_lab.netns import NetNamespace, stop_process

PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",  # microseconds
              b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}  # nanoseconds
LINKTYPE_ETHERNET = 1
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
IPPROTO_TCP, IPPROTO_UDP = 6, 17
_V4_FIRST_BYTE = re.compile(rb"[\x45-\x4f]")  # version 4, IHL 5..15


@dataclass(frozen=True)
class IpPacket:
    """The outer IP header of one captured frame, and every IPv4 header found inside it."""

    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: int
    sport: int | None = None
    dport: int | None = None
    inner: tuple[tuple[IPv4Address, IPv4Address], ...] = ()
    payload: bytes = field(default=b"", repr=False)  # what follows the outer IP header

    def __str__(self) -> str:
        ports = f" {self.sport}->{self.dport}" if self.sport is not None else ""
        inner = "".join(f" [inner {s} > {d}]" for s, d in self.inner)
        return f"{self.src} > {self.dst} proto {self.proto}{ports}{inner}"


def _checksum_ok(header: bytes) -> bool:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def embedded_ipv4_headers(data: bytes) -> Iterator[tuple[int, IPv4Address, IPv4Address]]:
    """(offset, src, dst) of every plausible IPv4 header in `data`: version 4, a header
    length of 5..15 words that fits, a total length at least that, a valid checksum."""
    for m in _V4_FIRST_BYTE.finditer(data):
        i = m.start()
        ihl = (data[i] & 0x0F) * 4
        hdr = data[i:i + ihl]
        if len(hdr) < ihl or struct.unpack("!H", hdr[2:4])[0] < ihl or not _checksum_ok(hdr):
            continue
        yield i, IPv4Address(hdr[12:16]), IPv4Address(hdr[16:20])


def embedded_ipv6_headers(data: bytes, net: IPv6Network
                          ) -> Iterator[tuple[int, IPv6Address, IPv6Address]]:
    """(offset, src, dst) of every IPv6 header in `data` whose source or destination lies
    in `net`: IPv6 has no header checksum, so the search is for the network's prefix bytes
    where a header's source (offset 8) or destination (offset 24) would start, after a
    version-6 byte."""
    prefix = net.network_address.packed[:max(1, net.prefixlen // 8)]
    seen = set()
    start = 0
    while (p := data.find(prefix, start)) >= 0:
        start = p + 1
        for h in (p - 8, p - 24):
            if h < 0 or h in seen or len(data) - h < 40 or data[h] >> 4 != 6:
                continue
            src, dst = IPv6Address(data[h + 8:h + 24]), IPv6Address(data[h + 24:h + 40])
            if src in net or dst in net:
                seen.add(h)
                yield h, src, dst


def parse_ip(frame: bytes) -> IpPacket | None:
    """The IP packet in an Ethernet frame (one 802.1Q tag allowed), None for ARP and the
    like or a frame too short to hold its header."""
    if len(frame) < 14:
        return None
    off, ethertype = 12, struct.unpack("!H", frame[12:14])[0]
    if ethertype == ETH_P_8021Q and len(frame) >= 18:
        off, ethertype = 16, struct.unpack("!H", frame[16:18])[0]
    ip = frame[off + 2:]
    if ethertype == ETH_P_IP and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        proto = ip[9]
        src: IPv4Address | IPv6Address = IPv4Address(ip[12:16])
        dst: IPv4Address | IPv6Address = IPv4Address(ip[16:20])
        frag = struct.unpack("!H", ip[6:8])[0] & 0x1FFF
        payload = ip[ihl:]
    elif ethertype == ETH_P_IPV6 and len(ip) >= 40:
        proto, frag = ip[6], 0
        src, dst = IPv6Address(ip[8:24]), IPv6Address(ip[24:40])
        payload = ip[40:]
    else:
        return None
    sport = dport = None
    if proto in (IPPROTO_TCP, IPPROTO_UDP) and frag == 0 and len(payload) >= 4:
        sport, dport = struct.unpack("!HH", payload[:4])
    inner = tuple((s, d) for _off, s, d in embedded_ipv4_headers(payload))
    return IpPacket(src, dst, proto, sport, dport, inner, payload)


def read_pcap(path: Path) -> list[bytes]:
    """The frames of a classic pcap file of Ethernet frames (as tcpdump -w writes it)."""
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in PCAP_MAGIC:
        raise ValueError(f"{path}: not a pcap file (magic {data[:4].hex()})")
    order = PCAP_MAGIC[data[:4]]
    linktype = struct.unpack(f"{order}I", data[20:24])[0]
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: link type {linktype}, expected Ethernet ({LINKTYPE_ETHERNET})")
    frames, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack(f"{order}I", data[off + 8:off + 12])[0]
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames


@dataclass
class WireReport:
    """What `encryption_violations` saw: counts by kind, and what broke the rules."""

    frames: int = 0
    node_to_node: int = 0
    tunnel: int = 0  # node-to-node UDP to or from the tunnel's port
    violations: list[str] = field(default_factory=list)


def encryption_violations(packets: Iterable[IpPacket | None],
                          nodes: Iterable[IPv4Address | IPv6Address],
                          port: int | Iterable[int],
                          networks: Iterable[IPv4Network | IPv6Network]) -> WireReport:
    """Every IP packet between two of `nodes` must be UDP to or from `port` (one of them);
    no address inside one of `networks` (the cluster's) may appear in any readable IP
    header."""
    node_set, nets = set(nodes), list(networks)
    ports = {port} if isinstance(port, int) else set(port)
    nets6 = [n for n in nets if isinstance(n, IPv6Network)]
    rep = WireReport()

    def is_pod(a: IPv4Address | IPv6Address) -> bool:
        return any(a.version == n.version and a in n for n in nets)

    for p in packets:
        rep.frames += 1
        if p is None:
            continue
        if p.src in node_set and p.dst in node_set:
            rep.node_to_node += 1
            if p.proto == IPPROTO_UDP and ports & {p.sport, p.dport}:
                rep.tunnel += 1
            else:
                rep.violations.append(
                    f"node-to-node packet not UDP to/from {'/'.join(map(str, sorted(ports)))}"
                    f": {p}")
        if is_pod(p.src) or is_pod(p.dst):
            rep.violations.append(f"pod address in the outer IP header: {p}")
        inner6 = [(s, d) for n in nets6 for _off, s, d in embedded_ipv6_headers(p.payload, n)]
        if any(is_pod(s) or is_pod(d) for s, d in p.inner) or inner6:
            rep.violations.append(f"pod address in an IP header inside, in clear: {p}"
                                  + "".join(f" [inner {s} > {d}]" for s, d in inner6))
    return rep


class Capture:
    """tcpdump on `iface` inside `ns`, writing `path`; a context manager. `packets()` after
    it stopped."""

    def __init__(self, ns: NetNamespace, iface: str, path: Path) -> None:
        self.ns, self.iface, self.path = ns, iface, path
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Capture:
        # --immediate-mode, -U: every packet reaches the file at once (in the default
        # mode the last ones wait in the kernel's buffer, and are lost at the stop);
        # -Z root: no switch to the tcpdump user, who may not enter the lab's work directory.
        self._proc = subprocess.Popen(
            self.ns.exec_args("tcpdump", "-n", "--immediate-mode", "-U", "-Z", "root",
                              "-i", self.iface, "-w", str(self.path)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self._proc.stderr is not None
        # "listening on ...": capturing from here on
        line = self._proc.stderr.readline().decode(errors="replace")
        if "listening on" not in line:
            self.__exit__()
            raise RuntimeError(f"tcpdump on {self.iface} in {self.ns.name}: {line.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, grace=5, sig=signal.SIGINT)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def packets(self) -> list[IpPacket | None]:
        return [parse_ip(f) for f in read_pcap(self.path)]
