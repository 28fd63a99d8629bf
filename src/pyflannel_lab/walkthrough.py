"""Flannel's walk-through on the kubelet lab, step by step as a person types it: the sed
that switches net-conf.json to host-gw, `kubectl create -f kube-flannel.yml`, one Running
and Ready pod per node, `kubectl logs`, `ip route show` on every node; then ordinary pods
on every node talking to each other and to a host outside the cluster.

The one change to the manifest besides the sed: there is no kube-proxy, so the Service
address Kubernetes injects (10.96.0.1) routes nowhere; the DaemonSet's container gets the
apiserver's real address in KUBERNETES_SERVICE_HOST/PORT (container env overrides the
injected service env), as flannel's docs say for clusters without kube-proxy.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyflannel_lab.checks import WHOAMI_CLIENT, WHOAMI_PORT
from pyflannel_lab.cluster import WHOAMI_SERVER, Cluster, LabNode
from pyflannel_lab.netns import NetNamespace, stop_process
from pyflannel_lab.nodehost import CGROUP_ROOT
from pyflannel_lab.pauseimage import KUBE_CACHE, PAUSE_IMAGE

FLANNEL_NS = "kube-flannel"
FLANNEL_DS = "kube-flannel-ds"
# Upstream's klog lines a user sees in `kubectl logs` (the walk-through's list), in order.
EXPECTED_LOG_LINES = (
    "Determining IP address of default interface",
    "Using interface with name ",
    "Created subnet manager: Kubernetes Subnet Manager - {node}",
    "Found network config - Backend type: {backend}",
    "Wrote subnet file to /run/flannel/subnet.env",
    "Running backend.",
    "Watching for new subnet leases",
    "Subnet added: ",
)


class WalkthroughError(RuntimeError):
    pass


class Kubectl:
    """kubectl v1.20.2 with the lab's admin kubeconfig, in the switch namespace."""

    def __init__(self, switch: NetNamespace, kubeconfig: Path) -> None:
        self.switch, self.kubeconfig = switch, kubeconfig

    def argv(self, *args: str) -> list[str]:
        return self.switch.exec_args(str(KUBE_CACHE / "kubectl"),
                                     f"--kubeconfig={self.kubeconfig}", *args)

    def run(self, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, input=input,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise WalkthroughError(f"kubectl {' '.join(args)}: {proc.stderr.strip()[-800:]}")
        return proc

    def json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.run(*args, "-o", "json").stdout)
        return out


def sed_host_gw(text: str) -> str:
    """`sed 's/vxlan/host-gw/'`: the first match on each line."""
    return "\n".join(line.replace("vxlan", "host-gw", 1) for line in text.split("\n"))


def with_apiserver_env(text: str, host: str, port: int) -> str:
    """Adds KUBERNETES_SERVICE_HOST/PORT at the top of the container's `env:` list."""
    m = re.search(r"^( *)env:\n( *)- ", text, flags=re.M)
    if m is None:
        raise WalkthroughError("the manifest's DaemonSet container has no env: list")
    item = m.group(2)
    extra = (f'{item}- name: KUBERNETES_SERVICE_HOST\n{item}  value: "{host}"\n'
             f'{item}- name: KUBERNETES_SERVICE_PORT\n{item}  value: "{port}"\n')
    return text[:m.end(1) + len("env:\n")] + extra + text[m.end(1) + len("env:\n"):]


def _ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return bool(pod.get("status", {}).get("phase") == "Running" and conds.get("Ready") == "True")


def nodes_ready(kubectl: Kubectl) -> dict[str, bool]:
    out = {}
    for n in kubectl.json("get", "nodes")["items"]:
        conds = {c["type"]: c["status"] for c in n["status"].get("conditions", [])}
        out[n["metadata"]["name"]] = conds.get("Ready") == "True"
    return out


def wait_for(cond: Callable[[], bool], timeout: float, what: str,
             detail: Callable[[], str] = lambda: "") -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise WalkthroughError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                   f"{detail()}")
        time.sleep(1)
    return time.monotonic() - t0


