"""External interface selection, as upstream's LookupExtIface.

Order: each --iface (a name or an address), each --iface-regex (matched against every
interface's addresses, then names), then --iface-can-reach; with none of them, the
interface owning --public-ip, else the default-route interface. The first address on
the chosen interface is picked after sorting: global before link-local, permanent before
dynamic, non-temporary before temporary, deprecated dropped.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from pyflannel.netlink import Link, RtNetlink

IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80


class InterfaceError(Exception):
    """No usable external interface; the message says which option to set."""


@dataclass(frozen=True)
class ExternalInterface:
    """The interface flannel talks to peers on, and the addresses it publishes."""

    name: str
    index: int
    mtu: int
    iface_addr: IPv4Address | None
    ext_addr: IPv4Address | None
    iface_addr6: IPv6Address | None = None
    ext_addr6: IPv6Address | None = None
    # The interface's connected prefixes: a peer whose public IP is one of their network or
    # broadcast addresses can never be a gateway.
    segments: tuple[IPv4Network | IPv6Network, ...] = ()


@dataclass(frozen=True)
class _Addr:
    index: int
    ip: IPv4Address | IPv6Address
    flags: int
    prefixlen: int = 0


def sort_addresses(addrs: Sequence[_Addr]) -> list[_Addr]:
    usable = [a for a in addrs if not a.flags & IFA_F_DEPRECATED]
    return sorted(usable, key=lambda a: (a.ip.is_link_local, not a.flags & IFA_F_PERMANENT,
                                         bool(a.flags & IFA_F_TEMPORARY)))


async def _default_route_index(nl: RtNetlink, family: int) -> int | None:
    found: int | None = None
    async for r in nl.dump_routes(family, table=254):
        if found is None and r.dst.prefixlen == 0 and r.oif is not None:
            found = r.oif  # keep reading: the dump must be drained
    return found


def _first(addrs: Sequence[_Addr], index: int, version: int) -> Any:
    cands = sort_addresses([a for a in addrs if a.index == index and a.ip.version == version])
    return cands[0].ip if cands else None


async def find_external_interface(
    *,
    ifaces: Sequence[str] = (),
    iface_regexes: Sequence[str] = (),
    can_reach: str = "",
    public_ip: IPv4Address | None = None,
    public_ipv6: IPv6Address | None = None,
    ipv4: bool = True,
    ipv6: bool = False,
    netns: str | None = None,
) -> ExternalInterface:
    """The external interface; `netns` (a name under /run/netns) is for tests and the
    lab, the daemon looks at its own namespace."""
    # Our own netlink codec, not pyroute2: the daemon's start-up and RSS stay small.
    with RtNetlink.open(netns) as nl:
        links = [link async for link in nl.dump_links()]
        addrs = [_Addr(a.index, a.ip, a.flags, a.prefixlen) async for a in nl.dump_addresses()]
        by_index = {link.index: link for link in links}
        by_name = {link.name: link for link in links}
        chosen: Link | None = None
        if ifaces or iface_regexes or can_reach:
            for spec in ifaces:
                try:
                    ip = ip_address(spec)
                except ValueError:
                    chosen = by_name.get(spec)
                else:
                    owner = next((a.index for a in addrs if a.ip == ip), None)
                    chosen = by_index.get(owner) if owner is not None else None
                if chosen:
                    break
            if chosen is None:
                for pattern in iface_regexes:
                    rx = re.compile(pattern)
                    owner = next((a.index for a in addrs if rx.search(str(a.ip))), None)
                    if owner is None:
                        owner = next((link.index for link in links if rx.search(link.name)), None)
                    if owner is not None:
                        chosen = by_index.get(owner)
                        break
            if chosen is None and can_reach:
                target = ip_address(can_reach)
                via = await nl.get_route(target)
                chosen = by_index.get(via.oif) if via is not None and via.oif else None
            if chosen is None:
                raise InterfaceError(
                    "Failed to find interface to use that matches the interfaces and/or regexes "
                    "provided (check --iface / --iface-regex / --iface-can-reach against "
                    "`ip addr` on this node)")
        else:
            pub = public_ip if public_ip is not None else public_ipv6
            if pub is not None:
                owner = next((a.index for a in addrs if a.ip == pub), None)
                if owner is None:
                    raise InterfaceError(
                        f"Failed to find any valid interface to use: --public-ip {pub} is not on "
                        "a local interface; if it is a NAT address, also set --iface")
                chosen = by_index[owner]
            else:
                idx = await _default_route_index(nl, socket.AF_INET if ipv4 else socket.AF_INET6)
                if idx is None:
                    raise InterfaceError(
                        "Failed to find any valid interface to use: failed to get default "
                        "interface: unable to find default route (set --iface to the interface "
                        "that connects the nodes)")
                chosen = by_index[idx]
                if ipv4 and ipv6:
                    idx6 = await _default_route_index(nl, socket.AF_INET6)
                    if idx6 is not None and idx6 != idx:
                        raise InterfaceError(
                            "the IPv4 and IPv6 default routes use different interfaces; set "
                            "--iface")
    if chosen.mtu == 0:
        raise InterfaceError(f"interface {chosen.name} has MTU 0")
    a4 = _first(addrs, chosen.index, 4) if ipv4 else None
    a6 = _first(addrs, chosen.index, 6) if ipv6 else None
    if ipv4 and a4 is None:
        raise InterfaceError(f"interface {chosen.name} has no IPv4 address; set --iface")
    if ipv6 and a6 is None:
        raise InterfaceError(f"interface {chosen.name} has no global IPv6 address; set --iface")
    return ExternalInterface(
        name=chosen.name, index=chosen.index, mtu=chosen.mtu,
        iface_addr=a4, ext_addr=public_ip if public_ip is not None else a4,
        iface_addr6=a6, ext_addr6=public_ipv6 if public_ipv6 is not None else a6,
        segments=tuple(ip_network((a.ip, a.prefixlen), strict=False) for a in addrs
                       if a.index == chosen.index),
    )
