"""IPv6-only and dual-stack clusters, host-gw and vxlan, etcd mode: leases, subnet.env,
routes/devices, ip6 masquerade rules, the CNI plugin's IPv6 ranges and routes, and pods
talking in both families."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Any

import pytest

from pyflannel_lab.cluster import Cluster, LabNode

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None or not os.path.exists("/usr/lib/cni/bridge"),
                       reason="needs etcd and containernetworking-plugins (scripts/setup.sh)"),
    pytest.mark.etcd,
]

V6_NETWORK = "fd10:244::/56"
TIMEOUT = 60


def v6_peers_routed(cl: Cluster, node: LabNode, backend: str) -> bool:
    others = [o for o in cl.nodes.values() if o is not node]
    subnets = {cl.subnet6_of(o) for o in others}
    if None in subnets:
        return False
    if backend == "host-gw":
        return bool(cl.flannel_routes(node, family=6) == cl.expected_routes6(node))
    # vxlan: `<subnet> via <subnet>:: dev flannel-v6.1 onlink`
    got = cl.flannel_routes(node, family=6, dev="flannel-v6.1")
    return bool(got == {(str(s), str(s.network_address)) for s in subnets if s is not None})


def v4_peers_routed(cl: Cluster, node: LabNode, backend: str) -> bool:
    if backend == "host-gw":
        return bool(cl.flannel_routes(node) == cl.expected_routes(node))
    got = cl.flannel_routes(node, dev="flannel.1")
    want = {(str(s), str(s.network_address)) for o in cl.nodes.values() if o is not node
            for s in [cl.subnet_of(o)] if s is not None}
    return len(want) == len(cl.nodes) - 1 and bool(got == want)


@pytest.fixture(scope="module", params=[
    ("host-gw", True), ("host-gw", False), ("vxlan", True), ("vxlan", False)],
    ids=["host-gw-dual", "host-gw-v6only", "vxlan-dual", "vxlan-v6only"])
def cluster(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, str, bool]]:
    backend, dual = request.param
    netconf: dict[str, Any] = {"EnableIPv6": True, "IPv6Network": V6_NETWORK,
                               "Backend": {"Type": backend}}
    if dual:
        netconf["Network"] = "10.244.0.0/16"
    else:
        netconf["EnableIPv4"] = False
    with Cluster(nodes=3, netconf=netconf, name="pf6", ipv6=True,
                 flanneld_args=["--ip-masq"]) as cl:
        cl.wait_until(lambda: all(
            v6_peers_routed(cl, n, backend) and (not dual or v4_peers_routed(cl, n, backend))
            for n in cl.nodes.values()), timeout=TIMEOUT, what="routes in both families")
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        yield cl, backend, dual


def test_subnet_env_and_leases(cluster: tuple[Cluster, str, bool]) -> None:
    cl, backend, dual = cluster
    for node in cl.nodes.values():
        s4, s6 = cl.subnet_of(node), cl.subnet6_of(node)
        assert s6 is not None and s6.prefixlen == 64 and s6.subnet_of(IPv6Network(V6_NETWORK))
        mtu = {"host-gw": 1500, "vxlan": 1450 if dual else 1430}[backend]
        v4_lines = (f"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={s4}\n"
                    .replace(f"{s4}", f"{s4.network_address + 1}/24") if s4 else "")
        assert (s4 is not None) == dual
        assert node.subnet_file.read_text() == (
            f"{v4_lines}FLANNEL_IPV6_NETWORK={V6_NETWORK}\n"
            f"FLANNEL_IPV6_SUBNET={s6.network_address + 1}/64\n"
            f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n")
    for key, attrs in cl.leases().items():
        node = next(n for n in cl.nodes.values() if attrs["PublicIPv6"] == str(n.addr6))
        assert key.rsplit("/", 1)[1].startswith("&") != dual  # IPv6-only keys: `&<v6>-64`
        assert attrs["PublicIP"] == (str(node.addr) if dual else "0.0.0.0")
        if backend == "vxlan":
            assert list(attrs["BackendV6Data"]) == ["VNI", "VtepMAC"]
            assert ("BackendData" in attrs) == dual


def test_devices_and_ip6_masquerade(cluster: tuple[Cluster, str, bool]) -> None:
    cl, backend, dual = cluster
    for node in cl.nodes.values():
        nat6 = node.ns.run("ip6tables-save", "-t", "nat").stdout
        assert "MASQUERADE" in nat6 and V6_NETWORK in nat6
        if backend == "vxlan":
            d = json.loads(node.ns.ip("-d", "-j", "link", "show", "flannel-v6.1").stdout)[0]
            assert d["linkinfo"]["info_data"]["local6"] == str(node.addr6) and d["mtu"] == 1430
            s6 = cl.subnet6_of(node)
            assert s6 is not None
            addrs = node.ns.ip("-6", "addr", "show", "dev", "flannel-v6.1").stdout
            assert f"{s6.network_address}/128" in addrs
            # no flannel.1 without IPv4
            links = node.ns.ip("link").stdout
            assert ("flannel.1:" in links) == dual


def test_cni_gives_pods_addresses_and_routes_in_both_families(
        cluster: tuple[Cluster, str, bool]) -> None:
    cl, _backend, dual = cluster
    for pod in cl.pods.values():
        s6 = cl.subnet6_of(pod.node)
        assert pod.ip6 is not None and s6 is not None and pod.ip6 in s6
        routes6 = pod.ns.ip("-6", "route").stdout
        assert f"default via {s6.network_address + 1}" in routes6
        s4 = cl.subnet_of(pod.node)
        if dual:
            assert isinstance(pod.ip, IPv4Address) and s4 is not None and pod.ip in s4
        else:
            assert isinstance(pod.ip, IPv6Address) and pod.ip == pod.ip6


def test_pods_reach_each_other_in_every_family(cluster: tuple[Cluster, str, bool]) -> None:
    cl, _backend, dual = cluster
    for family in (4, 6) if dual else (6,):
        matrix = cl.reachability(family)
        assert len(matrix) == 3 * 2
        for (src, dst), seen in matrix.items():
            want = str(cl.pods[src].address(family))
            if seen != want:
                # A pod's new IPv6 address is usable once its duplicate address detection
                # is over (a second or more on a loaded machine): ask again for a while.
                dst_ip = cl.pods[dst].address(family)
                assert dst_ip is not None
                deadline = time.monotonic() + 15
                while seen != want and time.monotonic() < deadline:
                    time.sleep(0.5)
                    seen = cl.whoami(cl.pods[src].ns, dst_ip)
            assert seen == want, (family, src, dst, seen)
