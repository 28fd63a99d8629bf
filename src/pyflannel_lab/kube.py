"""A real Kubernetes API server for tests and the lab, and the lab store on top of it.

`KubeApiServer` runs its own etcd and kube-apiserver (v1.20.2, built by
scripts/build-kubernetes.sh) inside a network namespace we created, on an address in
it and ports picked at run time: TLS with an openssl-made CA, a static admin token, RBAC
on (`--authorization-mode=Node,RBAC`), and ServiceAccount tokens through the
TokenRequest API. `KubeAdmin` talks to it from this process: its requests run on one
thread that joined the namespace (setns on that thread only), so the root namespace
needs no route to the server and no kubectl is needed.

`KubeLabStore` makes `Cluster(store=KubeLabStore())` run flanneld with
--kube-subnet-mgr: Node objects created as a kubelet registers them (podCIDR from a
simple allocator, as kube-controller-manager --allocate-node-cidrs would), and every
daemon authenticating with the token of upstream's `flannel` ServiceAccount, bound to
exactly upstream's ClusterRole.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from pyflannel_lab.etcd import EtcdServer
from pyflannel_lab.netns import NetNamespace, OwnedProcess, run

if TYPE_CHECKING:
    from pyflannel_lab.cluster import Cluster, LabNode

KUBE_APISERVER_ENV = "PYFLANNEL_KUBE_APISERVER"
KUBE_APISERVER_DEFAULT = "/var/cache/pyflannel/kubernetes-v1.20.2/kube-apiserver"
SERVICE_CIDR = "10.96.0.0/16"
FLANNEL_NAMESPACE = "kube-flannel"
FLANNEL_SERVICE_ACCOUNT = "flannel"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def kube_apiserver_binary() -> Path | None:
    """The kube-apiserver to use ($PYFLANNEL_KUBE_APISERVER or the build script's cache),
    or None when it is not installed."""
    path = Path(os.environ.get(KUBE_APISERVER_ENV) or KUBE_APISERVER_DEFAULT)
    return path if path.is_file() and os.access(path, os.X_OK) else None


MISSING_BINARY = ("kube-apiserver not installed: run scripts/build-kubernetes.sh as root "
                  f"(about 12-15 minutes, once per machine) or set {KUBE_APISERVER_ENV}")


def flannel_rbac_objects() -> list[dict[str, Any]]:
    """Upstream kube-flannel.yml's Namespace, ClusterRole, ClusterRoleBinding and
    ServiceAccount (reference §10): the daemon must work with exactly these rights."""
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": FLANNEL_NAMESPACE, "labels": {
             "k8s-app": "flannel", "pod-security.kubernetes.io/enforce": "privileged"}}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "flannel", "labels": {"k8s-app": "flannel"}},
         "rules": [
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
             {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "flannel", "labels": {"k8s-app": "flannel"}},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "flannel"},
         "subjects": [{"kind": "ServiceAccount", "name": FLANNEL_SERVICE_ACCOUNT,
                       "namespace": FLANNEL_NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": FLANNEL_SERVICE_ACCOUNT, "namespace": FLANNEL_NAMESPACE,
                      "labels": {"k8s-app": "flannel"}}},
    ]


def manifest_objects(path: Path) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML manifest, in order."""
    import yaml  # PyYAML comes with lightkube

    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


class KubeApiServerError(RuntimeError):
    pass


class KubeAdminError(RuntimeError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _join_netns(name: str) -> None:
    """Thread initializer: move THIS thread (only) into the namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


# Collection paths of the kinds the lab and the manifest use.
_PATHS: dict[str, tuple[str, bool]] = {
    "Namespace": ("/api/v1/namespaces", False),
    "Node": ("/api/v1/nodes", False),
    "Pod": ("/api/v1/namespaces/{ns}/pods", True),
    "ServiceAccount": ("/api/v1/namespaces/{ns}/serviceaccounts", True),
    "ConfigMap": ("/api/v1/namespaces/{ns}/configmaps", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1/clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", False),
    "DaemonSet": ("/apis/apps/v1/namespaces/{ns}/daemonsets", True),
}


def object_path(obj: dict[str, Any], *, named: bool = True) -> str:
    kind = obj["kind"]
    if kind not in _PATHS:
        raise KubeAdminError(f"kind {kind} is not known to the lab's admin client", 0)
    path, namespaced = _PATHS[kind]
    meta = obj.get("metadata", {})
    if namespaced:
        path = path.format(ns=meta.get("namespace") or "default")
    return f"{path}/{meta['name']}" if named else path


class KubeAdmin:
    """An admin client (static token, system:masters) for a server inside a namespace."""

    def __init__(self, base_url: str, token: str, ca: Path, netns: NetNamespace | None) -> None:
        self.base_url = base_url
        init: Callable[[], None] | None = (
            (lambda: _join_netns(netns.name)) if netns is not None else None)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kube-admin", initializer=init)
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._ca = ca
        self._client: httpx.Client | None = None

    def _on_thread(self, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result()

    def _http(self) -> httpx.Client:
        # Created (and its sockets opened) on the namespace thread.
        if self._client is None:
            ctx = ssl.create_default_context(cafile=str(self._ca))
            self._client = httpx.Client(base_url=self.base_url, verify=ctx,
                                        headers=self._headers, timeout=30, trust_env=False)
        return self._client

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json",
                params: dict[str, str] | None = None) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            content = json.dumps(body).encode() if body is not None else None
            resp = self._http().request(method, path, content=content, params=params,
                                        headers={"Content-Type": content_type})
            if resp.status_code >= 400:
                raise KubeAdminError(f"{method} {path}: {resp.status_code} {resp.text[:300]}",
                                     resp.status_code)
            out: dict[str, Any] = resp.json() if resp.content else {}
            return out
        return self._on_thread(call)

    def text(self, path: str) -> str:
        """GET a plain-text endpoint (/readyz, /healthz)."""
        def call() -> str:
            resp = self._http().get(path)
            if resp.status_code >= 400:
                raise KubeAdminError(f"GET {path}: {resp.status_code} {resp.text[:300]}",
                                     resp.status_code)
            return resp.text
        return self._on_thread(call)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        return self.request("GET", path, params=params or None)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", object_path(obj, named=False), obj)

    def apply(self, objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create each object, or replace it when it exists (what `kubectl apply` ends up
        doing for objects only this tool manages)."""
        out = []
        for obj in objs:
            try:
                out.append(self.create(obj))
            except KubeAdminError as e:
                if e.status != 409:
                    raise
                current = self.get(object_path(obj))
                obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion":
                                           current["metadata"]["resourceVersion"]}}
                out.append(self.request("PUT", object_path(obj), obj))
        return out

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def patch(self, path: str, body: dict[str, Any], *,
              kind: str = "application/strategic-merge-patch+json") -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type=kind)

    def service_account_token(self, namespace: str, name: str,
                              seconds: int = 24 * 3600) -> str:
        """A token for the ServiceAccount from the TokenRequest API (as a projected
        token volume gives a pod)."""
        out = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/"
                           "token", {"apiVersion": "authentication.k8s.io/v1",
                                     "kind": "TokenRequest",
                                     "spec": {"expirationSeconds": seconds}})
        return str(out["status"]["token"])

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            self._on_thread(client.close)
        self._pool.shutdown(wait=True)


