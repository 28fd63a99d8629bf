"""rtnetlink codec: byte layouts checked by hand against <linux/rtnetlink.h>, and round trips."""

from __future__ import annotations

import errno
import struct
import sys
from dataclasses import replace
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_network,
)
from socket import AF_INET, AF_INET6

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflannel.netlink import (
    IFA_F_NOPREFIXROUTE,
    IFA_F_PERMANENT,
    RTPROT_KERNEL,
    Address,
    FdbEntry,
    Link,
    LinkEvent,
    Neighbour,
    Nexthop,
    Op,
    Route,
    RtEvent,
)
from pyflannel.netlink.codec import (
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_DELNEXTHOP,
    RTM_NEWADDR,
    RTM_NEWNEXTHOP,
    RTM_NEWROUTE,
    NetlinkDecodeError,
    NetlinkError,
    decode_address,
    decode_error,
    decode_events,
    decode_link_info,
    decode_neigh,
    decode_nexthop,
    decode_route,
    encode_address_dump,
    encode_fdb,
    encode_fdb_dump,
    encode_get_route,
    encode_link_dump,
    encode_neigh_dump,
    encode_neighbour,
    encode_nexthop,
    encode_nexthop_dump,
    encode_op,
    encode_route,
    encode_route_dump,
    iter_messages,
    parse_dump_chunk,
)

# Netlink integers are host order; the expected bytes below are written for little-endian.
pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="layouts written for LE hosts")


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def payload(msg: bytes) -> tuple[int, int, int, int, int]:
    (only,) = list(iter_messages(msg))
    mtype, flags, seq, start, stop = only
    return mtype, flags, seq, start, stop


# --- hand-checked layouts ---------------------------------------------------------------------

def test_route_replace_layout() -> None:
    route = Route(IPv4Network("10.244.2.0/24"), IPv4Address("192.168.1.12"), 3)
    assert encode_route("replace", route, 7) == h("""
        3c000000 1800 0505 07000000 00000000
        02 18 00 00 fe 03 00 01 00000000
        0800 0f00 fe000000
        0800 0100 0af40200
        0800 0500 c0a8010c
        0800 0400 03000000
    """)
    # nlmsghdr: len 60, RTM_NEWROUTE, REQUEST|ACK|REPLACE|CREATE, seq 7, pid 0
    # rtmsg: AF_INET, /24, table main, proto boot, scope universe, unicast, no flags


