"""Moving a node between upstream flannel's route form and pyflannel's, both ways, with no
moment in which a peer's route is missing; and nexthop_compat_mode=0.

There is no upstream binary here, so its data plane is emulated two ways: pyflannel with
PYFLANNEL_NEXTHOP_OBJECTS=off (upstream's route form: `<subnet> via <gw> dev eth0`,
checked below line by line), and upstream's own steps programmed with `ip` in the node's
namespace (reference §6 and §7: host-gw's `routeAdd`, which lists the routes to the subnet
and skips one with the same gateway and device; vxlan's `ip neigh/bridge fdb/ip route
replace`). "No gap" is checked three ways at once while it happens: the node's netlink
notifications (no route deleted, no nexthop deleted under a route, nothing lost:
RouteGapWatch), back-to-back route dumps, and a UDP echo every 10 ms between pods on two
nodes that loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from ipaddress import IPv4Network

import pytest

from pyflannel.reconcile.plan import is_our_nhid
from pyflannel_lab.cluster import Cluster, LabNode, LabPod
from pyflannel_lab.probe import UdpProbe
from pyflannel_lab.sampling import RouteGapWatch

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None or not os.path.exists("/usr/lib/cni/bridge"),
                       reason="needs etcd and containernetworking-plugins (scripts/setup.sh)"),
    pytest.mark.etcd,
]

HOSTGW = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}
VXLAN = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
OFF = {"PYFLANNEL_NEXTHOP_OBJECTS": "off"}
TIMEOUT = 60


def peer_routes(cl: Cluster, node: LabNode) -> dict[str, str]:
    """Peer subnet -> its `ip route show` line on `node` (any device)."""
    subnets = {str(cl.subnet_of(o)) for o in cl.nodes.values() if o is not node}
    out = {}
    for line in node.ns.ip("route", "show").stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in subnets:
            out[parts[0]] = line.strip()
    return out


def upstream_form(cl: Cluster, node: LabNode, backend: str) -> dict[str, str]:
    """The lines upstream's routes show as (`ip route show`; proto boot is not shown)."""
    out = {}
    for o in cl.nodes.values():
        subnet = cl.subnet_of(o)
        if o is node or subnet is None:
            continue
        out[str(subnet)] = (f"{subnet} via {o.addr} dev eth0" if backend == "host-gw" else
                            f"{subnet} via {subnet.network_address} dev flannel.1 onlink")
    return out


def nhid_form(cl: Cluster, node: LabNode, backend: str) -> dict[str, str]:
    """Routes in pyflannel's default form: `<subnet> nhid <id> via ...` with one of ours."""
    have = peer_routes(cl, node)
    out = {}
    for subnet, line in upstream_form(cl, node, backend).items():
        m = re.fullmatch(r"(\S+) nhid (\d+) (.*)", have.get(subnet, ""))
        if m and is_our_nhid(int(m.group(2))) and f"{m.group(1)} {m.group(3)}" == line:
            out[subnet] = line
    return out


def our_nexthops(node: LabNode) -> list[dict[str, object]]:
    shown = json.loads(node.ns.ip("-j", "nexthop", "show").stdout or "[]")
    return [nh for nh in shown if is_our_nhid(int(nh["id"]))]


def probing(src: LabPod, dst: LabPod) -> UdpProbe:
    """A datagram every 10 ms from pod `src` to pod `dst`, echoed back, from 0.3 s before
    the change to 0.3 s after it."""
    return UdpProbe(src.ns, dst.ns, str(dst.ip), interval=0.01, linger=0.5, settle=0.3)


