"""deploy/kube-flannel.yml on a real kube-apiserver: every object accepted, and flanneld
running with its ServiceAccount's rights (exactly upstream's ClusterRole); a missing
right gives one clear error line, not a crash loop of stack traces."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pyflannel.cni.install import install_conf
from pyflannel_lab.cluster import Cluster
from pyflannel_lab.kube import (
    FLANNEL_NAMESPACE,
    MISSING_BINARY,
    KubeAdmin,
    KubeAdminError,
    KubeLabStore,
    flannel_rbac_objects,
    kube_apiserver_binary,
    manifest_objects,
)

NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (run the README's test command as root)")
NEEDS_APISERVER = pytest.mark.skipif(kube_apiserver_binary() is None, reason=MISSING_BINARY)

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kube-flannel.yml"
TIMEOUT = 90
ROLE = "/apis/rbac.authorization.k8s.io/v1/clusterroles/flannel"


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind)


def test_manifest_shape_matches_upstream() -> None:
    objs = manifest_objects(MANIFEST)
    assert [o["kind"] for o in objs] == ["Namespace", "ClusterRole", "ClusterRoleBinding",
                                         "ServiceAccount", "ConfigMap", "DaemonSet"]
    # The lab's RBAC (used by every kube-mode test) is the manifest's, rule for rule.
    assert by_kind(objs, "ClusterRole")["rules"] == by_kind(flannel_rbac_objects(),
                                                            "ClusterRole")["rules"]
    cm = by_kind(objs, "ConfigMap")["data"]
    assert json.loads(cm["net-conf.json"])["Backend"]["Type"] == "vxlan"  # as upstream's
    conflist = json.loads(cm["cni-conf.json"])
    assert [p["type"] for p in conflist["plugins"]] == ["flannel", "portmap"]
    pod = by_kind(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert [c["args"][0] for c in pod["initContainers"]] == ["install-cni", "install-conf"]
    (main,) = pod["containers"]
    assert "--kube-subnet-mgr" in main["args"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {e["name"] for e in main["env"]} == {"POD_NAME", "POD_NAMESPACE"}


def test_install_conf_writes_the_manifest_conflist(tmp_path: Path) -> None:
    src = tmp_path / "cni-conf.json"
    src.write_text(by_kind(manifest_objects(MANIFEST), "ConfigMap")["data"]["cni-conf.json"])
    dst = tmp_path / "net.d" / "10-flannel.conflist"
    dst.parent.mkdir()
    install_conf(src, dst)
    assert json.loads(dst.read_text()) == json.loads(src.read_text())


@NEEDS_ROOT
@NEEDS_APISERVER
@pytest.mark.kernel
def test_manifest_applied_and_daemons_use_its_service_account() -> None:
    netconf = json.loads(by_kind(manifest_objects(MANIFEST), "ConfigMap")["data"]
                         ["net-conf.json"])
    with Cluster(nodes=2, name="pfm", netconf=netconf,
                 store=KubeLabStore(manifest=MANIFEST)) as cl:
        ks = cl.store
        assert isinstance(ks, KubeLabStore) and ks.server is not None
        # Every object was accepted (created, with a uid).
        assert [o["kind"] for o in ks.applied] == [o["kind"] for o in
                                                   manifest_objects(MANIFEST)]
        assert all(o["metadata"].get("uid") for o in ks.applied)
        ds = ks.admin.get(f"/apis/apps/v1/namespaces/{FLANNEL_NAMESPACE}/daemonsets/"
                          "kube-flannel-ds")
        assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "flannel"

        # The daemons run with the manifest's ServiceAccount token.
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes on both nodes")

        # That token has exactly the ClusterRole's rights.
        sa = KubeAdmin(ks.server.url, ks.token, ks.server.ca, ks.server.netns)
        try:
            assert sa.get("/api/v1/nodes")["items"]
            node = cl.nodes[1].name
            sa.patch(f"/api/v1/nodes/{node}/status",
                     {"metadata": {"annotations": {"example.com/x": "1"}}})
            for method, path, body in [
                    ("DELETE", f"/api/v1/nodes/{node}", None),
                    ("PATCH", f"/api/v1/nodes/{node}", {"metadata": {"labels": {"a": "b"}}}),
                    ("GET", "/api/v1/namespaces/kube-flannel/secrets", None),
                    ("GET", "/api/v1/namespaces/kube-flannel/pods", None)]:
                with pytest.raises(KubeAdminError) as err:
                    sa.request(method, path, body,
                               content_type="application/strategic-merge-patch+json")
                assert err.value.status == 403, (method, path)
        finally:
            sa.close()


@NEEDS_ROOT
@NEEDS_APISERVER
@pytest.mark.kernel
def test_missing_permissions_give_one_clear_line() -> None:
    with Cluster(nodes=0, name="pfr", store=KubeLabStore()) as cl:
        ks = cl.store
        assert isinstance(ks, KubeLabStore)
        full = ks.admin.get(ROLE)

        def set_rules(rules: list[dict[str, Any]]) -> None:
            role = ks.admin.get(ROLE)
            role["rules"] = rules
            ks.admin.request("PUT", ROLE, role)

        # No nodes/status patch: the lease cannot be published, the daemon stops at
        # once with the missing rule named.
        set_rules([r for r in full["rules"] if r["resources"] != ["nodes/status"]])
        n1 = cl.add_node()
        cl.wait_until(lambda: n1.proc is not None and n1.proc.poll() is not None,
                      timeout=TIMEOUT, what="daemon exiting on a missing permission")
        assert n1.proc is not None and n1.proc.returncode == 1
        log = n1.log()
        assert "Traceback" not in log
        errors = [line for line in log.splitlines() if "permission denied" in line]
        assert len(errors) == 1, log
        assert "cannot patch nodes/status" in errors[0]
        assert 'resources: ["nodes/status"], verbs: ["patch"]' in errors[0]

        # No list/watch: the daemon keeps running, says so once, and recovers as soon
        # as the ClusterRole is fixed.
        set_rules([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                   {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
                   {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]}])
        cl.start_daemon(n1)
        n2 = cl.add_node()
        cl.wait_until(lambda: "cannot list nodes" in n2.log(), timeout=TIMEOUT,
                      what="the list permission error")
        assert n2.proc is not None and n2.proc.poll() is None
        set_rules(full["rules"])
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes once RBAC is fixed")
        for n in (n1, n2):
            log = n.log()
            assert "Traceback" not in log
            assert sum("cannot list nodes" in line for line in log.splitlines()) <= 1, log
