"""`pyflannel lab up --kubernetes`: a real Kubernetes cluster on one machine.

The network is the lab's usual one (cluster.py: a switch namespace with the segment's
bridge, node namespaces with eth0, an outside host); the lab's store here is a real control
plane (controlplane.py) and every node is a real one: its own namespaces (nodehost.py),
containerd (containerd.py) and kubelet (kubelet.py), with the pause image (and the
verified pyflannel image) imported. Nothing runs flanneld by hand: that is
`kubectl create -f kube-flannel.yml`'s job (walkthrough.py).

What is created is recorded in `<state dir>/kube.json` before it is created, so
`remove_leftovers` undoes it after a crash: processes by PID, cgroups under every hierarchy
(named `<lab name>-<node>`), mountpoints made on the root filesystem, directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyflannel_lab.cluster import Cluster, LabNode
from pyflannel_lab.containerd import Containerd
from pyflannel_lab.controlplane import CLUSTER_CIDR, ControlPlane
from pyflannel_lab.kubelet import Kubelet
from pyflannel_lab.nodehost import (
    PRIVATE_DIRS,
    PRIVATE_FILES,
    NodeHost,
    make_cgroup,
    make_mountpoints,
    remove_cgroups,
    remove_mountpoints,
)
from pyflannel_lab.pauseimage import KUBE_CACHE, pause_image

Say = Callable[[str], None]
SYSTEM_CNI_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins


class KubeNode:
    """One node's anchor, containerd and kubelet: start(), stop()."""

    def __init__(self, node: LabNode, cgroup_root: str, kubeconfig: Path, ca: Path) -> None:
        self.node = node
        self.cgroup_root = cgroup_root
        self.host = NodeHost(node.ns, node.name, node.workdir)
        self.containerd = Containerd(self.host, node.workdir / "containerd")
        self.kubelet = Kubelet(self.host, node.name, str(node.addr), kubeconfig, ca,
                               cgroup_root, node.workdir / "kubelet")

    def start(self, images: list[Path]) -> None:
        make_cgroup(self.cgroup_root)
        self.host.start()
        # The plugins a distribution's kubernetes-cni package puts in /opt/cni/bin (flannel's
        # delegates bridge, host-local, portmap); flannel's own plugin comes from its pod.
        bindir = self.host.private_path("/opt/cni/bin")
        for plugin in SYSTEM_CNI_DIR.iterdir():
            target = bindir / plugin.name
            if not target.exists():
                target.symlink_to(plugin)
        # cluster.py reads each node's lease from <workdir>/subnet.env.
        subnet = self.node.subnet_file
        if not subnet.is_symlink():
            subnet.symlink_to(self.host.private_path("/run/flannel") / "subnet.env")
        self.containerd.start()
        for image in images:
            self.containerd.import_image(image)
        self.kubelet.start()

    def stop(self) -> None:
        """kubelet, then containerd, then everything left in the node's pod cgroups."""
        self.kubelet.stop(grace=5)
        self.containerd.stop(grace=5)
        remove_cgroups(self.cgroup_root)

    def pids(self) -> dict[str, int]:
        out = {"kubelet": self.kubelet.pid, "containerd": self.containerd.pid}
        with contextlib.suppress(RuntimeError):
            out["anchor"] = self.host.pid
        return {k: v for k, v in out.items() if v}


class KubeletLabStore:
    """The lab's store when the cluster is real Kubernetes (see cluster.LabStore)."""

    kind = "kubelet"

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.cp: ControlPlane | None = None
        self.nodes: dict[str, KubeNode] = {}
        self.images: list[Path] = []
        self.kubeconfig: Path | None = None
        self.workdir: Path | None = None
        self.lab_name = ""
        self.switch = ""
        self.mountpoints: list[str] = []

    def save(self) -> None:
        cp = self.cp
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps({
            "name": self.lab_name, "switch": self.switch,
            "workdir": str(self.workdir or ""), "kubeconfig": str(self.kubeconfig or ""),
            "dirs": [str(cp.api.dir), str(cp.api.etcd._tmp)] if cp else [],
            "mountpoints": self.mountpoints,
            "pids": {**(cp.pids() if cp else {}),
                     **{f"{n}/{k}": p for n, kn in self.nodes.items()
                        for k, p in kn.pids().items()}},
            "anchors": {n: kn.host.pid for n, kn in self.nodes.items() if kn.host._proc},
            "netns": {n: kn.node.ns.name for n, kn in self.nodes.items()},
        }, indent=1))

    def start(self, cluster: Cluster) -> None:
        assert cluster.switch is not None
        self.lab_name, self.switch, self.workdir = cluster.name, cluster.switch.name, \
            cluster.workdir
        self.save()
        self.mountpoints = make_mountpoints(PRIVATE_DIRS, PRIVATE_FILES)
        self.save()
        cpdir = cluster.workdir / "control-plane"
        cpdir.mkdir()
        self.cp = ControlPlane(cluster.switch, str(cluster.switch_addr), cpdir)
        self.save()
        self.cp.start()
        self.kubeconfig = self.cp.admin_kubeconfig(cluster.workdir / "admin.kubeconfig")
        self.images = [pause_image(cluster.workdir / "pause.oci.tar"),
                       flannel_image()]
        self.save()

    def put_netconf(self, netconf: dict[str, Any]) -> None:
        """net-conf.json comes from the manifest's ConfigMap, not from the lab."""

    def flanneld_args(self, node: LabNode) -> list[str]:
        return []

    def node_env(self, node: LabNode) -> dict[str, str]:
        return {}

    def node_added(self, node: LabNode) -> None:
        assert self.cp is not None
        kc = self.cp.node_kubeconfig(node.workdir / "kubelet.kubeconfig", node.name)
        kn = KubeNode(node, f"{self.lab_name}-{node.name}", kc, self.cp.ca)
        self.nodes[node.name] = kn
        try:
            kn.start(self.images)
        finally:
            self.save()

    def node_removed(self, node: LabNode) -> None:
        kn = self.nodes.pop(node.name, None)
        if kn is not None:
            kn.stop()
            kn.host.stop()
        assert self.cp is not None and self.cp.api.admin is not None
        with contextlib.suppress(RuntimeError):
            self.cp.api.admin.delete(f"/api/v1/nodes/{node.name}")
        self.save()

    def stop(self) -> None:
        assert self.cp is not None
        self.cp.api.stop()

    def resume(self) -> None:
        assert self.cp is not None
        self.cp.api.start_again()

    def close(self) -> None:
        for kn in self.nodes.values():
            with contextlib.suppress(Exception):
                kn.stop()
            kn.host.stop()
        self.nodes.clear()
        remove_cgroups(f"{self.lab_name}-*")
        if self.cp is not None:
            self.cp.close()
            self.cp = None
        _remove_mountpoints_unless_shared(self.mountpoints, self.state_path)
        self.mountpoints = []
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()


