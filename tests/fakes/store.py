"""InMemoryStore: the SubnetManager seam in memory, etcd-like (leases keyed by subnet), for
unit tests of the daemon loop. Tests put and delete peer leases and revoke ours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network

from pyflannel.config.netconf import NetConf, check_network_config, parse_netconf
from pyflannel.lease.events import LeaseChanges, LeaseSnapshot, LeaseUpdate
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState
from pyflannel.subnet.base import LeaseRevoked, LeaseSetup, NodeConfig


class InMemoryStore:
    name = "etcd"
    description = "in-memory store (a test fake)"

    def __init__(self, netconf: str = '{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}',
                 *, own_subnet: str = "10.244.1.0/24") -> None:
        self.netconf: NetConf = check_network_config(parse_netconf(netconf))
        self.own_subnet = IPv4Network(own_subnet)
        self.leases: dict[str, Lease] = {}
        self.watch_reconnects = 0
        self.watch_down_since: float | None = None
        self._revision = 0
        self._queue: asyncio.Queue[LeaseUpdate] = asyncio.Queue()
        self._revoked = asyncio.Event()
        self.closed = False
        self.remembered = StoredNodeState()

    # -- what tests do --------------------------------------------------------------------

    def peer(self, n: int, ip: str | None = None, *, data: str = "", btype: str = "") -> Lease:
        self._revision += 1
        lease = Lease(IPv4Network(f"10.244.{n}.0/24"), LeaseAttrs(
            public_ip=IPv4Address(ip or f"192.168.77.{n}"),
            backend_type=btype or self.netconf.backend_type, backend_data=data),
            created=self._revision, revision=self._revision)
        return lease

    def put(self, lease: Lease) -> None:
        self.leases[lease.key] = lease
        self._queue.put_nowait(LeaseChanges(upserted=(lease,)))

    def delete(self, key: str) -> None:
        if self.leases.pop(key, None) is not None:
            self._queue.put_nowait(LeaseChanges(removed=(key,)))

    def revoke(self) -> None:
        self._revoked.set()

    # -- SubnetManager ----------------------------------------------------------------------

    async def node_config(self) -> NodeConfig:
        return NodeConfig(self.netconf)

    async def acquire_lease(self, netconf: NetConf, attrs: LeaseAttrs,
                            setup: LeaseSetup | None = None) -> Lease:
        if setup is not None:
            attrs = await setup(self.remembered)
        lease = Lease(self.own_subnet, attrs, expiration=None, created=0)
        self.leases[lease.key] = lease
        return lease

    async def updates(self) -> AsyncIterator[LeaseUpdate]:
        yield LeaseSnapshot(tuple(self.leases.values()))
        while True:
            yield await self._queue.get()

    async def keep_lease(self, lease: Lease) -> None:
        await self._revoked.wait()
        raise LeaseRevoked(f"lease {lease.key} has been revoked (a test revoked it)")

    async def aclose(self) -> None:
        self.closed = True