def test_vxlan_route_replace_sets_onlink_flag() -> None:
    route = Route(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.0"), 4, onlink=True)
    msg = encode_route("replace", route, 1)
    assert msg[16:28] == h("02 18 00 00 fe 03 00 01 04000000")  # rtm_flags = RTNH_F_ONLINK


def test_route_delete_layout_uses_wildcards() -> None:
    route = Route(IPv4Network("10.244.2.0/24"), None, None, table=1000)
    assert encode_route("delete", route, 9) == h("""
        2c000000 1900 0500 09000000 00000000
        02 18 00 00 00 00 ff 00 00000000
        0800 0f00 e8030000
        0800 0100 0af40200
    """)
    # RTM_DELROUTE, REQUEST|ACK; table > 255 goes in RTA_TABLE only; protocol 0, scope
    # RT_SCOPE_NOWHERE, type RTN_UNSPEC match any route to the prefix.


def test_default_route_has_no_dst_attribute() -> None:
    route = Route(IPv4Network("0.0.0.0/0"), IPv4Address("192.168.0.1"), 2)
    msg = encode_route("replace", route, 1)
    assert [a for a in _attr_types(msg, 12)] == [15, 5, 4]


def _attr_types(msg: bytes, fixed: int) -> list[int]:
    off = 16 + fixed
    types = []
    while off < len(msg):
        alen, atype = struct.unpack_from("=HH", msg, off)
        types.append(atype)
        off += (alen + 3) & ~3
    return types


def test_neighbour_replace_layout() -> None:
    neigh = Neighbour(5, IPv4Address("10.244.2.0"), "0e:00:00:00:00:01")
    assert encode_neighbour("replace", neigh, 1) == h("""
        30000000 1c00 0505 01000000 00000000
        02 00 0000 05000000 8000 00 01
        0800 0100 0af40200
        0a00 0200 0e0000000001 0000
    """)
    # ndmsg: AF_INET, ifindex 5, NUD_PERMANENT, no flags, RTN_UNICAST; lladdr padded to 4


def test_neighbour_delete_layout() -> None:
    neigh = Neighbour(5, IPv4Address("10.244.2.0"), "0e:00:00:00:00:01")
    assert encode_neighbour("delete", neigh, 2) == h("""
        24000000 1d00 0500 02000000 00000000
        02 00 0000 05000000 0000 00 00
        0800 0100 0af40200
    """)


def test_fdb_replace_layout() -> None:
    entry = FdbEntry(5, "0e:00:00:00:00:01", IPv4Address("192.168.0.2"))
    assert encode_fdb("replace", entry, 3) == h("""
        30000000 1c00 0505 03000000 00000000
        07 00 0000 05000000 c000 02 00
        0a00 0200 0e0000000001 0000
        0800 0100 c0a80002
    """)
    # AF_BRIDGE, NUD_PERMANENT|NUD_NOARP (as `bridge fdb ... permanent`), NTF_SELF


def test_fdb_delete_names_the_remote() -> None:
    entry = FdbEntry(5, "0e:00:00:00:00:01", IPv4Address("192.168.0.2"))
    assert encode_fdb("delete", entry, 3) == h("""
        30000000 1d00 0500 03000000 00000000
        07 00 0000 05000000 0000 02 00
        0a00 0200 0e0000000001 0000
        0800 0100 c0a80002
    """)


def test_dump_requests() -> None:
    assert encode_route_dump(AF_INET, 4, 254) == h("""
        24000000 1a00 0103 04000000 00000000
        02 00 00 00 fe 00 00 00 00000000
        0800 0f00 fe000000
    """)
    assert encode_route_dump(AF_INET6, 4, None) == h("""
        1c000000 1a00 0103 04000000 00000000
        0a 00 00 00 00 00 00 00 00000000
    """)
    assert encode_neigh_dump(AF_INET, 5, 7) == h("""
        24000000 1e00 0103 05000000 00000000
        02 00 0000 00000000 0000 00 00
        0800 0800 07000000
    """)
    assert encode_fdb_dump(6, 7) == h("""
        1c000000 1e00 0103 06000000 00000000
        07 00 0000 07000000 0000 00 00
    """)


def test_get_route_layout() -> None:
    assert encode_get_route(IPv4Address("192.168.0.5"), 8) == h("""
        24000000 1a00 0100 08000000 00000000
        02 20 00 00 00 00 00 00 00000000
        0800 0100 c0a80005
    """)


def test_mixed_families_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_route("replace", Route(IPv6Network("2001:db8::/64"),
                                      IPv4Address("192.168.0.1"), 2), 1)
    with pytest.raises(TypeError):
        encode_op(Op("replace", "10.0.0.0/8"), 1)  # type: ignore[arg-type]


# --- decoding kernel messages -----------------------------------------------------------------

KERNEL_V6_ROUTE = h("""
    64000000 1800 0200 05000000 d2040000
    0a 40 00 00 fe 03 00 01 00000000
    0800 0f00 fe000000
    1400 0100 20010db8000100000000000000000000
    0800 0600 00040000
    1400 0500 20010db8000000000000000000000002
    0800 0400 02000000
    0500 1400 00 000000
""")  # RTM_NEWROUTE, MULTI, seq 5, pid 1234; metric 1024, RTA_PREF (u8, padded)


def test_decode_kernel_ipv6_route() -> None:
    mtype, flags, seq, start, stop = payload(KERNEL_V6_ROUTE)
    assert (mtype, flags, seq) == (RTM_NEWROUTE, NLM_F_MULTI, 5)
    assert decode_route(KERNEL_V6_ROUTE, start, stop) == Route(
        IPv6Network("2001:db8:1::/64"), IPv6Address("2001:db8::2"), 2)


def test_decode_multipath_route_reports_first_nexthop() -> None:
    nexthops = h("""
        1000 04 00 03000000 0800 0500 c0a80002
        1000 00 00 04000000 0800 0500 c0a80102
    """)  # rtnexthop len 16, flags onlink, ifindex 3, gateway; second hop
    body = (h("02 18 00 00 fe 03 00 01 00000000")
            + h("0800 0100 0a000100")
            + struct.pack("=HH", 4 + len(nexthops), 9) + nexthops)
    msg = struct.pack("=IHHII", 16 + len(body), RTM_NEWROUTE, 0, 0, 0) + body
    _, _, _, start, stop = payload(msg)
    assert decode_route(msg, start, stop) == Route(
        IPv4Network("10.0.1.0/24"), IPv4Address("192.168.0.2"), 3, onlink=True)


def test_decode_fdb_without_remote_is_skipped() -> None:
    # `33:33:00:00:00:01 dev v0 self permanent`: a device's own multicast address.
    body = h("07 00 0000 03000000 8000 02 00 0a00 0200 333300000001 0000")
    assert decode_neigh(body, 0, len(body)) is None


def test_decode_incomplete_neighbour_has_empty_lladdr() -> None:
    body = h("02 00 0000 03000000 0100 00 01 0800 0100 c0a80009")
    assert decode_neigh(body, 0, len(body)) == Neighbour(3, IPv4Address("192.168.0.9"), "", 1)


def test_decode_events_mixed_buffer() -> None:
    link = (h("00 00 0100 09000000 43100100 00000000")
            + h("0e00 0300 666c616e6e656c2e3100 0000"))  # IFLA_IFNAME "flannel.1"
    neigh = encode_neighbour("replace", Neighbour(9, IPv4Address("10.1.2.0"), "aa:bb:cc:dd:ee:ff"),
                             0)
    route = encode_route("delete", Route(IPv4Network("10.1.2.0/24"), None, 9), 0)
    unknown = struct.pack("=IHHII", 20, 20, 0, 0, 0) + b"\0" * 4  # RTM_NEWADDR: not decoded
    buf = (struct.pack("=IHHII", 16 + len(link), 17, 0, 0, 0) + link
           + neigh + unknown + route)
    events = decode_events(buf, len(buf))
    assert events == [
        RtEvent("link_del", LinkEvent(9, "flannel.1")),
        RtEvent("neigh_new", Neighbour(9, IPv4Address("10.1.2.0"), "aa:bb:cc:dd:ee:ff")),
        RtEvent("route_del", Route(IPv4Network("10.1.2.0/24"), None, 9, protocol=0,
                                   scope=255, type=0)),
    ]


def test_decode_error_with_extended_ack() -> None:
    text = b"Nexthop has invalid gateway\0"
    tlv = struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) & 3)
    body = struct.pack("=i", -errno.ENETUNREACH) + struct.pack("=IHHII", 60, 24, 0x505, 3, 0) + tlv
    flags = NLM_F_CAPPED | NLM_F_ACK_TLVS
    assert decode_error(body, 0, len(body), flags) == (errno.ENETUNREACH,
                                                       "Nexthop has invalid gateway")
    ack = struct.pack("=i", 0) + struct.pack("=IHHII", 60, 24, 0x505, 3, 0)
    assert decode_error(ack, 0, len(ack), NLM_F_CAPPED) == (0, "")


