"""A lab that stays up between commands: `pyflannel lab up|add-node|remove-node|graph|
status|down`.

`lab up` starts a supervisor process that owns the Cluster (its namespaces, etcd, the
flanneld daemons) and answers the other commands over a Unix socket, streaming what it
does line by line. A state file records the lab's unique name before anything is
created, so `lab down` can remove everything even after the supervisor crashed: every
namespace the lab creates is named `<lab name>-...`, and the name carries a random part.
Nothing here listens on the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyflannel_lab.netns import NetNamespace, run

STATE_DIR = Path(os.environ.get("PYFLANNEL_LAB_DIR", "/run/pyflannel-lab"))

Say = Callable[[str], None]


class LabError(Exception):
    """One line that says what to do."""


def state_file(label: str) -> Path:
    return STATE_DIR / f"{label}.json"


def kube_state_path(label: str) -> Path:
    """What a --kubernetes lab created (kubelab.py), for `lab kubectl/exec` and `down`."""
    return STATE_DIR / label / "kube.json"


def kube_state(label: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(kube_state_path(label).read_text())
    except (OSError, ValueError):
        raise LabError(f"no --kubernetes lab '{label}' is up (start one with "
                       "`pyflannel lab up --kubernetes`)") from None
    if not data.get("kubeconfig"):
        raise LabError(f"lab '{label}' is still starting its control plane")
    return data


def socket_path(label: str) -> Path:
    return STATE_DIR / f"{label}.sock"


def read_state(label: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(state_file(label).read_text())
        return data
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A recycled PID is not our supervisor: check what it runs.
    try:
        return b"pyflannel_lab.session" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# -- client side (the CLI) --------------------------------------------------------------


def request(label: str, cmd: dict[str, Any], say: Say = print, timeout: float = 600) -> int:
    """Sends one command to the supervisor and prints its lines as they come; returns its
    exit status."""
    path = socket_path(label)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError:
            raise LabError(f"no lab '{label}' is up (start one with `pyflannel lab up`)") from None
        s.sendall(json.dumps(cmd).encode() + b"\n")
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise LabError("the lab supervisor stopped mid-command; `pyflannel lab down` "
                               "cleans up")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "line" in msg:
                    say(msg["line"])
                else:
                    return int(msg.get("exit", 1))


def up(label: str, options: dict[str, Any], say: Say = print) -> int:
    st = read_state(label)
    if st is not None and _alive(int(st.get("pid", 0))):
        raise LabError(f"lab '{label}' is already up (pyflannel lab down, or --label another)")
    if st is not None:
        say("A previous lab did not shut down cleanly; removing its leftovers first.")
        down(label, say=say)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    name = f"pfl{secrets.token_hex(2)}"
    log = STATE_DIR / f"{label}.log"
    # The state is on disk before anything is created, so a crash can always be undone.
    state_file(label).write_text(json.dumps({"name": name, "pid": 0, "workdir": ""}))
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyflannel_lab.session", label, name],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)  # survives this command's exit and its Ctrl-C
    deadline = time.monotonic() + 30
    while not socket_path(label).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the lab supervisor did not start; see {log}")
        time.sleep(0.05)
    return request(label, {"cmd": "up", **options}, say)


def down(label: str, say: Say = print) -> int:
    st = read_state(label)
    if st is None:
        say(f"No lab '{label}' is up: nothing to remove.")
        return 0
    pid = int(st.get("pid", 0))
    if pid and _alive(pid):
        with contextlib.suppress(LabError, OSError):
            request(label, {"cmd": "down"}, say, timeout=120)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    from pyflannel_lab.kubelab import remove_leftovers as remove_kube_leftovers

    for what in remove_kube_leftovers(kube_state_path(label)):
        say(f"Left behind by a crash: {what}.")
    removed = remove_leftovers(str(st["name"]), st.get("workdir") or None)
    if removed:
        say(f"Removed {removed} namespace(s) left behind.")
    with contextlib.suppress(OSError):
        kube_state_path(label).parent.rmdir()
    for p in (state_file(label), socket_path(label), STATE_DIR / f"{label}.log"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    say("The lab is down: nothing of it is left on this machine.")
    return 0


def remove_leftovers(name: str, workdir: str | None) -> int:
    """Deletes every namespace of lab `name` (killing what runs inside: only the lab's own
    processes can be there) and its working directory."""
    count = 0
    for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if ns.startswith(f"{name}-"):
            NetNamespace(ns).delete()
            count += 1
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return count


# -- server side (the supervisor) --------------------------------------------------------


class Supervisor:
    def __init__(self, label: str, name: str) -> None:
        self.label, self.name = label, name
        self.cluster: Any = None  # a lab.cluster.Cluster once `up` ran
        self.options: dict[str, Any] = {}

    def save(self) -> None:
        workdir = str(self.cluster.workdir) if self.cluster is not None else ""
        state_file(self.label).write_text(json.dumps(
            {"name": self.name, "pid": os.getpid(), "workdir": workdir,
             "options": self.options}))

    def serve(self) -> None:
        path = socket_path(self.label)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        os.chmod(path, 0o600)
        srv.listen(4)
        self.save()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                conn, _ = srv.accept()
                with conn, conn.makefile("rwb") as f:
                    stop = self.handle(f)
                if stop:
                    return
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if self.cluster is not None:
                self.cluster.close()

    def handle(self, f: Any) -> bool:
        def say(line: str) -> None:
            with contextlib.suppress(OSError):
                f.write(json.dumps({"line": line}).encode() + b"\n")
                f.flush()

        try:
            req = json.loads(f.readline())
            from pyflannel_lab import views

            cmd = req.pop("cmd")
            if cmd == "down":
                if self.cluster is not None:
                    say("Stopping the daemons and removing the namespaces...")
                    self.cluster.close()
                    self.cluster = None
                rc, stop = 0, True
            elif cmd == "up" and req.get("kubernetes"):
                from pyflannel_lab import kubeviews

                self.options = req
                self.cluster = kubeviews.build(self.name, req, kube_state_path(self.label),
                                               say)
                self.save()
                rc, stop = kubeviews.show(self.cluster, say), False
            elif cmd == "up":
                self.options = req
                self.cluster = views.build(self.name, req, say, on_created=self.save)
                self.save()
                rc, stop = views.show(self.cluster, say), False
            else:
                if self.cluster is None:
                    raise LabError("the lab is not built")
                if self.options.get("kubernetes"):
                    from pyflannel_lab import kubeviews

                    rc = kubeviews.command(self.cluster, cmd, req, say)
                else:
                    rc = views.command(self.cluster, cmd, req, say)
                stop = False
        except Exception as e:  # report it to the CLI; the lab stays as it is
            say(f"error: {e}")
            traceback.print_exc()
            rc, stop = 1, False
        with contextlib.suppress(OSError):
            f.write(json.dumps({"exit": rc}).encode() + b"\n")
            f.flush()
        return stop


if __name__ == "__main__":
    Supervisor(sys.argv[1], sys.argv[2]).serve()
