"""The flannel CNI plugin's config building, subnet.env parsing and CNI protocol,
run as kubelet runs it: a separate `python -I -S` process, with a recording fake
delegate in CNI_PATH."""

from __future__ import annotations

import ipaddress
import json
import marshal
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflannel.cni import flannel_plugin as plugin
from pyflannel.cni import install
from pyflannel.cni.install import (
    CODE_PREFIX,
    InstallError,
    install_conf,
    install_plugin,
    launcher_text,
)

PLUGIN = Path(plugin.__file__)

# Upstream's fixture (flannel_linux_test.go), which has no cniVersion in its input.
UPSTREAM_FIXTURE = (
    '{"ipMasq":false,"ipam":{"routes":[{"dst":"10.1.0.0/16"}],"ranges":[[{"subnet":'
    '"10.1.17.0/24"}]],"type":"host-local"},"isGateway":true,"mtu":1472,'
    '"name":"cni-flannel","type":"bridge"}'
)
SAMPLE_ENV = ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n"
              "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n")

# A stand-in delegate: records its stdin and CNI_* variables per command, then
# succeeds, or fails with a CNI error when FAKE_FAIL names the command.
FAKE_DELEGATE = """#!/bin/sh
cat > "$FAKE_DIR/$CNI_COMMAND.json"
env | grep '^CNI_' | sort > "$FAKE_DIR/$CNI_COMMAND.env"
if [ "$FAKE_FAIL" = "$CNI_COMMAND" ]; then
  echo '{"cniVersion":"1.0.0","code":7,"msg":"fake failure","details":"d"}'; exit 1
fi
echo '{"cniVersion":"1.0.0","ips":[{"address":"10.1.17.2/24","gateway":"10.1.17.1"}]}'
"""