def test_truncated_messages_are_rejected() -> None:
    msg = encode_route("replace", Route(IPv4Network("10.0.0.0/8"), None, 1), 1)
    with pytest.raises(NetlinkDecodeError):
        list(iter_messages(msg[:-4]))
    bad_attr = msg[:-8] + struct.pack("=HH", 40, 4) + msg[-4:]
    with pytest.raises(NetlinkDecodeError):
        _, _, _, start, stop = payload(bad_attr)
        decode_route(bad_attr, start, stop)


# --- dump chunks ------------------------------------------------------------------------------

def _route_msg(seq: int, prefix: str, flags: int = NLM_F_MULTI) -> bytes:
    msg = bytearray(encode_route("replace", Route(ip_network(prefix), None, 2), seq))
    struct.pack_into("=H", msg, 6, flags)
    return bytes(msg)


def _done(seq: int, status: int = 0) -> bytes:
    return struct.pack("=IHHII", 20, NLMSG_DONE, NLM_F_MULTI, seq, 0) + struct.pack("=i", status)


def test_dump_chunk_skips_other_sequences_and_stops_at_done() -> None:
    buf = _route_msg(41, "10.0.0.0/24") + _route_msg(42, "10.0.1.0/24") + _done(42)
    items, done, interrupted = parse_dump_chunk(buf, len(buf), 42, RTM_NEWROUTE, decode_route)
    assert [r.dst for r in items] == [IPv4Network("10.0.1.0/24")]
    assert (done, interrupted) == (True, False)


def test_dump_chunk_filters_and_continues() -> None:
    buf = _route_msg(1, "10.0.0.0/24") + _route_msg(1, "10.0.1.0/24")
    items, done, _ = parse_dump_chunk(buf, len(buf), 1, RTM_NEWROUTE, decode_route,
                                      lambda r: r.dst.network_address.packed[2] == 1)
    assert [r.dst for r in items] == [IPv4Network("10.0.1.0/24")]
    assert not done


def test_dump_chunk_reports_interruption() -> None:
    buf = _route_msg(1, "10.0.0.0/24", NLM_F_MULTI | NLM_F_DUMP_INTR) + _done(1)
    _, done, interrupted = parse_dump_chunk(buf, len(buf), 1, RTM_NEWROUTE, decode_route)
    assert done and interrupted


def test_dump_chunk_raises_kernel_errors() -> None:
    buf = _done(1, -errno.ENOENT)
    with pytest.raises(NetlinkError) as info:
        parse_dump_chunk(buf, len(buf), 1, RTM_NEWROUTE, decode_route)
    assert info.value.errno == errno.ENOENT
    err = struct.pack("=IHHII", 36, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -errno.EBUSY) \
        + struct.pack("=IHHII", 28, 26, 0x301, 1, 0)
    with pytest.raises(NetlinkError) as info:
        parse_dump_chunk(err, len(err), 1, RTM_NEWROUTE, decode_route)
    assert info.value.errno == errno.EBUSY


# --- round trips ------------------------------------------------------------------------------

@st.composite
def routes(draw: st.DrawFn) -> Route:
    v6 = draw(st.booleans())
    bits = 128 if v6 else 32
    plen = draw(st.integers(0, bits))
    addr = draw(st.integers(0, 2**bits - 1))
    net = IPv6Network((addr, plen), strict=False) if v6 else IPv4Network((addr, plen), strict=False)
    gw_int = draw(st.none() | st.integers(0, 2**bits - 1))
    gw = None if gw_int is None else (IPv6Address(gw_int) if v6 else IPv4Address(gw_int))
    return Route(
        net, gw, draw(st.none() | st.integers(1, 2**31 - 1)),
        table=draw(st.integers(1, 2**32 - 1)), protocol=draw(st.integers(0, 255)),
        onlink=draw(st.booleans()), scope=draw(st.integers(0, 255)),
        type=draw(st.integers(1, 11)))


@given(routes(), st.integers(0, 2**32 - 1))
def test_route_round_trip(route: Route, seq: int) -> None:
    msg = encode_route("replace", route, seq)
    mtype, _flags, got_seq, start, stop = payload(msg)
    assert (mtype, got_seq) == (RTM_NEWROUTE, seq)
    assert decode_route(msg, start, stop) == route


macs = st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":"))
ips = st.one_of(st.integers(0, 2**32 - 1).map(IPv4Address),
                st.integers(0, 2**128 - 1).map(IPv6Address))


