"""`pyflannel lab up --kubernetes` as a person uses it: the CLI, `lab kubectl`, `lab exec`,
and `lab down` after the supervisor was killed (a crash) removing everything: processes
by their recorded PIDs, namespaces, cgroups in every hierarchy, mountpoints, directories.

Needs root and the binaries of scripts/build-kubernetes.sh; about a minute (one node, no
flannel: the walk-through itself is test_kubelet_walkthrough.py).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubelab_marks import KUBELET_LAB, other_kube_labs

from pyflannel_lab.nodehost import CGROUP_ROOT, KUBELET_SYSCTLS, PRIVATE_DIRS, PRIVATE_FILES

pytestmark = KUBELET_LAB


def lab(label: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyflannel_lab.cli", "--label", label, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_up_kubectl_exec_then_down_after_a_crash_leaves_nothing() -> None:
    from pyflannel_lab.session import kube_state_path, read_state

    sysctls = {k: (Path("/proc/sys") / k).read_text() for k in KUBELET_SYSCTLS}
    paths_before = [p for p in PRIVATE_DIRS + PRIVATE_FILES if Path(p).exists()]
    label = f"test-{secrets.token_hex(3)}"
    try:
        up = lab(label, "up", "--kubernetes", "--nodes", "1", "--no-flannel")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "node1: namespace" in up.stdout
        kube = json.loads(kube_state_path(label).read_text())
        st = read_state(label)
        assert st is not None
        # kubectl with the lab's kubeconfig: the kubelet registered (NotReady: no CNI yet).
        deadline = time.monotonic() + 60
        while "node1" not in (out := lab(label, "kubectl", "get", "nodes").stdout):
            assert time.monotonic() < deadline, out
            time.sleep(1)
        assert "NotReady" in out
        # exec on the node: its UTS name, its private /var/lib/kubelet, its containerd.
        ex = lab(label, "exec", "node1", "--", "sh", "-c",
                 "hostname; ls /var/lib/kubelet; ctr -n k8s.io images ls -q")
        assert ex.returncode == 0, ex.stderr
        words = ex.stdout.split()
        assert words[0] == "node1" and "pods" in words and "k8s.gcr.io/pause:3.2" in words
        assert lab(label, "exec", "node9", "--", "true").returncode == 1
        # The crash: the supervisor dies; kubelet, containerd, the control plane run on.
        os.kill(int(st["pid"]), signal.SIGKILL)
        time.sleep(0.5)
        assert any(CGROUP_ROOT.glob(f"*/{kube['name']}-node1"))
        down = lab(label, "down", timeout=120)
        assert down.returncode == 0, down.stderr
        assert "Left behind by a crash" in down.stdout
    finally:
        lab(label, "down", timeout=120)
    name = kube["name"]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ln for ln in netns.splitlines() if ln.startswith(f"{name}-")]
    assert not list(CGROUP_ROOT.glob(f"*/{name}-*"))
    # No process names the lab's directories (kubelet, containerd, the control plane);
    # the anchors died with the namespaces.
    marks = [kube["workdir"], *kube["dirs"]]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(m in text for m in marks), text
    if not other_kube_labs(label):  # no mountpoint of ours stays behind
        assert {p for p in PRIVATE_DIRS + PRIVATE_FILES if Path(p).exists()} <= \
            set(paths_before)
    assert not Path(kube["workdir"]).exists()
    assert not kube_state_path(label).parent.exists()
    assert {k: (Path("/proc/sys") / k).read_text() for k in KUBELET_SYSCTLS} == sysctls