def flannel_image() -> Path:
    """The pyflannel image the manifest names, as an OCI archive that passed verify()
    (built once per source state and signed with this machine's lab key)."""
    from pyflannel_lab.image import ensure_verified

    archive: Path = ensure_verified().archive
    return archive


def _remove_mountpoints_unless_shared(created: list[str], state_path: Path) -> None:
    """Another kube lab's nodes may still mount over them: then they stay, handed over in
    a shared list that the last lab down removes with its own."""
    shared = state_path.parent.parent / "kube-mountpoints.json"
    try:
        handed: list[str] = json.loads(shared.read_text())
    except (OSError, ValueError):
        handed = []
    todo = sorted(set(created) | set(handed))
    others = [p for p in state_path.parent.parent.glob("*/kube.json") if p != state_path]
    if others:
        if todo:
            shared.write_text(json.dumps(todo))
        return
    remove_mountpoints(todo)
    with contextlib.suppress(FileNotFoundError):
        shared.unlink()


def _is_ours(pid: int, name: str) -> bool:
    """The PID still runs a program of the lab (not a recycled PID)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return any(s in cmd for s in (str(KUBE_CACHE), "containerd", "etcd", "sleep", name))


def remove_leftovers(state_path: Path) -> list[str]:
    """Undoes a crashed kube lab from its state file; returns what it did."""
    try:
        st: dict[str, Any] = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return []
    done = []
    name = str(st.get("name", ""))
    for what, pid in dict(st.get("pids", {})).items():
        if _is_ours(int(pid), name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
                done.append(f"killed {what} ({pid})")
    if name:
        n = remove_cgroups(f"{name}-*")
        if n:
            done.append(f"removed {n} cgroup tree(s)")
    for d in [*st.get("dirs", []), st.get("workdir") or ""]:
        if d:
            shutil.rmtree(d, ignore_errors=True)
    _remove_mountpoints_unless_shared(list(st.get("mountpoints", [])), state_path)
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()
    return done


def build_cluster(name: str, nodes: int, netconf: dict[str, Any], state_path: Path,
                  say: Say) -> Cluster:
    """The control plane and `nodes` kubelets (they register; the controller-manager gives
    them podCIDRs). Closes everything it made if it fails half-way."""
    store = KubeletLabStore(state_path)
    cl = Cluster(nodes=0, name=name, netconf=netconf, store=store)
    try:
        say(f"Control plane (etcd, kube-apiserver, kube-controller-manager "
            f"--allocate-node-cidrs --cluster-cidr={CLUSTER_CIDR}, kube-scheduler) in "
            "the switch namespace...")
        cl.start()
        say(f"  kube-apiserver at https://{cl.switch_addr}:{store.cp.api.port if store.cp else 0}"
            f", kubeconfig {store.kubeconfig}")
        for _ in range(nodes):
            add_node(cl, say)
        return cl
    except BaseException:
        cl.close()
        raise


def add_node(cl: Cluster, say: Say) -> LabNode:
    n = cl.add_node(start=False)
    store = cl.store
    assert isinstance(store, KubeletLabStore)
    kn = store.nodes[n.name]
    say(f"  {n.name}: namespace {n.ns.name}, eth0 {n.addr}, containerd (pid "
        f"{kn.containerd.pid}), kubelet (pid {kn.kubelet.pid})")
    return n


def kubectl_argv(state: dict[str, Any], *args: str) -> list[str]:
    """kubectl with the lab's admin kubeconfig, in the namespace that reaches the
    apiserver."""
    return ["ip", "netns", "exec", str(state["switch"]), str(KUBE_CACHE / "kubectl"),
            f"--kubeconfig={state['kubeconfig']}", *args]


def node_exec_argv(state: dict[str, Any], node: str, *cmd: str) -> list[str]:
    """argv running `cmd` in `node`'s namespaces (after checking the anchor is still the
    node's: a recycled PID must not be entered)."""
    anchors = dict(state.get("anchors", {}))
    if node not in anchors:
        raise ValueError(f"node must be one of {', '.join(sorted(anchors)) or '(none)'}, "
                         f"not {node!r}")
    pid = int(anchors[node])
    ident = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True,
                           text=True).stdout.strip()
    if ident != state["netns"][node]:
        raise ValueError(f"{node} is not running (its anchor process is gone)")
    return ["nsenter", "-t", str(pid), "-n", "-m", "-u", "--", *cmd]
