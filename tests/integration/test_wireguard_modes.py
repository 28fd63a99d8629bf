"""The wireguard backend's other modes and families on the lab (userspace wireguard-go,
three nodes on three segments across the router): `auto`, `ipv4` and `ipv6` (one
flannel-wg carrying both families, the endpoint in the mode's family) in dual stack, and
IPv6-only clusters in `separate` (flannel-wg-v6 alone) and `ipv6` mode. For each: every
node's peers as its leases say, upstream's lease data, and pods reaching each other in every
enabled family with their own addresses. (Dual-stack `separate` and IPv4: see
test_wireguard_cluster.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyflannel_lab.cluster import Cluster
from pyflannel_lab.wireguard import (
    WG_DEV,
    WG_DEV6,
    WG_PORT,
    WG_PORT6,
    wg_show,
)
from tests.integration.wireguard_marks import WIREGUARD_LAB

pytestmark = WIREGUARD_LAB

SEGMENTS = ["192.168.93.0/24", "192.168.94.0/24", "192.168.95.0/24"]
V6_NETWORK = "fd10:245::/56"
TIMEOUT = 60

# (mode, IPv4 enabled): which device carries the peers, on which port, endpoint family
CASES = [("auto", True), ("ipv4", True), ("ipv6", True), ("separate", False), ("ipv6", False)]


def layout(mode: str, dual: bool) -> tuple[str, int, int]:
    if mode == "separate":  # IPv6-only: the v6 device alone
        return WG_DEV6, WG_PORT6, 6
    return WG_DEV, WG_PORT, 4 if mode in ("auto", "ipv4") else 6


def converged(cl: Cluster, mode: str, dual: bool) -> bool:
    dev, port, fam = layout(mode, dual)
    try:  # by IPv6 address: an IPv6-only lease's PublicIP is 0.0.0.0
        keys = {a["PublicIPv6"]: a["BackendV6Data"]["PublicKey"] for a in cl.leases().values()}
    except (RuntimeError, KeyError, ValueError, TypeError):
        return False
    for node in cl.nodes.values():
        have = wg_show(cl, node, dev)
        if have is None or have.listen_port != port or have.public_key != keys.get(
                str(node.addr6)):
            return False
        want = set()
        for o in cl.nodes.values():
            if o is node:
                continue
            s4, s6 = cl.subnet_of(o), cl.subnet6_of(o)
            if s6 is None or (dual and s4 is None):
                return False
            ep = f"{o.addr}:{port}" if fam == 4 else f"[{o.addr6}]:{port}"
            ips = tuple(sorted(str(s) for s in (s4 if dual else None, s6) if s is not None))
            want.add((keys.get(str(o.addr6)), ep, ips))
        if {(p.public_key, p.endpoint, p.allowed_ips) for p in have.peers.values()} != want:
            return False
    return True


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{'dual' if d else 'v6only'}"
                                                   for m, d in CASES])
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, str, bool]]:
    mode, dual = request.param
    netconf: dict[str, Any] = {"EnableIPv6": True, "IPv6Network": V6_NETWORK,
                               "Backend": {"Type": "wireguard", "Mode": mode}}
    if dual:
        netconf["Network"] = "10.244.0.0/16"
    else:
        netconf["EnableIPv4"] = False
    with Cluster(segments=SEGMENTS, nodes=[0, 1, 2], netconf=netconf, name="pfwm", ipv6=True,
                 flanneld_args=["--ip-masq"], wireguard_impl="userspace") as cl:
        cl.wait_until(lambda: converged(cl, mode, dual), timeout=TIMEOUT, interval=0.2,
                      what=f"wireguard peers in {mode} mode")
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        yield cl, mode, dual


def test_pods_reach_each_other_in_every_family(cluster: tuple[Cluster, str, bool]) -> None:
    cl, mode, dual = cluster
    for family in (4, 6) if dual else (6,):
        matrix = cl.reachability(family)
        assert len(matrix) == 6
        for (src, dst), seen in matrix.items():
            assert seen == str(cl.pods[src].address(family)), (mode, family, src, dst, seen)


def test_devices_routes_and_lease_data(cluster: tuple[Cluster, str, bool]) -> None:
    cl, mode, dual = cluster
    dev, port, _fam = layout(mode, dual)
    other = WG_DEV if dev == WG_DEV6 else WG_DEV6
    for node in cl.nodes.values():
        assert "FLANNEL_MTU=1420\n" in node.subnet_file.read_text()
        assert wg_show(cl, node, other) is None  # one device in these layouts
        routes6 = node.ns.ip("-6", "route", "show", "dev", dev).stdout
        assert any(line.split()[0] == V6_NETWORK for line in routes6.splitlines() if line)
        routes4 = node.ns.ip("-4", "route", "show", "dev", dev, check=False).stdout
        assert ("10.244.0.0/16 " in routes4) == dual
        assert "Traceback" not in node.log()
    for attrs in cl.leases().values():
        assert attrs["BackendType"] == "wireguard"
        assert list(attrs["BackendV6Data"]) == ["PublicKey", "Port"]
        assert attrs["BackendV6Data"]["Port"] == port
        if dual:  # one device: the same key and port in both
            assert attrs["BackendData"] == attrs["BackendV6Data"]
        else:
            assert "BackendData" not in attrs
