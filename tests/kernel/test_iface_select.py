"""External interface selection (upstream §1.2) against real interfaces in a namespace."""

from __future__ import annotations

import os
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest

from pyflannel.iface.select import InterfaceError, find_external_interface, sort_addresses
from pyflannel_lab.netns import NetNamespace, veth_between

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def node(netns_factory: Callable[[str], NetNamespace]) -> NetNamespace:
    """A node with two interfaces: eth0 (default route) and eth1."""
    ns = netns_factory("pfi")
    peer = netns_factory("pfip")
    veth_between(ns, "eth0", peer, "p0")
    veth_between(ns, "eth1", peer, "p1")
    ns.ip("addr", "add", "192.168.10.5/24", "dev", "eth0")
    ns.ip("addr", "add", "172.16.0.5/24", "dev", "eth1")
    ns.ip("link", "set", "eth1", "mtu", "1400")
    ns.ip("route", "add", "default", "via", "192.168.10.1")
    ns.ip("route", "add", "10.50.0.0/16", "via", "172.16.0.1")
    return ns


async def test_default_route_interface(node: NetNamespace) -> None:
    ext = await find_external_interface(netns=node.name)
    assert (ext.name, ext.iface_addr, ext.ext_addr, ext.mtu) == (
        "eth0", IPv4Address("192.168.10.5"), IPv4Address("192.168.10.5"), 1500)


@pytest.mark.parametrize("kw,name", [
    ({"ifaces": ["eth1"]}, "eth1"),
    ({"ifaces": ["172.16.0.5"]}, "eth1"),
    ({"ifaces": ["nope", "eth1"]}, "eth1"),            # tried in order
    ({"iface_regexes": [r"^172\.16\."]}, "eth1"),       # addresses first
    ({"iface_regexes": [r"th1$"]}, "eth1"),            # then names
    ({"ifaces": ["nope"], "iface_regexes": ["eth0"]}, "eth0"),
    ({"can_reach": "10.50.3.4"}, "eth1"),
    ({"public_ip": IPv4Address("172.16.0.5")}, "eth1"),  # --public-ip alone picks its owner
])
async def test_explicit_choices(node: NetNamespace, kw: dict[str, object], name: str) -> None:
    ext = await find_external_interface(netns=node.name, **kw)  # type: ignore[arg-type]
    assert ext.name == name
    if name == "eth1":
        assert ext.mtu == 1400 and ext.iface_addr == IPv4Address("172.16.0.5")


async def test_public_ip_with_iface_is_published_but_not_the_interface_address(
        node: NetNamespace) -> None:
    ext = await find_external_interface(netns=node.name, ifaces=["eth0"],
                                        public_ip=IPv4Address("203.0.113.9"))
    assert ext.iface_addr == IPv4Address("192.168.10.5")
    assert ext.ext_addr == IPv4Address("203.0.113.9")


@pytest.mark.parametrize("kw,msg", [
    ({"ifaces": ["nope"]}, "matches the interfaces and/or regexes"),
    ({"public_ip": IPv4Address("203.0.113.9")}, "not on a local interface"),
])
async def test_errors_say_what_to_do(node: NetNamespace, kw: dict[str, object],
                                     msg: str) -> None:
    with pytest.raises(InterfaceError, match=msg):
        await find_external_interface(netns=node.name, **kw)  # type: ignore[arg-type]


async def test_no_default_route(netns: NetNamespace) -> None:
    with pytest.raises(InterfaceError, match="unable to find default route.*--iface"):
        await find_external_interface(netns=netns.name)


async def test_address_preference(node: NetNamespace) -> None:
    # a deprecated address is never picked, even when listed first; a dynamic (finite
    # lifetime) address sorts after a permanent one
    node.ip("addr", "add", "192.168.30.5/24", "dev", "eth0", "valid_lft", "1000",
            "preferred_lft", "0")
    node.ip("addr", "add", "192.168.20.5/24", "dev", "eth0", "valid_lft", "1000",
            "preferred_lft", "1000")
    ext = await find_external_interface(netns=node.name)
    assert ext.iface_addr == IPv4Address("192.168.10.5")
    node.ip("addr", "del", "192.168.10.5/24", "dev", "eth0")
    node.ip("route", "replace", "default", "via", "192.168.20.1")
    ext = await find_external_interface(netns=node.name)
    assert ext.iface_addr == IPv4Address("192.168.20.5")


def test_sort_addresses_order() -> None:
    from pyflannel.iface.select import IFA_F_DEPRECATED, IFA_F_PERMANENT, IFA_F_TEMPORARY, _Addr

    addrs = [
        _Addr(1, IPv4Address("169.254.1.1"), IFA_F_PERMANENT),
        _Addr(1, IPv4Address("10.0.0.3"), IFA_F_TEMPORARY),
        _Addr(1, IPv4Address("10.0.0.2"), 0),
        _Addr(1, IPv4Address("10.0.0.1"), IFA_F_PERMANENT),
        _Addr(1, IPv4Address("10.0.0.9"), IFA_F_PERMANENT | IFA_F_DEPRECATED),
    ]
    assert [str(a.ip) for a in sort_addresses(addrs)] == [
        "10.0.0.1", "10.0.0.2", "10.0.0.3", "169.254.1.1"]
