"""`pyflannel lab up|show|add-node|remove-node|graph|status|down`, end to end, as a user
runs them (each command a separate process), and `lab down` after a crash."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (scripts/setup.sh)"),
    pytest.mark.etcd,
]


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


class Lab:
    def __init__(self, state_dir: Path, label: str) -> None:
        self.state_dir, self.label = state_dir, label

    def __call__(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pyflannel.cli", "lab", "--label", self.label, *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYFLANNEL_LAB_DIR": str(self.state_dir)})

    @property
    def name(self) -> str:
        state = json.loads((self.state_dir / f"{self.label}.json").read_text())
        return str(state["name"])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "state", "t")
    yield lab
    lab("down", timeout=120)  # also when the test failed half-way


def test_up_add_remove_graph_status_down(lab: Lab, tmp_path: Path) -> None:
    r = lab("up", "--nodes", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Waiting for every node's lease and routes" in r.stdout  # progress is shown
    assert "node1 (" in r.stdout and "$ ip route" in r.stdout
    assert "Pod to pod keeps the pod IP" in r.stdout
    name = lab.name
    assert len(namespaces(f"{name}-")) >= 5  # switch, 2 nodes, 2 pods, outside

    r = lab("add-node")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node3 joins" in r.stdout
    assert "node1: + 10.244." in r.stdout and "node2: + 10.244." in r.stdout
    assert r.stdout.count("node3: + 10.244.") == 2  # node3 learns both peers

    r = lab("remove-node", "node1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "node2: - 10.244." in r.stdout and "node3: - 10.244." in r.stdout

    svg = tmp_path / "lab.svg"
    r = lab("graph", "--out", str(svg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert ET.parse(svg).getroot().tag.endswith("svg")
    assert "node2" in svg.read_text() and "node3" in svg.read_text()
    assert "node1" not in svg.read_text()

    r = lab("status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("match the leases") == 2

    r = lab("down")
    assert r.returncode == 0 and "nothing of it is left" in r.stdout
    assert namespaces(f"{name}-") == []
    assert not list(lab.state_dir.glob("t.*"))


def test_down_after_a_crash_removes_everything(lab: Lab) -> None:
    r = lab("up", "--nodes", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    name = lab.name
    pid = json.loads((lab.state_dir / "t.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # the supervisor dies; namespaces and daemons stay
    time.sleep(0.5)
    assert namespaces(f"{name}-")
    r = lab("show")
    assert r.returncode != 0 and "no lab" in r.stderr
    r = lab("down")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "namespace(s) left behind" in r.stdout
    assert namespaces(f"{name}-") == []


def test_a_second_up_is_refused_while_one_runs(lab: Lab) -> None:
    assert lab("up", "--nodes", "1").returncode == 0
    r = lab("up", "--nodes", "1")
    assert r.returncode == 1 and "already up" in r.stderr
