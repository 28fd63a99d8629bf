"""Where the kube subnet manager finds the API server: --kubeconfig-file, --kube-api-url,
the in-cluster service account (client-go's BuildConfigFromFlags order), and net-conf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyflannel.subnet.kube.api import load_config
from pyflannel.subnet.kube.errors import KubeError
from pyflannel.subnet.kube.manager import read_netconf


def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://10.0.0.1:6443",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t0k"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def service_account(tmp_path: Path) -> Path:
    d = tmp_path / "sa"
    d.mkdir()
    (d / "token").write_text("sa-token")
    (d / "namespace").write_text("kube-flannel")
    (d / "ca.crt").write_text("")
    return d


def test_kubeconfig_file(tmp_path: Path) -> None:
    conf = load_config(str(kubeconfig(tmp_path)), "", tmp_path / "none")
    assert conf.cluster.server == "https://10.0.0.1:6443"
    assert conf.user is not None and conf.user.token == "t0k"


def test_kube_api_url_overrides_the_kubeconfig_server(tmp_path: Path) -> None:
    conf = load_config(str(kubeconfig(tmp_path)), "https://10.9.9.9:443", tmp_path / "none")
    assert conf.cluster.server == "https://10.9.9.9:443"
    assert conf.user is not None and conf.user.token == "t0k"


def test_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sa = service_account(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    conf = load_config("", "", sa)
    assert conf.cluster.server == "https://10.96.0.1:443"
    assert conf.user is not None and conf.user.token_file == str(sa / "token")
    # --kube-api-url with the pod's token: the explicit server wins.
    conf = load_config("", "https://192.0.2.1:6443", sa)
    assert conf.cluster.server == "https://192.0.2.1:6443"
    assert conf.user is not None and conf.user.token == "sa-token"


def test_no_configuration_is_a_clear_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="--kubeconfig-file or --kube-api-url"):
        load_config("", "", tmp_path / "none")
    with pytest.raises(KubeError, match="not found"):
        load_config(str(tmp_path / "missing"), "", tmp_path / "none")


def test_netconf_read_once_with_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KubeError, match="failed to read net conf"):
        read_netconf(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(KubeError, match="error parsing subnet config"):
        read_netconf(str(bad))
    good = tmp_path / "net-conf.json"
    good.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
    nc = read_netconf(str(good))
    assert str(nc.network) == "10.244.0.0/16" and nc.backend_type == "host-gw"


def test_netconf_file_nested_oversized_or_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "net-conf.json"
    for content, reason in ((b"[" * 1500 + b"]" * 1500, "nested too deeply: 1500 levels"),
                            (b" " * 70_000 + b"{}", "too large: 70002 bytes"),
                            (b'{"Network": "10.244.0.0/16\xff"}', "Network: invalid IPv4 CIDR")):
        path.write_bytes(content)
        with pytest.raises(KubeError) as err:
            read_netconf(str(path))
        assert str(err.value).startswith(f"error parsing subnet config {path}: ")
        assert reason in str(err.value)
    # invalid UTF-8 inside a string is replaced, as Go does, not an exception
    path.write_bytes(b'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "x": "\xff"}}')
    assert read_netconf(str(path)).backend["x"] == "\ufffd"