@given(st.integers(1, 2**31 - 1), ips, macs, st.integers(1, 0xFFFF))
def test_neighbour_round_trip(ifindex: int, ip: IPv4Address | IPv6Address, mac: str,
                              state: int) -> None:
    neigh = Neighbour(ifindex, ip, mac, state)
    _, _, _, start, stop = payload(encode_neighbour("replace", neigh, 1))
    assert decode_neigh(encode_neighbour("replace", neigh, 1), start, stop) == neigh


@given(st.integers(1, 2**31 - 1), macs, ips)
def test_fdb_round_trip(ifindex: int, mac: str, dst: IPv4Address | IPv6Address) -> None:
    entry = FdbEntry(ifindex, mac, dst)
    msg = encode_fdb("replace", entry, 1)
    _, _, _, start, stop = payload(msg)
    assert decode_neigh(msg, start, stop) == entry


def test_uppercase_mac_encodes_like_lowercase() -> None:
    a = Neighbour(1, IPv4Address("10.0.0.1"), "0E:AA:00:00:00:01")
    b = Neighbour(1, IPv4Address("10.0.0.1"), "0e:aa:00:00:00:01")
    assert encode_neighbour("replace", a, 1) == encode_neighbour("replace", b, 1)


# --- nexthop objects --------------------------------------------------------------------------

def test_nexthop_replace_layout() -> None:
    nh = Nexthop(7, IPv4Address("192.168.0.2"), 3)
    assert encode_nexthop("replace", nh, 5) == h("""
        30000000 6800 0505 05000000 00000000
        02 00 03 00 00000000
        0800 0100 07000000
        0800 0600 c0a80002
        0800 0500 03000000
    """)
    # RTM_NEWNEXTHOP, REQUEST|ACK|REPLACE|CREATE; nhmsg: AF_INET, scope 0 (the kernel refuses
    # any other), proto boot, resvd 0, no flags; NHA_ID, NHA_GATEWAY, NHA_OIF
    assert encode_op(Op("replace", nh), 5) == encode_nexthop("replace", nh, 5)


def test_nexthop_replace_ipv6_onlink() -> None:
    nh = Nexthop(9, IPv6Address("2001:db8::2"), 4, protocol=RTPROT_KERNEL, onlink=True)
    assert encode_nexthop("replace", nh, 1) == h("""
        3c000000 6800 0505 01000000 00000000
        0a 00 02 00 04000000
        0800 0100 09000000
        1400 0600 20010db8000000000000000000000002
        0800 0500 04000000
    """)  # AF_INET6 from the gateway, RTNH_F_ONLINK in nh_flags


def test_nexthop_device_and_blackhole_layouts() -> None:
    assert encode_nexthop("replace", Nexthop(5, None, 3), 1)[16:] == h("""
        02 00 03 00 00000000
        0800 0100 05000000
        0800 0500 03000000
    """)  # `dev X` only: AF_INET
    assert encode_nexthop("replace", Nexthop(4, None, None), 1)[16:] == h("""
        02 00 03 00 00000000
        0800 0100 04000000
        0400 0400
    """)  # neither: NHA_BLACKHOLE (a flag attribute), AF_INET like `ip nexthop ... blackhole`


def test_nexthop_delete_layout_sends_only_the_id() -> None:
    nh = Nexthop(7, IPv4Address("192.168.0.2"), 3, onlink=True)
    assert encode_nexthop("delete", nh, 2) == h("""
        20000000 6900 0500 02000000 00000000
        00 00 00 00 00000000
        0800 0100 07000000
    """)  # RTM_DELNEXTHOP, REQUEST|ACK; the kernel refuses a protocol/flags in a delete


def test_route_with_nhid_layout_leaves_gateway_and_oif_out() -> None:
    route = Route(IPv4Network("10.244.1.0/24"), IPv4Address("192.168.0.2"), 3, nhid=7)
    expected = h("""
        34000000 1800 0505 01000000 00000000
        02 18 00 00 fe 03 00 01 00000000
        0800 0f00 fe000000
        0800 0100 0af40100
        0800 1e00 07000000
    """)  # RTA_NH_ID = 30; gateway/oif with nhid is "mutually exclusive" for the kernel
    assert encode_route("replace", route, 1) == expected
    assert encode_route("replace", Route(route.dst, None, None, nhid=7), 1) == expected
    assert encode_route("delete", route, 1) == h("""
        34000000 1900 0500 01000000 00000000
        02 18 00 00 fe 00 ff 00 00000000
        0800 0f00 fe000000
        0800 0100 0af40100
        0800 1e00 07000000
    """)  # a delete matches on the nexthop id


