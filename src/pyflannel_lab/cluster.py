"""A flannel cluster on one machine: every node is a network namespace.

Topology: a "switch" namespace holds one Linux bridge per L2 segment and the store's
servers (etcd, or etcd + kube-apiserver); each node namespace has `eth0`, a veth whose
other end is a port of its segment's bridge, an address on the segment and a default
route, so flanneld's default-interface detection works as on a real node. With more
than one segment a "router" namespace joins them (nodes' default route points at it),
which is what host-gw cannot cross and vxlan can. IPv6 addresses are added per segment
when asked for. Nothing is created in the root namespace; `close()` removes every
namespace, process and temporary file, also after a failure half-way through.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any, Protocol

from pyflannel.cni.install import install_plugin
from pyflannel_lab.checks import WHOAMI_PORT, Checks
from pyflannel_lab.cniruntime import Attachment, CniRuntime
from pyflannel_lab.daemons import WIREGUARD_RUN_DIR, Daemons, wireguard_mount_point_in_use
from pyflannel_lab.etcd import EtcdServer
from pyflannel_lab.netns import NetNamespace, veth_between

DEFAULT_SEGMENT = "192.168.77.0/24"
IPV6_SEGMENT_PREFIX = "fd77:{seg}::/64"  # the IPv6 prefix of segment number `seg`
SYSTEM_CNI_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins

# A tiny TCP service for reachability checks: it answers every connection with the
# address it sees the client coming from (so NAT, or its absence, is visible).
WHOAMI_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])));s.listen(64)\n"
    "print('ready',flush=True)\n"
    "while True:\n"
    " c,a=s.accept();c.sendall(a[0].encode());c.close()\n")


@dataclass
class LabPod:
    """A pod: a network namespace attached through the flannel CNI plugin."""

    name: str
    node: LabNode
    ns: NetNamespace
    ip: IPv4Address | IPv6Address  # the IPv4 address; the IPv6 one in IPv6-only clusters
    result: dict[str, Any]
    attachment: Attachment
    server: subprocess.Popen[bytes] | None = None
    ip6: IPv6Address | None = None  # dual-stack and IPv6-only clusters
    server6: subprocess.Popen[bytes] | None = None

    def address(self, family: int = 4) -> IPv4Address | IPv6Address | None:
        """The pod's address of `family` (4 or 6), None when it has none."""
        if family == 6:
            return self.ip6
        return self.ip if self.ip.version == 4 else None


@dataclass
class OutsideHost:
    """A machine on the nodes' segment that is not part of the cluster."""

    ns: NetNamespace
    addr: IPv4Address
    server: subprocess.Popen[bytes] | None = None


@dataclass
class LabNode:
    index: int
    ns: NetNamespace
    addr: IPv4Address
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    segment: int = 0
    addr6: IPv6Address | None = None
    # the daemon's environment beyond the lab's (PYFLANNEL_NEXTHOP_OBJECTS=off, ...)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def subnet_file(self) -> Path:
        return self.workdir / "subnet.env"

    @property
    def log_file(self) -> Path:
        return self.workdir / "flanneld.log"

    def routes(self, *args: str) -> str:
        return self.ns.ip("route", "show", *args).stdout

    def log(self) -> str:
        try:
            return self.log_file.read_text()
        except OSError:
            return ""


@dataclass(frozen=True)
class Segment:
    """One L2 segment: a bridge in the switch namespace."""

    index: int
    net: IPv4Network
    net6: IPv6Network | None

    @property
    def bridge(self) -> str:
        return f"br{self.index}"

    def host(self, n: int) -> IPv4Address:
        return self.net.network_address + n

    def host6(self, n: int) -> IPv6Address | None:
        return self.net6.network_address + n if self.net6 is not None else None

    # The top of each segment is infrastructure: switch (servers), router, outside host.
    @property
    def switch_addr(self) -> IPv4Address:
        return IPv4Address(int(self.net.broadcast_address) - 1)

    @property
    def router_addr(self) -> IPv4Address:
        return IPv4Address(int(self.net.broadcast_address) - 2)

    @property
    def outside_addr(self) -> IPv4Address:
        return IPv4Address(int(self.net.broadcast_address) - 5)


