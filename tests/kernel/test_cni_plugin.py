"""The flannel CNI plugin with the real `bridge`, `host-local` and `portmap` plugins,
driven by the lab's CNI runtime, in a node namespace with two pod namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyflannel.cni.install import install_plugin
from pyflannel_lab.cniruntime import Attachment, CniPluginError, CniRuntime
from pyflannel_lab.netns import NetNamespace, run

CNI_BIN = Path("/usr/lib/cni")

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 (run the README's test command as root)",
    ),
    pytest.mark.skipif(not (CNI_BIN / "bridge").exists(),
                       reason="needs containernetworking-plugins in /usr/lib/cni"),
]

SUBNET_ENV = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
              "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")


@dataclass
class CniLab:
    node: NetNamespace
    pods: list[NetNamespace]
    tmp: Path
    subnet_env: Path
    data_dir: Path
    ipam_dir: Path
    plugin_dirs: list[Path]

    def conflist(self, cni_version: str = "1.0.0") -> dict[str, object]:
        """The kube-flannel.yml conflist, plus tmp paths so nothing touches /var or /run."""
        return {
            "name": "cbr0",
            "cniVersion": cni_version,
            "plugins": [
                {"type": "flannel", "subnetFile": str(self.subnet_env),
                 "dataDir": str(self.data_dir),
                 "ipam": {"dataDir": str(self.ipam_dir)},
                 "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def runtime(self, cni_version: str = "1.0.0") -> CniRuntime:
        return CniRuntime(self.conflist(cni_version), self.plugin_dirs, node=self.node.name)

    def attachment(self, index: int, **kwargs: object) -> Attachment:
        pod = self.pods[index]
        return Attachment(container_id=f"c{index}-{pod.name}", netns=pod.path,
                          args={"IgnoreUnknown": "1", "K8S_POD_NAME": f"pod{index}"}, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def lab(tmp_path: Path, netns_factory: Callable[[str], NetNamespace]) -> Iterator[CniLab]:
    bin_dir = tmp_path / "bin"
    install_plugin(bin_dir, python=sys.executable)
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text(SUBNET_ENV)
    yield CniLab(node=netns_factory("pfcnode"), pods=[netns_factory("pfcpod"),
                                                       netns_factory("pfcpod")],
                 tmp=tmp_path, subnet_env=subnet_env, data_dir=tmp_path / "flannel",
                 ipam_dir=tmp_path / "ipam", plugin_dirs=[bin_dir, CNI_BIN])


SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
s.settimeout(20)
c, _ = s.accept()
c.sendall(c.recv(16).replace(b"ping", b"pong"))
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"ping")
print(c.recv(16).decode())
"""