def test_new_dump_requests() -> None:
    assert encode_nexthop_dump(3, None) == h("""
        18000000 6a00 0103 03000000 00000000
        00 00 00 00 00000000
    """)
    assert encode_nexthop_dump(3, 5) == h("""
        20000000 6a00 0103 03000000 00000000
        00 00 00 00 00000000
        0800 0500 05000000
    """)  # NHA_OIF filter, applied by the kernel
    assert encode_link_dump(4) == h("""
        28000000 1200 0103 04000000 00000000
        00 00 0000 00000000 00000000 00000000
        0800 1d00 08000000
    """)  # RTM_GETLINK; IFLA_EXT_MASK = RTEXT_FILTER_SKIP_STATS
    assert encode_address_dump(AF_INET6, 6) == h("""
        18000000 1600 0103 06000000 00000000
        0a 00 00 00 00000000
    """)  # RTM_GETADDR


# Captured from kernel 6.18 (`ip nexthop add id 7 via 192.168.0.2 dev eth0 onlink`, then
# `... id 9 group 7/8`, dumped with encode_nexthop_dump).
KERNEL_NEXTHOP = h("""
    30000000 6800 0200 01000000 4c590000
    02 fd 00 00 04000000
    0800 0100 07000000
    0800 0500 03000000
    0800 0600 c0a80002
""")
KERNEL_NEXTHOP_GROUP = h("""
    44000000 6800 0200 01000000 4c590000
    00 00 00 00 00000000
    0800 0100 09000000
    0600 0300 0000 0000
    1400 0200 0700000000000000 0800000000000000
    0800 0e00 00000080
""")


def test_decode_kernel_nexthops() -> None:
    _, _, _, start, stop = payload(KERNEL_NEXTHOP)
    assert decode_nexthop(KERNEL_NEXTHOP, start, stop) == Nexthop(
        7, IPv4Address("192.168.0.2"), 3, protocol=0, onlink=True)
    _, _, _, start, stop = payload(KERNEL_NEXTHOP_GROUP)
    assert decode_nexthop(KERNEL_NEXTHOP_GROUP, start, stop) is None


def test_decode_route_with_nhid_both_shapes() -> None:
    # nexthop_compat_mode = 1 (default): TABLE, DST, NH_ID, then the nexthop's GATEWAY, OIF.
    compat = h("""
        44000000 1800 0200 01000000 00000000
        02 18 00 00 fe 03 00 01 04000000
        0800 0f00 fe000000
        0800 0100 0af40100
        0800 1e00 07000000
        0800 0500 c0a80002
        0800 0400 03000000
    """)
    _, _, _, start, stop = payload(compat)
    assert decode_route(compat, start, stop) == Route(
        IPv4Network("10.244.1.0/24"), IPv4Address("192.168.0.2"), 3, onlink=True, nhid=7)
    # The same attributes in another order take the general loop and agree with it.
    reordered = compat[:44] + compat[52:60] + compat[44:52] + compat[60:]
    _, _, _, start, stop = payload(reordered)
    assert decode_route(reordered, start, stop) == decode_route(compat, 16, len(compat))
    # nexthop_compat_mode = 0: only the id.
    bare = compat[:16 + 36]
    bare = struct.pack("=I", len(bare)) + bare[4:]
    _, _, _, start, stop = payload(bare)
    assert decode_route(bare, start, stop) == Route(
        IPv4Network("10.244.1.0/24"), None, None, onlink=True, nhid=7)