class KubeApiServer(OwnedProcess):
    """etcd + kube-apiserver in `netns` on `host`. start(), then close() (always)."""

    def __init__(self, netns: NetNamespace, host: str, base: Path | None = None) -> None:
        binary = kube_apiserver_binary()
        if binary is None:
            raise KubeApiServerError(MISSING_BINARY)
        self.binary = binary
        self.netns = netns
        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix="pyflannel-kas-", dir=base))
        self.port = 0
        self.admin_token = secrets.token_hex(16)
        self.etcd = EtcdServer(netns=netns, host=host, name="kube", base=self.dir)
        self.log_path = self.dir / "kube-apiserver.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.admin: KubeAdmin | None = None
        # More flags, for the kubelet lab (controlplane.py): set before start().
        self.extra_args: list[str] = []
        self._make_credentials()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def _make_credentials(self) -> None:
        d = self.dir

        def ossl(*args: str) -> None:
            run(["openssl", *args])

        ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(d / "ca.key"))
        ossl("req", "-x509", "-new", "-key", str(d / "ca.key"), "-out", str(self.ca),
             "-days", "2", "-subj", "/CN=pyflannel-lab-kubernetes-ca")
        (d / "server.ext").write_text(
            f"subjectAltName=IP:{self.host},IP:10.96.0.1,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth\n")
        ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
             str(d / "server.key"))
        ossl("req", "-new", "-key", str(d / "server.key"), "-out", str(d / "server.csr"),
             "-subj", "/CN=kube-apiserver")
        ossl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(self.ca), "-CAkey",
             str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.pem"), "-days", "2",
             "-extfile", str(d / "server.ext"))
        # The ServiceAccount token signing key pair (RSA: the issuer's default algorithm).
        ossl("genrsa", "-out", str(d / "sa.key"), "2048")
        ossl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))
        (d / "tokens.csv").write_text(f'{self.admin_token},admin,admin-uid,"system:masters"\n')

    def _argv(self) -> list[str]:
        d = self.dir
        return self.netns.exec_args(
            str(self.binary), f"--etcd-servers={self.etcd.client_url}",
            f"--bind-address={self.host}", f"--advertise-address={self.host}",
            f"--secure-port={self.port}", "--insecure-port=0",
            f"--tls-cert-file={d / 'server.pem'}", f"--tls-private-key-file={d / 'server.key'}",
            f"--client-ca-file={self.ca}", f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false", "--logtostderr=true", "-v=1", *self.extra_args)

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 120.0) -> None:
        self.etcd.start()
        last = ""
        for _ in range(3):
            # A namespace of our own has no other listeners: any port is free in it.
            self.port = 20000 + secrets.randbelow(20000)
            self._spawn()
            try:
                self.wait_ready(timeout)
                break
            except KubeApiServerError as e:
                last = str(e)
                self.stop()
                if "address already in use" not in self.log_text():
                    raise
        else:
            raise KubeApiServerError(last)

    def wait_ready(self, timeout: float = 120.0) -> None:
        if self.admin is None:
            self.admin = KubeAdmin(self.url, self.admin_token, self.ca, self.netns)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise KubeApiServerError(f"kube-apiserver exited during start-up; log "
                                         f"{self.log_path}:\n{self.log_text()[-3000:]}")
            try:
                # /readyz includes the RBAC bootstrap roles being in place.
                if self.admin.text("/readyz").strip() == "ok":
                    return
            except (KubeAdminError, httpx.HTTPError, ValueError) as e:
                last = str(e)
            time.sleep(0.25)
        raise KubeApiServerError(f"kube-apiserver not ready at {self.url} after "
                                 f"{timeout:.0f}s: {last}")

    def stop(self, grace: float = 15.0) -> None:
        """The API server goes away (etcd and its data stay)."""
        super().stop(grace)

    def start_again(self, timeout: float = 120.0) -> None:
        if self.running:
            return
        self._spawn()
        self.wait_ready(timeout)

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        self.stop()
        self.etcd.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- clients -------------------------------------------------------------------------
    def kubeconfig(self, path: Path, *, token: str, user: str = "flannel") -> Path:
        """A kubeconfig for this server with a bearer token (JSON is valid YAML)."""
        ca_data = base64.b64encode(self.ca.read_bytes()).decode()
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {
                "server": self.url, "certificate-authority-data": ca_data}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": user}}],
        }, indent=1))
        return path


