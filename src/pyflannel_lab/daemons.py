"""The flanneld processes of a lab cluster: their command lines and their lives. A mixin of
Cluster: each node's daemon runs inside the node's namespace, logs to the node's work
directory, and is stopped by PID.

WireGuard nodes need more than a network namespace: wireguard-go (and `wg`) put the UAPI
socket at the fixed path /var/run/wireguard/<dev>.sock, and the lab's nodes share one
filesystem. So each node's daemon, and every command run "as the node" (`node_exec_args`),
gets a private bind mount of the node's own directory over /run/wireguard: `ip netns exec`
already runs its command in a new mount namespace (with / a slave of the host's), so the
mount stays inside that process tree and goes away with it; wireguard-go, the daemon's
child, inherits it. Every mount of the same directory reaches the same socket, so a command
run later (or a restarted daemon) sees the node's running wireguard-go. Each node also gets
its own private key file (WIREGUARD_KEY_FILE) in its work directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pyflannel_lab.netns import run, stop_process

if TYPE_CHECKING:
    from pyflannel_lab.cluster import LabNode, LabStore

WIREGUARD_RUN_DIR = Path("/run/wireguard")  # wireguard-go: /var/run/wireguard, /var/run -> /run
# `sh -c` with the node's directory as $0: the bind mount, then the command itself.
_MOUNT_AND_EXEC = 'mount --bind "$0" /run/wireguard && exec "$@"'


class Daemons:
    store: LabStore
    flanneld_args: list[str]
    wireguard_dirs: bool  # each node gets its own /run/wireguard and key file
    wireguard_impl: str | None  # PYFLANNEL_WIREGUARD for the daemons (None: theirs)

    def flanneld_argv(self, node: LabNode) -> list[str]:
        return [sys.executable, "-m", "pyflannel.daemon.main", *self.store.flanneld_args(node),
                f"--subnet-file={node.subnet_file}", *self.flanneld_args, *node.extra_args]

    # -- a node's own view: its netns, and with wireguard its own /run/wireguard ---------

    def wireguard_dir(self, node: LabNode) -> Path:
        """What the node sees as /run/wireguard (its wireguard-go's UAPI sockets)."""
        return node.workdir / "wireguard"

    def wireguard_key_file(self, node: LabNode) -> Path:
        return node.workdir / "wgkey"

    def node_exec_args(self, node: LabNode, *cmd: str) -> list[str]:
        """The argv that runs `cmd` as on the node: in its netns, and (wireguard) with its
        own /run/wireguard."""
        if not self.wireguard_dirs:
            return node.ns.exec_args(*cmd)
        self.wireguard_dir(node).mkdir(mode=0o700, exist_ok=True)
        return node.ns.exec_args("sh", "-c", _MOUNT_AND_EXEC, str(self.wireguard_dir(node)),
                                 *cmd)

    def node_run(self, node: LabNode, *cmd: str, check: bool = True, timeout: float = 60,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.node_exec_args(node, *cmd), check=check, timeout=timeout, env=env)

    def status_argv(self, node: LabNode) -> list[str]:
        """`pyflannel status --check` with the node daemon's own flags."""
        return [sys.executable, "-m", "pyflannel.cli", "status", "--check",
                *self.flanneld_argv(node)[3:]]  # without "python -m pyflannel.daemon.main"

    def daemon_env(self, node: LabNode) -> dict[str, str]:
        """The environment of the node's daemon (and of `pyflannel status` on the node)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.store.node_env(node), **node.env}
        if self.wireguard_dirs:
            env["WIREGUARD_KEY_FILE"] = str(self.wireguard_key_file(node))
            if self.wireguard_impl is not None:
                env["PYFLANNEL_WIREGUARD"] = self.wireguard_impl
        return env

    # -- lives ---------------------------------------------------------------------------

    def start_daemon(self, node: LabNode) -> None:
        if node.proc is not None and node.proc.poll() is None:
            return
        with open(node.log_file, "ab") as logf:
            node.proc = subprocess.Popen(self.node_exec_args(node, *self.flanneld_argv(node)),
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         env=self.daemon_env(node))

    def stop_daemon(self, node: LabNode, *, sig: int = signal.SIGTERM,
                    timeout: float = 10) -> int | None:
        proc, node.proc = node.proc, None
        return stop_process(proc, grace=timeout, sig=sig)


def wireguard_mount_point_in_use() -> bool:
    """Whether any process's mount namespace has a mount on /run/wireguard (another lab's
    node): then the empty host directory must stay, since removing a mount point detaches
    the mounts on it in every other namespace."""
    target = str(WIREGUARD_RUN_DIR)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            mounts = (proc / "mountinfo").read_text()
        except OSError:
            continue  # gone meanwhile
        if any(line.split()[4] == target for line in mounts.splitlines()
               if len(line.split()) > 4):
            return True
    return False
