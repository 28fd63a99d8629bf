"""Subnet allocation as upstream's etcd manager does it: walk from SubnetMin to SubnetMax
in SubnetLen steps, keep the lowest 100 free subnets, pick one at random."""

from __future__ import annotations

import random
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

Net = TypeVar("Net", IPv4Network, IPv6Network)

CANDIDATES = 100  # upstream considers only the lowest 100 free subnets


def free_subnets(
    network: Net,
    subnet_len: int,
    subnet_min: IPv4Address | IPv6Address,
    subnet_max: IPv4Address | IPv6Address,
    taken: Iterable[Net],
    limit: int = CANDIDATES,
) -> list[Net]:
    """The lowest `limit` subnets of `subnet_len` in [subnet_min, subnet_max] that overlap
    nothing in `taken`. Runs in O(len(taken) + limit), never over the whole range."""
    size = 1 << (network.max_prefixlen - subnet_len)
    same_len: set[int] = set()
    others: list[Net] = []
    for t in taken:
        if t.version != network.version:
            continue
        if t.prefixlen == subnet_len:
            same_len.add(int(t.network_address))
        else:
            others.append(t)
    cls = type(network)
    out: list[Net] = []
    cur, last = int(subnet_min), int(subnet_max)
    while cur <= last and len(out) < limit:
        if cur not in same_len:
            cand = cls((cur, subnet_len))
            if not any(cand.overlaps(o) for o in others):
                out.append(cand)
        cur += size
    return out


def allocate_subnet(
    network: Net,
    subnet_len: int,
    subnet_min: IPv4Address | IPv6Address,
    subnet_max: IPv4Address | IPv6Address,
    taken: Iterable[Net],
    rng: random.Random | None = None,
) -> Net | None:
    """A random one of the lowest free subnets, or None when the range is full."""
    free = free_subnets(network, subnet_len, subnet_min, subnet_max, taken)
    if not free:
        return None
    return (rng or random).choice(free)


def fits(
    subnet: Net,
    subnet_len: int,
    subnet_min: IPv4Address | IPv6Address,
    subnet_max: IPv4Address | IPv6Address,
) -> bool:
    """Whether a lease's subnet is acceptable under the current config (reuse checks)."""
    return (
        subnet.prefixlen == subnet_len
        and int(subnet_min) <= int(subnet.network_address) <= int(subnet_max)
    )
