"""A continuous probe between two of the lab's namespaces (two pods), to see whether a fault
(a daemon restart, a peer's key rotation) ever interrupts traffic.

The sender sends one numbered UDP datagram every `interval` seconds to an echo server; a
probe is lost when its echo has not come back by the end (`linger` seconds after the last
probe was sent). The result: how many were sent, which ones were lost, and the longest run
of consecutive lost probes (`max_lost_run`): with probes every 50 ms, a run of 1 is one
lost datagram, a run of k an interruption of about k * 50 ms.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass

from pyflannel_lab.netns import NetNamespace, stop_process

ECHO_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET,"
    "socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "print('ready',flush=True)\n"
    "while True:\n"
    " d,a=s.recvfrom(64);s.sendto(d,a)\n")

# Sends until its stdin closes, then waits `linger` s for late echoes and prints the
# sent count and the received sequence numbers as JSON.
PROBE_CLIENT = (
    "import json,select,socket,sys,time\n"
    "dst,port,iv,linger=sys.argv[1],int(sys.argv[2]),float(sys.argv[3]),float(sys.argv[4])\n"
    "s=socket.socket(socket.AF_INET6 if ':' in dst else socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.setblocking(False)\n"
    "got=set();seq=0;nxt=time.monotonic();end=None\n"
    "print('ready',flush=True)\n"
    "while True:\n"
    " now=time.monotonic()\n"
    " if end is None and now>=nxt:\n"
    "  try: s.sendto(seq.to_bytes(8,'big'),(dst,port))\n"
    "  except OSError: pass\n"
    "  seq+=1;nxt=max(nxt+iv,now)\n"
    " if end is not None and now>=end: break\n"
    " wait=max(0.0,(nxt if end is None else end)-time.monotonic())\n"
    " r,_,_=select.select([s]+([sys.stdin] if end is None else []),[],[],wait)\n"
    " if sys.stdin in r and not sys.stdin.readline(): end=time.monotonic()+linger\n"
    " if s in r:\n"
    "  while True:\n"
    "   try: got.add(int.from_bytes(s.recv(64)[:8],'big'))\n"
    "   except OSError: break\n"
    "print(json.dumps({'sent':seq,'received':sorted(got)}),flush=True)\n")


@dataclass(frozen=True)
class ProbeResult:
    interval: float
    sent: int
    lost: tuple[int, ...]

    @property
    def max_lost_run(self) -> int:
        """The longest run of consecutive lost probes."""
        best = run = 0
        prev = None
        for seq in self.lost:
            run = run + 1 if prev is not None and seq == prev + 1 else 1
            best, prev = max(best, run), seq
        return best

    def __str__(self) -> str:
        return (f"{self.sent} probes every {self.interval * 1000:.0f} ms, {len(self.lost)} "
                f"lost, longest run of lost {self.max_lost_run} "
                f"(seq {list(self.lost)[:20]})")


class UdpProbe:
    """A context manager: probes from `src` to `dst_ip` (served in `dst`) while inside;
    `result` afterwards. `settle`: seconds of probing on entry before the body runs and
    after it before stopping, so the probes surely span a change the body makes."""

    def __init__(self, src: NetNamespace, dst: NetNamespace, dst_ip: str, *,
                 interval: float = 0.05, linger: float = 1.0, settle: float = 0.0) -> None:
        self.src, self.dst, self.dst_ip = src, dst, dst_ip
        self.interval, self.linger, self.settle = interval, linger, settle
        self.port = random.randint(20000, 60000)  # fresh namespaces: nothing listens there
        self.result: ProbeResult | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._client: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> UdpProbe:
        try:
            self._server = self._start(self.dst, ECHO_SERVER, self.dst_ip, str(self.port))
            self._client = self._start(self.src, PROBE_CLIENT, self.dst_ip, str(self.port),
                                       str(self.interval), str(self.linger),
                                       stdin=subprocess.PIPE)
        except BaseException:
            self._stop()
            raise
        time.sleep(self.settle)
        return self

    @staticmethod
    def _start(ns: NetNamespace, code: str, *args: str,
               stdin: int | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(ns.exec_args(sys.executable, "-I", "-S", "-c", code, *args),
                                stdin=stdin, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            stop_process(proc, grace=1)
            raise RuntimeError(f"probe process in {ns.name} did not start")
        return proc

    def __exit__(self, *exc: object) -> None:
        client = self._client
        try:
            time.sleep(self.settle)
            if client is not None and client.stdin is not None and client.stdout is not None:
                client.stdin.close()  # stop sending; the client lingers, then reports
                out = client.stdout.readline()
                client.wait(self.linger + 10)
                if out:
                    data = json.loads(out)
                    got = set(data["received"])
                    self.result = ProbeResult(self.interval, int(data["sent"]), tuple(
                        s for s in range(int(data["sent"])) if s not in got))
        finally:
            self._stop()

    def _stop(self) -> None:
        for proc in (self._client, self._server):
            stop_process(proc, grace=1, sig=9)
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
        self._client = self._server = None
