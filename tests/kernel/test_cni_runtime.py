"""The flannel CNI plugin installed with its own runtime (what the image's
`pyflannel install-cni` does) runs where the host has no Python at all.

The runtime is built from this machine's Debian python3.11 by the image builder's own
function, installed by the product's installer, then every ADD/DEL runs in a private
mount namespace where /usr/lib/python3*, /usr/local/lib/python3*, pyenv and every
python3 executable are hidden: pods still get addresses on cni0 and reach each other."""

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

from pyflannel.cni.install import (
    LAUNCHER,
    PLUGIN_SOURCE,
    RUNTIME_MANIFEST,
    RUNTIME_PREFIX,
    InstallError,
    install_plugin_with_runtime,
)
from pyflannel_lab.image.pylayer import build_cni_runtime, host_plugin_modules
from pyflannel_lab.netns import NetNamespace

CNI_BIN = Path("/usr/lib/cni")
SUBNET_ENV = ("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
              "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                       or shutil.which("unshare") is None,
                       reason="needs root, iproute2 and unshare"),
    pytest.mark.skipif(not (CNI_BIN / "bridge").exists(),
                       reason="needs containernetworking-plugins in /usr/lib/cni"),
    pytest.mark.skipif(not Path("/usr/bin/python3.11").exists()
                       or shutil.which("patchelf") is None,
                       reason="needs Debian's python3.11 and patchelf (scripts/setup.sh)"),
]

# Runs in a private mount namespace: hide every Python of the host, prove it is hidden,
# then run the plugin in the node's network namespace (LD_DEBUG for the plugin only).
HIDE_PYTHON = r"""
set -e
for d in /usr/lib/python3 /usr/lib/python3.11 /usr/local/lib/python3.11 /root/.pyenv; do
  [ -d "$d" ] && mount -t tmpfs -o size=1m tmpfs "$d"
done
for f in /usr/bin/python3* /usr/local/bin/python3*; do
  [ -f "$f" ] && mount --bind /dev/null "$f"
done
if python3 -c pass 2>/dev/null; then echo "a python3 is still visible" >&2; exit 97; fi
exec ip netns exec "$NODE" env ${PLUGIN_LD_DEBUG:+LD_DEBUG=$PLUGIN_LD_DEBUG} "$PLUGIN"
"""


@dataclass
class HostLab:
    node: NetNamespace
    pods: list[NetNamespace]
    bin_dir: Path
    tmp: Path

    def config(self) -> bytes:
        return json.dumps({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": str(self.tmp / "subnet.env"), "dataDir": str(self.tmp / "flannel"),
            "ipam": {"dataDir": str(self.tmp / "ipam")},
            "delegate": {"hairpinMode": True, "isDefaultGateway": True},
        }).encode()

    def call(self, command: str, pod: int,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NODE": self.node.name,
               "PLUGIN": str(self.bin_dir / "flannel"), "CNI_COMMAND": command,
               "CNI_CONTAINERID": f"pod{pod}", "CNI_NETNS": self.pods[pod].path,
               "CNI_IFNAME": "eth0", "CNI_PATH": f"{self.bin_dir}:{CNI_BIN}",
               **(extra_env or {})}
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               HIDE_PYTHON], input=self.config(), env=env,
                              capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNI runtime made from this machine's Debian python, as the image build makes one."""
    path = tmp_path_factory.mktemp("runtime") / "cni-runtime"
    build_cni_runtime(Path("/"), path, host_plugin_modules(PLUGIN_SOURCE))
    return path


@pytest.fixture
def lab(tmp_path: Path, runtime: Path,
        netns_factory: Callable[[str], NetNamespace]) -> Iterator[HostLab]:
    bin_dir = tmp_path / "opt-cni-bin"
    install_plugin_with_runtime(bin_dir, runtime=runtime)
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    yield HostLab(netns_factory("pfrnode"), [netns_factory("pfrpod"), netns_factory("pfrpod")],
                  bin_dir, tmp_path)