class LabStore(Protocol):
    """Where the lab's leases live: etcd, or the Kubernetes API. Its servers run in the
    switch namespace."""

    kind: str

    def start(self, cluster: Cluster) -> None: ...

    def put_netconf(self, netconf: dict[str, Any]) -> None: ...

    def flanneld_args(self, node: LabNode) -> list[str]: ...

    def node_env(self, node: LabNode) -> dict[str, str]: ...

    def node_added(self, node: LabNode) -> None: ...

    def node_removed(self, node: LabNode) -> None: ...

    def stop(self) -> None:
        """An outage: the store's servers go away, data is kept."""
        ...

    def resume(self) -> None: ...

    def close(self) -> None: ...


class EtcdLabStore:
    """A real etcd in the switch namespace; flanneld in etcd mode."""

    kind = "etcd"

    def __init__(self, prefix: str = "/coreos.com/network") -> None:
        self.prefix = prefix
        self.etcd: EtcdServer | None = None

    def start(self, cluster: Cluster) -> None:
        assert cluster.switch is not None
        self.etcd = EtcdServer(netns=cluster.switch, host=str(cluster.segments[0].switch_addr),
                               base=cluster.workdir)
        self.etcd.start()

    @property
    def endpoint(self) -> str:
        assert self.etcd is not None
        return self.etcd.client_url

    def etcdctl(self, *args: str) -> str:
        assert self.etcd is not None
        return self.etcd.etcdctl(*args).stdout

    def put_netconf(self, netconf: dict[str, Any]) -> None:
        self.etcdctl("put", f"{self.prefix}/config", json.dumps(netconf))

    def flanneld_args(self, node: LabNode) -> list[str]:
        return [f"--etcd-endpoints={self.endpoint}", f"--etcd-prefix={self.prefix}"]

    def node_env(self, node: LabNode) -> dict[str, str]:
        return {}

    def node_added(self, node: LabNode) -> None:
        pass

    def leases(self) -> dict[str, dict[str, Any]]:
        """Lease key -> lease JSON, straight from etcd."""
        out = self.etcdctl("get", "--prefix", f"{self.prefix}/subnets/").splitlines()
        return {out[i]: json.loads(out[i + 1]) for i in range(0, len(out) - 1, 2)}

    def node_removed(self, node: LabNode) -> None:
        for key, attrs in self.leases().items():
            if attrs.get("PublicIP") == str(node.addr):
                self.etcdctl("del", key)

    def stop(self) -> None:
        assert self.etcd is not None
        self.etcd.stop()

    def resume(self) -> None:
        assert self.etcd is not None
        self.etcd.start_again()

    def close(self) -> None:
        if self.etcd is not None:
            self.etcd.close()
            self.etcd = None


