"""The etcd subnet manager against a real etcd 3.4 on loopback (free ports, temp data dirs)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyflannel.config.netconf import NetConf
from pyflannel.lease.events import LeaseChanges, LeaseSnapshot, LeaseUpdate
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState, parse_subnet_key, subnet_key
from pyflannel.subnet.base import LeaseSetup
from pyflannel.subnet.etcd import (
    EtcdClient,
    EtcdError,
    EtcdSubnetManager,
    LeaseRevoked,
)
from pyflannel.subnet.etcd.client import WatchStream
from pyflannel_lab.etcd import ETCD_BIN, EtcdServer, make_tls_files
from pyflannel_lab.netns import NetNamespace

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not Path(ETCD_BIN).exists(), reason=f"{ETCD_BIN} not installed"),
]

MGR_LOG = "pyflannel.subnet.etcd.manager"
UPSTREAM_VXLAN = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                  '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')


def vxlan_attrs(ip: str, mac: str = "0a:00:00:00:00:01") -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan",
                      backend_data=f'{{"VNI":1,"VtepMAC":"{mac}"}}')


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    # One etcd serves the module; each test gets its own key space.
    return f"/test-{secrets.token_hex(4)}/network"


class CountingClient(EtcdClient):
    """Counts TimeToLive calls (peers' expirations must never be looked up)."""

    ttl_calls = 0

    async def time_to_live(self, lease: int) -> int:
        self.ttl_calls += 1
        return await super().time_to_live(lease)


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[CountingClient]:
    c = CountingClient([etcd.client_url])
    yield c
    await c.aclose()


def put_config(etcd: EtcdServer, prefix: str, conf: dict[str, Any]) -> None:
    etcd.etcdctl("put", f"{prefix}/config", json.dumps(conf))


async def configured(etcd: EtcdServer, prefix: str, mgr: EtcdSubnetManager,
                     **conf: Any) -> NetConf:
    put_config(etcd, prefix, {"Backend": {"Type": "vxlan"}, **conf})
    return (await mgr.node_config()).netconf


def stored(etcd: EtcdServer, key: str) -> tuple[str, int] | None:
    """(value, etcd lease id) of a key as etcdctl sees it."""
    out = json.loads(etcd.etcdctl("get", key, "-w", "json").stdout)
    kvs = out.get("kvs") or []
    if not kvs:
        return None
    return base64.b64decode(kvs[0]["value"]).decode(), int(kvs[0].get("lease", 0))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def etcd_leases(etcd: EtcdServer) -> list[str]:
    return [line.strip() for line in etcd.etcdctl("lease", "list").stdout.splitlines()[1:]
            if line.strip()]


def grant(etcd: EtcdServer, ttl: int = 600) -> str:
    """A lease granted by etcdctl; returns its hex id (etcdctl's format)."""
    return etcd.etcdctl("lease", "grant", str(ttl)).stdout.split()[1]


# -- config ------------------------------------------------------------------------------

async def test_missing_config_gives_upstream_hint(client: EtcdClient, prefix: str) -> None:
    mgr = EtcdSubnetManager(client, prefix=prefix)
    with pytest.raises(EtcdError, match="Did you create your config using etcdv3 API"):
        await mgr.node_config()


async def test_config_is_parsed_and_defaults_filled(etcd: EtcdServer, client: EtcdClient,
                                                    prefix: str) -> None:
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.50.0.0/16")
    assert (nc.subnet_len, nc.subnet_min, nc.subnet_max) == (
        24, IPv4Address("10.50.1.0"), IPv4Address("10.50.255.0"))


@pytest.mark.parametrize(("value", "reason"), [
    ("garbage", "invalid JSON: Expecting value: line 1 column 1 (char 0) (expected a JSON "
     'object such as {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})'),
    ("[" * 1500 + "]" * 1500, "nested too deeply: 1500 levels of arrays/objects "
     "(the limit is 16)"),
    ('{"Network": "10.50.0.0"}', 'Network: invalid IPv4 CIDR format: "10.50.0.0"'),
    ('{"Network": "10.50.0.0/16", "SubnetLen": 31}', "SubnetLen: SubnetLen must be less "
     "than /31"),
])
async def test_bad_config_names_the_etcd_key(etcd: EtcdServer, client: EtcdClient, prefix: str,
                                             value: str, reason: str) -> None:
    # The cases: a garbage config was reported as "net-conf.json: invalid JSON" and
    # a nested one stopped the daemon with RecursionError.
    etcd.etcdctl("put", f"{prefix}/config", value)
    mgr = EtcdSubnetManager(client, prefix=prefix)
    with pytest.raises(EtcdError) as err:
        await mgr.node_config()
    assert str(err.value).startswith(f"network config at etcd key {prefix}/config: {reason}")
    assert "\n" not in str(err.value)


# -- acquiring ---------------------------------------------------------------------------

async def test_allocation_writes_upstream_key_and_exact_bytes(
        etcd: EtcdServer, client: EtcdClient, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, MGR_LOG)
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.50.0.0/16")
    attrs = vxlan_attrs("192.168.64.3", "c6:d2:32:6f:8f:44")
    lease = await mgr.acquire_lease(nc, attrs)

    assert lease.subnet is not None and lease.subnet.prefixlen == 24
    assert IPv4Address("10.50.1.0") <= lease.subnet.network_address <= IPv4Address("10.50.255.0")
    key = f"{prefix}/subnets/{lease.subnet.network_address}-24"
    value, lease_id = stored(etcd, key) or ("", 0)
    assert value == UPSTREAM_VXLAN
    assert lease_id == int(lease.origin) and not lease.reservation
    ttl_out = etcd.etcdctl("lease", "timetolive", f"{lease_id:x}").stdout
    assert "granted with TTL(86400s)" in ttl_out
    assert lease.expiration is not None
    expected = f"Allocated lease (ip: {lease.subnet} ipv6: None) to current node (192.168.64.3)"
    assert any(expected in r.getMessage() for r in caplog.records)


async def test_dual_stack_key_and_independent_v6_allocation(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.51.0.0/16", EnableIPv6=True,
                          IPv6Network="fd00:51::/56")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.0.1"))
    assert lease.subnet is not None and lease.ipv6_subnet is not None
    assert lease.ipv6_subnet.prefixlen == 64 and lease.ipv6_subnet.subnet_of(
        IPv6Network("fd00:51::/56"))
    key = (f"{prefix}/subnets/{lease.subnet.network_address}-24&"
           f"{lease.ipv6_subnet.network_address.compressed}-64")
    assert stored(etcd, key) is not None
    # Read back through a snapshot: the key parses into both subnets.
    snap = await anext(aiter(mgr.updates()))
    assert isinstance(snap, LeaseSnapshot) and snap.leases == (lease,)


async def test_upstream_written_lease_is_read(etcd: EtcdServer, client: CountingClient,
                                              prefix: str) -> None:
    etcd.etcdctl("put", f"--lease={grant(etcd)}", f"{prefix}/subnets/10.52.3.0-24",
                 UPSTREAM_VXLAN)
    mgr = EtcdSubnetManager(client, prefix=prefix)
    snap = await anext(aiter(mgr.updates()))
    assert isinstance(snap, LeaseSnapshot)
    (lease,) = snap.leases
    assert lease.subnet == IPv4Network("10.52.3.0/24")
    assert lease.attrs == LeaseAttrs.from_json(UPSTREAM_VXLAN)
    assert lease.attrs.to_json() == UPSTREAM_VXLAN
    assert lease.expiration is None and not lease.reservation
    assert client.ttl_calls == 0


async def test_reuses_lease_of_our_public_ip(etcd: EtcdServer, client: EtcdClient,
                                             prefix: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, MGR_LOG)
    old_lease = grant(etcd)
    etcd.etcdctl("put", f"--lease={old_lease}", f"{prefix}/subnets/10.53.7.0-24",
                 vxlan_attrs("10.0.0.7", "0a:00:00:00:00:99").to_json())
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.53.0.0/16")
    attrs = vxlan_attrs("10.0.0.7", "0a:00:00:00:00:07")  # new VTEP MAC after a reboot
    # What the store remembers of us (before we overwrite it), and nothing for strangers.
    seen: list[StoredNodeState] = []

    def recording(publish: LeaseAttrs) -> LeaseSetup:
        async def setup(remembered: StoredNodeState) -> LeaseAttrs:
            seen.append(remembered)
            return publish
        return setup

    stranger = vxlan_attrs("10.0.0.70")
    await EtcdSubnetManager(client, prefix=prefix).acquire_lease(nc, stranger,
                                                                 recording(stranger))
    assert seen.pop().backend_data == ""
    lease = await mgr.acquire_lease(nc, attrs, recording(attrs))
    assert seen == [StoredNodeState('{"VNI":1,"VtepMAC":"0a:00:00:00:00:99"}')]
    assert lease.subnet == IPv4Network("10.53.7.0/24")
    value, lease_id = stored(etcd, f"{prefix}/subnets/10.53.7.0-24") or ("", 0)
    assert value == attrs.to_json()
    assert lease_id != int(old_lease, 16) and lease_id == int(lease.origin)
    assert any("Found lease (ip: 10.53.7.0/24 ipv6: None) for current IP (10.0.0.7), reusing"
               in r.getMessage() for r in caplog.records)


async def test_subnet_env_lease_wins_over_a_planted_lease_with_our_ip(
        etcd: EtcdServer, client: EtcdClient, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue #9: after a restart, a lease planted with this node's PublicIP for another
    subnet is not adopted while subnet.env's lease still exists and carries our IP; the
    planted one is logged and left alone (so is its VTEP MAC, which must not become ours)."""
    caplog.set_level(logging.INFO, MGR_LOG)
    ours = f"{prefix}/subnets/10.57.8.0-24"
    planted = f"{prefix}/subnets/10.57.3.0-24"  # sorts first: upstream's order would take it
    etcd.etcdctl("put", f"--lease={grant(etcd)}", ours,
                 vxlan_attrs("10.0.0.11", "0a:00:00:00:00:11").to_json())
    etcd.etcdctl("put", f"--lease={grant(etcd)}", planted,
                 vxlan_attrs("10.0.0.11", "0a:00:00:00:00:66").to_json())
    mgr = EtcdSubnetManager(client, prefix=prefix, previous_subnet=IPv4Network("10.57.8.0/24"))
    nc = await configured(etcd, prefix, mgr, Network="10.57.0.0/16")
    attrs = vxlan_attrs("10.0.0.11", "0a:00:00:00:00:11")
    seen: list[StoredNodeState] = []

    async def setup(remembered: StoredNodeState) -> LeaseAttrs:
        seen.append(remembered)
        return attrs

    lease = await mgr.acquire_lease(nc, attrs, setup)
    assert seen == [StoredNodeState('{"VNI":1,"VtepMAC":"0a:00:00:00:00:11"}')]
    assert lease.subnet == IPv4Network("10.57.8.0/24")
    assert stored(etcd, planted) is not None  # not ours to delete
    assert any("Lease 10.57.3.0-24 carries our public IP (10.0.0.11) but is not the one "
               "subnet.env records (10.57.8.0-24)" in r.getMessage() for r in caplog.records)
    # Without subnet.env's lease (it expired), upstream's order applies again.
    etcd.etcdctl("del", ours)
    again = EtcdSubnetManager(client, prefix=prefix,
                              previous_subnet=IPv4Network("10.57.8.0/24"))
    lease = await again.acquire_lease(nc, attrs)
    assert lease.subnet == IPv4Network("10.57.3.0/24")


async def test_our_lease_that_no_longer_fits_is_deleted(etcd: EtcdServer, client: EtcdClient,
                                                        prefix: str) -> None:
    # 10.54.0.0/24 is below the default SubnetMin (the first subnet is skipped).
    etcd.etcdctl("put", f"--lease={grant(etcd)}", f"{prefix}/subnets/10.54.0.0-24",
                 vxlan_attrs("10.0.0.8").to_json())
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.54.0.0/16")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.0.8"))
    assert lease.subnet != IPv4Network("10.54.0.0/24")
    assert stored(etcd, f"{prefix}/subnets/10.54.0.0-24") is None


async def test_previous_subnet_is_reused_only_when_free(etcd: EtcdServer, client: EtcdClient,
                                                        prefix: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, MGR_LOG)
    mgr = EtcdSubnetManager(client, prefix=prefix, previous_subnet=IPv4Network("10.55.9.0/24"))
    nc = await configured(etcd, prefix, mgr, Network="10.55.0.0/16")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.0.9"))
    assert lease.subnet == IPv4Network("10.55.9.0/24")
    assert any("Found previously leased subnet (ip: 10.55.9.0/24" in r.getMessage()
               for r in caplog.records)

    # Another node that remembers the same subnet must not take it over (upstream #1289).
    other = EtcdSubnetManager(client, prefix=prefix,
                              previous_subnet=IPv4Network("10.55.9.0/24"))
    theirs = await other.acquire_lease(nc, vxlan_attrs("10.0.0.10"))
    assert theirs.subnet != IPv4Network("10.55.9.0/24")
    assert (stored(etcd, f"{prefix}/subnets/10.55.9.0-24") or ("",))[0] == \
        vxlan_attrs("10.0.0.9").to_json()


async def test_reservation_is_honoured_and_never_gets_a_ttl(
        etcd: EtcdServer, client: CountingClient, prefix: str) -> None:
    key = f"{prefix}/subnets/10.56.5.0-24"
    etcd.etcdctl("put", key, vxlan_attrs("10.0.0.5").to_json())  # no --lease: a reservation
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.56.0.0/16", SubnetMin="10.56.5.0",
                          SubnetMax="10.56.6.0")
    # A different node never gets the reserved subnet...
    other = await mgr.acquire_lease(nc, vxlan_attrs("10.0.0.6"))
    assert other.subnet == IPv4Network("10.56.6.0/24")
    # ...and the owner gets it back, still without an etcd lease, with its new attributes.
    attrs = vxlan_attrs("10.0.0.5", "0a:00:00:00:00:55")
    lease = await mgr.acquire_lease(nc, attrs)
    assert lease.subnet == IPv4Network("10.56.5.0/24")
    assert lease.reservation and lease.expiration is None
    assert stored(etcd, key) == (attrs.to_json(), 0)
    renewed = await mgr.renew_lease(lease)
    assert renewed.reservation and stored(etcd, key) == (attrs.to_json(), 0)
    snap = await anext(aiter(mgr.updates()))
    assert isinstance(snap, LeaseSnapshot)
    assert {(x.subnet, x.reservation) for x in snap.leases} == {
        (IPv4Network("10.56.5.0/24"), True), (IPv4Network("10.56.6.0/24"), False)}
    assert client.ttl_calls == 0


async def test_allocation_avoids_taken_subnets_then_reports_out_of_subnets(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    for sub in ("10.57.1.0-24", "10.57.3.0-24"):
        etcd.etcdctl("put", f"{prefix}/subnets/{sub}", vxlan_attrs("10.9.9.9").to_json())
    mgr = EtcdSubnetManager(client, prefix=prefix, rng=random.Random(1))
    nc = await configured(etcd, prefix, mgr, Network="10.57.0.0/16", SubnetMin="10.57.1.0",
                          SubnetMax="10.57.3.0")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.1.1"))
    assert lease.subnet == IPv4Network("10.57.2.0/24")
    with pytest.raises(EtcdError, match=r"out of subnets.*10\.57\.0\.0/16.*SubnetMin 10\.57\.1"
                                        r"\.0 and SubnetMax 10\.57\.3\.0"):
        await mgr.acquire_lease(nc, vxlan_attrs("10.0.1.2"))


class RacingClient(EtcdClient):
    """Lets another node create the very key we are about to create, once."""

    def __init__(self, *args: Any, rival_value: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rival_value = rival_value
        self.raced: list[str] = []

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int:
        if not self.raced:
            self.raced.append(key)
            assert await super().create(key, self.rival_value)
        return await super().create(key, value, lease=lease)


@pytest.mark.parametrize("free", [2, 1])
async def test_lost_create_race_is_retried(etcd: EtcdServer, prefix: str, free: int,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, MGR_LOG)
    rival = vxlan_attrs("10.0.2.99").to_json().encode()
    racing = RacingClient([etcd.client_url], rival_value=rival)
    mgr = EtcdSubnetManager(racing, prefix=prefix)
    leases_before = len(etcd_leases(etcd))
    try:
        nc = await configured(etcd, prefix, mgr, Network="10.58.0.0/16", SubnetMin="10.58.1.0",
                              SubnetMax=f"10.58.{free}.0")
        if free == 1:
            with pytest.raises(EtcdError, match="out of subnets"):
                await mgr.acquire_lease(nc, vxlan_attrs("10.0.2.1"))
        else:
            lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.2.1"))
            assert lease.key != racing.raced[0].rsplit("/", 1)[1]
        assert stored(etcd, racing.raced[0]) == (rival.decode(), 0)  # the winner's lease
        assert any("was taken by another node meanwhile, retrying" in r.getMessage()
                   for r in caplog.records)
        # The etcd lease granted for the lost attempt was revoked, not left to expire.
        assert len(etcd_leases(etcd)) == leases_before + (1 if free == 2 else 0)
    finally:
        await mgr.aclose()


class DualStackRacingClient(EtcdClient):
    """Before our first create, another node takes our IPv6 subnet under another key (its
    IPv4 subnet differs), as two dual-stack nodes starting together can."""

    def __init__(self, *args: Any, rival_value: bytes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rival_value = rival_value
        self.rival_key = ""

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int:
        if not self.rival_key:
            where, _, sub = key.rpartition("/")
            _v4, v6 = parse_subnet_key(sub)
            self.rival_key = f"{where}/{subnet_key(IPv4Network('10.61.200.0/24'), v6)}"
            assert await super().create(self.rival_key, self.rival_value)
        return await super().create(key, value, lease=lease)


async def test_dual_stack_race_on_the_ipv6_subnet_alone(
        etcd: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, MGR_LOG)
    racing = DualStackRacingClient([etcd.client_url],
                                   rival_value=vxlan_attrs("10.0.2.98").to_json().encode())
    mgr = EtcdSubnetManager(racing, prefix=prefix)
    try:
        nc = await configured(etcd, prefix, mgr, Network="10.61.0.0/16", SubnetMin="10.61.1.0",
                              SubnetMax="10.61.199.0", EnableIPv6=True,
                              IPv6Network="fd61::/56")
        lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.2.2"))
        _r4, rival6 = parse_subnet_key(racing.rival_key.rpartition("/")[2])
        assert lease.ipv6_subnet is not None and not lease.ipv6_subnet.overlaps(rival6)
        keys = etcd.etcdctl("get", "--prefix", f"{prefix}/subnets/", "--keys-only").stdout.split()
        assert sorted(keys) == sorted([racing.rival_key, prefix + "/subnets/" + lease.key])
        assert "created just before ours; picking another" in caplog.text
    finally:
        await mgr.aclose()


@pytest.mark.parametrize("free", [2, 1])
async def test_two_managers_racing(etcd: EtcdServer, prefix: str, free: int) -> None:
    clients = [EtcdClient([etcd.client_url]) for _ in range(2)]
    # Same seed: both pick the same subnet first, so one of them must lose the race.
    mgrs = [EtcdSubnetManager(c, prefix=prefix, rng=random.Random(5)) for c in clients]
    try:
        nc = await configured(etcd, prefix, mgrs[0], Network="10.59.0.0/16",
                              SubnetMin="10.59.1.0", SubnetMax=f"10.59.{free}.0")
        results = await asyncio.gather(
            mgrs[0].acquire_lease(nc, vxlan_attrs("10.0.3.1")),
            mgrs[1].acquire_lease(nc, vxlan_attrs("10.0.3.2")), return_exceptions=True)
        leases = [r for r in results if isinstance(r, Lease)]
        errors = [r for r in results if not isinstance(r, Lease)]
        if free == 2:
            assert len(leases) == 2 and leases[0].subnet != leases[1].subnet
        else:
            assert len(leases) == 1
            assert len(errors) == 1 and "out of subnets" in str(errors[0])
        keys = etcd.etcdctl("get", "--prefix", f"{prefix}/subnets/", "--keys-only").stdout.split()
        assert len(keys) == len(leases)
    finally:
        for m in mgrs:
            await m.aclose()


# -- keeping the lease ---------------------------------------------------------------------

async def test_renewal_grants_a_new_lease(etcd: EtcdServer, client: EtcdClient,
                                          prefix: str) -> None:
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.60.0.0/16")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.4.1"))
    renewed = await mgr.renew_lease(lease)
    assert renewed.origin != lease.origin and renewed.key == lease.key
    assert renewed.expiration is not None and lease.expiration is not None
    assert renewed.expiration >= lease.expiration
    assert stored(etcd, f"{prefix}/subnets/{lease.key}") == (
        lease.attrs.to_json(), int(renewed.origin))


async def test_renewal_never_brings_a_deleted_lease_back(etcd: EtcdServer, client: EtcdClient,
                                                         prefix: str) -> None:
    # The renewal races with an admin deleting our key: upstream's plain put would
    # re-create it; ours is conditional and reports the revocation instead.
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.60.0.0/16")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.4.9"))
    key = f"{prefix}/subnets/{lease.key}"
    etcd.etcdctl("del", key)
    with pytest.raises(LeaseRevoked):
        await mgr.renew_lease(lease)
    assert stored(etcd, key) is None


async def wait_for(cond: Any, what: str, timeout: float = 20.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.1)
    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def test_keep_lease_renews_and_raises_when_key_deleted(
        etcd: EtcdServer, client: EtcdClient, prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, MGR_LOG)
    # A margin just under the TTL makes the first renewal due about a second from now.
    mgr = EtcdSubnetManager(client, prefix=prefix, renew_margin=86400 - 1)
    nc = await configured(etcd, prefix, mgr, Network="10.61.0.0/16")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.5.1"))
    key = f"{prefix}/subnets/{lease.key}"
    keeper = asyncio.create_task(mgr.keep_lease(lease))
    try:
        await wait_for(lambda: any("Lease renewed, new expiration:" in r.getMessage()
                                   for r in caplog.records), "lease renewed")
        value, lease_id = stored(etcd, key) or ("", 0)
        assert value == lease.attrs.to_json() and lease_id not in (0, int(lease.origin))
        assert not keeper.done()
        etcd.etcdctl("del", key)
        with pytest.raises(LeaseRevoked):
            await asyncio.wait_for(keeper, 20)
        assert any("Lease has been revoked. Shutting down daemon." in r.getMessage()
                   for r in caplog.records)
    finally:
        keeper.cancel()


async def test_keep_lease_raises_when_etcd_lease_expires(
        etcd: EtcdServer, client: EtcdClient, prefix: str) -> None:
    mgr = EtcdSubnetManager(client, prefix=prefix)
    nc = await configured(etcd, prefix, mgr, Network="10.62.0.0/16")
    lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.6.1"))
    keeper = asyncio.create_task(mgr.keep_lease(lease))
    try:
        await asyncio.sleep(0.5)
        assert not keeper.done()
        etcd.etcdctl("lease", "revoke", f"{int(lease.origin):x}")  # what expiry does
        with pytest.raises(LeaseRevoked):
            await asyncio.wait_for(keeper, 20)
    finally:
        keeper.cancel()


# -- watching ------------------------------------------------------------------------------

class Collector:
    """Runs updates() in the background and hands over what it yields."""

    def __init__(self, mgr: EtcdSubnetManager) -> None:
        self.queue: asyncio.Queue[LeaseUpdate] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(mgr))

    async def _run(self, mgr: EtcdSubnetManager) -> None:
        async for update in mgr.updates():
            await self.queue.put(update)

    async def next(self, timeout: float = 30.0) -> LeaseUpdate:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_updates_snapshot_then_changes(etcd: EtcdServer, client: CountingClient,
                                             prefix: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    subnets = f"{prefix}/subnets"
    etcd.etcdctl("put", f"{subnets}/10.63.1.0-24", vxlan_attrs("10.0.7.1").to_json())
    mgr = EtcdSubnetManager(client, prefix=prefix)
    col = Collector(mgr)
    try:
        snap = await col.next()
        assert isinstance(snap, LeaseSnapshot)
        assert [x.key for x in snap.leases] == ["10.63.1.0-24"]

        etcd.etcdctl("put", f"--lease={grant(etcd)}", f"{subnets}/10.63.2.0-24",
                     vxlan_attrs("10.0.7.2").to_json())
        change = await col.next()
        assert isinstance(change, LeaseChanges) and change.removed == ()
        assert [(x.key, x.attrs.public_ip) for x in change.upserted] == [
            ("10.63.2.0-24", IPv4Address("10.0.7.2"))]

        # Foreign keys and values are skipped; a valid change after them still arrives.
        etcd.etcdctl("put", f"{subnets}/not-a-subnet", "x")
        etcd.etcdctl("put", f"{subnets}/10.63.3.0-24/extra", "x")
        etcd.etcdctl("put", f"{prefix}/config", "{}")
        etcd.etcdctl("del", f"{subnets}/10.63.1.0-24")
        change = await col.next()
        assert change == LeaseChanges(upserted=(), removed=("10.63.1.0-24",))

        caplog.set_level(logging.WARNING, MGR_LOG)
        etcd.etcdctl("put", f"{subnets}/10.63.4.0-24", "garbage")
        change = await col.next()
        assert change == LeaseChanges(upserted=(), removed=("10.63.4.0-24",))
        assert any("Skipping" in r.getMessage() and "10.63.4.0-24" in r.getMessage()
                   for r in caplog.records)

        # One transaction, two leases: one revision, one batch.
        # (Straight to the gateway: etcdctl's txn reader mangles quoted JSON.)
        puts = [{"request_put": {"key": b64(f"{subnets}/10.63.{i}.0-24"),
                                 "value": b64(vxlan_attrs(f"10.0.7.{i}").to_json())}}
                for i in (5, 6)]
        async with httpx.AsyncClient(trust_env=False) as http:
            resp = await http.post(f"{etcd.client_url}/v3/kv/txn", json={"success": puts})
            assert resp.status_code == 200 and resp.json()["succeeded"]
        change = await col.next()
        assert isinstance(change, LeaseChanges) and change.removed == ()
        assert sorted(x.key for x in change.upserted) == ["10.63.5.0-24", "10.63.6.0-24"]
        assert client.ttl_calls == 0
    finally:
        await col.stop()


async def test_updates_resume_after_etcd_restart(prefix: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, MGR_LOG)
    with EtcdServer() as etcd:
        subnets = f"{prefix}/subnets"
        etcd.etcdctl("put", f"{subnets}/10.64.1.0-24", vxlan_attrs("10.0.8.1").to_json())
        mgr = EtcdSubnetManager(EtcdClient([etcd.client_url]), prefix=prefix)
        col = Collector(mgr)
        try:
            assert isinstance(await col.next(), LeaseSnapshot)
            await asyncio.to_thread(etcd.stop)
            await asyncio.sleep(3)
            await asyncio.to_thread(etcd.start_again)
            etcd.etcdctl("put", f"{subnets}/10.64.2.0-24", vxlan_attrs("10.0.8.2").to_json())
            # Resumed from its revision: the new lease arrives as a change, no new snapshot.
            change = await col.next()
            assert isinstance(change, LeaseChanges)
            assert [x.key for x in change.upserted] == ["10.64.2.0-24"]
            unreachable = [r for r in caplog.records if r.levelno == logging.WARNING
                           and "cannot reach etcd" in r.getMessage()]
            assert len(unreachable) == 1, "a lasting outage is logged once, not per retry"
        finally:
            await col.stop()
            await mgr.aclose()


class GatedClient(EtcdClient):
    """Holds new watches until the gate opens, so a test can act while we are away."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.gate.set()

    async def watch(self, prefix: str, *, start_revision: int) -> WatchStream:
        await self.gate.wait()
        async for item in super().watch(prefix, start_revision=start_revision):
            yield item


async def test_catch_up_after_reconnect_then_compaction_gives_fresh_snapshot(
        prefix: str) -> None:
    with EtcdServer() as etcd:
        subnets = f"{prefix}/subnets"
        etcd.etcdctl("put", f"{subnets}/10.65.1.0-24", vxlan_attrs("10.0.9.1").to_json())
        etcd.etcdctl("put", f"{subnets}/10.65.7.0-24", vxlan_attrs("10.0.9.7").to_json())
        gated = GatedClient([etcd.client_url])
        mgr = EtcdSubnetManager(gated, prefix=prefix)
        col = Collector(mgr)
        try:
            assert isinstance(await col.next(), LeaseSnapshot)

            # Away without compaction: the missed revisions arrive as one catch-up batch,
            # folded to the last state per key.
            gated.gate.clear()
            await asyncio.to_thread(etcd.restart)  # drops the watch stream
            etcd.etcdctl("put", f"{subnets}/10.65.5.0-24", vxlan_attrs("10.0.9.5").to_json())
            etcd.etcdctl("put", f"{subnets}/10.65.6.0-24", vxlan_attrs("10.0.9.6").to_json())
            etcd.etcdctl("del", f"{subnets}/10.65.5.0-24")
            etcd.etcdctl("del", f"{subnets}/10.65.7.0-24")
            etcd.etcdctl("put", f"{subnets}/10.65.7.0-24", vxlan_attrs("10.0.9.77").to_json())
            gated.gate.set()
            change = await col.next()
            assert isinstance(change, LeaseChanges)
            assert sorted(change.removed) == ["10.65.5.0-24"]
            assert sorted((x.key, str(x.attrs.public_ip)) for x in change.upserted) == [
                ("10.65.6.0-24", "10.0.9.6"), ("10.65.7.0-24", "10.0.9.77")]

            # Away across a compaction: the history is gone, so a fresh snapshot comes.
            gated.gate.clear()
            await asyncio.to_thread(etcd.restart)
            etcd.etcdctl("del", f"{subnets}/10.65.1.0-24")
            etcd.etcdctl("put", f"{subnets}/10.65.2.0-24", vxlan_attrs("10.0.9.2").to_json())
            rev = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json").stdout)[0][
                "Status"]["header"]["revision"]
            etcd.etcdctl("compact", str(rev))
            gated.gate.set()
            snap = await col.next()
            assert isinstance(snap, LeaseSnapshot)
            assert sorted(x.key for x in snap.leases) == [
                "10.65.2.0-24", "10.65.6.0-24", "10.65.7.0-24"]
            # And the watch continues from the snapshot's revision.
            etcd.etcdctl("put", f"{subnets}/10.65.3.0-24", vxlan_attrs("10.0.9.3").to_json())
            change = await col.next()
            assert isinstance(change, LeaseChanges)
            assert [x.key for x in change.upserted] == ["10.65.3.0-24"]
        finally:
            await col.stop()
            await mgr.aclose()


# -- client --------------------------------------------------------------------------------

def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed: nothing listens


async def test_endpoint_failover_and_clear_error(etcd: EtcdServer, prefix: str) -> None:
    c = EtcdClient([dead_url(), etcd.client_url])
    try:
        assert await c.put(f"{prefix}/k", b"v") > 0
        assert (await c.get(f"{prefix}/k")) is not None
    finally:
        await c.aclose()
    bad = dead_url()
    c = EtcdClient([bad])
    try:
        with pytest.raises(EtcdError, match=f"cannot reach etcd.*{bad}.*is etcd running"):
            await c.get("/x")
    finally:
        await c.aclose()


async def test_range_is_paginated_at_one_revision(etcd: EtcdServer, client: EtcdClient,
                                                  prefix: str) -> None:
    for i in range(25):
        await client.put(f"{prefix}/p/{i:02d}", str(i).encode())
    await client.put(f"{prefix}/q", b"outside")
    kvs, rev = await client.range_prefix(f"{prefix}/p/", page=10)
    assert [kv.key for kv in kvs] == [f"{prefix}/p/{i:02d}" for i in range(25)]
    assert all(kv.mod_revision <= rev for kv in kvs)
    assert await client.create(f"{prefix}/p/00", b"again") == 0
    assert await client.delete(f"{prefix}/p/00") is True
    assert await client.delete(f"{prefix}/p/00") is False
    assert await client.time_to_live(123456789) == -1


async def test_tls_with_client_certificates(tmp_path: Path, prefix: str) -> None:
    tls = make_tls_files(tmp_path / "pki")
    with EtcdServer(tls=tls) as etcd:
        assert etcd.client_url.startswith("https://127.0.0.1:")
        c = EtcdClient([etcd.client_url], cafile=str(tls.ca), certfile=str(tls.client_cert),
                       keyfile=str(tls.client_key))
        mgr = EtcdSubnetManager(c, prefix=prefix)
        try:
            nc = await configured(etcd, prefix, mgr, Network="10.66.0.0/16")
            lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.10.1"))
            assert stored(etcd, f"{prefix}/subnets/{lease.key}") is not None
        finally:
            await mgr.aclose()
        # Without a client certificate the server refuses us.
        no_cert = EtcdClient([etcd.client_url], cafile=str(tls.ca))
        try:
            with pytest.raises(EtcdError):
                await no_cert.get(f"{prefix}/config")
        finally:
            await no_cert.aclose()


async def test_username_password_auth(prefix: str) -> None:
    with EtcdServer() as etcd:
        etcd.etcdctl("user", "add", "root:rootpw")
        etcd.etcdctl("auth", "enable")
        etcd.etcdctl("put", f"{prefix}/config",
                     json.dumps({"Network": "10.67.0.0/16", "Backend": {"Type": "vxlan"}}),
                     user="root:rootpw")
        c = EtcdClient([etcd.client_url], username="root", password="rootpw")
        mgr = EtcdSubnetManager(c, prefix=prefix)
        try:
            nc = (await mgr.node_config()).netconf
            lease = await mgr.acquire_lease(nc, vxlan_attrs("10.0.11.1"))
            # An expired/invalid token is replaced once, transparently.
            c._token = "invalid.1"
            snap = await anext(aiter(mgr.updates()))
            assert isinstance(snap, LeaseSnapshot) and snap.leases == (lease,)
        finally:
            await mgr.aclose()
        for kwargs in ({}, {"username": "root", "password": "wrong"}):
            bad = EtcdClient([etcd.client_url], **kwargs)
            try:
                with pytest.raises(EtcdError):
                    await bad.get(f"{prefix}/config")
            finally:
                await bad.aclose()



@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
async def test_etcd_server_inside_a_namespace(netns: NetNamespace, prefix: str) -> None:
    with EtcdServer(netns=netns) as etcd:
        etcd.etcdctl("put", f"{prefix}/k", "in-namespace")
        assert etcd.etcdctl("get", f"{prefix}/k", "--print-value-only").stdout.strip() == \
            "in-namespace"
        # The server process lives in the namespace (so its 127.0.0.1 is the namespace's).
        in_ns = subprocess.run(["ip", "netns", "pids", netns.name], capture_output=True,
                               text=True, check=True).stdout.split()
        assert str(etcd.pid) in in_ns
    assert not etcd.running
