"""Benchmark: one lease event -> the kernel, on a running flanneld with N peers (etcd mode).

Per size, a daemon converged on N leases (host-gw, or vxlan); then, one at a time with a
pause between, a new peer's lease is put in etcd and later deleted. Timestamps, all
CLOCK_MONOTONIC on this machine:
  * t0: just before the put/delete request, in a driver inside the node's namespace;
  * floor: when a plain etcd watch on the same prefix, in that same driver, receives the
    event (etcd's own delivery: what no watcher can beat);
  * ours: when the node's kernel holds the peer's objects (host-gw: the route; vxlan: the
    neighbour, the FDB entry and the route), or no longer holds them, seen from a netlink
    monitor in the node's namespace. With nexthop objects, deleting the nexthop removes its
    IPv4 route without an RTM_DELROUTE, so the nexthop's deletion counts as the route's.
Prints p50/p99 of each, the ratio ours / floor, and "added" (ours minus the floor, per
sample: what the daemon itself adds after etcd delivered the event). No assertions.

Run as root:  .venv/bin/python bench/lease_latency.py [--sizes 10,1000,10000]
              [--vxlan-sizes 1000,10000] [--samples 200] [--etcd-tmpfs] [--raw FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

from pyflannel.netlink import FdbEntry, Neighbour, Nexthop, Route, RtMonitor
from pyflannel_lab.cluster import Cluster, LabNode

PAUSE = 0.03  # between samples, so each event meets an idle daemon


def convergence_bench() -> ModuleType:
    path = Path(__file__).with_name("daemon_convergence.py")
    spec = importlib.util.spec_from_file_location("daemon_convergence", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the driver: runs inside the node's namespace, talks to etcd -------------------------

async def _http_head(r: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status = int((await r.readuntil(b"\r\n")).split()[1])
    headers: dict[str, str] = {}
    while (line := await r.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _http_chunk(r: asyncio.StreamReader) -> bytes:
    size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
    data = await r.readexactly(size + 2)
    return data[:-2]


def _http_post(host: str, path: str, body: object) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def driver(endpoint: str, prefix: str) -> None:
    """stdin: `put KEY VALUE` / `del KEY`; stdout: `C KEY T0` per request and `W KEY T`
    per event the plain watch delivers (T in ns).

    HTTP/1.1 on plain sockets, requests encoded before T0 is taken: the driver's own
    cost stays out of both the floor and ours (an HTTP library's request building and
    response parsing cost ~1 ms of CPU per event here, on a machine with 2 cores shared
    by etcd, the daemon, this driver and the netlink monitor)."""
    import base64

    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    url = urlsplit(endpoint)
    host, port = url.hostname or "127.0.0.1", url.port or 2379
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    out = sys.stdout
    ready = asyncio.Event()

    async def watch() -> None:
        r, w = await asyncio.open_connection(host, port)
        w.write(_http_post(host, "/v3/watch", {
            "create_request": {"key": b64(prefix), "range_end": b64(end)}}))
        status, headers = await _http_head(r)
        assert status == 200 and headers.get("transfer-encoding") == "chunked", headers
        buf = b""
        while chunk := await _http_chunk(r):
            t = time.monotonic_ns()
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    ready.set()
                for ev in result.get("events", []):
                    key = base64.b64decode(ev["kv"]["key"]).decode()
                    out.write(f"W {key} {t}\n")
            out.flush()

    task = asyncio.create_task(watch())
    await ready.wait()
    out.write("READY\n")
    out.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    r, w = await asyncio.open_connection(host, port)

    async def call(request: bytes) -> None:
        w.write(request)
        status, headers = await _http_head(r)
        if "content-length" in headers:
            await r.readexactly(int(headers["content-length"]))
        else:
            while await _http_chunk(r):  # the last, empty chunk ends with its CRLF
                pass
        if status != 200:
            raise RuntimeError(f"etcd answered {status}")

    await call(_http_post(host, "/v3/kv/range", {"key": b64(prefix)}))  # connection warm
    while line := (await reader.readline()).decode().strip():
        verb, key, *rest = line.split(" ", 2)
        if verb == "put":
            request = _http_post(host, "/v3/kv/put", {"key": b64(key), "value": b64(rest[0])})
        else:
            request = _http_post(host, "/v3/kv/deleterange", {"key": b64(key)})
        t0 = time.monotonic_ns()
        await call(request)
        out.write(f"C {key} {t0}\n")
        out.flush()
    task.cancel()


# -- the kernel side ------------------------------------------------------------------------

class KernelWatch:
    """Netlink monitor in the node's namespace: when each prefix's objects came and went."""

    def __init__(self, node: LabNode) -> None:
        self.mon = RtMonitor.open(node.ns.name, routes=True, neighbours=True, nexthops=True)
        self.seen: dict[tuple[str, str], int] = {}  # (what, key) -> ns
        self.nh_of: dict[int, str] = {}  # nexthop id -> the prefix of the route on it
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async for batch in self.mon.events():
            t = time.monotonic_ns()
            for ev in batch:
                o = ev.obj
                new = ev.kind.endswith("_new")
                if isinstance(o, Route):
                    k = str(o.dst)
                    self.seen[("route+" if new else "route-", k)] = t
                    if new and o.nhid is not None:
                        self.nh_of[o.nhid] = k
                elif isinstance(o, Nexthop) and not new and o.id in self.nh_of:
                    self.seen.setdefault(("route-", self.nh_of.pop(o.id)), t)
                elif isinstance(o, Neighbour):
                    self.seen[("neigh+" if new else "neigh-", str(o.ip))] = t
                elif isinstance(o, FdbEntry):
                    self.seen[("fdb+" if new else "fdb-", o.lladdr)] = t
            self.changed.set()

    async def wait(self, keys: list[tuple[str, str]], timeout: float = 10.0) -> int | None:
        """The time the last of `keys` was seen (None: not within `timeout`)."""
        end = time.monotonic() + timeout
        while not all(k in self.seen for k in keys):
            self.changed.clear()
            left = end - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return None
        return max(self.seen.pop(k) for k in keys)


async def lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    while line := await stream.readline():
        yield line.decode().strip()


async def measure(cl: Cluster, node: LabNode, n: int, samples: int, backend: str,
                  dc: ModuleType) -> dict[str, list[float]]:
    """{"put"/"del"} x {"ours", "floor", "added"} -> latencies in ms ("added": ours minus
    the floor, per sample: the daemon's own share)."""
    kw = KernelWatch(node)
    kt = asyncio.create_task(kw.run())
    proc = await asyncio.create_subprocess_exec(
        *node.ns.exec_args(sys.executable, __file__, "--driver", cl.etcd_endpoint,
                           f"{dc.PREFIX}/subnets/"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdin is not None and proc.stdout is not None
    watched: dict[str, int] = {}
    sent: dict[str, int] = {}
    arrived = asyncio.Event()

    async def read_driver() -> None:
        assert proc.stdout is not None
        async for line in lines(proc.stdout):
            kind, _, rest = line.partition(" ")
            if kind in ("W", "C"):
                key, t = rest.rsplit(" ", 1)
                (watched if kind == "W" else sent)[key] = int(t)
                arrived.set()

    first = await proc.stdout.readline()
    assert first.strip() == b"READY", first
    rt = asyncio.create_task(read_driver())

    async def both(key: str) -> tuple[int, int]:
        while key not in watched or key not in sent:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)
        return sent.pop(key), watched.pop(key)

    out: dict[str, list[float]] = {f"{v} {k}": [] for v in ("put", "del")
                                   for k in ("ours", "floor", "added", "t0")}
    try:
        for j in range(samples):
            i = n + j
            key, val = dc.peer_lease(i, backend)
            subnet, _gw = dc.peer(i)
            objs = [("route", str(subnet))]
            if backend == "vxlan":
                objs += [("neigh", str(subnet.network_address)), ("fdb", dc.vtep_mac(i))]
            for verb in ("put", "del"):
                sign = "+" if verb == "put" else "-"
                line = f"put {key} {val}\n" if verb == "put" else f"del {key}\n"
                proc.stdin.write(line.encode())
                await proc.stdin.drain()
                t0, tw = await both(key)
                tk = await kw.wait([(w + sign, k) for w, k in objs])
                if tk is not None:
                    out[f"{verb} ours"].append((tk - t0) / 1e6)
                    out[f"{verb} added"].append((tk - tw) / 1e6)  # after etcd's delivery
                    out[f"{verb} t0"].append(t0 / 1e9)
                out[f"{verb} floor"].append((tw - t0) / 1e6)
                await asyncio.sleep(PAUSE)
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 10)
        rt.cancel()
        kt.cancel()
        kw.mon.close()
    return out


def pct(xs: list[float], p: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]


def run_size(n: int, samples: int, backend: str, dc: ModuleType) -> dict[str, list[float]]:
    netconf = {"Network": str(dc.NETWORK), "SubnetLen": 24, "Backend": {"Type": backend}}
    with Cluster(nodes=0, name="pflat", netconf=netconf, segment=dc.SEGMENT) as cl:
        assert cl.switch is not None
        cl.switch.run(sys.executable, dc.__file__, "--seed", cl.etcd_endpoint, str(n),
                      backend, timeout=600)
        node = cl.add_node()
        dev = "flannel.1" if backend == "vxlan" else "eth0"
        t0 = time.monotonic()
        while dc.count_routes(node.ns, dev) < n:
            if time.monotonic() - t0 > 600 or (node.proc and node.proc.poll() is not None):
                raise RuntimeError(f"no convergence:\n{node.log()[-3000:]}")
            time.sleep(0.05)
        time.sleep(1.0)  # the start-up's notifications drained
        return asyncio.run(measure(cl, node, n, samples, backend, dc))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--driver":
        asyncio.run(driver(sys.argv[2], sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--vxlan-sizes", default="1000,10000")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--etcd-tmpfs", action="store_true",
                    help="keep the lab (etcd's data and WAL among it) in /dev/shm: etcd's "
                         "fsync then costs nothing, so the floor is its delivery alone")
    ap.add_argument("--raw", metavar="FILE",
                    help="also write every sample (ms; t0 in s, CLOCK_MONOTONIC) as JSON")
    args = ap.parse_args()
    if args.etcd_tmpfs:
        tempfile.tempdir = "/dev/shm"  # the lab's work directory, removed with the lab
    dc = convergence_bench()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.samples} samples each, ms"
          + ("; etcd data on tmpfs" if args.etcd_tmpfs else ""))
    print(f"{'backend':>8} {'N':>6} {'event':>6} {'floor p50':>10} {'floor p99':>10} "
          f"{'ours p50':>9} {'ours p99':>9} {'p50 ratio':>10} {'p99 ratio':>10} "
          f"{'added p50':>10} {'added p99':>10} {'lost':>5}")
    runs = [("host-gw", int(x)) for x in args.sizes.split(",") if x]
    runs += [("vxlan", int(x)) for x in args.vxlan_sizes.split(",") if x]
    raw: dict[str, dict[str, list[float]]] = {}
    for backend, n in runs:
        res = run_size(n, args.samples, backend, dc)
        raw[f"{backend} {n}"] = res
        for verb in ("put", "del"):
            fl, ours, add = res[f"{verb} floor"], res[f"{verb} ours"], res[f"{verb} added"]
            f50, f99, o50, o99 = pct(fl, 50), pct(fl, 99), pct(ours, 50), pct(ours, 99)
            print(f"{backend:>8} {n:>6} {verb:>6} {f50:>10.2f} {f99:>10.2f} {o50:>9.2f} "
                  f"{o99:>9.2f} {o50 / f50:>10.2f} {o99 / f99:>10.2f} "
                  f"{pct(add, 50):>10.2f} {pct(add, 99):>10.2f} {len(fl) - len(ours):>5}",
                  flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.raw:
        Path(args.raw).write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
