"""vxlan backend: lease data, MACs, device compatibility, and the per-peer kernel objects."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflannel.backend.base import DesiredTable, PeerState
from pyflannel.backend.vxlan import (
    DeviceSpec,
    ExistingDevice,
    backend_data,
    device_name,
    incompatibility,
    random_vtep_mac,
    valid_vtep_mac,
    vtep_mac_of,
)
from pyflannel.lease.model import LeaseAttrs, LeaseFormatError, parse_subnet_key, subnet_key
from pyflannel.netlink import FdbEntry, Neighbour, Route
from pyflannel.reconcile.plan import KernelScope, Observed, plan


def test_device_names_are_upstreams() -> None:
    assert device_name(1) == "flannel.1"
    assert device_name(4096, ipv6=True) == "flannel-v6.4096"


def test_backend_data_has_upstreams_bytes() -> None:
    assert backend_data(1, "0e:2a:00:11:22:33") == '{"VNI":1,"VtepMAC":"0e:2a:00:11:22:33"}'


@given(st.integers(0, 1000))
def test_random_mac_is_locally_administered_unicast(_: int) -> None:
    mac = random_vtep_mac()
    first = int(mac[:2], 16)
    assert first & 0x01 == 0 and first & 0x02 == 0x02
    assert valid_vtep_mac(mac) == mac


@pytest.mark.parametrize("data, mac", [
    ('{"VNI":1,"VtepMAC":"0E:2A:00:11:22:33"}', "0e:2a:00:11:22:33"),
    ('{"vni":1,"vtepmac":"0e:2a:00:11:22:33"}', "0e:2a:00:11:22:33"),  # Go: any case
    ('{"VNI":1}', None),
    ('{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}', None),  # multicast
    ('{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}', None),
    ('{"VNI":1,"VtepMAC":"0e2a00112233"}', None),
    ('{"VNI":1,"VtepMAC":7}', None),
    ("[1]", None),
    ("not json", None),
    ("", None),
])
def test_vtep_mac_of_lease_data(data: str, mac: str | None) -> None:
    assert vtep_mac_of(data) == mac


SPEC = DeviceSpec("flannel.1", 1, 2, IPv4Address("192.168.1.1"), 0, False, False, 1450)
SAME = ExistingDevice(7, "vxlan", vni=1, link=2, local=IPv4Address("192.168.1.1"), port=8472)


@pytest.mark.parametrize("have, why", [
    (SAME, None),
    (ExistingDevice(7, "vxlan", vni=1), None),  # unset link/local/port are not compared
    (ExistingDevice(7, "veth"), "type veth is not vxlan"),
    (ExistingDevice(7, "vxlan", vni=2, link=2), "vni 2 != 1"),
    (ExistingDevice(7, "vxlan", vni=1, link=3), "vtep (external) interface 3 != 2"),
    (ExistingDevice(7, "vxlan", vni=1, local=IPv4Address("192.168.1.9")),
     "vtep IP 192.168.1.9 != 192.168.1.1"),
    (ExistingDevice(7, "vxlan", vni=1, group="239.1.1.1"), "group address 239.1.1.1 is set"),
    (ExistingDevice(7, "vxlan", vni=1, l2miss=True), "l2miss is on"),
    (ExistingDevice(7, "vxlan", vni=1, gbp=True), "gbp True != False"),
    (ExistingDevice(7, "vxlan", vni=1, learning=True), "learning True != False"),
])
def test_incompatible_devices(have: ExistingDevice, why: str | None) -> None:
    assert incompatibility(SPEC, have) == why


def test_port_compared_only_when_both_set() -> None:
    spec4789 = DeviceSpec("flannel.1", 1, 2, IPv4Address("192.168.1.1"), 4789, False, False,
                          1450)
    assert incompatibility(spec4789, SAME) == "port 8472 != 4789"
    assert incompatibility(spec4789, ExistingDevice(7, "vxlan", vni=1, port=4789)) is None
    assert incompatibility(SPEC, ExistingDevice(7, "vxlan", vni=1, port=4789)) is None


def test_reconciler_programs_neighbour_then_fdb_then_route_and_removes_departed() -> None:
    """The order upstream relies on (the kernel never ARPs for the onlink gateway), and a
    peer that left while we were down loses all three objects."""
    dev = 5
    mac = "0e:00:00:00:00:02"
    table = DesiredTable()
    table.put("10.244.2.0-24", PeerState(
        routes=(Route(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.0"), dev,
                      onlink=True),),
        neighbours=(Neighbour(dev, IPv4Address("10.244.2.0"), mac),),
        fdb=(FdbEntry(dev, mac, IPv4Address("192.168.1.2")),)))
    scope = KernelScope(route_oifs=frozenset({dev, 2}), networks=(IPv4Network("10.244.0.0/16"),),
                        neighbour_ifindexes=frozenset({dev}))
    gone_mac = "0e:00:00:00:00:09"
    observed = Observed(
        routes=[Route(IPv4Network("10.244.9.0/24"), IPv4Address("10.244.9.0"), dev,
                      onlink=True)],
        neighbours=[Neighbour(dev, IPv4Address("10.244.9.0"), gone_mac)],
        fdb=[FdbEntry(dev, gone_mac, IPv4Address("192.168.1.9"))])
    ops = plan(table.state, observed, scope, nexthops=False)
    kinds = [(op.action, type(op.obj).__name__) for op in ops]
    assert kinds == [("replace", "Neighbour"), ("replace", "FdbEntry"), ("replace", "Route"),
                     ("delete", "Route"), ("delete", "Neighbour"), ("delete", "FdbEntry")]
    assert ops[2].obj == Route(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.0"), dev,
                               onlink=True)
    # Nothing to do once the kernel matches.
    now = Observed(routes=list(table.state.routes.values()),
                   neighbours=list(table.state.neighbours.values()),
                   fdb=list(table.state.fdb.values()))
    assert plan(table.state, now, scope, nexthops=False) == []


def test_ipv6_only_subnet_keys_round_trip() -> None:
    """Upstream writes `&<v6>-<len>` for IPv6-only leases but cannot read them back; we
    can, so IPv6-only clusters work in etcd mode."""
    v6 = IPv6Network("fd10:244:0:2b::/64")
    key = subnet_key(None, v6)
    assert key == "&fd10:244:0:2b::-64"
    assert parse_subnet_key(key) == (None, v6)
    for bad in ("&fd10::-xx", "&fd10::1-64", "&-64"):
        with pytest.raises(LeaseFormatError):
            parse_subnet_key(bad)


def test_lease_json_carries_v6_vtep_data() -> None:
    attrs = LeaseAttrs(public_ip=IPv4Address("192.168.1.1"),
                       public_ipv6=IPv6Address("fd77::1"), backend_type="vxlan",
                       backend_data=backend_data(1, "0e:00:00:00:00:01"),
                       backend_v6_data=backend_data(1, "0e:00:00:00:00:02"))
    assert json.loads(attrs.to_json()) == {
        "PublicIP": "192.168.1.1", "PublicIPv6": "fd77::1", "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"},
        "BackendV6Data": {"VNI": 1, "VtepMAC": "0e:00:00:00:00:02"}}
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs
