"""The lab's pcap reader and wire check (pyflannel_lab.capture) on frames built here: the
check that proves wireguard encrypts must see a pod address carried in clear (vxlan) and a
node-to-node packet that is not the tunnel's, or it could not fail."""

from __future__ import annotations

import os
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from pyflannel_lab.capture import encryption_violations, parse_ip, read_pcap
from pyflannel_lab.probe import ProbeResult

NODE1, NODE2 = IPv4Address("192.168.90.1"), IPv4Address("192.168.91.2")
POD1, POD2 = IPv4Address("10.244.5.2"), IPv4Address("10.244.65.2")
NET = IPv4Network("10.244.0.0/16")


def checksum(hdr: bytes) -> int:
    total = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: IPv4Address, dst: IPv4Address, proto: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                      src.packed, dst.packed)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ether(ip: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip


def pcap(frames: list[bytes]) -> bytes:
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    for i, f in enumerate(frames):
        out += struct.pack("<IIII", i, 0, len(f), len(f)) + f
    return out


def vxlan_frame() -> bytes:
    inner = ether(ipv4(POD1, POD2, 1, b"\x08\x00" + b"\x00" * 30))
    return ether(ipv4(NODE1, NODE2, 17, udp(40000, 8472, b"\x08" + b"\x00" * 7 + inner)))


def wireguard_frame() -> bytes:
    return ether(ipv4(NODE1, NODE2, 17, udp(51820, 51820, b"\x04\x00\x00\x00" +
                                             os.urandom(200))))


def test_pcap_round_trip_and_inner_headers(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap([vxlan_frame(), wireguard_frame(), b"\xff" * 6 + b"\x00" * 6 +
                           b"\x08\x06" + b"\x00" * 28]))
    frames = read_pcap(path)
    assert len(frames) == 3
    vx, wg, arp = (parse_ip(f) for f in frames)
    assert vx is not None and (vx.src, vx.dst, vx.proto, vx.dport) == (NODE1, NODE2, 17, 8472)
    assert vx.inner == ((POD1, POD2),)
    assert wg is not None and wg.sport == wg.dport == 51820
    assert arp is None


def test_encrypted_traffic_passes() -> None:
    rep = encryption_violations([parse_ip(wireguard_frame()) for _ in range(50)],
                                [NODE1, NODE2], 51820, [NET])
    assert (rep.frames, rep.node_to_node, rep.tunnel, rep.violations) == (50, 50, 50, [])


def test_pod_address_in_clear_and_other_protocols_are_violations() -> None:
    # vxlan: UDP between the nodes, but the pods' header is readable inside
    rep = encryption_violations([parse_ip(vxlan_frame())], [NODE1, NODE2], 8472, [NET])
    assert rep.tunnel == 1 and len(rep.violations) == 1 and "inside, in clear" in \
        rep.violations[0]
    # plain TCP between the nodes, and a pod packet routed without any tunnel
    tcp = ether(ipv4(NODE1, NODE2, 6, struct.pack("!HH", 2379, 40000) + b"\x00" * 16))
    plain = ether(ipv4(POD1, POD2, 1, b"\x08\x00" + b"\x00" * 30))
    rep = encryption_violations([parse_ip(tcp), parse_ip(plain)], [NODE1, NODE2], 51820,
                                [NET])
    assert rep.tunnel == 0 and len(rep.violations) == 2
    assert "not UDP to/from 51820" in rep.violations[0]
    assert "outer IP header" in rep.violations[1]


def test_ipv6_pod_address_in_clear_is_a_violation() -> None:
    net6 = IPv6Network("fd10:244::/56")
    pod_a, pod_b = IPv6Address("fd10:244:0:33::2"), IPv6Address("fd10:244:0:e::2")
    inner6 = struct.pack("!IHBB16s16s", 6 << 28, 8, 58, 64, pod_a.packed, pod_b.packed)
    inner = b"\x02" * 12 + b"\x86\xdd" + inner6 + b"\x80\x00" + b"\x00" * 6
    frame = ether(ipv4(NODE1, NODE2, 17, udp(40000, 8472, b"\x08" + b"\x00" * 7 + inner)))
    rep = encryption_violations([parse_ip(frame)], [NODE1, NODE2], [8472], [NET, net6])
    assert rep.tunnel == 1 and len(rep.violations) == 1
    assert f"[inner {pod_a} > {pod_b}]" in rep.violations[0]
    # ciphertext: nothing
    rep = encryption_violations([parse_ip(wireguard_frame())], [NODE1, NODE2], [51820, 51821],
                                [NET, net6])
    assert rep.tunnel == 1 and rep.violations == []


def test_probe_result_longest_run_of_lost() -> None:
    assert ProbeResult(0.05, 100, ()).max_lost_run == 0
    assert ProbeResult(0.05, 100, (3, 7, 9)).max_lost_run == 1
    assert ProbeResult(0.05, 100, (3, 4, 9, 10, 11, 40)).max_lost_run == 3
