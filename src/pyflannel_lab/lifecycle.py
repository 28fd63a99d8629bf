"""The life of a kubelet-lab cluster, as the walk-through's two reasons for flannel:
routes follow nodes joining and leaving, and come back after a reboot. Also the flannel
pod replaced (by deletion, or by a rolling update to a new image tag) while pods keep
talking.

A reboot here is what a machine loses: every process of the node (kubelet, containerd,
shims, pods, the anchor with its mounts) is killed, the node's /run is emptied, and the
kernel state flannel and CNI made in its network namespace (routes, cni0, flannel.1, pod
veths, iptables rules) is removed; only the namespace with eth0 and its address and
default route stays, as the machine's own network configuration would. Then containerd
and kubelet start again and nobody touches anything.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

from pyflannel_lab.cluster import Cluster, LabNode
from pyflannel_lab.kubelab import KubeletLabStore
from pyflannel_lab.walkthrough import FLANNEL_DS, FLANNEL_NS, Kubectl, PodNetwork, wait_for

# Long-lived TCP connections: the server echoes; the client opens N connections, sends a
# byte on each every 0.2 s and prints how many still answer when told to stop (stdin EOF).
ECHO_SERVER = (
    "import socket,sys,threading\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])));s.listen(128);print('ready',flush=True)\n"
    "def h(c):\n"
    " while True:\n"
    "  d=c.recv(64)\n"
    "  if not d: return\n"
    "  c.sendall(d)\n"
    "while True:\n"
    " c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n")
ECHO_CLIENT = (
    "import socket,sys,threading,time\n"
    "n=int(sys.argv[3]);cs=[socket.create_connection((sys.argv[1],int(sys.argv[2])),5)"
    " for _ in range(n)]\n"
    "bad=set();stop=threading.Event()\n"
    "def loop():\n"
    " while not stop.is_set():\n"
    "  for i,c in enumerate(cs):\n"
    "   if i in bad: continue\n"
    "   try:\n"
    "    c.settimeout(5);c.sendall(b'x')\n"
    "    if c.recv(1)!=b'x': bad.add(i)\n"
    "   except OSError: bad.add(i)\n"
    "  time.sleep(0.2)\n"
    "print('open',n,flush=True)\n"
    "t=threading.Thread(target=loop);t.start();sys.stdin.read();stop.set();t.join()\n"
    "print('alive',n-len(bad),'of',n,flush=True)\n")
ECHO_PORT = 7778


class NodeLife:
    """reboot(), drain_and_delete(), replace_flannel_pod(), rolling_update()."""

    def __init__(self, cluster: Cluster, kubectl: Kubectl) -> None:
        self.cluster, self.kubectl = cluster, kubectl
        store = cluster.store
        assert isinstance(store, KubeletLabStore)
        self.store = store

    def reboot(self, node: LabNode) -> None:
        kn = self.store.nodes[node.name]
        kn.stop()
        kn.host.stop()
        for d in ("/run/containerd", "/run/flannel"):
            p = kn.host.private_path(d)
            shutil.rmtree(p, ignore_errors=True)
            p.mkdir()
        _forget_kernel_state(node)
        kn.start([])  # the images are on the node's disk already

    def drain_and_delete(self, node: LabNode) -> None:
        self.kubectl.run("drain", node.name, "--ignore-daemonsets", "--force",
                         "--delete-local-data", "--grace-period=0", timeout=120)
        self.kubectl.run("delete", "node", node.name)
        self.cluster.remove_node(node, delete_lease=True)

    def replace_flannel_pod(self, node: LabNode) -> str:
        pods = self.kubectl.json("get", "pods", "-n", FLANNEL_NS, "-l", "app=flannel",
                                 "--field-selector", f"spec.nodeName={node.name}")["items"]
        old: str = pods[0]["metadata"]["name"]
        self.kubectl.run("delete", "pod", "-n", FLANNEL_NS, old, "--wait=false")

        def replaced() -> bool:
            now = self.kubectl.json("get", "pods", "-n", FLANNEL_NS, "-l", "app=flannel",
                                    "--field-selector", f"spec.nodeName={node.name}")["items"]
            return [p["metadata"]["name"] for p in now] not in ([], [old])

        wait_for(replaced, 60, f"a new flannel pod on {node.name}")
        return old

    def rolling_update(self, tag: str) -> None:
        """Every node gets the image under a new tag (as a registry push would), then the
        DaemonSet's pod template names it: the DaemonSet controller replaces pods one
        node at a time."""
        ds = self.kubectl.json("get", "ds", "-n", FLANNEL_NS, FLANNEL_DS)
        image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
        new = f"{image.rsplit(':', 1)[0]}:{tag}"
        for kn in self.store.nodes.values():
            kn.containerd.ctr("-n", "k8s.io", "images", "tag", "--force", image, new)
        names = [c["name"] for k in ("initContainers", "containers")
                 for c in ds["spec"]["template"]["spec"].get(k, [])]
        self.kubectl.run("set", "image", "-n", FLANNEL_NS, f"daemonset/{FLANNEL_DS}",
                         *(f"{n}={new}" for n in names))
        self.kubectl.run("rollout", "status", "-n", FLANNEL_NS, f"daemonset/{FLANNEL_DS}",
                         "--timeout=180s", timeout=200)


def _forget_kernel_state(node: LabNode) -> None:
    """What a reboot clears in the node's network namespace (eth0 stays configured)."""
    ns = node.ns
    for line in ns.ip("-o", "link", "show", check=False).stdout.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        if dev not in ("lo", "eth0"):
            ns.ip("link", "del", dev, check=False)
    for line in ns.ip("route", "show", check=False).stdout.splitlines():
        if " via " in line and not line.startswith("default"):
            ns.ip("route", "del", *line.split()[:1], check=False)
    for table in ("filter", "nat", "mangle"):
        ns.run("iptables", "-t", table, "-F", check=False)
        ns.run("iptables", "-t", table, "-X", check=False)


