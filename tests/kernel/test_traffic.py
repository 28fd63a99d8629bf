"""Traffic rules against the real kernel, in a fresh network namespace per test.

Both modes are exercised with the real `iptables-restore`/`iptables-save` (nf_tables
backend) and `nft`; the rule text seen inside the namespace is compared with upstream's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

import pytest

from pyflannel.traffic import TrafficConfig, TrafficRules, make_traffic_rules
from pyflannel_lab.netns import NetNamespace, veth_between

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables-save", "nft")),
        reason="needs root, iproute2, iptables and nft"),
]

C4, P4, P4_NEW = (IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"),
                  IPv4Network("10.244.7.0/24"))
C6, P6 = IPv6Network("fd00:10:244::/56"), IPv6Network("fd00:10:244:1::/64")

DUAL = TrafficConfig(C4, P4, C6, P6, masquerade=True, forward=True)
V4_ONLY = TrafficConfig(C4, P4, None, None, masquerade=True, forward=True)

MASQ = '-m comment --comment "flanneld masq"'
FWD = '-m comment --comment "flanneld forward"'
# iptables-save's view of upstream's v4 rules for C4/P4, table-prefixed.
EXPECTED_V4_IPTABLES = [
    "filter :FLANNEL-FWD - [0:0]",
    f"filter -A FORWARD {FWD} -j FLANNEL-FWD",
    f"filter -A FLANNEL-FWD -s 10.244.0.0/16 {FWD} -j ACCEPT",
    f"filter -A FLANNEL-FWD -d 10.244.0.0/16 {FWD} -j ACCEPT",
    "nat :FLANNEL-POSTRTG - [0:0]",
    f"nat -A POSTROUTING {MASQ} -j FLANNEL-POSTRTG",
    f"nat -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {MASQ} -j RETURN",
    f"nat -A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 {MASQ} -j RETURN",
    f"nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 {MASQ} -j RETURN",
    f"nat -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 {MASQ} -j RETURN",
    f"nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully",
    f"nat -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {MASQ} -j MASQUERADE "
    "--random-fully",
]
EXPECTED_V4_NFT = """\
table ip flannel-ipv4 {
	comment "rules for flannel-ipv4"
	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}

	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}
}
"""

# Rules other software (kube-proxy, docker) keeps in the same base chains and tables.
FOREIGN_IPTABLES = """\
*nat
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE --random-fully
COMMIT
*filter
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""
FOREIGN_NFT = """\
table ip kube-proxy {
	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 masquerade
	}
}
"""


def iptables_state(ns: NetNamespace, *, v6: bool = False, everything: bool = False) -> list[str]:
    """`<table> <line>` for each flannel line (or every rule line) of iptables-save."""
    out = ns.run("ip6tables-save" if v6 else "iptables-save").stdout
    lines: list[str] = []
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(("-A", ":")) and (
                everything or "FLANNEL" in line or "flanneld" in line):
            if everything and line.startswith(":") and "ACCEPT" in line:
                continue  # built-in chains, with changing counters
            lines.append(f"{table} {line}")
    return sorted(lines)


def nft_table(ns: NetNamespace, family: str, name: str) -> str | None:
    proc = ns.run("nft", "list", "table", family, name, check=False)
    return proc.stdout if proc.returncode == 0 else None


def state(ns: NetNamespace, mode: str) -> object:
    """Everything flannel owns in this mode, for before/after comparisons."""
    if mode == "iptables":
        return iptables_state(ns), iptables_state(ns, v6=True)
    return nft_table(ns, "ip", "flannel-ipv4"), nft_table(ns, "ip6", "flannel-ipv6")


def foreign_state(ns: NetNamespace) -> object:
    return ([ln for ln in iptables_state(ns, everything=True) if "flannel" not in ln.lower()],
            nft_table(ns, "ip", "kube-proxy"))