def cleanup_nexthops(node: LabNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.ns.run(sys.executable, "-m", "pyflannel.cli", "cleanup-nexthops", *args,
                       check=False)


def upstream_host_gw_takes_over(cl: Cluster, node: LabNode) -> list[str]:
    """Upstream host-gw's routeAdd for every peer lease: list the routes to the subnet;
    one with the same gateway and device is kept ("already exists, skipping"), one that
    differs is deleted and the route added. What it logged, per subnet."""
    said = []
    for o in cl.nodes.values():
        subnet = cl.subnet_of(o)
        if o is node or subnet is None:
            continue
        have = json.loads(node.ns.ip("-j", "route", "show", "exact", str(subnet)).stdout
                          or "[]")
        if any(r.get("gateway") == str(o.addr) and r.get("dev") == "eth0" for r in have):
            said.append(f"Route to {subnet} already exists, skipping.")
            continue
        for _r in have:
            node.ns.ip("route", "del", str(subnet))
        node.ns.ip("route", "add", str(subnet), "via", str(o.addr), "dev", "eth0")
        said.append(f"Replacing existing route to {subnet}")
    return said


def upstream_vxlan_takes_over(cl: Cluster, node: LabNode) -> None:
    """Upstream vxlan's handleSubnetEvents for every peer lease (reference §7)."""
    for key, attrs in cl.leases().items():
        subnet = IPv4Network(key.rsplit("/", 1)[1].replace("-", "/"))
        if attrs["PublicIP"] == str(node.addr):
            continue
        gw, mac = str(subnet.network_address), attrs["BackendData"]["VtepMAC"]
        node.ns.ip("neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
        node.ns.run("bridge", "fdb", "replace", mac, "dev", "flannel.1", "dst",
                    attrs["PublicIP"], "self", "permanent")
        node.ns.ip("route", "replace", str(subnet), "via", gw, "dev", "flannel.1", "onlink")


def assert_no_gap(watch: RouteGapWatch, probe: UdpProbe, *, forms: set[str]) -> None:
    assert watch.gaps == []
    assert watch.dumps > 100 and watch.dump_misses == 0, (watch.dumps, watch.dump_misses)
    # the change happened while watched: every route was seen in both forms
    assert all(seen == forms for seen in watch.forms.values()), watch.forms
    print(f"route notifications {watch.changes}, dumps {watch.dumps} (missing a route: "
          f"{watch.dump_misses}), datagrams: {probe.result}")
    assert probe.result is not None, "the probe reported nothing"
    assert probe.result.sent > 50 and not probe.result.lost, str(probe.result)


def test_upstream_to_pyflannel_replaces_each_route_in_place() -> None:
    with Cluster(nodes=0, name="pnu", netconf=HOSTGW) as cl:
        node = cl.add_node(start=False)
        node.env.update(OFF)  # upstream's route form
        cl.start_daemon(node)
        other = cl.add_node()
        cl.add_node()
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="convergence")
        cl.wait_until(lambda: peer_routes(cl, node) == upstream_form(cl, node, "host-gw"),
                      what="upstream's plain routes on node1")
        assert our_nexthops(node) == []
        src, dst = cl.add_pod(node, serve=False), cl.add_pod(other, serve=False)
        with RouteGapWatch(node.ns.name, set(peer_routes(cl, node))) as watch, \
                probing(src, dst) as probe:
            cl.stop_daemon(node)  # upstream stops; its routes stay
            node.env.clear()  # pyflannel, nexthop objects (the default)
            cl.start_daemon(node)
            cl.wait_until(lambda: nhid_form(cl, node, "host-gw")
                          == upstream_form(cl, node, "host-gw"),
                          timeout=TIMEOUT, what="routes on nexthop objects")
        assert_no_gap(watch, probe, forms={"plain", "nhid"})
        assert "Drift" not in node.log()


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_pyflannel_to_upstream_then_cleanup_leaves_upstreams_routes_only(backend: str) -> None:
    with Cluster(nodes=3, name="pnd", netconf=HOSTGW if backend == "host-gw" else VXLAN) as cl:
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="convergence")
        node, other = cl.nodes[1], cl.nodes[2]
        want = upstream_form(cl, node, backend)
        cl.wait_until(lambda: nhid_form(cl, node, backend) == want, timeout=TIMEOUT,
                      what="routes on nexthop objects")
        assert len(our_nexthops(node)) == 2
        src, dst = cl.add_pod(node, serve=False), cl.add_pod(other, serve=False)
        with RouteGapWatch(node.ns.name, set(want)) as watch, probing(src, dst) as probe:
            cl.stop_daemon(node)
            if backend == "host-gw":
                # upstream's routeEqual sees our route's gateway and device (compat mode 1)
                # and leaves it on our nexthop: the reason cleanup converts routes itself
                assert upstream_host_gw_takes_over(cl, node) == [
                    f"Route to {s} already exists, skipping." for s in want]
                assert nhid_form(cl, node, backend) == want
            else:
                upstream_vxlan_takes_over(cl, node)  # `ip route replace`: plain now
                assert peer_routes(cl, node) == want
            dry = cleanup_nexthops(node, "--dry-run")
            assert dry.returncode == 0 and "would remove nexthop" in dry.stdout, dry
            assert len(our_nexthops(node)) == 2  # a dry run changes nothing
            done = cleanup_nexthops(node)
        assert_no_gap(watch, probe, forms={"plain", "nhid"})
        assert done.returncode == 0, done
        lines = done.stdout.splitlines()
        converted = [ln for ln in lines if ln.startswith("converted route ")]
        assert len(converted) == (2 if backend == "host-gw" else 0), lines
        assert sum(ln.startswith("removed nexthop ") for ln in lines) == 2, lines
        assert lines[-1].startswith("done: ") and lines[-1].endswith(" 0 kept, 0 failed")
        assert peer_routes(cl, node) == want  # exactly upstream's routes
        assert our_nexthops(node) == []
        again = cleanup_nexthops(node)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again