class TcpWatch:
    """N established TCP connections from one pod to another, checked every 0.2 s:
    start(), then finish() -> how many survived."""

    def __init__(self, src: PodNetwork, dst: PodNetwork, dst_ip: str, n: int = 20) -> None:
        self.src, self.dst, self.dst_ip, self.n = src, dst, dst_ip, n
        self.server: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.server = subprocess.Popen(
            self.dst.exec_args(sys.executable, "-I", "-S", "-c", ECHO_SERVER, self.dst_ip,
                               str(ECHO_PORT)), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        assert self.server.stdout is not None
        self.server.stdout.readline()
        self.client = subprocess.Popen(
            self.src.exec_args(sys.executable, "-I", "-S", "-c", ECHO_CLIENT, self.dst_ip,
                               str(ECHO_PORT), str(self.n)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.client.stdout is not None
        line = self.client.stdout.readline().decode()
        if not line.startswith("open"):
            raise RuntimeError(f"the TCP connections did not open: {line!r}")

    def finish(self) -> int:
        assert self.client is not None and self.server is not None
        out, _ = self.client.communicate(b"", timeout=30)
        self.server.kill()
        self.server.wait()
        words = out.decode().split()
        return int(words[words.index("alive") + 1])


class RouteWatch:
    """Samples every other node's routes while something happens: were any peer routes
    missing at any moment?"""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.gaps: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        want = {n.name: self.cluster.routed_subnets(n) for n in self.cluster.nodes.values()}
        while not self._stop.is_set():
            for n in self.cluster.nodes.values():
                have = self.cluster.routed_subnets(n)
                lost = want[n.name] - have
                if lost:
                    self.gaps.append(f"{n.name} lost {sorted(lost)}")
            time.sleep(0.2)

    def __enter__(self) -> RouteWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_routes(cluster: Cluster, timeout: float = 120) -> float:
    return wait_for(cluster.converged, timeout, "routes on every node")