class Cluster(Daemons, Checks):
    """Build with `Cluster(...)`, then `start()`; always `close()` (or use `with`).

    Three parts: the topology (namespaces, segments, router, nodes, pods: here), the
    daemons (pyflannel_lab.daemons) and the checks (pyflannel_lab.checks)."""

    def __init__(self, *, nodes: int | Sequence[int] = 3, network: str = "10.244.0.0/16",
                 netconf: dict[str, Any] | None = None, prefix: str = "/coreos.com/network",
                 flanneld_args: Sequence[str] = (), name: str = "pfl",
                 segment: str = DEFAULT_SEGMENT, segments: Sequence[str] = (),
                 ipv6: bool = False, store: LabStore | None = None,
                 wireguard_dirs: bool | None = None, wireguard_impl: str | None = None) -> None:
        """`nodes`: how many nodes (all on segment 0), or the segment of each node.
        `segments`: the IPv4 prefixes of the L2 segments (default: just `segment`).
        `wireguard_dirs`: each node's daemon gets its own /run/wireguard and key file
        (pyflannel_lab.daemons); default: when the backend is wireguard. `wireguard_impl`:
        PYFLANNEL_WIREGUARD for the daemons (kernel, userspace, auto)."""
        nets = [IPv4Network(x) for x in (segments or [segment])]
        self.segments = [
            Segment(i, n, IPv6Network(IPV6_SEGMENT_PREFIX.format(seg=i)) if ipv6 else None)
            for i, n in enumerate(nets)]
        self.ipv6 = ipv6
        self.initial_nodes = [0] * nodes if isinstance(nodes, int) else list(nodes)
        self.netconf = netconf or {"Network": network, "Backend": {"Type": "host-gw"}}
        backend = str(self.netconf.get("Backend", {}).get("Type", "vxlan")).lower()
        self.wireguard_dirs = backend == "wireguard" if wireguard_dirs is None else wireguard_dirs
        self.wireguard_impl = wireguard_impl
        self._made_wireguard_run_dir = False
        self.store: LabStore = store or EtcdLabStore(prefix)
        self.flanneld_args = list(flanneld_args)
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-lab-"))
        self.switch: NetNamespace | None = None
        self.router: NetNamespace | None = None
        self.nodes: dict[int, LabNode] = {}
        self.pods: dict[str, LabPod] = {}
        self.outside: OutsideHost | None = None
        self._next_index = 1
        self._cni_bin: Path | None = None

    # Single-segment conveniences, kept for callers that know of one segment only.
    @property
    def segment(self) -> IPv4Network:
        return self.segments[0].net

    @property
    def switch_addr(self) -> IPv4Address:
        return self.segments[0].switch_addr

    # -- building -----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self.wireguard_dirs and not WIREGUARD_RUN_DIR.is_dir():
            # The mount point of the nodes' private /run/wireguard (pyflannel_lab.daemons);
            # an empty directory, removed again by close().
            WIREGUARD_RUN_DIR.mkdir(mode=0o755)
            self._made_wireguard_run_dir = True
        self.switch = NetNamespace.create(f"{self.name}-sw")
        sw = self.switch
        first = self.segments[0]
        for seg in self.segments:
            # A fixed MAC: a bridge without one takes its lowest port's, so a node leaving
            # would change it and the other nodes' ARP entries for the switch's servers
            # would point nowhere until they expire (~30 s of etcd unreachable).
            sw.ip("link", "add", seg.bridge, "address", f"02:fa:00:00:00:{seg.index:02x}",
                  "type", "bridge")
            sw.ip("link", "set", seg.bridge, "up")
        sw.ip("addr", "add", f"{first.switch_addr}/{first.net.prefixlen}", "dev", first.bridge)
        if first.net6 is not None:
            sw.ip("addr", "add", f"{first.host6(0xff)}/64", "dev", first.bridge, "nodad")
        if len(self.segments) > 1:
            self._add_router()
        self.store.start(self)
        self.store.put_netconf(self.netconf)
        for seg_index in self.initial_nodes:
            self.add_node(segment=seg_index)

    def _add_router(self) -> None:
        """A router namespace with a leg on every segment; the switch's servers reach the
        other segments through it."""
        assert self.switch is not None
        rt = self.router = NetNamespace.create(f"{self.name}-rt")
        rt.sysctl("net.ipv4.ip_forward", "1")
        if self.ipv6:
            rt.sysctl("net.ipv6.conf.all.forwarding", "1")
        for seg in self.segments:
            veth_between(rt, f"r{seg.index}", self.switch, f"rp{seg.index}")
            self.switch.ip("link", "set", f"rp{seg.index}", "master", seg.bridge)
            rt.ip("addr", "add", f"{seg.router_addr}/{seg.net.prefixlen}", "dev", f"r{seg.index}")
            if seg.net6 is not None:
                rt.ip("addr", "add", f"{seg.host6(0xfe)}/64", "dev", f"r{seg.index}", "nodad")
        first = self.segments[0]
        for seg in self.segments[1:]:
            self.switch.ip("route", "add", str(seg.net), "via", str(first.router_addr))
            if seg.net6 is not None:
                self.switch.ip("-6", "route", "add", str(seg.net6), "via", str(first.host6(0xfe)))

    def converged(self) -> bool:
        """Checks.converged; for wireguard (one route for the whole network, no route per
        peer): every lease, and every node's wg peers as its leases say."""
        if str(self.netconf.get("Backend", {}).get("Type", "")).lower() != "wireguard":
            return super().converged()
        from pyflannel_lab.wireguard import peers_converged

        return (all(self.subnet_of(n) is not None for n in self.nodes.values())
                and peers_converged(self))

    def put_netconf(self, netconf: dict[str, Any]) -> None:
        self.netconf = netconf
        self.store.put_netconf(netconf)

    def add_node(self, *, start: bool = True, extra_args: Sequence[str] = (),
                 segment: int = 0) -> LabNode:
        assert self.switch is not None
        seg = self.segments[segment]
        idx = self._next_index
        self._next_index += 1
        ns = NetNamespace.create(f"{self.name}-n{idx}")
        addr, addr6 = seg.host(idx), seg.host6(idx)
        veth_between(ns, "eth0", self.switch, f"p{idx}")
        self.switch.ip("link", "set", f"p{idx}", "master", seg.bridge)
        ns.ip("addr", "add", f"{addr}/{seg.net.prefixlen}", "dev", "eth0")
        gw = seg.router_addr if self.router is not None else seg.switch_addr
        ns.ip("route", "add", "default", "via", str(gw))
        # A node forwards pod traffic; per-namespace sysctls, the root namespace is untouched.
        ns.sysctl("net.ipv4.ip_forward", "1")
        if addr6 is not None:
            ns.ip("addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
            gw6 = seg.host6(0xfe if self.router is not None else 0xff)
            ns.ip("-6", "route", "add", "default", "via", str(gw6))
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        workdir = self.workdir / f"node{idx}"
        workdir.mkdir()
        node = LabNode(idx, ns, addr, workdir, extra_args=list(extra_args), segment=segment,
                       addr6=addr6)
        self.nodes[idx] = node
        self.store.node_added(node)
        if start:
            self.start_daemon(node)
        return node

    def remove_node(self, node: LabNode, *, delete_lease: bool = True) -> None:
        """The node leaves: its daemon stops, and (by default) the store forgets it, as
        deleting a Node object or its etcd lease does."""
        self.stop_daemon(node)
        if delete_lease:
            self.store.node_removed(node)
        node.ns.delete()
        self.nodes.pop(node.index, None)

    # -- etcd conveniences (the default store) --------------------------------------------

    @property
    def etcd_store(self) -> EtcdLabStore:
        if not isinstance(self.store, EtcdLabStore):
            raise TypeError("this lab cluster does not use etcd")
        return self.store

    @property
    def etcd(self) -> EtcdServer | None:
        return self.etcd_store.etcd

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd_store.endpoint

    @property
    def prefix(self) -> str:
        return self.etcd_store.prefix

    def etcdctl(self, *args: str) -> str:
        return self.etcd_store.etcdctl(*args)

    def leases(self) -> dict[str, dict[str, Any]]:
        return self.etcd_store.leases()

    def lease_key_of(self, node: LabNode) -> str | None:
        for key, attrs in self.leases().items():
            if attrs.get("PublicIP") == str(node.addr):
                return key
        return None

    # -- pods ---------------------------------------------------------------------------

    def conflist(self, node: LabNode) -> dict[str, Any]:
        """Upstream's 10-flannel.conflist, with this node's files instead of the
        machine-wide /run/flannel, /var/lib/cni/flannel and /var/lib/cni/networks."""
        return {"name": "cbr0", "cniVersion": "0.3.1", "plugins": [
            {"type": "flannel", "subnetFile": str(node.subnet_file),
             "dataDir": str(node.workdir / "cni-flannel"),
             "ipam": {"dataDir": str(node.workdir / "cni-ipam")},
             "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}

    def cni_runtime(self, node: LabNode) -> CniRuntime:
        if self._cni_bin is None:
            self._cni_bin = self.workdir / "cni-bin"
            self._cni_bin.mkdir()
            install_plugin(self._cni_bin)
        return CniRuntime(self.conflist(node), [self._cni_bin, SYSTEM_CNI_DIR], node=node.ns.name)

    def add_pod(self, node: LabNode, name: str | None = None, *, serve: bool = True) -> LabPod:
        """Creates a pod on `node` exactly as a container runtime does (CNI ADD through
        the conflist); with `serve`, starts the whoami service in it."""
        name = name or f"pod{len(self.pods) + 1}"
        ns = NetNamespace.create(f"{self.name}-{name}")
        att = Attachment(container_id=ns.name, netns=ns.path,
                         args={"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "default",
                               "K8S_POD_NAME": name})
        try:
            result = self.cni_runtime(node).add(att)
        except BaseException:
            ns.delete()
            raise
        ips = result.get("ips")
        assert isinstance(ips, list) and ips, f"CNI ADD returned no IP: {result}"
        addrs = [ip_address(str(x["address"]).split("/")[0]) for x in ips]
        ip4 = next((a for a in addrs if isinstance(a, IPv4Address)), None)
        ip6 = next((a for a in addrs if isinstance(a, IPv6Address)), None)
        ip = ip4 or ip6
        assert ip is not None
        pod = LabPod(name, node, ns, ip, result, att, ip6=ip6)
        self.pods[name] = pod
        if serve:
            pod.server = self._serve(ns, str(ip))
            if ip6 is not None and ip6 != ip:
                pod.server6 = self._serve(ns, str(ip6))
        return pod

    def delete_pod(self, pod: LabPod) -> None:
        self._stop_proc(pod.server)
        self._stop_proc(pod.server6)
        try:
            self.cni_runtime(pod.node).delete(pod.attachment, pod.result)
        finally:
            pod.ns.delete()
            self.pods.pop(pod.name, None)

    def add_outside_host(self) -> OutsideHost:
        """A host on the segment, outside the cluster, running the whoami service."""
        assert self.switch is not None
        ns = NetNamespace.create(f"{self.name}-out")
        seg = self.segments[0]
        addr = seg.outside_addr
        veth_between(ns, "eth0", self.switch, "pout")
        self.switch.ip("link", "set", "pout", "master", seg.bridge)
        ns.ip("addr", "add", f"{addr}/{seg.net.prefixlen}", "dev", "eth0")
        self.outside = OutsideHost(ns, addr, self._serve(ns, str(addr)))
        return self.outside

    def _serve(self, ns: NetNamespace, addr: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ns.exec_args(sys.executable, "-I", "-S", "-c", WHOAMI_SERVER, addr,
                         str(WHOAMI_PORT)), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready": listening before anyone connects
        return proc

    @staticmethod
    def _stop_proc(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    # -- tearing down -------------------------------------------------------------------

    def close(self) -> None:
        for pod in list(self.pods.values()):
            self._stop_proc(pod.server)
            self._stop_proc(pod.server6)
            pod.ns.delete()  # the node namespaces (with their cni0) go below
        self.pods.clear()
        if self.outside is not None:
            self._stop_proc(self.outside.server)
            self.outside.ns.delete()
            self.outside = None
        for node in list(self.nodes.values()):
            try:
                self.stop_daemon(node, timeout=5)
            finally:
                node.ns.delete()
        self.nodes.clear()
        self.store.close()
        if self.router is not None:
            self.router.delete()
            self.router = None
        if self.switch is not None:
            self.switch.delete()
            self.switch = None
        if self._made_wireguard_run_dir and not wireguard_mount_point_in_use():
            with contextlib.suppress(OSError):  # not empty: someone else's now, it stays
                WIREGUARD_RUN_DIR.rmdir()
            self._made_wireguard_run_dir = False
        shutil.rmtree(self.workdir, ignore_errors=True)
