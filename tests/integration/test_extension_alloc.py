"""The extension and alloc backends with the real flanneld on a real etcd, nodes in
network namespaces.

extension: the data path is the operator's commands. Here SubnetAddCommand is a script that
runs `ip route replace $1 via $2` (called as `hook.sh $SUBNET $PUBLIC_IP`) and records its
stdin and environment, SubnetRemoveCommand is `ip route del $SUBNET` as it stands (no
shell: the words are expanded and executed), PreStartupCommand prints a per-node string
(it must land in the lease's BackendData and in the peers' stdin) and PostStartupCommand
records its environment. Pods on every node must reach each other through those routes,
and a node that leaves must take its route with it.

alloc: a lease, subnet.env with the interface's MTU, and nothing programmed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from pyflannel_lab.cluster import Cluster, LabNode

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (scripts/setup.sh)"),
    pytest.mark.etcd,
]

# Run by flanneld (without a shell) inside the node's namespace. The node is known by its
# eth0 address; what a hook saw goes to $OUT/<kind>-<node address>-<peer subnet>.
SCRIPT = """#!/bin/sh
set -e
me=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
case "$1" in
pre)  echo "data of $me <&>"; echo "on stderr" >&2; echo ran >> "$OUT/pre-$me" ;;
post) env | grep -E '^(NETWORK|SUBNET|IPV6SUBNET|PUBLIC_IP|PUBLIC_IPV6)=' | sort \
          > "$OUT/post-$me" ;;
add)  ip route replace "$2" via "$3"
      cat > "$OUT/stdin-$me-$(echo "$2" | tr / _)"
      echo "SUBNET=$SUBNET PUBLIC_IP=$PUBLIC_IP" > "$OUT/env-$me-$(echo "$2" | tr / _)" ;;