class FlannelDeployment:
    """The DaemonSet in the lab: create(), wait_ready(), pods(), logs(), memory()."""

    def __init__(self, cluster: Cluster, kubectl: Kubectl, api: tuple[str, int]) -> None:
        self.cluster, self.kubectl, self.api = cluster, kubectl, api
        self.created_at = 0.0

    def create(self, manifest: Path, backend: str) -> Path:
        text = manifest.read_text()
        if backend == "host-gw":
            text = sed_host_gw(text)
        text = with_apiserver_env(text, *self.api)
        out = self.cluster.workdir / "kube-flannel.yml"
        out.write_text(text)
        netconf = next(json.loads(o["data"]["net-conf.json"]) for o in _yaml_docs(text)
                       if o.get("kind") == "ConfigMap")
        self.cluster.netconf = netconf  # what converged() checks routes against
        self.created_at = time.monotonic()
        self.kubectl.run("create", "-f", str(out))
        return out

    def pods(self) -> dict[str, dict[str, Any]]:
        """node name -> its flannel pod (the newest, if a replacement is starting; pods
        being deleted do not count)."""
        out: dict[str, dict[str, Any]] = {}
        for p in self.kubectl.json("get", "pods", "-n", FLANNEL_NS, "-l", "app=flannel")["items"]:
            node = p["spec"].get("nodeName")
            if p["metadata"].get("deletionTimestamp"):
                continue
            if node and (node not in out or p["metadata"]["creationTimestamp"] >=
                         out[node]["metadata"]["creationTimestamp"]):
                out[node] = p
        return out

    def _all_ready(self) -> bool:
        pods = self.pods()
        names = {n.name for n in self.cluster.nodes.values()}
        return (set(pods) == names and all(_ready(p) for p in pods.values())
                and all(nodes_ready(self.kubectl).get(n) for n in names)
                and self.cluster.converged())

    def wait_ready(self, timeout: float = 240, since: float | None = None) -> float:
        """Seconds from `kubectl create` (or from `since`, a time.monotonic()) to every pod
        Ready, every node Ready and every route in place."""
        wait_for(self._all_ready, timeout, "flannel Ready on every node", self._detail)
        return time.monotonic() - (self.created_at if since is None else since)

    def _detail(self) -> str:
        lines = [self.kubectl.run("get", "pods", "-A", "-o", "wide", check=False).stdout,
                 self.kubectl.run("get", "nodes", check=False).stdout]
        for node, p in self.pods().items():
            lines.append(f"--- {node} {p['metadata']['name']}: "
                         f"{json.dumps(p.get('status', {}).get('containerStatuses', []))[:1500]}")
            lines.append(self.logs(p["metadata"]["name"])[-1500:])
        return "\n".join(lines)

    def logs(self, pod: str) -> str:
        return self.kubectl.run("logs", "-n", FLANNEL_NS, pod, "-c", "kube-flannel",
                                check=False).stdout

    def memory(self) -> dict[str, tuple[int, int, str]]:
        """node -> (bytes the flannel pod's memory cgroup charges, of which RSS, the
        manifest's request)."""
        out = {}
        for node, p in self.pods().items():
            uid = p["metadata"]["uid"]
            req = p["spec"]["containers"][0].get("resources", {}).get("requests", {})
            used = rss = 0
            for d in (CGROUP_ROOT / "memory").glob(f"*/kubepods/*/pod{uid}"):
                used = int((d / "memory.usage_in_bytes").read_text())
                stat = dict(line.split() for line in (d / "memory.stat").read_text()
                            .splitlines())
                rss = int(stat.get("total_rss", 0))
            out[node] = (used, rss, str(req.get("memory", "-")))
        return out


def missing_log_lines(log: str, node: str, backend: str) -> list[str]:
    want = [w.format(node=node, backend=backend) for w in EXPECTED_LOG_LINES]
    return [w for w in want if w not in log]