def test_decode_events_with_nexthops() -> None:
    deleted = bytearray(KERNEL_NEXTHOP)
    struct.pack_into("=H", deleted, 4, RTM_DELNEXTHOP)
    buf = KERNEL_NEXTHOP + KERNEL_NEXTHOP_GROUP + bytes(deleted)
    nh = Nexthop(7, IPv4Address("192.168.0.2"), 3, protocol=0, onlink=True)
    assert decode_events(buf, len(buf)) == [RtEvent("nexthop_new", nh),
                                            RtEvent("nexthop_del", nh)]  # group skipped


@st.composite
def nexthops(draw: st.DrawFn) -> Nexthop:
    gw: IPv4Address | IPv6Address | None = draw(st.none() | ips)
    # A gateway needs a device; only blackhole has neither.
    oif = draw(st.integers(1, 2**31 - 1)) if gw is not None else draw(
        st.none() | st.integers(1, 2**31 - 1))
    return Nexthop(draw(st.integers(1, 2**32 - 1)), gw, oif,
                   protocol=draw(st.integers(0, 255)), onlink=draw(st.booleans()))


@given(nexthops(), st.integers(0, 2**32 - 1))
def test_nexthop_round_trip(nh: Nexthop, seq: int) -> None:
    msg = encode_nexthop("replace", nh, seq)
    mtype, _flags, got_seq, start, stop = payload(msg)
    assert (mtype, got_seq) == (RTM_NEWNEXTHOP, seq)
    assert decode_nexthop(msg, start, stop) == nh


@given(routes(), st.integers(1, 2**32 - 1))
def test_route_with_nhid_round_trip(route: Route, nhid: int) -> None:
    # gateway/oif are not sent with an nhid, so what comes back has neither.
    msg = encode_route("replace", replace(route, nhid=nhid), 1)
    _, _, _, start, stop = payload(msg)
    assert decode_route(msg, start, stop) == replace(route, gateway=None, oif=None, nhid=nhid)


# --- links and addresses ----------------------------------------------------------------------