esac
"""


def status(cl: Cluster, node: LabNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.ns.run(sys.executable, "-m", "pyflannel.cli", "status", "--check",
                       f"--etcd-endpoints={cl.etcd_endpoint}",
                       f"--subnet-file={node.subnet_file}", *args, check=False)


@pytest.fixture
def ext_cluster(tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    out = tmp_path / "out"
    out.mkdir()
    hook = tmp_path / "hook.sh"
    hook.write_text(SCRIPT)
    hook.chmod(stat.S_IRWXU)
    netconf = {"Network": "10.244.0.0/16", "Backend": {
        "Type": "extension",
        "PreStartupCommand": f"{hook} pre",
        "PostStartupCommand": f"{hook} post",
        "SubnetAddCommand": f"{hook} add $SUBNET $PUBLIC_IP",
        "SubnetRemoveCommand": "ip route del $SUBNET"}}
    os.environ["OUT"] = str(out)  # the daemons inherit it: the commands see flanneld's env
    try:
        # --ip-masq as the manifest has it (without it the CNI bridge masquerades pods)
        with Cluster(nodes=3, name="pfx", netconf=netconf, flanneld_args=["--ip-masq"]) as cl:
            cl.wait_until(cl.converged, timeout=60, what="the hooks' routes on every node")
            yield cl, out
    finally:
        os.environ.pop("OUT", None)


def test_extension_hooks_make_the_data_path(ext_cluster: tuple[Cluster, Path]) -> None:
    cl, out = ext_cluster
    nodes = list(cl.nodes.values())
    # the routes are exactly the commands': one per peer, via its public IP
    for node in nodes:
        assert cl.flannel_routes(node) == cl.expected_routes(node)
        assert len(cl.flannel_routes(node)) == 2
    # PreStartupCommand's output (stdout + stderr, trimmed) is BackendData, a JSON string
    leases = cl.leases()
    by_ip = {attrs["PublicIP"]: attrs for attrs in leases.values()}
    for node in nodes:
        attrs = by_ip[str(node.addr)]
        assert attrs["BackendType"] == "extension"
        assert attrs["BackendData"] == f"data of {node.addr} <&>\non stderr"
    raw = cl.etcdctl("get", cl.lease_key_of(nodes[0]) or "", "--print-value-only")
    assert '"BackendData":"data of' in raw and "\\u003c\\u0026\\u003e" in raw  # Go's escapes
    # each SubnetAddCommand got the remote's BackendData on stdin, its SUBNET and PUBLIC_IP
    for node in nodes:
        for peer in nodes:
            if peer is node:
                continue
            subnet = str(cl.subnet_of(peer)).replace("/", "_")
            assert (out / f"stdin-{node.addr}-{subnet}").read_text() == \
                f"data of {peer.addr} <&>\non stderr\n"
            assert (out / f"env-{node.addr}-{subnet}").read_text() == \
                f"SUBNET={cl.subnet_of(peer)} PUBLIC_IP={peer.addr}\n"
        # PostStartupCommand: upstream's environment
        subnet = cl.subnet_of(node)
        assert subnet is not None
        assert (out / f"post-{node.addr}").read_text().splitlines() == [
            "IPV6SUBNET=::/0", "NETWORK=10.244.0.0/16", f"PUBLIC_IP={node.addr}",
            "PUBLIC_IPV6=<nil>", f"SUBNET={subnet.network_address}/24"]
    # `pyflannel status --check` runs no command and finds the node in order (the hooks'
    # routes are not ours to judge)
    r = status(cl, nodes[0], "--ip-masq")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 leases in the etcd store" in r.stdout and "backend extension" in r.stdout
    assert all((out / f"pre-{n.addr}").read_text() == "ran\n" for n in nodes)
    # subnet.env: the interface's MTU
    assert b"FLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n" in nodes[0].subnet_file.read_bytes()


def test_extension_pods_reach_each_other_and_a_leaver_takes_its_route(
        ext_cluster: tuple[Cluster, Path]) -> None:
    cl, _out = ext_cluster
    for node in cl.nodes.values():
        cl.add_pod(node, f"pod{node.index}")
    matrix = cl.reachability()
    assert len(matrix) == 6
    for (src, _dst), seen in matrix.items():
        assert seen == str(cl.pods[src].ip), matrix
    leaver = cl.nodes[3]
    gone = str(cl.subnet_of(leaver))
    cl.remove_node(leaver)  # stops its daemon and deletes its lease: the remove commands run
    cl.wait_until(lambda: all(gone not in {d for d, _ in cl.flannel_routes(n)}
                              for n in cl.nodes.values()),
                  timeout=30, what="the leaver's route removed by SubnetRemoveCommand")
    for node in cl.nodes.values():
        assert cl.flannel_routes(node) == cl.expected_routes(node)
        assert "Ran command: ip route del $SUBNET" in node.log()


def test_alloc_takes_a_lease_and_programs_nothing() -> None:
    with Cluster(nodes=2, name="pfa",
                 netconf={"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}) as cl:
        nodes = list(cl.nodes.values())
        cl.wait_until(lambda: all(cl.subnet_of(n) is not None for n in nodes), timeout=60,
                      what="both leases")
        leases = cl.leases()
        assert len(leases) == 2
        for attrs in leases.values():
            # upstream's alloc lease: no BackendType, no BackendData
            assert list(attrs) == ["PublicIP", "PublicIPv6"]
        for node in nodes:
            subnet = cl.subnet_of(node)
            assert isinstance(subnet, IPv4Network)
            assert node.subnet_file.read_bytes() == (
                f"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet.network_address + 1}"
                "/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n").encode()
        cl.wait_until(lambda: all("not watching peers' leases" in n.log() for n in nodes),
                      timeout=20, what="the daemons running")
        for node in nodes:
            assert cl.routed_subnets(node) == set()
            assert "Watching for new subnet leases" not in node.log()
            assert node.proc is not None and node.proc.poll() is None
        r = status(cl, nodes[0])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "2 leases in the etcd store" in r.stdout and "backend alloc" in r.stdout
        # a peer that joins later changes nothing on the others either
        cl.add_node()
        cl.wait_until(lambda: len(cl.leases()) == 3, timeout=30, what="the third lease")
        assert all(cl.routed_subnets(n) == set() for n in nodes)