def test_pyflannel_in_upstreams_form_removes_its_own_nexthops() -> None:
    """PYFLANNEL_NEXTHOP_OBJECTS=off on a node that ran with nexthop objects: the routes
    are converted in place and our nexthop objects go, with no cleanup to run."""
    with Cluster(nodes=3, name="pno", netconf=HOSTGW) as cl:
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="convergence")
        node = cl.nodes[1]
        want = upstream_form(cl, node, "host-gw")
        cl.wait_until(lambda: nhid_form(cl, node, "host-gw") == want, timeout=TIMEOUT,
                      what="routes on nexthop objects")
        with RouteGapWatch(node.ns.name, set(want)) as watch, \
                probing(cl.add_pod(node, serve=False),
                        cl.add_pod(cl.nodes[2], serve=False)) as probe:
            cl.stop_daemon(node)
            node.env.update(OFF)
            cl.start_daemon(node)
            cl.wait_until(lambda: peer_routes(cl, node) == want and not our_nexthops(node),
                          timeout=TIMEOUT, what="plain routes, no nexthop objects")
        assert_no_gap(watch, probe, forms={"plain", "nhid"})


def test_compat_mode_0_gives_plain_routes_that_tools_read_the_gateway_of() -> None:
    with Cluster(nodes=2, name="pnc", netconf=HOSTGW) as cl:
        node = cl.add_node(start=False)
        node.ns.sysctl("net.ipv4.nexthop_compat_mode", "0")  # this node's namespace only
        cl.start_daemon(node)
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="convergence")
        want = upstream_form(cl, node, "host-gw")
        cl.wait_until(lambda: peer_routes(cl, node) == want, what="plain routes")
        assert our_nexthops(node) == []
        # what a tool reading the gateway sees: `ip -j route` and `ip route get`
        shown = {r["dst"]: r for r in json.loads(node.ns.ip("-j", "route", "show").stdout)}
        for peer in (cl.nodes[1], cl.nodes[2]):
            r = shown[str(cl.subnet_of(peer))]
            assert (r.get("gateway"), r.get("dev"), r.get("nhid")) == (str(peer.addr), "eth0",
                                                                      None)
            subnet = cl.subnet_of(peer)
            assert subnet is not None
            got = node.ns.ip("route", "get", str(subnet.network_address + 5)).stdout
            assert f"via {peer.addr} dev eth0" in got, got
        assert node.log().count("nexthop_compat_mode is 0") == 1

        # Set while a daemon runs: its next safety-net pass (every 10 s) converts in place.
        busy = cl.nodes[1]
        want1 = upstream_form(cl, busy, "host-gw")
        cl.wait_until(lambda: nhid_form(cl, busy, "host-gw") == want1,
                      what="node1 on nexthop objects")
        with RouteGapWatch(busy.ns.name, set(want1)) as watch:
            busy.ns.sysctl("net.ipv4.nexthop_compat_mode", "0")
            cl.wait_until(lambda: peer_routes(cl, busy) == want1 and not our_nexthops(busy),
                          timeout=25, what="node1's routes plain after compat mode 0")
        assert watch.gaps == [] and watch.dump_misses == 0
        assert all(seen == {"plain", "nhid"} for seen in watch.forms.values()), watch.forms
        assert busy.log().count("nexthop_compat_mode is 0") == 1
