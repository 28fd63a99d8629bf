"""kubelet v1.20.2 for one lab node, inside the node's namespaces, on its containerd.

The configuration is what worked on this machine (cgroup v1, PID 1 not systemd, no
CAP_SYS_RESOURCE): cgroupfs driver, pod cgroups under the node's own `/<cgroup root>` in
every hierarchy (removed by `lab down`), no node-allocatable enforcement, no swap check,
no read-only port, oom_score_adj left alone, eviction thresholds that a busy shared disk
does not trip. Clients of its API (kube-apiserver for `kubectl logs/exec`) must present a
certificate from the lab's CA; anonymous requests are refused.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pyflannel_lab.containerd import SOCKET
from pyflannel_lab.netns import OwnedProcess
from pyflannel_lab.nodehost import NodeHost
from pyflannel_lab.pauseimage import KUBE_CACHE, PAUSE_IMAGE


def kubelet_config(*, ca: Path, cgroup_root: str, address: str,
                   static_pods: Path) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": address, "readOnlyPort": 0,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(ca)}},
        # Only holders of a certificate from the lab's CA get this far (the apiserver).
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs", "cgroupsPerQOS": True, "cgroupRoot": f"/{cgroup_root}",
        "enforceNodeAllocatable": [], "failSwapOn": False, "oomScoreAdj": 0,
        "staticPodPath": str(static_pods), "clusterDomain": "cluster.local",
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "serializeImagePulls": False, "kernelMemcgNotification": False,
        "protectKernelDefaults": False,
    }


class Kubelet(OwnedProcess):
    """kubelet of node `name` on `host`: start(), stop() (by PID)."""

    def __init__(self, host: NodeHost, name: str, node_ip: str, kubeconfig: Path, ca: Path,
                 cgroup_root: str, workdir: Path) -> None:
        self.host, self.name, self.node_ip = host, name, node_ip
        self.kubeconfig, self.ca, self.cgroup_root = kubeconfig, ca, cgroup_root
        self.workdir = workdir
        self.log_path = workdir / "kubelet.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        cfg = self.workdir / "kubelet-config.json"
        static = self.workdir / "manifests"
        static.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps(kubelet_config(
            ca=self.ca, cgroup_root=self.cgroup_root, address=self.node_ip,
            static_pods=static), indent=1))
        return [str(KUBE_CACHE / "kubelet"), f"--config={cfg}",
                f"--kubeconfig={self.kubeconfig}",
                "--container-runtime=remote", f"--container-runtime-endpoint=unix://{SOCKET}",
                "--root-dir=/var/lib/kubelet", f"--hostname-override={self.name}",
                f"--node-ip={self.node_ip}", f"--pod-infra-container-image={PAUSE_IMAGE}",
                f"--volume-plugin-dir={self.workdir / 'volume-plugins'}",
                "--logtostderr=true", "-v=1"]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.host.exec_args(*self.argv()), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""
