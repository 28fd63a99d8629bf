"""Network namespaces the lab and the tests create for themselves.

Every namespace gets a random suffix so that concurrent runs (and other users of
the machine) never collide, and every creation is paired with a deletion. Nothing
here touches the root network namespace: links are created inside a namespace or
moved into one at once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


def unique_name(prefix: str) -> str:
    """A namespace name that no one else uses: `<prefix>-<8 hex digits>`."""
    return f"{prefix}-{secrets.token_hex(4)}"


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 60, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command, raising with its stderr in the message when it fails."""
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class NetNamespace:
    """One network namespace that this process created and will delete."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def create(cls, prefix: str) -> NetNamespace:
        name = unique_name(prefix)
        run(["ip", "netns", "add", name])
        ns = cls(name)
        # Loopback up: daemons and servers inside bind to 127.0.0.1.
        ns.ip("link", "set", "lo", "up")
        return ns

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def exec_args(self, *cmd: str) -> list[str]:
        """The argv that runs `cmd` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(self.exec_args(*cmd), check=check, input=input, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str) -> None:
        # Written through /proc inside the namespace: per-netns keys only.
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def delete(self) -> None:
        """Delete the namespace, first killing processes still inside it that we started."""
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        # Only our own processes can be inside a namespace we created and named randomly.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run(["ip", "netns", "del", self.name], check=False)

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r})"


def stop_process(proc: subprocess.Popen[bytes] | None, *, grace: float = 10.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """Stops a process we started: `sig` (SIGTERM), then SIGKILL after `grace` seconds.
    Returns its exit status (None when there was no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class OwnedProcess:
    """A server process this object started (etcd, kube-apiserver): whether it runs, its
    PID, and stopping it by that PID."""

    _proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        proc, self._proc = self._proc, None
        stop_process(proc, grace=grace)


def veth_between(a: NetNamespace, a_if: str, b: NetNamespace, b_if: str) -> None:
    """A veth pair with one end in each namespace, created inside `a` so the root
    namespace never holds either end."""
    a.ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.ip("link", "set", a_if, "up")
    b.ip("link", "set", b_if, "up")