def add_foreign_rules(ns: NetNamespace) -> None:
    ns.run("iptables-restore", "--noflush", input=FOREIGN_IPTABLES)
    ns.run("nft", "-f", "-", input=FOREIGN_NFT)


@pytest.fixture(params=["iptables", "nftables"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def rules_in(ns: NetNamespace, mode: str) -> TrafficRules:
    return make_traffic_rules(mode == "nftables", exec_prefix=ns.exec_args())


async def test_ensure_installs_upstreams_rules(netns: NetNamespace, mode: str) -> None:
    rules = rules_in(netns, mode)
    assert await rules.drift(DUAL) != []
    assert await rules.ensure(DUAL) is True
    if mode == "iptables":
        assert iptables_state(netns) == sorted(EXPECTED_V4_IPTABLES)
        v6 = iptables_state(netns, v6=True)
        assert f"nat -A FLANNEL-POSTRTG -s {C6} ! -d ff00::/8 {MASQ} -j MASQUERADE " \
               "--random-fully" in v6
        assert f"filter -A FLANNEL-FWD -d {C6} {FWD} -j ACCEPT" in v6
        assert len(v6) == len(EXPECTED_V4_IPTABLES)
        assert nft_table(netns, "ip", "flannel-ipv4") is None
    else:
        assert nft_table(netns, "ip", "flannel-ipv4") == EXPECTED_V4_NFT
        v6_table = nft_table(netns, "ip6", "flannel-ipv6")
        assert v6_table is not None
        assert f"ip6 saddr {C6} ip6 daddr != ff00::/8 masquerade fully-random" in v6_table
        assert f"ip6 saddr != {C6} ip6 daddr {P6} return" in v6_table
        assert iptables_state(netns) == []
    assert await rules.drift(DUAL) == []


async def test_ensure_twice_changes_nothing(netns: NetNamespace, mode: str) -> None:
    rules = rules_in(netns, mode)
    assert await rules.ensure(DUAL) is True
    before = state(netns, mode)
    assert await rules.ensure(DUAL) is False
    # A fresh manager (a daemon restart) also sees nothing to do.
    assert await rules_in(netns, mode).ensure(DUAL) is False
    assert state(netns, mode) == before


def _nft_handle(ns: NetNamespace, chain: str, index: int) -> str:
    listing = ns.run("nft", "-a", "list", "chain", "ip", "flannel-ipv4", chain).stdout
    handles = re.findall(r"^\t\t(?!type|comment).* # handle (\d+)$", listing, re.M)
    return str(handles[index])


IPTABLES_DAMAGE: dict[str, list[list[str]]] = {
    "deleted rule": [["iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"]],
    "flushed chain": [["iptables", "-t", "filter", "-F", "FLANNEL-FWD"]],
    "deleted jump": [["iptables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment",
                      "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"]],
    "deleted chain": [["iptables", "-t", "filter", "-D", "FORWARD", "-m", "comment",
                       "--comment", "flanneld forward", "-j", "FLANNEL-FWD"],
                      ["iptables", "-t", "filter", "-F", "FLANNEL-FWD"],
                      ["iptables", "-t", "filter", "-X", "FLANNEL-FWD"]],
    "hand-added rule": [["iptables", "-t", "nat", "-I", "FLANNEL-POSTRTG", "-j", "ACCEPT"]],
    "duplicated jump": [["iptables", "-t", "nat", "-A", "POSTROUTING", "-m", "comment",
                         "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"]],
    "v6 deleted rule": [["ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "5"]],
}
NFT_DAMAGE: dict[str, list[list[str]]] = {
    "deleted rule": [["nft", "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle",
                      "{postrtg:2}"]],
    "flushed chain": [["nft", "flush", "chain", "ip", "flannel-ipv4", "forward"]],
    "deleted chain": [["nft", "delete", "chain", "ip", "flannel-ipv4", "postrtg"]],
    "deleted table": [["nft", "delete", "table", "ip", "flannel-ipv4"]],
    "hand-added rule": [["nft", "insert", "rule", "ip", "flannel-ipv4", "postrtg", "accept"]],
    "v6 deleted table": [["nft", "delete", "table", "ip6", "flannel-ipv6"]],
}


@pytest.mark.parametrize(("drift_mode", "damage"),
                         [("iptables", d) for d in IPTABLES_DAMAGE]
                         + [("nftables", d) for d in NFT_DAMAGE])
async def test_drift_is_reported_and_repaired(netns: NetNamespace, drift_mode: str, damage: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    mode = drift_mode
    table = IPTABLES_DAMAGE if mode == "iptables" else NFT_DAMAGE
    add_foreign_rules(netns)
    rules = rules_in(netns, mode)
    await rules.ensure(DUAL)
    good, foreign = state(netns, mode), foreign_state(netns)
    for cmd in table[damage]:
        cmd = [_nft_handle(netns, "postrtg", 2) if part == "{postrtg:2}" else part
               for part in cmd]
        netns.run(*cmd)
    assert state(netns, mode) != good
    assert await rules.drift(DUAL) != []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyflannel.traffic"):
        assert await rules.ensure(DUAL) is True
    # Someone else's change is drift: said loudly, as upstream does.
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "rules are missing" in caplog.records[0].getMessage()
    assert state(netns, mode) == good
    assert await rules.drift(DUAL) == []
    assert await rules.ensure(DUAL) is False
    assert foreign_state(netns) == foreign


async def test_previous_subnet_rules_are_replaced(netns: NetNamespace, mode: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    old = V4_ONLY
    new = TrafficConfig(C4, P4_NEW, None, None, masquerade=True, forward=True)
    rules = rules_in(netns, mode)
    await rules.ensure(old)
    if mode == "iptables":
        # A leftover of the pre-v0.20 layout (rules straight in POSTROUTING) of the old lease.
        netns.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", str(C4), "-d", str(C4),
                  "-m", "comment", "--comment", "flanneld masq", "-j", "RETURN")
    # A new manager, as after a restart with a new lease.
    with caplog.at_level(logging.INFO, logger="pyflannel.traffic"):
        assert await rules_in(netns, mode).ensure(new, previous=old) is True
    # An expected change, not drift: no warning.
    assert [r.levelname for r in caplog.records if r.name.startswith("pyflannel")] == ["INFO"]
    current = state(netns, mode)
    assert str(P4) not in repr(current)
    assert str(P4_NEW) in repr(current)

    fresh_ns = NetNamespace.create("pft")
    try:
        await rules_in(fresh_ns, mode).ensure(new)
        assert state(fresh_ns, mode) == current
    finally:
        fresh_ns.delete()


async def test_disabling_features_removes_their_rules(netns: NetNamespace, mode: str) -> None:
    rules = rules_in(netns, mode)
    await rules.ensure(DUAL)
    forward_only = TrafficConfig(C4, P4, None, None, masquerade=False, forward=True)
    assert await rules.ensure(forward_only) is True
    if mode == "iptables":
        assert [ln for ln in iptables_state(netns) if ln.startswith("nat")] == []
        assert iptables_state(netns, v6=True) == []
        assert [ln for ln in iptables_state(netns) if ln.startswith("filter")] == [
            ln for ln in sorted(EXPECTED_V4_IPTABLES) if ln.startswith("filter")]
    else:
        assert nft_table(netns, "ip6", "flannel-ipv6") is None
        table = nft_table(netns, "ip", "flannel-ipv4")
        assert table is not None and "postrtg" not in table and "chain forward" in table
    assert await rules.drift(forward_only) == []


async def test_cleanup_removes_only_its_own_modes_state(netns: NetNamespace) -> None:
    add_foreign_rules(netns)
    foreign = foreign_state(netns)
    ipt, nft = rules_in(netns, "iptables"), rules_in(netns, "nftables")
    await ipt.ensure(DUAL)
    await nft.ensure(DUAL)
    nft_before = state(netns, "nftables")

    # Starting in nft mode: the iptables leftovers go, filter's FLANNEL-FWD included.
    await ipt.cleanup()
    assert state(netns, "iptables") == ([], [])
    assert state(netns, "nftables") == nft_before
    assert await ipt.drift(DUAL) != []

    await ipt.ensure(DUAL)
    await nft.cleanup()
    assert state(netns, "nftables") == (None, None)
    assert iptables_state(netns) == sorted(EXPECTED_V4_IPTABLES)
    assert foreign_state(netns) == foreign
    # Nothing left to clean: a no-op, not an error.
    await nft.cleanup()


async def test_resync_rewrite_never_shows_an_empty_or_unhooked_chain(
        netns: NetNamespace, mode: str) -> None:
    """Alternate between two leases while another process keeps reading the ruleset:
    every read must show the complete masquerade chain, hooked (upstream #2237)."""
    other = TrafficConfig(C4, P4_NEW, None, None, masquerade=True, forward=True)
    rules = rules_in(netns, mode)
    await rules.ensure(V4_ONLY)
    if mode == "iptables":
        read = netns.exec_args("iptables-save", "-t", "nat")
    else:
        read = netns.exec_args("nft", "list", "table", "ip", "flannel-ipv4")

    bad: list[str] = []
    reads = 0
    done = asyncio.Event()

    async def reader() -> None:
        nonlocal reads
        while not done.is_set():
            proc = await asyncio.create_subprocess_exec(*read, stdout=subprocess.PIPE)
            out = (await proc.communicate())[0].decode()
            reads += 1
            if mode == "iptables":
                masq = [ln for ln in out.splitlines() if ln.startswith("-A FLANNEL-POSTRTG")]
                hooked = f"-A POSTROUTING {MASQ} -j FLANNEL-POSTRTG" in out
            else:
                body = out.split("chain postrtg", 1)[-1]
                masq = [ln for ln in body.splitlines() if ln.endswith(("return", "fully-random"))]
                hooked = "hook postrouting" in body
            if len(masq) != 6 or not hooked:
                bad.append(out)

    task = asyncio.create_task(reader())
    try:
        for i in range(40):
            assert await rules.ensure(other if i % 2 == 0 else V4_ONLY) is True
            await asyncio.sleep(0)
    finally:
        done.set()
        await task
    assert reads > 0
    assert bad == []


# ------------------------------------------------------------------ real traffic

SERVER = """
import socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(peer[0].encode() + b"\\n")
    conn.close()
"""
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    print(s.makefile().readline().strip())
"""


@dataclass
class RoutedLab:
    """pod (10.244.1.2, own subnet P) and remote (10.244.2.2, another node's pod in C) hang
    off `node`, which also reaches outside (192.168.77.2). Pod, outside and remote each run
    a TCP server that answers every client with the address it saw."""

    pod: NetNamespace
    node: NetNamespace
    outside: NetNamespace
    remote: NetNamespace
    outside_port: str
    remote_port: str
    pod_port: str

    def seen_by_outside(self) -> str:
        return connect(self.pod, "192.168.77.2", self.outside_port)

    def seen_by_remote(self, client: NetNamespace) -> str:
        return connect(client, "10.244.2.2", self.remote_port)


def connect(client: NetNamespace, host: str, port: str) -> str:
    return client.run(sys.executable, "-c", CLIENT, host, port).stdout.strip()


def start_server(ns: NetNamespace, address: str) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(ns.exec_args(sys.executable, "-c", SERVER, address),
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


@pytest.fixture
def lab(netns_factory: Callable[[str], NetNamespace]) -> Iterator[RoutedLab]:
    pod, node = netns_factory("pfpod"), netns_factory("pfnode")
    outside, remote = netns_factory("pfout"), netns_factory("pfrem")
    veth_between(pod, "eth0", node, "cni0")
    veth_between(node, "eth1", outside, "eth0")
    veth_between(node, "eth2", remote, "eth0")
    pod.ip("addr", "add", "10.244.1.2/24", "dev", "eth0")
    pod.ip("route", "add", "default", "via", "10.244.1.1")
    node.ip("addr", "add", "10.244.1.1/24", "dev", "cni0")
    node.ip("addr", "add", "192.168.77.1/24", "dev", "eth1")
    node.ip("addr", "add", "10.244.2.1/24", "dev", "eth2")
    node.sysctl("net.ipv4.ip_forward", "1")
    outside.ip("addr", "add", "192.168.77.2/24", "dev", "eth0")
    # The outside can route back to pods, so without masquerade it sees the pod address.
    outside.ip("route", "add", str(C4), "via", "192.168.77.1")
    remote.ip("addr", "add", "10.244.2.2/24", "dev", "eth0")
    remote.ip("route", "add", "default", "via", "10.244.2.1")
    servers: list[subprocess.Popen[str]] = []
    try:
        out_server, out_port = start_server(outside, "192.168.77.2")
        servers.append(out_server)
        rem_server, rem_port = start_server(remote, "10.244.2.2")
        servers.append(rem_server)
        pod_server, pod_port = start_server(pod, "10.244.1.2")
        servers.append(pod_server)
        yield RoutedLab(pod, node, outside, remote, out_port, rem_port, pod_port)
    finally:
        for server in servers:
            server.kill()
            server.wait()


# What kube-proxy does for traffic it will masquerade itself: set the 0x4000 bit (here
# alongside another bit, which upstream's exact-value nft match would have missed).
MARK_TO_OUTSIDE = """\
table ip kube-mark {
	chain set-kube-mark {
		type filter hook forward priority mangle; policy accept;
		ip daddr 192.168.77.2 meta mark set meta mark | 0x00014000
	}
}
"""


async def test_masquerade_hides_pod_address_from_the_outside(lab: RoutedLab, mode: str) -> None:
    if mode == "iptables":
        # Docker's FORWARD policy: only flannel's forward rules let pod traffic through.
        lab.node.run("iptables", "-P", "FORWARD", "DROP")
    else:
        assert lab.seen_by_outside() == "10.244.1.2"
    await rules_in(lab.node, mode).ensure(V4_ONLY)
    assert lab.seen_by_outside() == "192.168.77.1"
    # Pod to pod stays unNATed: the remote pod sees the real pod address.
    assert lab.seen_by_remote(lab.pod) == "10.244.1.2"

    # Kube-proxy-marked packets are left to kube-proxy: not masqueraded by flannel.
    lab.node.run("nft", "-f", "-", input=MARK_TO_OUTSIDE)
    assert lab.seen_by_outside() == "10.244.1.2"


async def test_outside_to_remote_pod_is_masqueraded(lab: RoutedLab, mode: str) -> None:
    """Traffic from outside the cluster to another node's pod hits the last rule
    (`! -s C -d C MASQUERADE`). Upstream's nft rule 4 (`saddr != P daddr C return`)
    returned it first, so the remote pod saw the outside address (upstream §14.4)."""
    assert lab.seen_by_remote(lab.outside) == "192.168.77.2"
    await rules_in(lab.node, mode).ensure(V4_ONLY)
    assert lab.seen_by_remote(lab.outside) == "10.244.2.1"
    # ... while traffic into this node's own subnet keeps its source (rule 4).
    assert connect(lab.outside, "10.244.1.2", lab.pod_port) == "192.168.77.2"


async def test_forward_rules_let_pod_traffic_through_drop_policy(lab: RoutedLab) -> None:
    lab.node.run("iptables", "-P", "FORWARD", "DROP")
    forward_only = TrafficConfig(C4, P4, None, None, masquerade=False, forward=True)
    client = lab.pod.run(sys.executable, "-c", CLIENT, "192.168.77.2", lab.outside_port,
                         check=False)
    assert client.returncode != 0
    await rules_in(lab.node, "iptables").ensure(forward_only)
    assert lab.seen_by_outside() == "10.244.1.2"