@dataclass
class PluginRun:
    status: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, object]:
        loaded = json.loads(self.stdout)
        assert isinstance(loaded, dict)
        return loaded


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        for name in ("bridge", "ipvlan"):
            (self.bin / name).write_text(FAKE_DELEGATE)
            (self.bin / name).chmod(0o755)
        self.fake = root / "fake"
        self.fake.mkdir()
        self.subnet_env = root / "subnet.env"
        self.subnet_env.write_text(SAMPLE_ENV)
        self.data_dir = root / "data"

    def config(self, **extra: object) -> dict[str, object]:
        conf: dict[str, object] = {"cniVersion": "0.3.1", "name": "cni-flannel",
                                   "type": "flannel", "subnetFile": str(self.subnet_env),
                                   "dataDir": str(self.data_dir)}
        conf.update(extra)
        return conf

    def run(self, command: str, config: dict[str, object] | bytes, *,
            container_id: str = "ctr1", env: dict[str, str] | None = None) -> PluginRun:
        stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
                   "CNI_CONTAINERID": container_id, "CNI_NETNS": "/var/run/netns/x",
                   "CNI_IFNAME": "eth0", "CNI_PATH": str(self.bin),
                   "FAKE_DIR": str(self.fake), **(env or {})}
        environ = {k: v for k, v in environ.items() if v is not None and v != "<unset>"}
        proc = subprocess.run([sys.executable, "-I", "-S", str(PLUGIN)], input=stdin,
                              env=environ, capture_output=True, timeout=30)
        return PluginRun(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    def sent(self, command: str = "ADD") -> str:
        return (self.fake / f"{command}.json").read_text()

    def saved(self, container_id: str = "ctr1") -> Path:
        return self.data_dir / container_id


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


def delegate_of(box: Sandbox, env_text: str, **extra: object) -> dict[str, object]:
    box.subnet_env.write_text(env_text)
    result = box.run("ADD", box.config(**extra))
    assert result.status == 0, result.stdout
    loaded = json.loads(box.sent())
    assert isinstance(loaded, dict)
    return loaded


def error_of(result: PluginRun) -> tuple[int, str]:
    assert result.status != 0
    error = result.json
    return int(str(error["code"])), str(error["msg"])


# ----------------------------------------------------------------- the delegate config


def test_upstream_fixture_byte_for_byte(box: Sandbox) -> None:
    result = box.run("ADD", box.config())
    assert result.status == 0, result.stdout
    expected = ('{"cniVersion":"0.3.1","ipMasq":false,"ipam":{"ranges":[[{"subnet":'
                '"10.1.17.0/24"}]],"routes":[{"dst":"10.1.0.0/16"}],"type":"host-local"},'
                '"isGateway":true,"mtu":1472,"name":"cni-flannel","type":"bridge"}')
    assert box.sent() == expected  # Go's json.Marshal: sorted keys, compact
    assert box.saved().read_text() == expected  # saved exactly as sent
    without_version = json.loads(expected)
    del without_version["cniVersion"]
    assert without_version == json.loads(UPSTREAM_FIXTURE)
    # The delegate's result is the plugin's result; the delegate saw the same CNI_* env.
    assert result.json["ips"] == [{"address": "10.1.17.2/24", "gateway": "10.1.17.1"}]
    sent_env = (box.fake / "ADD.env").read_text().splitlines()
    assert "CNI_COMMAND=ADD" in sent_env and "CNI_CONTAINERID=ctr1" in sent_env
    assert "delegateAdd: netconf sent to delegate plugin:" in result.stderr


def test_saved_config_permissions(box: Sandbox) -> None:
    assert box.run("ADD", box.config()).status == 0
    assert stat.S_IMODE(box.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(box.saved().stat().st_mode) == 0o600
    assert sorted(p.name for p in box.data_dir.iterdir()) == ["ctr1"]  # no temp file left


def test_dual_stack(box: Sandbox) -> None:
    conf = delegate_of(box, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n"
                       "FLANNEL_IPV6_NETWORK=2001:CAFE:42:0::/56\n"
                       "FLANNEL_IPV6_SUBNET=2001:cafe:42:3::1/64\n"
                       "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    assert conf["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.3.0/24"}], [{"subnet": "2001:cafe:42:3::/64"}]],
        "routes": [{"dst": "10.244.0.0/16"}, {"dst": "2001:cafe:42::/56"}],
    }
    assert conf["ipMasq"] is True  # flanneld does not masquerade, so the bridge must
    assert conf["mtu"] == 1450


def test_ipv6_only(box: Sandbox) -> None:
    conf = delegate_of(box, "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:7::1/64\n"
                       "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n")
    assert conf["ipam"] == {"type": "host-local", "ranges": [[{"subnet": "fd00:0:0:7::/64"}]],
                            "routes": [{"dst": "fd00::/48"}]}


def test_comma_lists_are_normalised_and_deduplicated(box: Sandbox) -> None:
    conf = delegate_of(box, "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16,10.244.9.9/16\n"
                       "FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
    ipam = conf["ipam"]
    assert isinstance(ipam, dict)
    assert ipam["routes"] == [{"dst": "10.244.0.0/16"}, {"dst": "10.245.0.0/16"}]


def test_delegate_keys_pass_through_and_win(box: Sandbox) -> None:
    conf = delegate_of(box, SAMPLE_ENV, delegate={
        "hairpinMode": True, "isDefaultGateway": True, "mtu": 9000, "ipMasq": True,
        "isGateway": False, "bridge": "mynet0", "nested": {"b": 1, "a": [1.5, "<x>"]}})
    assert (conf["mtu"], conf["ipMasq"], conf["isGateway"]) == (9000, True, False)
    assert conf["bridge"] == "mynet0" and conf["hairpinMode"] is True
    assert conf["nested"] == {"a": [1.5, "<x>"], "b": 1}
    # Go escapes HTML characters and sorts nested maps.
    assert '"nested":{"a":[1.5,"\\u003cx\\u003e"],"b":1}' in box.sent()


def test_non_bridge_delegate_gets_no_is_gateway(box: Sandbox) -> None:
    conf = delegate_of(box, SAMPLE_ENV, delegate={"type": "ipvlan", "master": "eth0"})
    assert conf["type"] == "ipvlan" and "isGateway" not in conf


def test_input_ipam_is_kept_routes_appended_ranges_replaced(box: Sandbox) -> None:
    conf = delegate_of(box, SAMPLE_ENV, ipam={
        "dataDir": "/tmp/x", "ranges": [[{"subnet": "192.168.0.0/24"}]],
        "routes": [{"dst": "192.168.5.7/16", "gw": "10.1.17.254", "extra": 1, "mtu": 0}]})
    assert conf["ipam"] == {
        "type": "host-local", "dataDir": "/tmp/x",
        "ranges": [[{"subnet": "10.1.17.0/24"}]],
        # types.Route keeps the host bits of dst, drops unknown keys and zero ints.
        "routes": [{"dst": "192.168.5.7/16", "gw": "10.1.17.254"}, {"dst": "10.1.0.0/16"}],
    }


def test_runtime_config_is_copied_into_the_delegate(box: Sandbox) -> None:
    conf = delegate_of(box, SAMPLE_ENV, runtimeConfig={"portMappings": [{"hostPort": 80}]})
    assert conf["runtimeConfig"] == {"portMappings": [{"hostPort": 80}]}


@pytest.mark.parametrize(("delegate", "message"), [
    ({"name": "x"}, "'delegate' dictionary must not have 'name' field, it'll be set by flannel"),
    ({"ipam": {}}, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel"),
    ({"type": 5}, "'delegate' dictionary, if present, must have (string) 'type' field"),
])
def test_delegate_validation(box: Sandbox, delegate: dict[str, object], message: str) -> None:
    result = box.run("ADD", box.config(delegate=delegate))
    assert error_of(result) == (7, message)
    assert result.json["cniVersion"] == "0.3.1"
    assert not box.data_dir.exists()  # nothing saved, nothing delegated
    assert not (box.fake / "ADD.json").exists()


def test_add_that_cannot_save_its_config_gives_the_delegate_nothing(box: Sandbox) -> None:
    """The delegate is started before the config is saved (its start-up overlaps the
    fsync), so a failed save must stop it before it gets a config."""
    box.data_dir.write_text("a file where the data directory should be")
    result = box.run("ADD", box.config())
    code, msg = error_of(result)
    assert code == 5 and msg.startswith(f"cannot save the delegate config in {box.data_dir}")
    # The fake writes its CNI_* variables only after stdin ended: it was killed first.
    assert not (box.fake / "ADD.env").exists()
    assert not (box.fake / "ADD.json").exists() or box.sent() == ""


# ----------------------------------------------------------------- subnet.env


def test_missing_subnet_env(box: Sandbox) -> None:
    box.subnet_env.unlink()
    code, msg = error_of(box.run("ADD", box.config()))
    assert code == 11
    assert msg == (f"flanneld is not ready on this node: {box.subnet_env} does not exist; "
                   "check the flannel pod log on this node (kubectl -n kube-flannel logs <pod> "
                   "-c kube-flannel) or journalctl -u flanneld")


@pytest.mark.parametrize(("text", "missing"), [
    ("FLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
     "FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK"),
    ("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_IPMASQ=true\n",
     "FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU"),
    ("", "FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, "
         "FLANNEL_MTU, FLANNEL_IPMASQ"),
])
def test_missing_keys(box: Sandbox, text: str, missing: str) -> None:
    box.subnet_env.write_text(text)
    code, msg = error_of(box.run("ADD", box.config()))
    assert code == 7
    assert f"{box.subnet_env} is missing {missing}" in msg


@pytest.mark.parametrize(("line", "complaint"), [
    ("FLANNEL_MTU=abc", "FLANNEL_MTU"),
    ("FLANNEL_MTU=-1", "FLANNEL_MTU"),
    ("FLANNEL_SUBNET=10.1.17.1", "invalid CIDR address: 10.1.17.1"),
    ("FLANNEL_SUBNET=10.1.17.01/24", "invalid CIDR address"),
    ("FLANNEL_NETWORK=10.1.0.0/16,bad", "invalid CIDR address: bad"),
    ("FLANNEL_IPV6_SUBNET=2001:db8::1/129", "invalid CIDR address"),
    ("FLANNEL_MTU", "no '='"),
    ("FLANNEL_MTU=0", 'FLANNEL_MTU: expected an MTU in 68..65535, got "0"'),
    ("FLANNEL_MTU=65536", 'FLANNEL_MTU: expected an MTU in 68..65535, got "65536"'),
    ("FLANNEL_MTU=" + "9" * 5000, "FLANNEL_MTU: expected an MTU in 68..65535, got \"999"),
    ("FLANNEL_IPMASQ=True", 'FLANNEL_IPMASQ: expected true or false, got "True"'),
    ("FLANNEL_IPMASQ=\x1b[31m", 'FLANNEL_IPMASQ: expected true or false, got "\\x1b[31m"'),
    ("FLANNEL_SUBNET=x", "FLANNEL_SUBNET: invalid CIDR address: x (expected a CIDR such as "
     "10.244.1.1/24)"),
    ("FLANNEL_NETWORK=10.0.0.0/" + "1" * 5000, "invalid CIDR address: 10.0.0.0/111"),
])
def test_bad_values(box: Sandbox, line: str, complaint: str) -> None:
    box.subnet_env.write_text(SAMPLE_ENV + line + "\n")
    code, msg = error_of(box.run("ADD", box.config()))
    assert code == 7 and complaint in msg and str(box.subnet_env) in msg


def test_subnet_env_size_limit(box: Sandbox) -> None:
    box.subnet_env.write_text(SAMPLE_ENV + "#" * (64 * 1024))
    code, msg = error_of(box.run("ADD", box.config()))
    assert code == 7
    assert f"{box.subnet_env}: 65537 bytes is more than the limit of 65536" in msg
    # a long comma list is still linear (a set, not a list, deduplicates)
    many = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(4000))
    env = plugin.parse_subnet_env(SAMPLE_ENV + f"FLANNEL_NETWORK={many}\n", "f")
    assert len(env.networks) == 4000


def test_parse_rules_match_upstream() -> None:
    env = plugin.parse_subnet_env(
        "# comment\nOTHER=1\nFLANNEL_NETWORK=10.0.0.0/8\r\nFLANNEL_SUBNET=10.1.2.3/24\n"
        "FLANNEL_MTU=1400\nFLANNEL_MTU=1300\nFLANNEL_IPMASQ=false\n", "f")
    assert env.networks == ["10.0.0.0/8"]  # CRLF tolerated like bufio.Scanner
    assert env.subnet == "10.1.2.0/24"
    assert env.mtu == 1300  # the last occurrence wins
    assert env.ipmasq is False


# ----------------------------------------------------------------- DEL and CHECK


def test_del_without_saved_config_succeeds(box: Sandbox) -> None:
    result = box.run("DEL", box.config(), env={"CNI_NETNS": "<unset>"})
    assert (result.status, result.stdout) == (0, "")
    assert not (box.fake / "DEL.json").exists()


def test_del_keeps_the_saved_config_until_the_delegate_succeeds(box: Sandbox) -> None:
    assert box.run("ADD", box.config()).status == 0
    saved = box.saved().read_text()
    failed = box.run("DEL", box.config(), env={"FAKE_FAIL": "DEL"})
    assert error_of(failed) == (7, "failed to delegate del: bridge: fake failure")
    assert failed.json["details"] == "d"
    assert box.saved().exists()  # upstream would have lost it here
    assert box.sent("DEL") == saved  # DEL hands the delegate the ADD-time config
    assert box.run("DEL", box.config()).status == 0
    assert not box.saved().exists()
    assert box.run("DEL", box.config()).status == 0


def test_check_passes_prev_result_with_gateways_to_the_delegate(box: Sandbox) -> None:
    conf = box.config(cniVersion="1.0.0")
    assert box.run("ADD", conf).status == 0
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.17.2/24", "gateway": "10.1.17.1"}],
            "routes": [{"dst": "10.1.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.1.17.9"}]}
    result = box.run("CHECK", {**conf, "prevResult": prev})
    assert (result.status, result.stdout) == (0, "")
    sent = json.loads(box.sent("CHECK"))
    assert sent["prevResult"]["routes"] == [{"dst": "10.1.0.0/16", "gw": "10.1.17.1"},
                                            {"dst": "0.0.0.0/0", "gw": "10.1.17.9"}]
    del sent["prevResult"]
    assert sent == json.loads(box.saved().read_text())


def test_check_reports_what_changed(box: Sandbox) -> None:
    conf = box.config(cniVersion="1.0.0")
    assert box.run("ADD", conf).status == 0
    box.subnet_env.write_text(SAMPLE_ENV.replace("10.1.17.1/24", "10.1.18.1/24")
                              .replace("IPMASQ=true", "IPMASQ=false"))
    code, msg = error_of(box.run("CHECK", {**conf, "prevResult": {"cniVersion": "1.0.0"}}))
    assert code == 100
    assert 'ipMasq: saved false, now true' in msg
    assert ('ipam.ranges: saved [[{"subnet":"10.1.17.0/24"}]], '
            'now [[{"subnet":"10.1.18.0/24"}]]') in msg
    assert not (box.fake / "CHECK.json").exists()


def test_check_errors(box: Sandbox) -> None:
    conf = box.config(cniVersion="1.0.0")
    code, msg = error_of(box.run("CHECK", {**conf, "prevResult": {}}))
    assert code == 3 and "no saved config for container ctr1" in msg
    assert error_of(box.run("CHECK", conf))[0] == 7  # no prevResult
    assert error_of(box.run("CHECK", {**box.config(), "prevResult": {}})) == (
        1, "config version does not allow CHECK")


# ----------------------------------------------------------------- protocol


def test_version(box: Sandbox) -> None:
    result = box.run("VERSION", b'{"cniVersion":"0.4.0"}')
    assert result.json == {"cniVersion": "0.4.0", "supportedVersions":
                           ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    assert box.run("VERSION", b"").json["cniVersion"] == "1.1.0"


def test_incompatible_version(box: Sandbox) -> None:
    result = box.run("ADD", box.config(cniVersion="0.2.0"))
    assert error_of(result) == (1, "incompatible CNI versions")
    assert "0.2.0" in str(result.json["details"])


@pytest.mark.parametrize(("env", "message"), [
    ({"CNI_NETNS": "<unset>"}, "required env variables [CNI_NETNS] missing"),
    ({"CNI_CONTAINERID": "../../etc/x"}, "invalid characters in containerID"),
    ({"CNI_IFNAME": "a/b"}, "interface name contains / or : or whitespace characters"),
    ({"CNI_COMMAND": "FOO"}, "unknown CNI_COMMAND: FOO"),
])
def test_environment_errors(box: Sandbox, env: dict[str, str], message: str) -> None:
    assert error_of(box.run("ADD", box.config(), env=env)) == (4, message)


def test_undecodable_config(box: Sandbox) -> None:
    code, msg = error_of(box.run("ADD", b'{"cniVersion": "0.3.1", '))
    assert code == 6 and msg.startswith("failed to load netconf")
    assert error_of(box.run("ADD", box.config(name=5)))[0] == 6


@pytest.mark.parametrize(("stdin", "message"), [
    (b"[" * 100_000, "failed to load netconf from stdin: arrays/objects nest deeper than the "
     "limit of 64 levels"),
    (b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", "nest deeper than the limit of 64 levels"),
    (b" " * (1 << 20) + b"{}", "failed to load netconf from stdin: 1048577 bytes is more than "
     "the limit of 1048576"),
    (b'{"cniVersion": "0.3.1", "x": 1e999}', "number 1e999 is out of range for a float64"),
    (b'{"x": ' + b"1" * 500 + b"}", "is out of range for a float64"),
    (b'{"x": NaN}', "invalid JSON value NaN"),
])
def test_bounded_stdin(box: Sandbox, stdin: bytes, message: str) -> None:
    result = box.run("ADD", stdin)
    code, msg = error_of(result)
    assert code == 6 and message in msg
    assert "Traceback" not in result.stderr


def test_deep_but_allowed_runtime_config_is_passed_through(box: Sandbox) -> None:
    nested: object = 1
    for _ in range(60):  # 62 levels in the stdin config, 61 in the delegate's
        nested = [nested]
    sent = delegate_of(box, SAMPLE_ENV, runtimeConfig={"x": nested})
    assert sent["runtimeConfig"] == {"x": nested}


def test_paths_with_nul_and_long_container_ids_are_refused(box: Sandbox) -> None:
    code, msg = error_of(box.run("ADD", box.config(subnetFile="/run/x\0y")))
    assert code == 7 and "'subnetFile' must be a path without NUL characters" in msg
    code, msg = error_of(box.run("DEL", box.config(dataDir="\0")))
    assert code == 7 and "'dataDir' must be a path without NUL" in msg
    assert error_of(box.run("ADD", box.config(), container_id="a" * 251)) == (
        4, "containerID is longer than 250 characters")


def test_oversized_saved_config_is_kept_on_del(box: Sandbox) -> None:
    box.data_dir.mkdir()
    box.saved().write_bytes(b" " * (1 << 20) + b'{"type":"bridge"}')
    result = box.run("DEL", box.config())
    assert (result.status, result.stdout) == (0, "")
    assert "1048593 bytes is more than the limit" not in result.stderr  # read is bounded
    assert "more than the limit of 1048576" in result.stderr
    assert box.saved().exists() and not (box.fake / "DEL.json").exists()


def test_status(box: Sandbox) -> None:
    conf = box.config(cniVersion="1.1.0")
    assert box.run("STATUS", conf).status == 0
    box.subnet_env.unlink()
    assert error_of(box.run("STATUS", conf))[0] == 50


def test_imports_stay_lean(box: Sandbox) -> None:
    """The plugin's start-up budget: only these modules may load during an ADD."""
    stdin = json.dumps(box.config()).encode()
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(box.bin), "FAKE_DIR": str(box.fake),
               "PATH": os.environ.get("PATH", "")}

    def imports(*args: str) -> set[str]:
        proc = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", *args],
                              input=stdin, env=environ, capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stdout
        return {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line} - {"imported package"}

    interpreter_start = imports("-c", "pass")
    imported = imports(str(PLUGIN)) - interpreter_start
    assert "_json" in imported  # the measurement sees the plugin's own imports
    allowed = {"os", "stat", "_stat", "posixpath", "genericpath", "_collections_abc",
               "_json", "_socket", "encodings.idna", "stringprep", "unicodedata"}
    assert imported - allowed == set()


# ----------------------------------------------------------------- pure functions


@pytest.mark.parametrize(("value", "text"), [
    (1.0, "1"), (1500, "1500"), (0.1, "0.1"), (1e-5, "0.00001"), (1e-7, "1e-7"),
    (1.5e-7, "1.5e-7"), (1e20, "100000000000000000000"), (1e21, "1e+21"),
    (123456789.125, "123456789.125"), (-0.0, "-0"), (2.0**60, "1152921504606847000"),
])
def test_go_float_format(value: float, text: str) -> None:
    assert plugin.go_json(value) == text


def test_go_string_escapes() -> None:
    assert plugin.go_json("a<b>&\n\t\"\\\x01\u2028é") == (
        '"a\\u003cb\\u003e\\u0026\\n\\t\\"\\\\\\u0001\\u2028é"')
    assert plugin.go_json({"b": 1, "a": None, "c": [True]}) == '{"a":null,"b":1,"c":[true]}'


@given(st.binary(min_size=16, max_size=16))
def test_ipv6_format_matches_rfc5952(raw: bytes) -> None:
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        assert plugin.format_ip(raw) == str(ipaddress.IPv4Address(raw[12:]))  # as Go
    else:
        assert plugin.format_ip(raw) == str(ipaddress.IPv6Address(raw))


@given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
def test_network_of_matches_ipaddress(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                      prefix: int) -> None:
    prefix = min(prefix, address.max_prefixlen)
    text, _, _ = plugin.network_of(f"{address}/{prefix}")
    expected = ipaddress.ip_interface(f"{address}/{prefix}").network
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return  # Go prints these as IPv4; covered by the formatting test
    assert text == str(expected)


# ----------------------------------------------------------------- install


def test_install_plugin(tmp_path: Path, box: Sandbox) -> None:
    path = install_plugin(tmp_path / "opt-cni-bin", python=sys.executable)
    assert path.name == "flannel"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert path.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    names = sorted(p.name for p in path.parent.iterdir())
    assert len(names) == 2 and names[0].startswith(CODE_PREFIX) and names[1] == "flannel"
    code = path.parent / names[0]
    assert (code / "flannel_plugin.py").read_bytes() == PLUGIN.read_bytes()
    assert [p.name for p in (code / "__pycache__").iterdir()] == [
        f"flannel_plugin.{sys.implementation.cache_tag}.pyc"]
    # Compiled without docstrings (optimize=2): the module sets no __doc__.
    pyc = next((code / "__pycache__").iterdir()).read_bytes()
    assert "__doc__" not in marshal.loads(pyc[16:]).co_names
    assert "__doc__" in compile(PLUGIN.read_text(), str(PLUGIN), "exec").co_names
    proc = subprocess.run([str(path)], input=b'{"cniVersion":"1.0.0"}', capture_output=True,
                          env={"CNI_COMMAND": "VERSION"}, timeout=30)
    assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"
    with pytest.raises(ValueError, match="whitespace"):
        launcher_text("/opt/my python/bin/python3", str(code))


def test_installed_plugin_runs_from_the_bytecode_compiled_at_install(tmp_path: Path) -> None:
    path = install_plugin(tmp_path / "bin", python=sys.executable)
    (code,) = path.parent.glob(CODE_PREFIX + "*")
    # Were the source compiled (or even read) at run time, this would be what runs.
    (code / "flannel_plugin.py").write_text("raise SystemExit('the source was compiled')\n")
    cache = sorted((code / "__pycache__").iterdir())
    proc = subprocess.run([str(path)], input=b'{"cniVersion":"1.0.0"}', capture_output=True,
                          env={"CNI_COMMAND": "VERSION"}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cniVersion"] == "1.0.0"
    assert sorted((code / "__pycache__").iterdir()) == cache


def test_path_helpers_match_os(tmp_path: Path) -> None:
    # The plugin avoids importing os; its stand-ins must behave as os.path/os.makedirs.
    for directory in ("", "/", "/var/lib/cni/flannel", "/var/lib/cni/flannel/", "rel/dir"):
        assert plugin.join_path(directory, "ctr1") == os.path.join(directory, "ctr1")
    nested = tmp_path / "a" / "b" / "c"
    plugin.make_dirs(f"{nested}/", 0o700)
    plugin.make_dirs(str(nested), 0o700)  # exists: fine
    assert stat.S_IMODE(nested.stat().st_mode) == 0o700
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~umask
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        plugin.make_dirs(str(tmp_path / "file"), 0o700)
    with pytest.raises(NotADirectoryError):
        plugin.make_dirs(str(tmp_path / "file" / "sub"), 0o700)
    assert plugin.is_file(str(tmp_path / "file")) and not plugin.is_file(str(nested))
    assert not plugin.is_file(str(tmp_path / "missing")) and not plugin.is_file("a\0b")
    assert plugin.environment() == dict(os.environ)


def _imported(argv: list[str], stdin: bytes, env: dict[str, str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", *argv], input=stdin,
                          env=env, capture_output=True, timeout=30)
    return {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines()
            if line.startswith("import time:") and "imported package" not in line}


def test_add_and_del_import_only_what_they_need(box: Sandbox) -> None:
    """Every import is start-up time on every call: beyond what the bare interpreter
    loads, ADD and DEL load only the C JSON scanner; `os`, `json`, `re`, `signal`,
    `subprocess` would each cost milliseconds, `__future__` 0.15 ms."""
    bare = _imported(["-c", "pass"], b"", {})
    assert "encodings" in bare  # the probe sees the interpreter's own imports
    for command in ("ADD", "DEL"):
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/x",
               "CNI_IFNAME": "eth0", "CNI_PATH": str(box.bin), "FAKE_DIR": str(box.fake),
               "PATH": "/usr/bin:/bin"}
        loaded = _imported([str(PLUGIN)], json.dumps(box.config()).encode(), env)
        assert (box.fake / f"{command}.json").exists()  # it did delegate
        assert loaded - bare == {"_json"}, command


def test_install_for_a_python_not_visible_here(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """An init container names the host's python, which it cannot run: the plugin is
    installed without bytecode, and its first call (on the host) writes the cache."""
    host_python = tmp_path / "host" / "python3"
    path = install_plugin(tmp_path / "bin", python=str(host_python))
    assert "bytecode is written by its first call" in capsys.readouterr().err
    (code,) = path.parent.glob(CODE_PREFIX + "*")
    assert (code / "flannel_plugin.py").is_file() and not (code / "__pycache__").exists()
    assert path.read_text().splitlines()[0] == f"#!{host_python} -IS"
    host_python.parent.mkdir()
    host_python.symlink_to(sys.executable)  # now "on the host"
    proc = subprocess.run([str(path)], input=b"{}", capture_output=True, timeout=30,
                          env={"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (code / "__pycache__").iterdir()] == [
        f"flannel_plugin.{sys.implementation.cache_tag}.pyc"]


def _plugin_release(tmp_path: Path, n: int, text: str | None = None) -> Path:
    source = tmp_path / f"release{n}" / "flannel_plugin.py"
    source.parent.mkdir()
    source.write_text(text if text is not None else PLUGIN.read_text() + f"# release {n}\n")
    return source


def test_upgrade_keeps_the_code_in_use_and_drops_older(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    seen = []
    for n in range(3):
        monkeypatch.setattr(install, "PLUGIN_SOURCE", _plugin_release(tmp_path, n))
        install_plugin(bin_dir, python=sys.executable)
        seen.append(sorted(p.name for p in bin_dir.glob(CODE_PREFIX + "*")))
        assert not list(bin_dir.glob("*.tmp*")) and not list(bin_dir.glob(".*.tmp*"))
        runs = subprocess.run([str(bin_dir / "flannel")], input=b"{}", capture_output=True,
                              env={"CNI_COMMAND": "VERSION"}, timeout=30)
        assert runs.returncode == 0, runs.stderr
    assert len(seen[0]) == 1
    assert len(seen[1]) == 2 and seen[0][0] in seen[1]
    # The third install keeps the second (the previous launcher used it), drops the first.
    assert len(seen[2]) == 2 and seen[0][0] not in seen[2]
    (current,) = set(seen[2]) - set(seen[1])
    assert f"{bin_dir}/{current}" in (bin_dir / "flannel").read_text()


def test_a_plugin_that_does_not_compile_is_not_installed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    install_plugin(bin_dir, python=sys.executable)
    before = (bin_dir / "flannel").read_bytes()
    monkeypatch.setattr(install, "PLUGIN_SOURCE", _plugin_release(tmp_path, 0, "def (:\n"))
    with pytest.raises(InstallError, match="cannot compile the plugin"):
        install_plugin(bin_dir, python=sys.executable)
    assert (bin_dir / "flannel").read_bytes() == before
    assert len(list(bin_dir.glob(CODE_PREFIX + "*"))) == 1
    assert not list(bin_dir.glob(".*.tmp*"))


def test_packaged_script_reexecs_under_isolated_python(tmp_path: Path) -> None:
    """The file's sh preamble (used by the venv's `flannel` command) runs the python3
    beside it with -I -S."""
    bindir = tmp_path / "venv-bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    script = bindir / "flannel"
    script.write_bytes(PLUGIN.read_bytes())
    script.chmod(0o755)
    probe = "import sys; print(sys.flags.isolated, sys.flags.no_site)"
    proc = subprocess.run([str(script)], input=b"", capture_output=True, timeout=30,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})
    assert json.loads(proc.stdout)["cniVersion"] == "1.1.0"
    flags = subprocess.run([str(bindir / "python3"), "-I", "-S", "-c", probe],
                           capture_output=True, text=True, timeout=30).stdout.split()
    assert flags == ["1", "1"]


def test_install_conf_is_an_atomic_copy(tmp_path: Path) -> None:
    src = tmp_path / "cni-conf.json"
    src.write_text('{"name":"cbr0"}')
    dst = tmp_path / "etc" / "cni" / "net.d" / "10-flannel.conflist"
    install_conf(src, dst)
    assert dst.read_text() == '{"name":"cbr0"}'
    src.write_text('{"name":"cbr1"}')
    install_conf(src, dst)
    assert dst.read_text() == '{"name":"cbr1"}'
    assert sorted(p.name for p in dst.parent.iterdir()) == ["10-flannel.conflist"]
