"""What the tests and benchmarks look at in a lab cluster: leases from subnet.env, the
routes each node has and should have, convergence, and pod-to-pod reachability. A mixin
of Cluster: it reads the topology's nodes, pods and network config, and changes nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import TYPE_CHECKING, Any

from pyflannel_lab.netns import NetNamespace

if TYPE_CHECKING:
    from pyflannel_lab.cluster import LabNode, LabPod, OutsideHost

# A tiny TCP client for reachability checks (the server side is the lab's whoami service).
WHOAMI_CLIENT = (
    "import socket,sys\n"
    "try:\n"
    " c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=float(sys.argv[3]))\n"
    " print(c.recv(100).decode())\n"
    "except OSError as e:\n"
    " print('error:',e);sys.exit(1)\n")
WHOAMI_PORT = 7777


class Checks:
    nodes: dict[int, LabNode]
    pods: dict[str, LabPod]
    outside: OutsideHost | None
    netconf: dict[str, Any]

    def whoami(self, src: NetNamespace, dst: IPv4Address | IPv6Address | str,
               timeout: float = 3) -> str:
        """Connects from `src` to the whoami service at `dst`: the address the other side
        saw us coming from, or 'error: ...'."""
        out = src.run(sys.executable, "-I", "-S", "-c", WHOAMI_CLIENT, str(dst),
                      str(WHOAMI_PORT), str(timeout), check=False, timeout=timeout + 10)
        return out.stdout.strip()

    def reachability(self, family: int | None = None,
                     timeout: float = 3) -> dict[tuple[str, str], str]:
        """(from pod, to pod or 'outside') -> the source address the receiver saw.
        `family` 4 or 6 tests the pods' addresses of that family only (no outside host for
        6); None tests each pod's primary address (IPv4 unless IPv6-only). `timeout`: per
        connection."""
        out: dict[tuple[str, str], str] = {}
        for a in self.pods.values():
            for b in self.pods.values():
                dst = b.ip if family is None else b.address(family)
                if a is not b and dst is not None:
                    out[(a.name, b.name)] = self.whoami(a.ns, dst, timeout)
            if self.outside is not None and family != 6:
                out[(a.name, "outside")] = self.whoami(a.ns, self.outside.addr, timeout)
        return out

    def subnet_of(self, node: LabNode) -> IPv4Network | None:
        try:
            for line in node.subnet_file.read_text().splitlines():
                if line.startswith("FLANNEL_SUBNET="):
                    return IPv4Network(line.split("=", 1)[1], strict=False)
        except OSError:
            return None
        return None

    def subnet6_of(self, node: LabNode) -> IPv6Network | None:
        try:
            for line in node.subnet_file.read_text().splitlines():
                if line.startswith("FLANNEL_IPV6_SUBNET="):
                    return IPv6Network(line.split("=", 1)[1], strict=False)
        except OSError:
            return None
        return None

    def expected_routes6(self, node: LabNode) -> set[tuple[str, str]]:
        """(IPv6 subnet, IPv6 gateway) host-gw routes `node` should have."""
        return {(str(self.subnet6_of(o)), str(o.addr6)) for o in self.nodes.values()
                if o is not node and self.subnet6_of(o) is not None}

    def expected_routes(self, node: LabNode) -> set[tuple[str, str]]:
        """(subnet, gateway) host-gw routes `node` should have: one per other node."""
        return {(str(self.subnet_of(o)), str(o.addr)) for o in self.nodes.values()
                if o is not node and self.subnet_of(o) is not None}

    def flannel_routes(self, node: LabNode, *, family: int = 4,
                       dev: str = "eth0") -> set[tuple[str, str]]:
        """(dst, gateway) of the routes inside the cluster network (IPv6Network for
        `family` 6) on `dev`."""
        network = ip_network(self.netconf["IPv6Network" if family == 6 else "Network"])
        out = set()
        args = ("-6", "route", "show", "dev", dev) if family == 6 else ("route", "show", "dev",
                                                                           dev)
        for line in node.ns.ip(*args, check=False).stdout.splitlines():
            parts = line.split()
            # `10.244.2.0/24 via 192.168.77.2 dev eth0`, or with a nexthop object
            # `10.244.2.0/24 nhid 253886465 via 192.168.77.2 dev eth0`
            if "via" in parts and "/" in parts[0]:
                dst = ip_network(parts[0])
                if dst.version == network.version and dst.subnet_of(network):  # type: ignore[arg-type]
                    out.add((parts[0], parts[parts.index("via") + 1]))
        return out

    def wait_until(self, cond: Callable[[], bool], timeout: float = 20, interval: float = 0.05,
                   what: str = "condition") -> float:
        """Wait for `cond`; returns the seconds it took, raises with the daemons' logs."""
        start = time.monotonic()
        while True:
            if cond():
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                logs = "\n".join(f"--- {n.name} ---\n{n.log()[-3000:]}" for n in
                                 self.nodes.values())
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{logs}")
            time.sleep(interval)

    def routed_subnets(self, node: LabNode, *, family: int = 4) -> set[str]:
        """Peer subnets `node` has a route to, on any device (vxlan, DirectRouting)."""
        key = "IPv6Network" if family == 6 else "Network"
        if key not in self.netconf:
            return set()
        network = ip_network(self.netconf[key])
        out = set()
        for line in node.ns.ip(f"-{family}", "route", "show", check=False).stdout.splitlines():
            parts = line.split()
            if parts and "/" in parts[0] and "via" in parts:
                dst = ip_network(parts[0])
                if dst.version == network.version and dst.subnet_of(network):  # type: ignore[arg-type]
                    out.add(parts[0])
        return out

    def converged(self) -> bool:
        """Every node has its lease and a route to every other node's subnet: exactly the
        host-gw routes for host-gw, a route on any device for other backends."""
        nodes = list(self.nodes.values())
        if any(self.subnet_of(n) is None for n in nodes if self.netconf.get("EnableIPv4", True)):
            return False
        if self.netconf.get("Backend", {}).get("Type", "vxlan") == "host-gw" and \
                self.netconf.get("EnableIPv4", True):
            return all(self.flannel_routes(n) == self.expected_routes(n) for n in nodes)
        for fam, subnet_of in ((4, self.subnet_of), (6, self.subnet6_of)):
            if fam == 4 and not self.netconf.get("EnableIPv4", True):
                continue
            if fam == 6 and not self.netconf.get("EnableIPv6", False):
                continue
            for n in nodes:
                want = {str(subnet_of(o)) for o in nodes if o is not n and subnet_of(o)}
                if self.routed_subnets(n, family=fam) != want:
                    return False
        return True