def _yaml_docs(text: str) -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all(text) if d]


class PodNetwork(NetNamespace):
    """A pod's network namespace, entered through one of the pod's processes."""

    def __init__(self, pod: str, pid: int) -> None:
        super().__init__(f"pod:{pod}")
        self.pid = pid

    def exec_args(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "--", *cmd]

    def delete(self) -> None:
        """Pods are kubelet's to delete."""


@dataclass
class ProbePod:
    name: str
    node: str
    ip: str
    net: PodNetwork
    server: subprocess.Popen[bytes] | None = None


class ProbePods:
    """Ordinary pods (pause image, not hostNetwork), one per node: start(), matrix(),
    close(). A whoami service runs in each pod's network namespace."""

    def __init__(self, cluster: Cluster, kubectl: Kubectl) -> None:
        self.cluster, self.kubectl = cluster, kubectl
        self.pods: dict[str, ProbePod] = {}
        self.created = 0

    def start(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        for n in self.cluster.nodes.values():
            self.kubectl.run("create", "-f", "-", input=json.dumps(_probe_pod(n)))
            self.created += 1
        self.attach(timeout)
        return time.monotonic() - t0

    def attach(self, timeout: float = 120) -> None:
        """(Re)starts the whoami services once every probe pod runs (again: a rebooted
        node's pods come back in new network namespaces)."""
        wait_for(self._all_running, timeout, "probe pods Running",
                 lambda: self.kubectl.run("get", "pods", "-o", "wide", check=False).stdout)
        for old in self.pods.values():
            stop_process(old.server, grace=1)
        self.pods.clear()
        for p in self.kubectl.json("get", "pods", "-l", "app=probe")["items"]:
            name, uid = p["metadata"]["name"], p["metadata"]["uid"]
            pod = ProbePod(name, p["spec"]["nodeName"], p["status"]["podIP"],
                           PodNetwork(name, _pod_pid(uid)))
            pod.server = subprocess.Popen(
                pod.net.exec_args(sys.executable, "-I", "-S", "-c", WHOAMI_SERVER, pod.ip,
                                  str(WHOAMI_PORT)),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert pod.server.stdout is not None
            pod.server.stdout.readline()
            self.pods[name] = pod

    def _all_running(self) -> bool:
        items = self.kubectl.json("get", "pods", "-l", "app=probe")["items"]
        return len(items) == self.created and all(
            p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
            and all(c.get("ready") for c in p["status"].get("containerStatuses", [{}]))
            for p in items)

    def matrix(self, outside: str | None = None) -> dict[tuple[str, str], str]:
        """(from, to) -> the source address the receiver saw (or 'error: ...')."""
        out = {}
        for a in self.pods.values():
            for b in self.pods.values():
                if a is not b:
                    out[(a.name, b.name)] = _whoami(a.net, b.ip)
            if outside:
                out[(a.name, "outside")] = _whoami(a.net, outside)
        return out

    def close(self) -> None:
        for p in self.pods.values():
            stop_process(p.server, grace=1)
        self.pods.clear()
        self.kubectl.run("delete", "pods", "-l", "app=probe", "--wait=false", check=False)


def _probe_pod(node: LabNode) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"probe-{node.name}", "labels": {"app": "probe"}},
            "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "pause", "image": PAUSE_IMAGE}]}}


def _pod_pid(uid: str) -> int:
    for procs in (CGROUP_ROOT / "memory").glob(f"*/kubepods/**/pod{uid}/*/cgroup.procs"):
        pids = procs.read_text().split()
        if pids:
            return int(pids[0])
    raise WalkthroughError(f"no process of pod {uid} found in its cgroups")


def _whoami(src: NetNamespace, dst: str, timeout: float = 3) -> str:
    out = src.run(sys.executable, "-I", "-S", "-c", WHOAMI_CLIENT, dst, str(WHOAMI_PORT),
                  str(timeout), check=False, timeout=timeout + 10)
    return out.stdout.strip()
