"""The kubelet lab's control plane: etcd + kube-apiserver (kube.py's KubeApiServer, its
CA and admin token), kube-controller-manager and kube-scheduler, all v1.20.2, in the lab's
switch namespace on the segment's server address.

What a kubeadm cluster has and the lab needs too: the controller-manager allocates the
nodes' podCIDRs (--allocate-node-cidrs) and creates ServiceAccount token secrets; the
scheduler places DaemonSet pods; the Node authorizer and NodeRestriction keep each
kubelet to its own Node; the apiserver reaches kubelets on their InternalIP with a client
certificate (`kubectl logs`). Every component authenticates with a certificate from the
lab's CA (system:node:<name> in system:nodes for kubelets), so a node can join at any time
without restarting the apiserver. There is no kube-proxy: pods that need the apiserver
are given its real address.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

from pyflannel_lab.kube import KubeApiServer, KubeApiServerError
from pyflannel_lab.netns import NetNamespace, OwnedProcess, run
from pyflannel_lab.pauseimage import KUBE_CACHE

CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"


def kube_binaries_missing() -> list[str]:
    """Which of the binaries the kubelet lab needs are not in the cache."""
    names = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
             "kubectl", "pause")
    return [n for n in names if not (KUBE_CACHE / n).is_file()]


class Certificates:
    """Client certificates signed by the apiserver's CA (openssl, small EC keys)."""

    def __init__(self, server: KubeApiServer) -> None:
        self.server = server

    def issue(self, name: str, cn: str, org: str = "") -> tuple[Path, Path]:
        d = self.server.dir
        key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem"
        subj = f"/CN={cn}" + (f"/O={org}" if org else "")
        (d / f"{name}.ext").write_text("extendedKeyUsage=clientAuth\n")
        run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
             str(key)])
        run(["openssl", "req", "-new", "-key", str(key), "-out", str(csr), "-subj", subj])
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.server.ca),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(crt), "-days", "2",
             "-extfile", str(d / f"{name}.ext")])
        return crt, key

    def kubeconfig(self, path: Path, name: str, cn: str, org: str = "") -> Path:
        crt, key = self.issue(name, cn, org)

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {
                "server": self.server.url, "certificate-authority-data": b64(self.server.ca)}}],
            "users": [{"name": name, "user": {"client-certificate-data": b64(crt),
                                              "client-key-data": b64(key)}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": name}}],
        }, indent=1))
        return path


class _Component(OwnedProcess):
    def __init__(self, ns: NetNamespace, argv: list[str], log: Path) -> None:
        self.ns, self.argv, self.log_path = ns, argv, log
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.ns.exec_args(*self.argv), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class ControlPlane:
    """start(), node_kubeconfig(), admin_kubeconfig(), pids(), close()."""

    def __init__(self, ns: NetNamespace, host: str, workdir: Path) -> None:
        self.ns, self.workdir = ns, workdir
        self.api = KubeApiServer(ns, host, base=workdir)
        self.certs = Certificates(self.api)
        self.components: dict[str, _Component] = {}

    @property
    def ca(self) -> Path:
        return self.api.ca

    def start(self) -> None:
        api, d = self.api, self.api.dir
        kcrt, kkey = self.certs.issue("kubelet-client", "kube-apiserver-kubelet-client",
                                      "system:masters")
        api.extra_args = [
            "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={kcrt}", f"--kubelet-client-key={kkey}"]
        api.start()
        cm_kc = self.certs.kubeconfig(self.workdir / "controller-manager.kubeconfig",
                                      "controller-manager", "system:kube-controller-manager")
        sched_kc = self.certs.kubeconfig(self.workdir / "scheduler.kubeconfig",
                                         "scheduler", "system:kube-scheduler")
        self.components["kube-controller-manager"] = _Component(self.ns, [
            str(KUBE_CACHE / "kube-controller-manager"), f"--kubeconfig={cm_kc}",
            "--allocate-node-cidrs=true", f"--cluster-cidr={CLUSTER_CIDR}",
            "--node-cidr-mask-size=24", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={api.ca}", "--use-service-account-credentials=true",
            "--leader-elect=false", "--port=0", "--secure-port=0",
            "--controllers=*,-cloud-node-lifecycle,-route,-service",
            "--logtostderr=true", "-v=1"], self.workdir / "kube-controller-manager.log")
        self.components["kube-scheduler"] = _Component(self.ns, [
            str(KUBE_CACHE / "kube-scheduler"), f"--kubeconfig={sched_kc}",
            "--leader-elect=false", "--port=0", "--secure-port=0",
            "--logtostderr=true", "-v=1"], self.workdir / "kube-scheduler.log")
        for c in self.components.values():
            c.start()
        time.sleep(0.5)
        for name, c in self.components.items():
            if not c.running:
                raise KubeApiServerError(f"{name} exited at once: "
                                         f"{c.log_path.read_text()[-2000:]}")

    def node_kubeconfig(self, path: Path, node: str) -> Path:
        return self.certs.kubeconfig(path, f"node-{node}", f"system:node:{node}",
                                     "system:nodes")

    def admin_kubeconfig(self, path: Path) -> Path:
        return self.api.kubeconfig(path, token=self.api.admin_token, user="admin")

    def pids(self) -> dict[str, int]:
        out = {n: c.pid for n, c in self.components.items() if c.pid}
        for n, pid in (("kube-apiserver", self.api.pid), ("etcd", self.api.etcd.pid)):
            if pid:
                out[n] = pid
        return out

    def close(self) -> None:
        for c in self.components.values():
            c.stop(grace=5)
        self.api.close()