def tcp_roundtrip(server_ns: NetNamespace, server_ip: str, client_ns: NetNamespace) -> str:
    """Send "ping" over TCP from `client_ns` to a one-shot server in `server_ns`
    (no ping binary on this machine); return what came back."""
    server = subprocess.Popen(server_ns.exec_args(sys.executable, "-c", SERVER, server_ip),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        reply = client_ns.run(sys.executable, "-c", CLIENT, server_ip, port, timeout=20)
        return reply.stdout.strip()
    finally:
        server.kill()
        server.wait()


def addresses(ns: NetNamespace, ifname: str) -> list[str]:
    info = json.loads(ns.ip("-j", "addr", "show", "dev", ifname).stdout)
    return [f"{a['local']}/{a['prefixlen']}" for a in info[0]["addr_info"]
            if a["family"] == "inet"]


def mtu(ns: NetNamespace, ifname: str) -> int:
    return int(json.loads(ns.ip("-j", "link", "show", "dev", ifname).stdout)[0]["mtu"])


def pod_ip(result: dict[str, object]) -> str:
    ips = result["ips"]
    assert isinstance(ips, list)
    return str(ips[0]["address"]).split("/")[0]


def test_add_wires_two_pods_on_cni0(lab: CniLab) -> None:
    runtime = lab.runtime()
    results = [runtime.add(lab.attachment(i)) for i in range(2)]

    ips = sorted(pod_ip(r) for r in results)
    assert ips == ["10.244.1.2", "10.244.1.3"]
    for pod, result in zip(lab.pods, results, strict=True):
        assert addresses(pod, "eth0") == [f"{pod_ip(result)}/24"]
        assert mtu(pod, "eth0") == 1450
        routes = json.loads(pod.ip("-j", "route", "show").stdout)
        via = {r["dst"]: r.get("gateway") for r in routes}
        assert via["default"] == "10.244.1.1"  # isDefaultGateway from the delegate
        assert via["10.244.0.0/16"] == "10.244.1.1"  # the flannel network route
    assert addresses(lab.node, "cni0") == ["10.244.1.1/24"]
    assert mtu(lab.node, "cni0") == 1450

    # Pod to pod across cni0, and pod to the node's bridge address.
    assert tcp_roundtrip(lab.pods[1], pod_ip(results[1]), lab.pods[0]) == "pong"
    assert tcp_roundtrip(lab.node, "10.244.1.1", lab.pods[1]) == "pong"

    # flannel saved the delegate config it used, keyed by container ID.
    saved = json.loads((lab.data_dir / lab.attachment(0).container_id).read_text())
    assert saved["type"] == "bridge" and saved["mtu"] == 1450 and saved["ipMasq"] is False
    assert (lab.data_dir / lab.attachment(0).container_id).stat().st_mode & 0o777 == 0o600


def test_check_passes_then_fails_when_the_pod_address_is_gone(lab: CniLab) -> None:
    runtime = lab.runtime()
    attachment = lab.attachment(0)
    result = runtime.add(attachment)
    runtime.check(attachment, result)

    lab.pods[0].ip("addr", "flush", "dev", "eth0")
    with pytest.raises(CniPluginError) as failure:
        runtime.check(attachment, result)
    assert failure.value.plugin == "flannel"
    assert "failed to delegate check: bridge" in failure.value.msg


def test_check_reports_a_changed_subnet_env(lab: CniLab) -> None:
    runtime = lab.runtime()
    attachment = lab.attachment(0)
    result = runtime.add(attachment)
    lab.subnet_env.write_text(SUBNET_ENV.replace("FLANNEL_MTU=1450", "FLANNEL_MTU=1400"))
    with pytest.raises(CniPluginError) as failure:
        runtime.check(attachment, result)
    assert failure.value.code == 100
    assert "mtu: saved 1450, now 1400" in failure.value.msg


def test_del_frees_the_address_and_is_idempotent(lab: CniLab) -> None:
    runtime = lab.runtime()
    attachment = lab.attachment(0)
    result = runtime.add(attachment)
    ip = pod_ip(result)
    reservation = lab.ipam_dir / "cbr0" / ip
    assert reservation.read_text().startswith(attachment.container_id)

    runtime.delete(attachment, result)
    assert not reservation.exists()
    assert not (lab.data_dir / attachment.container_id).exists()
    assert lab.pods[0].ip("link", "show", "dev", "eth0", check=False).returncode != 0

    runtime.delete(attachment, result)  # a second DEL must succeed too

    # The freed address can be reused at once.
    again = runtime.add(lab.attachment(1))
    assert pod_ip(again) in {ip, "10.244.1.3"}


def test_port_mapping_reaches_portmap_inside_the_node_namespace(lab: CniLab) -> None:
    runtime = lab.runtime()
    mapping = {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}
    attachment = lab.attachment(0, capability_args={"portMappings": [mapping]})
    result = runtime.add(attachment)
    rules = lab.node.run("iptables-save", "-t", "nat").stdout
    assert "18080" in rules and pod_ip(result) in rules
    runtime.delete(attachment, result)
    assert "18080" not in lab.node.run("iptables-save", "-t", "nat").stdout
    # portmap ran only in the node namespace.
    assert attachment.container_id not in run(["iptables-save"]).stdout


def test_manifest_conflist_version_0_3_1(lab: CniLab) -> None:
    runtime = lab.runtime("0.3.1")
    attachment = lab.attachment(0)
    result = runtime.add(attachment)
    assert result["cniVersion"] == "0.3.1"
    assert addresses(lab.pods[0], "eth0") == [f"{pod_ip(result)}/24"]
    with pytest.raises(ValueError, match="does not support the CHECK command"):
        runtime.check(attachment, result)
    runtime.delete(attachment)
    assert not (lab.ipam_dir / "cbr0" / pod_ip(result)).exists()


def test_missing_subnet_env_is_a_clear_error_and_changes_nothing(lab: CniLab) -> None:
    lab.subnet_env.unlink()
    runtime = lab.runtime()
    with pytest.raises(CniPluginError) as failure:
        runtime.add(lab.attachment(0))
    error = failure.value.error
    assert error is not None
    assert error["code"] == 11
    assert error["cniVersion"] == "1.0.0"
    assert error["msg"] == (
        f"flanneld is not ready on this node: {lab.subnet_env} does not exist; check the "
        "flannel pod log on this node (kubectl -n kube-flannel logs <pod> -c kube-flannel) "
        "or journalctl -u flanneld")
    assert lab.node.ip("link", "show", "cni0", check=False).returncode != 0
    assert not lab.data_dir.exists()


def test_dual_stack(lab: CniLab) -> None:
    lab.subnet_env.write_text(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    runtime = lab.runtime()
    attachment = lab.attachment(0)
    result = runtime.add(attachment)
    ips = result["ips"]
    assert isinstance(ips, list)
    assert [ip["address"] for ip in ips] == ["10.244.1.2/24", "fd00:10:244:1::2/64"]
    routes6 = json.loads(lab.pods[0].ip("-j", "-6", "route", "show").stdout)
    assert any(r["dst"] == "fd00:10:244::/56" and r.get("gateway") == "fd00:10:244:1::1"
               for r in routes6)
    runtime.delete(attachment, result)
    assert not (lab.ipam_dir / "cbr0" / "fd00:10:244:1::2").exists()
