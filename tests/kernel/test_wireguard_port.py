"""The userspace WgPort on Debian's wireguard-go, in two namespaces joined by a veth: a
tunnel that carries pings, read back by our UAPI client and by `wg` itself, adopted by a
new process without a restart, and a deleted device's process gone and started anew."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyflannel.kernel.wgkeys import encode_key, generate_private_key, public_key
from pyflannel.kernel.wireguard import SOCKET_DIR
from pyflannel_lab.netns import NetNamespace, veth_between

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None
                       or not os.path.exists("/dev/net/tun"),
                       reason="needs wireguard-go, wireguard-tools and TUN (scripts/setup.sh)"),
]
ROOT = Path(__file__).resolve().parents[2]
LOG = Path("/dev/null")


def drive(ns: NetNamespace, *args: str) -> dict[str, Any]:
    # wireguard-go inherits the driver's stderr (flanneld's log): a file, not a pipe we
    # would wait on for as long as wireguard-go runs
    with open(LOG, "ab") as log:
        out = subprocess.run(ns.exec_args(sys.executable, "-m", "tests.kernel.wg_driver",
                                          *args), stdout=subprocess.PIPE, stderr=log,
                             cwd=ROOT, timeout=60, check=True)
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def wireguard_go_pids(ns: NetNamespace) -> list[int]:
    pids = []
    for p in ns.run("ip", "netns", "pids", ns.name, check=False).stdout.split():
        try:
            if Path(f"/proc/{p}/comm").read_text().strip() == "wireguard-go":
                pids.append(int(p))
        except OSError:
            continue
    return pids


@pytest.fixture
def pair(netns_factory: Callable[[str], NetNamespace]) -> Iterator[
        tuple[NetNamespace, NetNamespace, str, str]]:
    created = not SOCKET_DIR.exists()
    a, b = netns_factory("pfwa"), netns_factory("pfwb")
    veth_between(a, "eth0", b, "eth0")
    a.ip("addr", "add", "192.168.201.1/24", "dev", "eth0")
    b.ip("addr", "add", "192.168.201.2/24", "dev", "eth0")
    tag = secrets.token_hex(3)  # devices named apart: the socket directory is the host's
    try:
        yield a, b, f"wgpa{tag}", f"wgpb{tag}"
    finally:
        for ns in (a, b):
            for pid in wireguard_go_pids(ns):  # started by our port, on our behalf
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        for name in (f"wgpa{tag}", f"wgpb{tag}"):
            (SOCKET_DIR / f"{name}.sock").unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # another test's device may still be there
                SOCKET_DIR.rmdir()


def wait(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_tunnel_on_wireguard_go(pair: tuple[NetNamespace, NetNamespace, str, str]) -> None:
    a, b, da, db = pair
    ka, kb = generate_private_key(), generate_private_key()
    pa, pb = encode_key(public_key(ka)), encode_key(public_key(kb))
    ra = drive(a, "ensure", da, encode_key(ka), "51820")
    rb = drive(b, "ensure", db, encode_key(kb), "51820")
    assert ra["started"] and rb["started"] and "wireguard-go" in ra["impl"]
    for ns, dev, addr, other in ((a, da, "10.99.1.0", "10.99.2.0/24"),
                                 (b, db, "10.99.2.0", "10.99.1.0/24")):
        ns.ip("addr", "add", f"{addr}/32", "dev", dev)
        ns.ip("link", "set", dev, "up")
        ns.ip("route", "add", other, "dev", dev, "scope", "link")
    drive(a, "update", da, json.dumps({"put": [
        {"key": pb, "ip": "192.168.201.2", "port": 51820, "ips": ["10.99.2.0/24"]}]}))
    drive(b, "update", db, json.dumps({"put": [
        {"key": pa, "ip": "192.168.201.1", "port": 51820, "ips": ["10.99.1.0/24"],
         "keepalive": 25}]}))
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.99.2.0")
    # read back by our UAPI client and by wireguard-tools
    st = drive(b, "state", db)
    assert st["public_key"] == pb and st["listen_port"] == 51820
    assert st["peers"] == {pa: {"endpoint": "192.168.201.1:51820", "ips": ["10.99.1.0/24"],
                                "psk": None, "keepalive": 25}}
    dump = a.run("wg", "show", da, "dump").stdout.splitlines()
    assert dump[0].split("\t")[:3] == [encode_key(ka), pa, "51820"]
    assert dump[1].split("\t")[2:4] == ["192.168.201.2:51820", "10.99.2.0/24"]
    handshake = dump[1].split("\t")[4]
    assert handshake != "0"
    # a new process (a restarted flanneld) adopts the running wireguard-go: same process,
    # same session (the handshake time is unchanged), nothing set
    pids = wireguard_go_pids(a)
    again = drive(a, "ensure", da, encode_key(ka), "51820")
    assert again["adopted"] and again["started"] is None and wireguard_go_pids(a) == pids
    assert a.run("wg", "show", da, "dump").stdout.splitlines()[1].split("\t")[4] == handshake
    a.run("ping", "-c", "1", "-W", "2", "10.99.2.0")
    # the device deleted: its wireguard-go exits; ensure starts a new one
    a.ip("link", "del", da)
    wait(lambda: wireguard_go_pids(a) == [], "wireguard-go to exit with its device")
    fresh = drive(a, "ensure", da, encode_key(ka), "51820")
    assert fresh["started"] and fresh["started"] not in pids
    assert drive(a, "state", da)["peers"] == {}


def test_auto_falls_back_to_wireguard_go_and_kernel_refuses_clearly(
        pair: tuple[NetNamespace, NetNamespace, str, str]) -> None:
    a, _b, da, _db = pair
    if a.ip("link", "add", "pfwgprobe", "type", "wireguard", check=False).returncode == 0:
        pytest.skip("this kernel has wireguard: the fallback cannot be shown here")
    k = encode_key(generate_private_key())
    kernel = drive(a, "ensure-auto", da, k, "51820", "kernel")
    assert kernel == {"error": "PYFLANNEL_WIREGUARD=kernel: the kernel has no wireguard "
                               "module"}
    assert a.ip("link", "show", da, check=False).returncode != 0  # nothing left behind
    auto = drive(a, "ensure-auto", da, k, "51820", "auto")
    assert auto["impl"] == ("userspace implementation (wireguard-go, /usr/bin/wireguard-go), "
                            "as the kernel has no wireguard module")
    assert wireguard_go_pids(a)
