"""A private containerd (Debian's) for running the image with `ctr run`.

Its root, state, sockets and runc state are under one temp directory, and it runs in a
private mount namespace with a tmpfs on /run/containerd, where containerd 1.6 puts shim
sockets whatever its config says: nothing of it is visible to, or collides with, any
other containerd on the machine. The CRI plugin is off (this is for `ctr`). Images go in
only through import_verified(), which runs trust.verify() first (containerd 1.6 does
not check signatures on import). Containers run in their own network namespace (no
--net-host), so the root namespace is never touched. stop() ends it by PID and removes
the cgroups its containers' namespace left in every hierarchy.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from pyflannel_lab.image.trust import verify
from pyflannel_lab.netns import OwnedProcess

CGROUP_ROOT = Path("/sys/fs/cgroup")


class ContainerdError(RuntimeError):
    """containerd or ctr failed; the message has their stderr."""


class PrivateContainerd(OwnedProcess):
    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "containerd.sock"
        self.namespace = f"pyflannel-{secrets.token_hex(4)}"

    def start(self, timeout: float = 30.0) -> None:
        for tool in ("containerd", "ctr", "runc", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                raise ContainerdError(f"{tool} is not installed (scripts/setup.sh installs it)")
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base / "root"}"\n'
            f'state = "{self.base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n')
        log = (self.base / "containerd.log").open("wb")
        script = ('mount -t tmpfs -o mode=0711 tmpfs /run/containerd && '
                  'exec containerd --config "$1"')
        Path("/run/containerd").mkdir(exist_ok=True)  # the mountpoint (Debian's path)
        self._proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                       "sh", "-c", script, "sh", str(config)],
                                      stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ContainerdError("containerd exited: "
                                      + (self.base / "containerd.log").read_text()[-2000:])
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise ContainerdError(f"containerd did not answer on {self.socket} in {timeout} s")

    def ctr(self, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # In containerd's mount namespace: ctr makes the stdio fifos under /run/containerd,
        # which must be the private tmpfs the shim sees.
        assert self.pid is not None, "containerd is not running"
        proc = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "ctr", "--address",
                               str(self.socket), "--namespace", self.namespace, *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed ({proc.returncode}): "
                                  f"{proc.stderr.strip()}")
        return proc

    def import_verified(self, archive: Path, pubkey: Path) -> str:
        """Verify (signature, digests) and only then import; return the image name."""
        verify(archive, pubkey)
        out = self.ctr("images", "import", str(archive)).stdout
        names = self.ctr("images", "list", "--quiet").stdout.split()
        if not names:
            raise ContainerdError(f"ctr images import imported nothing: {out.strip()}")
        return names[0]

    def run(self, image: str, *argv: str, mounts: tuple[str, ...] = (),
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm` one command in a new container; returns its output and status."""
        args = ["run", "--rm", "--runc-root", str(self.base / "runc")]
        for mount in mounts:
            args += ["--mount", mount]
        return self.ctr(*args, image, f"t-{secrets.token_hex(4)}", *argv, check=False,
                        timeout=timeout)

    def stop(self, grace: float = 10.0) -> None:
        super().stop(grace)
        # runc removes each container's cgroup; the namespace's parent stays: remove it.
        if CGROUP_ROOT.is_dir():
            for hierarchy in [CGROUP_ROOT, *CGROUP_ROOT.iterdir()]:
                leftover = hierarchy / self.namespace
                if leftover.is_dir():
                    for child in sorted(leftover.rglob("*"), reverse=True):
                        if child.is_dir():
                            os.rmdir(child)
                    os.rmdir(leftover)