def kubelet_node(name: str, address: str, pod_cidr: str | None) -> dict[str, Any]:
    """A Node as a kubelet registers it (labels, InternalIP, Ready), with the podCIDR
    kube-controller-manager would assign, and NetworkUnavailable=True as a cloud route
    controller would leave it until the network plugin is up."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    spec: dict[str, Any] = {}
    if pod_cidr:
        spec = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64"}},
        "spec": spec,
        "status": {
            "addresses": [{"type": "InternalIP", "address": address},
                          {"type": "Hostname", "address": name}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status",
                 "lastHeartbeatTime": now, "lastTransitionTime": now},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated",
                 "message": "Node created without a route",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}]},
    }


class PodCidrAllocator:
    """Consecutive /24s of the cluster network, the first free one for each new node
    (kube-controller-manager's range allocator in miniature)."""

    def __init__(self, network: str, prefixlen: int = 24) -> None:
        self.subnets = IPv4Network(network).subnets(new_prefix=prefixlen)
        self.free: list[IPv4Network] = []
        self.used: dict[str, IPv4Network] = {}

    def allocate(self, node: str) -> IPv4Network:
        if node in self.used:
            return self.used[node]
        net = self.free.pop(0) if self.free else next(self.subnets)
        self.used[node] = net
        return net

    def release(self, node: str) -> None:
        net = self.used.pop(node, None)
        if net is not None:
            self.free.append(net)
            self.free.sort()


class KubeLabStore:
    """The lab's store when it is Kubernetes: nodes are Node objects, flanneld runs with
    --kube-subnet-mgr and the `flannel` ServiceAccount's token."""

    kind = "kube"

    def __init__(self, manifest: Path | None = None) -> None:
        """`manifest`: a kube-flannel.yml whose objects (RBAC, ServiceAccount, ...) are
        applied instead of the built-in copy of upstream's RBAC."""
        self.manifest = manifest
        self.server: KubeApiServer | None = None
        self.workdir: Path | None = None
        self.netconf_path: Path | None = None
        self.token = ""
        self.allocator: PodCidrAllocator | None = None
        self.applied: list[dict[str, Any]] = []
        # False: new Nodes get no podCIDR (a controller-manager without
        # --allocate-node-cidrs), to see flanneld's error.
        self.assign_pod_cidrs = True

    @property
    def admin(self) -> KubeAdmin:
        assert self.server is not None and self.server.admin is not None
        return self.server.admin

    def start(self, cluster: Cluster) -> None:
        assert cluster.switch is not None
        self.workdir = cluster.workdir / "kube"
        self.workdir.mkdir(exist_ok=True)
        self.server = KubeApiServer(cluster.switch, str(cluster.segments[0].switch_addr),
                                    base=cluster.workdir)
        self.server.start()
        self.applied = self.admin.apply(
            manifest_objects(self.manifest) if self.manifest else flannel_rbac_objects())
        self.token = self.admin.service_account_token(FLANNEL_NAMESPACE,
                                                      FLANNEL_SERVICE_ACCOUNT)
        self.netconf_path = self.workdir / "net-conf.json"

    def put_netconf(self, netconf: dict[str, Any]) -> None:
        """The ConfigMap's net-conf.json, as the volume mount shows it to every node."""
        assert self.netconf_path is not None
        self.netconf_path.write_text(json.dumps(netconf, indent=2))
        if self.allocator is None:
            self.allocator = PodCidrAllocator(str(netconf["Network"]))

    def kubeconfig_path(self, node: LabNode) -> Path:
        return node.workdir / "kubeconfig"

    def flanneld_args(self, node: LabNode) -> list[str]:
        assert self.server is not None and self.netconf_path is not None
        kc = self.kubeconfig_path(node)
        if not kc.exists():
            self.server.kubeconfig(kc, token=self.token)
        return ["--kube-subnet-mgr", f"--kubeconfig-file={kc}",
                f"--net-config-path={self.netconf_path}"]

    def node_env(self, node: LabNode) -> dict[str, str]:
        return {"NODE_NAME": node.name}

    def node_added(self, node: LabNode) -> None:
        assert self.allocator is not None
        cidr = str(self.allocator.allocate(node.name)) if self.assign_pod_cidrs else None
        self.admin.create(kubelet_node(node.name, str(node.addr), cidr))

    def node_removed(self, node: LabNode) -> None:
        self.admin.delete(f"/api/v1/nodes/{node.name}")
        if self.allocator is not None:
            self.allocator.release(node.name)

    def node(self, name: str) -> dict[str, Any]:
        return self.admin.get(f"/api/v1/nodes/{name}")

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()

    def resume(self) -> None:
        assert self.server is not None
        self.server.start_again()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
