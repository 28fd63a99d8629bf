"""A Kubernetes node's "machine" for the kubelet lab: a network namespace plus its own
mount and UTS namespaces, held by one long-lived anchor process.

containerd and kubelet must share one mount namespace (runc has to see the volumes
kubelet mounts), so both are started with `nsenter -t <anchor>`. Inside that namespace:
- every host path kubelet, containerd, CNI and flannel hard-code is a bind mount of a
  directory of the node's own (the node never writes the machine's /var/lib/kubelet, ...);
- /sys/fs/cgroup is mounted again (`ip netns exec` gives a fresh /sys that hides it, and
  runc then finds no cgroup mount);
- the /proc/sys files kubelet "fixes" on start (kernel.panic, vm.overcommit_memory, ...)
  are covered by small files that already hold kubelet's values: those settings are
  global, not per namespace, and kubelet would otherwise change them for the whole machine.
A UTS namespace of its own makes `hostname` in hostNetwork pods the node's name.

The mountpoints have to exist on the root filesystem: the ones we create are recorded so
`lab down` removes them. Cgroups kubelet creates live under `/<cgroup_name>` in every
hierarchy; `remove_cgroups` kills what is left in them and removes them.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from pyflannel_lab.netns import NetNamespace, stop_process

# Directories the node's programs write that are fixed paths on a real machine.
PRIVATE_DIRS = ("/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/etc/cni/net.d",
                "/opt/cni/bin", "/run/flannel", "/var/lib/cni", "/var/lib/containerd",
                "/run/containerd")
PRIVATE_FILES = ("/run/xtables.lock",)
# What kubelet v1.20 sets at start-up (its setupNode): with these values already in place
# it writes nothing.
KUBELET_SYSCTLS = {"kernel/panic": "10", "kernel/panic_on_oops": "1",
                   "vm/overcommit_memory": "1", "vm/panic_on_oom": "0",
                   "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}
CGROUP_ROOT = Path("/sys/fs/cgroup")


class NodeHostError(RuntimeError):
    pass


def cgroup_mounts() -> list[tuple[str, str, str]]:
    """(fstype, options, mountpoint) of the machine's cgroup hierarchies."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) > 4 and len(rfields) > 2 and rfields[0] in ("cgroup", "cgroup2") \
                and fields[4].startswith(f"{CGROUP_ROOT}/"):
            opts = ",".join(o for o in rfields[2].split(",") if o not in ("rw", "ro"))
            out.append((rfields[0], opts, fields[4]))
    return out


def make_mountpoints(paths: Iterable[str], files: Iterable[str]) -> list[str]:
    """Creates the missing mountpoints on the root filesystem; returns what it created
    (deepest last), for remove_mountpoints."""
    created: list[str] = []
    for p in paths:
        missing = []
        q = Path(p)
        while not q.exists():
            missing.append(str(q))
            q = q.parent
        for m in reversed(missing):
            os.mkdir(m, 0o755)
            created.append(m)
    for f in files:
        if not Path(f).exists():
            Path(f).touch(0o600)
            created.append(f)
    return created


def remove_mountpoints(created: Iterable[str]) -> None:
    """Removes what make_mountpoints created, deepest first, if still empty."""
    for p in sorted(created, key=len, reverse=True):
        with contextlib.suppress(OSError):
            if Path(p).is_dir():
                os.rmdir(p)
            elif Path(p).is_file() and Path(p).stat().st_size == 0:
                os.unlink(p)


def make_cgroup(name: str) -> None:
    """`/<name>` in every hierarchy (cpuset needs its cpus and mems before use)."""
    for _, opts, mnt in cgroup_mounts():
        d = Path(mnt) / name
        d.mkdir(exist_ok=True)
        if "cpuset" in opts.split(","):
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((Path(mnt) / f).read_text())


def remove_cgroups(pattern: str, timeout: float = 10) -> int:
    """Kills every process in the cgroups `/<pattern>` (a glob) of every hierarchy (only
    the lab's own pods can be there: its names carry a random part) and removes them."""
    roots = [d for _, _, mnt in cgroup_mounts() for d in Path(mnt).glob(pattern)
             if d.is_dir()]
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for r in roots:
            for procs in r.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in procs.read_text().split())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    removed = 0
    for r in roots:
        for d in sorted((p for p in r.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            r.rmdir()
            removed += 1
    return removed


class NodeHost:
    """The anchor process of one node and the namespaces it holds. start(), stop()."""

    def __init__(self, ns: NetNamespace, hostname: str, workdir: Path) -> None:
        self.ns, self.hostname, self.workdir = ns, hostname, workdir
        self.private = workdir / "host"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise NodeHostError(f"{self.hostname}: the node is not running")
        return self._proc.pid

    def private_path(self, host_path: str) -> Path:
        """Where `host_path` of the node is in the machine's view."""
        return self.private / host_path.strip("/").replace("/", "_")

    def _script(self) -> str:
        lines = ["set -e", f"hostname {shlex.quote(self.hostname)}",
                 f"mount -t tmpfs -o mode=755 cgroup {CGROUP_ROOT}"]
        for fstype, opts, mnt in cgroup_mounts():
            o = f"-o {shlex.quote(opts)} " if opts else ""
            lines += [f"mkdir -p {mnt}", f"mount -t {fstype} {o}{fstype} {mnt}"]
        for p in PRIVATE_DIRS + PRIVATE_FILES:
            lines.append(f"mount --bind {self.private_path(p)} {p}")
        for key in KUBELET_SYSCTLS:
            lines.append(f"mount --bind {self.private / 'sysctl' / key.replace('/', '.')} "
                         f"/proc/sys/{key}")
        return "\n".join(lines + ["echo ready", "exec sleep infinity"])

    def start(self) -> None:
        self.private.mkdir(parents=True, exist_ok=True)
        for p in PRIVATE_DIRS:
            self.private_path(p).mkdir(exist_ok=True)
        for f in PRIVATE_FILES:
            self.private_path(f).touch()
        sysctl = self.private / "sysctl"
        sysctl.mkdir(exist_ok=True)
        for key, value in KUBELET_SYSCTLS.items():
            (sysctl / key.replace("/", ".")).write_text(value + "\n")
        with open(self.workdir / "anchor.log", "ab") as log:
            # `ip netns exec` and unshare both exec: the PID stays the anchor's.
            self._proc = subprocess.Popen(
                self.ns.exec_args("unshare", "--mount", "--uts", "--propagation", "private",
                                  "sh", "-c", self._script()),
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != b"ready":
            self._proc.wait(5)
            raise NodeHostError(f"{self.hostname}: setting up the node's mounts failed: "
                                f"{(self.workdir / 'anchor.log').read_text()[-1000:]}")

    def exec_args(self, *cmd: str) -> list[str]:
        """argv running `cmd` on the node: its network, mount and UTS namespaces."""
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "-u", "--", *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.exec_args(*cmd), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise NodeHostError(f"{self.hostname}: {' '.join(cmd)} failed "
                                f"({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return proc

    def stop(self) -> None:
        """The anchor goes; the namespaces and mounts go with the last process in them."""
        proc, self._proc = self._proc, None
        stop_process(proc, grace=2, sig=signal.SIGKILL)