def test_plugin_needs_no_python_of_the_host(lab: HostLab) -> None:
    results = []
    for pod in range(2):
        proc = lab.call("ADD", pod)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results.append(json.loads(proc.stdout))
    ips = [r["ips"][0]["address"] for r in results]
    assert sorted(ips) == ["10.244.1.2/24", "10.244.1.3/24"]
    for pod, ip in zip(lab.pods, ips, strict=True):
        info = json.loads(pod.ip("-j", "addr", "show", "dev", "eth0").stdout)
        assert f"{info[0]['addr_info'][0]['local']}/24" == ip
    # Pod to pod across cni0 (iproute2 has no ping; a TCP connect is the check).
    server_ip = ips[1].split("/")[0]
    server = subprocess.Popen(lab.pods[1].exec_args(
        sys.executable, "-c", "import socket,sys; s=socket.create_server((sys.argv[1], 7000));"
        "print('up', flush=True); c,_=s.accept(); c.sendall(b'pong')", server_ip),
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        reply = lab.pods[0].run(sys.executable, "-c",
                                "import socket,sys; print(socket.create_connection("
                                "(sys.argv[1], 7000), timeout=10).recv(4).decode())", server_ip)
        assert reply.stdout.strip() == "pong"
    finally:
        server.kill()
        server.wait()
    for pod in range(2):
        proc = lab.call("DEL", pod)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert lab.pods[pod].ip("link", "show", "eth0", check=False).returncode != 0


def test_every_shared_object_comes_from_the_runtime(lab: HostLab) -> None:
    # VERSION runs no delegate: every object initialised is the interpreter's.
    proc = lab.call("VERSION", 0, {"PLUGIN_LD_DEBUG": "libs"})
    assert proc.returncode == 0, proc.stderr
    loaded = [line.split("calling init: ", 1)[1].strip()
              for line in proc.stderr.decode().splitlines() if "calling init: " in line]
    runtime_dir = next(lab.bin_dir.glob(RUNTIME_PREFIX + "*"))
    assert any(p.endswith("/libc.so.6") for p in loaded), proc.stderr
    assert any("_json" in p for p in loaded), proc.stderr  # an extension module, dlopen()ed
    outside = [p for p in loaded if not p.startswith(f"{runtime_dir}/")]
    assert outside == [], outside


def test_upgrade_keeps_the_runtime_in_use_and_drops_older_ones(tmp_path: Path,
                                                               runtime: Path) -> None:
    bin_dir = tmp_path / "bin"
    versions = []
    for n in range(3):
        copy = tmp_path / f"rt{n}"
        shutil.copytree(runtime, copy, symlinks=True)
        manifest = json.loads((copy / RUNTIME_MANIFEST).read_text())
        manifest[f"release-{n}"] = manifest[LAUNCHER]  # another runtime id
        (copy / f"release-{n}").symlink_to(copy / LAUNCHER)
        (copy / RUNTIME_MANIFEST).write_text(json.dumps(manifest))
        install_plugin_with_runtime(bin_dir, runtime=copy)
        versions.append(sorted(p.name for p in bin_dir.glob(RUNTIME_PREFIX + "*")))
        assert not list(bin_dir.glob("*.tmp*")) and not list(bin_dir.glob(".*.tmp*"))
    assert len(versions[0]) == 1
    assert len(versions[1]) == 2 and versions[0][0] in versions[1]
    # The third install keeps the second (the previous plugin used it), drops the first.
    assert len(versions[2]) == 2 and versions[0][0] not in versions[2]
    first_line = (bin_dir / "flannel").read_text().splitlines()[0]
    runtime_of_plugin = first_line.split()[0].removeprefix("#!").split("/")[-3]
    assert runtime_of_plugin in versions[2] and runtime_of_plugin not in versions[1]


def test_a_failed_install_leaves_the_working_plugin(tmp_path: Path, runtime: Path) -> None:
    bin_dir = tmp_path / "bin"
    install_plugin_with_runtime(bin_dir, runtime=runtime)
    before = (bin_dir / "flannel").read_bytes()
    broken = tmp_path / "broken"
    shutil.copytree(runtime, broken, symlinks=True)
    manifest = json.loads((broken / RUNTIME_MANIFEST).read_text())
    manifest["lib/libc.so.6"] = "0" * 64  # the copy will not match: install must stop
    (broken / RUNTIME_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InstallError, match="content differs"):
        install_plugin_with_runtime(bin_dir, runtime=broken)
    assert (bin_dir / "flannel").read_bytes() == before
    assert len(list(bin_dir.glob(RUNTIME_PREFIX + "*"))) == 1
    version = subprocess.run([str(bin_dir / "flannel")], env={"CNI_COMMAND": "VERSION"},
                             input=b"{}", capture_output=True)
    assert version.returncode == 0 and b"supportedVersions" in version.stdout


def test_missing_runtime_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="not the pyflannel image: pass --python"):
        install_plugin_with_runtime(tmp_path / "bin", runtime=tmp_path / "nothing")


def test_the_launcher_reads_no_python_module_from_disk(lab: HostLab) -> None:
    """The launcher starts CPython only to its core: the one file it reads besides the
    script and the plugin's bytecode is `_json`'s shared object (no encodings, no io)."""
    script = (lab.bin_dir / "flannel").read_text()
    assert script.startswith("#!") and script.splitlines()[0].endswith("/" + LAUNCHER)
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace")
    proc = subprocess.run([strace, "-f", "-e", "trace=open,openat,stat,newfstatat",
                           str(lab.bin_dir / "flannel")], input=b"{}",
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True)
    assert proc.returncode == 0 and b"supportedVersions" in proc.stdout, proc.stderr
    opened = [line for line in proc.stderr.decode().splitlines()
              if line.startswith(("open", "stat", "newfstatat")) and "ENOENT" not in line]
    python_files = [line for line in opened if ".py" in line and "flannel_plugin" not in line]
    assert python_files == [], python_files
    assert any("_json" in line for line in opened), opened


@pytest.mark.parametrize(("script", "message"), [
    ("code /nonexistent/plugin.pyc\ndynload /nonexistent\n",
     "cannot read the plugin's bytecode: No such file or directory"),
    ("dynload /nonexistent\n", "the plugin script has no code or dynload line"),
    ("code {bad}\ndynload /nonexistent\n", "the plugin's bytecode is not for this Python"),
    ("code {junk}\ndynload /nonexistent\n", "the plugin's bytecode does not load"),
])
def test_launcher_failures_are_cni_errors(tmp_path: Path, runtime: Path, script: str,
                                          message: str) -> None:
    bin_dir = tmp_path / "bin"
    install_plugin_with_runtime(bin_dir, runtime=runtime)
    first = (bin_dir / "flannel").read_text().splitlines()[0]
    (tmp_path / "bad.pyc").write_bytes(b"\x00\x01\r\n" + bytes(12) + b"c")
    (tmp_path / "junk.pyc").write_bytes(b"\xa7\r\r\n" + bytes(12) + b"\xff\xff")
    plugin = tmp_path / "flannel"
    plugin.write_text(first + "\n" + script.format(bad=tmp_path / "bad.pyc",
                                                   junk=tmp_path / "junk.pyc"))
    plugin.chmod(0o755)
    proc = subprocess.run([str(plugin)], input=b"{}", env={"CNI_COMMAND": "VERSION"},
                          capture_output=True)
    assert proc.returncode == 1
    error = json.loads(proc.stdout)
    assert error["code"] == 999 and message in error["msg"], error