def _link_msg(index: int, flags: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBHiII", 0, 0, 1, index, flags, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 16, NLM_F_MULTI, 1, 0) + body


def _nla(atype: int, data: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(data), atype) + data + b"\0" * (-len(data) & 3)


def test_decode_link() -> None:
    linkinfo = _nla(1, b"vxlan\0") + _nla(2, _nla(1, struct.pack("=I", 1)))  # KIND, DATA
    msg = _link_msg(7, 0x11043, _nla(3, b"flannel.1\0") + _nla(4, struct.pack("=I", 1450))
                    + _nla(1, bytes.fromhex("0E0000000001")) + _nla(0x8000 | 18, linkinfo))
    _, _, _, start, stop = payload(msg)
    assert decode_link_info(msg, start, stop) == Link(7, "flannel.1", 1450, 0x11043, "vxlan",
                                                      "0e:00:00:00:00:01")
    bare = _link_msg(1, 0x49, _nla(3, b"lo\0") + _nla(4, struct.pack("=I", 65536)))
    _, _, _, start, stop = payload(bare)
    assert decode_link_info(bare, start, stop) == Link(1, "lo", 65536, 0x49, None, None)


# Captured from kernel 6.18: `192.168.9.1/24 dev eth0 noprefixroute` (ifa_flags 0x80, the
# NOPREFIXROUTE bit only in IFA_FLAGS), with IFA_LABEL and IFA_CACHEINFO.
KERNEL_ADDRESS = h("""
    50000000 1400 0200 02000000 4c590000
    02 18 80 00 03000000
    0800 0100 c0a80901
    0800 0200 c0a80901
    0900 0300 65746830 00000000
    0800 0800 80020000
    1400 0600 ffffffff ffffffff fdc80100 fdc80100
""")


def test_decode_kernel_address_uses_ifa_flags() -> None:
    mtype, _, _, start, stop = payload(KERNEL_ADDRESS)
    assert mtype == RTM_NEWADDR
    assert decode_address(KERNEL_ADDRESS, start, stop) == Address(
        3, IPv4Address("192.168.9.1"), 24, IFA_F_PERMANENT | IFA_F_NOPREFIXROUTE, 0)


def test_decode_address_prefers_local_over_peer() -> None:
    body = (struct.pack("=BBBBI", AF_INET6, 128, 0x80, 0, 4)
            + _nla(2, IPv6Address("2001:db8::1").packed)  # IFA_LOCAL
            + _nla(1, IPv6Address("2001:db8::2").packed))  # IFA_ADDRESS: the peer
    assert decode_address(body, 0, len(body)) == Address(4, IPv6Address("2001:db8::1"), 128,
                                                         0x80, 0)  # no IFA_FLAGS: ifa_flags
    only_address = struct.pack("=BBBBI", AF_INET6, 64, 0x80, 253, 4) + _nla(
        1, IPv6Address("fe80::1").packed)
    assert decode_address(only_address, 0, len(only_address)) == Address(
        4, IPv6Address("fe80::1"), 64, 0x80, 253)
    other_family = struct.pack("=BBBBI", 7, 0, 0, 0, 4)
    assert decode_address(other_family, 0, len(other_family)) is None


def test_cold_start_fast_encodings_match_the_general_encoder() -> None:
    """The one-pack encodings (a cold start's v4 nhid route and v4 gateway nexthop; removing
    peers: v4 routes, nexthops, v4 neighbours, FDB entries) are byte for byte what the
    general encoder writes, and every other shape still takes the general one."""
    import random

    from pyflannel.netlink.codec import (
        _encode_fdb,
        _encode_neighbour,
        _encode_nexthop,
        _encode_route,
        encode_fdb,
        encode_neighbour,
        encode_nexthop,
        encode_route,
    )

    rnd = random.Random(13)
    for i in range(3000):
        dst = IPv4Network((rnd.getrandbits(32), rnd.randint(0, 32)), strict=False)
        r = Route(dst, IPv4Address(rnd.getrandbits(32)), rnd.randint(1, 100),
                  table=rnd.choice([254, 255, 100, 1000]), protocol=rnd.randint(0, 255),
                  onlink=rnd.random() < 0.5, scope=rnd.choice([0, 253]),
                  type=rnd.choice([1, 6]), nhid=rnd.choice([None, rnd.getrandbits(32)]),
                  priority=rnd.choice([0, 0, 5]))
        nh = Nexthop(rnd.getrandbits(32), rnd.choice(
            [None, IPv4Address(rnd.getrandbits(32)), IPv6Address(rnd.getrandbits(128))]),
            rnd.choice([None, rnd.randint(1, 100)]), rnd.randint(0, 255), rnd.random() < 0.5)
        ip = rnd.choice([IPv4Address(rnd.getrandbits(32)), IPv6Address(rnd.getrandbits(128))])
        mac = ":".join(f"{rnd.getrandbits(8):02x}" for _ in range(rnd.choice([4, 6, 6])))
        neigh = Neighbour(rnd.randint(1, 100), ip, mac, rnd.choice([0x80, 0x40]))
        fdb = FdbEntry(rnd.randint(1, 100), mac, ip)
        for action in ("replace", "delete"):
            assert encode_route(action, r, i) == _encode_route(action, r, i), r
            assert encode_nexthop(action, nh, i) == _encode_nexthop(action, nh, i), nh
            assert encode_neighbour(action, neigh, i) == _encode_neighbour(action, neigh, i)
            assert encode_fdb(action, fdb, i) == _encode_fdb(action, fdb, i), fdb


def test_decode_cache_stays_bounded_and_keeps_the_newest() -> None:
    """Past its bound the address cache drops its older half at once (not one entry per
    put, which rescanned the dict's deleted front every time) and keeps the newest."""
    from pyflannel.netlink import codec

    cache: dict[int, int] = {}
    for i in range(3 * codec._CACHE_MAX):
        codec._cache_put(cache, i, i)
        assert len(cache) <= codec._CACHE_MAX
    last = 3 * codec._CACHE_MAX - 1
    assert cache[last] == last
    assert min(cache) > last - codec._CACHE_MAX  # only the older ones went
    assert len(cache) > codec._CACHE_MAX // 2
    codec._cache_put(cache, last, -1)  # an existing key is replaced, nothing dropped
    assert cache[last] == -1
