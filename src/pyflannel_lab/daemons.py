"""The flanneld processes of a lab cluster: their command lines and their lives. A mixin of
Cluster: each node's daemon runs inside the node's namespace, logs to the node's work
directory, and is stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from pyflannel_lab.netns import stop_process

if TYPE_CHECKING:
    from pyflannel_lab.cluster import LabNode, LabStore


class Daemons:
    store: LabStore
    flanneld_args: list[str]

    def flanneld_argv(self, node: LabNode) -> list[str]:
        return [sys.executable, "-m", "pyflannel.daemon.main", *self.store.flanneld_args(node),
                f"--subnet-file={node.subnet_file}", *self.flanneld_args, *node.extra_args]

    def start_daemon(self, node: LabNode) -> None:
        if node.proc is not None and node.proc.poll() is None:
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.store.node_env(node), **node.env}
        with open(node.log_file, "ab") as logf:
            node.proc = subprocess.Popen(node.ns.exec_args(*self.flanneld_argv(node)),
                                         stdout=logf, stderr=subprocess.STDOUT, env=env)

    def stop_daemon(self, node: LabNode, *, sig: int = signal.SIGTERM,
                    timeout: float = 10) -> int | None:
        proc, node.proc = node.proc, None
        return stop_process(proc, grace=timeout, sig=sig)

