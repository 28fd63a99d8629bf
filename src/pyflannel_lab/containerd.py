"""Debian's containerd (CRI on) for one lab node, run inside the node's namespaces.

Its root, state and socket are the usual /var/lib/containerd and /run/containerd, which
inside the node are bind mounts of the node's own directories (nodehost.py), so `ctr`
typed on the node works as on a real machine. Settings this machine needs:
`restrict_oom_score_adj` (no CAP_SYS_RESOURCE here: runc could not lower oom_score_adj),
`netns_mounts_under_state_dir` (pod netns files stay out of the machine's /run/netns),
runc's state root and the `opt` plugin's directory in the node's own directory.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pyflannel_lab.netns import OwnedProcess
from pyflannel_lab.nodehost import NodeHost
from pyflannel_lab.pauseimage import PAUSE_IMAGE

SOCKET = "/run/containerd/containerd.sock"
CONTAINERD_BIN = "/usr/bin/containerd"
CRI = 'plugins."io.containerd.grpc.v1.cri"'


class ContainerdError(RuntimeError):
    pass


def containerd_config(workdir: Path, sandbox_image: str = PAUSE_IMAGE) -> str:
    runc = f"{CRI}.containerd.runtimes.runc"
    return f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "{SOCKET}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{workdir / 'opt'}"
  [{CRI}]
    sandbox_image = "{sandbox_image}"
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [{CRI}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [{runc}]
        runtime_type = "io.containerd.runc.v2"
        [{runc}.options]
          SystemdCgroup = false
          Root = "{workdir / 'runc'}"
    [{CRI}.cni]
      bin_dir = "/opt/cni/bin"
      conf_dir = "/etc/cni/net.d"
"""


class Containerd(OwnedProcess):
    """containerd on `host`: start(), import_image(), stop()."""

    def __init__(self, host: NodeHost, workdir: Path) -> None:
        self.host, self.workdir = host, workdir
        self.config = workdir / "containerd.toml"
        self.log_path = workdir / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(containerd_config(self.workdir))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.host.exec_args(CONTAINERD_BIN, "--config", str(self.config)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.ctr("version", check=False).returncode != 0:
            if not self.running or time.monotonic() > deadline:
                raise ContainerdError(f"{self.host.hostname}: containerd did not start; "
                                      f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def ctr(self, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.host.run("ctr", "--address", SOCKET, *args, check=check, timeout=timeout)

    def import_image(self, archive: Path) -> str:
        """Imports an OCI archive into the k8s.io namespace (the one CRI uses)."""
        return self.ctr("-n", "k8s.io", "images", "import", str(archive)).stdout

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""
