"""A 3-member etcd cluster for the lab, and the faults flanneld must ride out.

Each member runs in its own network namespace, attached by a veth to the lab's segment
bridge in the switch namespace, so that each fault is a real one: `kill` (SIGKILL, as a
crash; healed by restarting on the same data dir), `pause` (SIGSTOP: the kernel still
completes TCP handshakes, the process never answers), `partition` (the member's link down:
nothing reaches it, nor its peers) and `isolate` (its peer traffic dropped by nftables in
its namespace: clients still reach it, but as a minority of one it serves no linearizable
request and its watches go silent). The members use a static `--initial-cluster` on the
standard ports (2379/2380 are free in a namespace of our own). With `tls`, clients must
present a certificate and the peers talk TLS with the same CA.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

from pyflannel_lab.cluster import Cluster, EtcdLabStore, LabNode
from pyflannel_lab.etcd import EtcdServer, EtcdServerError, EtcdTLSFiles, make_tls_files
from pyflannel_lab.netns import NetNamespace, stop_process, veth_between

Fault = Literal["kill", "pause", "partition", "isolate"]
CLIENT_PORT, PEER_PORT = 2379, 2380
# Drops the member's raft traffic, both ways; in the member's own namespace.
ISOLATE_TABLE = "pyflannel_isolate"
_DROP_PEERS = f"tcp dport {PEER_PORT} drop; tcp sport {PEER_PORT} drop;"
ISOLATE_RULES = (f"table inet {ISOLATE_TABLE} {{\n"
                 f"  chain input {{ type filter hook input priority 0; {_DROP_PEERS} }}\n"
                 f"  chain output {{ type filter hook output priority 0; {_DROP_PEERS} }}\n"
                 "}\n")


class EtcdMember(EtcdServer):
    """One member in its own namespace; `fault()` breaks it one way, `heal()` undoes it."""

    def __init__(self, index: int, netns: NetNamespace, host: str, initial_cluster: str,
                 tls: EtcdTLSFiles | None) -> None:
        super().__init__(host=host, netns=netns, tls=tls, name=f"etcd{index}",
                         ports=(CLIENT_PORT, PEER_PORT), initial_cluster=initial_cluster)
        self.index = index
        self.fault_now: Fault | None = None

    def _argv(self) -> list[str]:
        # Pre-vote, as etcd 3.5 and later have by default: a member back from a partition
        # does not force an election with the higher term it campaigned up to alone.
        return [*super()._argv(), "--pre-vote"]

    def fault(self, kind: Fault) -> None:
        """Break this member: `kill`, `pause`, `partition` or `isolate` (see the module
        docstring)."""
        if self.fault_now is not None:
            raise EtcdServerError(f"{self.name} is already faulted ({self.fault_now})")
        assert self.netns is not None and self._proc is not None
        if kind == "kill":
            proc, self._proc = self._proc, None
            stop_process(proc, sig=signal.SIGKILL)
        elif kind == "pause":
            self._proc.send_signal(signal.SIGSTOP)
        elif kind == "partition":
            self.netns.ip("link", "set", "eth0", "down")
        else:
            self.netns.run("nft", "-f", "-", input=ISOLATE_RULES)
        self.fault_now = kind

    def heal(self, timeout: float = 30.0) -> None:
        """Undo the fault: restart (same data and ports), SIGCONT, the link up, or the
        peer traffic let through again."""
        kind, self.fault_now = self.fault_now, None
        assert self.netns is not None
        if kind == "kill":
            self.start_again(timeout)
        elif kind == "pause" and self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        elif kind == "partition":
            self.netns.ip("link", "set", "eth0", "up")
        elif kind == "isolate":
            self.netns.run("nft", "delete", "table", "inet", ISOLATE_TABLE)

    def clients(self) -> set[str]:
        """The addresses with an established connection to this member's client port."""
        assert self.netns is not None
        out = self.netns.run("ss", "-Htn", "state", "established",
                             f"( sport = :{CLIENT_PORT} )").stdout
        return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}

    def status(self) -> dict[str, Any]:
        """etcd's endpoint status of this member (member_id, leader, raft_term, ...)."""
        out = self.etcdctl("endpoint", "status", "-w", "json", timeout=15).stdout
        entries = json.loads(out)
        return dict(entries[0]["Status"])


class EtcdCluster:
    """A member per address of `hosts` on `segment`, their namespaces attached to `bridge`
    in `switch`. Build, `start()`, always `close()` (also after a failed start)."""

    def __init__(self, switch: NetNamespace, bridge: str, segment: IPv4Network,
                 hosts: Sequence[IPv4Address], *, tls: bool = False,
                 name: str = "pfe") -> None:
        self.switch = switch
        self.bridge = bridge
        self.segment = segment
        self.hosts = list(hosts)
        self.name = name
        self.want_tls = tls
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{name}-etcdcluster-"))
        self.tls: EtcdTLSFiles | None = None
        self.members: list[EtcdMember] = []

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 60.0) -> None:
        if self.want_tls:
            self.tls = make_tls_files(self._tmp / "pki", [str(h) for h in self.hosts])
        scheme = "https" if self.tls else "http"
        initial = ",".join(f"etcd{i}={scheme}://{h}:{PEER_PORT}"
                           for i, h in enumerate(self.hosts))
        for i, host in enumerate(self.hosts):
            ns = NetNamespace.create(f"{self.name}-e{i}")
            # Registered before anything can fail, so that close() deletes the namespace.
            member = EtcdMember(i, ns, str(host), initial, self.tls)
            self.members.append(member)
            veth_between(ns, "eth0", self.switch, f"e{i}")
            self.switch.ip("link", "set", f"e{i}", "master", self.bridge)
            ns.ip("addr", "add", f"{host}/{self.segment.prefixlen}", "dev", "eth0")
        # All at once: none is healthy before a quorum runs.
        for m in self.members:
            m.spawn()
        for m in self.members:
            m.wait_ready(timeout)

    def healthy(self) -> list[EtcdMember]:
        return [m for m in self.members if m.fault_now is None]

    def leader(self) -> EtcdMember:
        """The member that says it leads (asked of the members that are not faulted)."""
        for m in self.healthy():
            st = m.status()
            if st["header"]["member_id"] == st["leader"]:
                return m
        raise EtcdServerError("no etcd member leads")

    def make_leader(self, target: EtcdMember) -> None:
        """Move the leadership to `target` (etcd's move-leader, sent to the leader)."""
        current = self.leader()
        if current is not target:
            member_id = int(target.status()["header"]["member_id"])
            current.etcdctl("move-leader", format(member_id, "x"))

    def etcdctl(self, *args: str, timeout: float = 30.0) -> str:
        """etcdctl on a member that is not faulted, retried while the cluster elects a
        leader (requests then fail with `Unavailable`), for up to `timeout` seconds. For
        commands that may run twice: an attempt that timed out may still be applied."""
        deadline = time.monotonic() + timeout
        while True:
            member = next(iter(self.healthy()), None)
            if member is None:
                raise EtcdServerError("every etcd member is faulted")
            try:
                return member.etcdctl(*args).stdout
            except EtcdServerError as e:
                if "Unavailable" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        """Stop every member and delete its namespace (which kills what is left in it),
        each even when another one's clean-up failed."""
        failure: BaseException | None = None
        for m in self.members:
            try:
                if m.fault_now == "pause":
                    m.heal()  # a stopped process ignores SIGTERM until continued
                # A leader that cannot reach its peers spends seconds trying to hand over
                # its leadership; the data is thrown away anyway.
                m.stop(grace=1.0)
                m.close()
            except Exception as e:  # re-raised below, after the others
                failure = failure or e
            finally:
                assert m.netns is not None
                m.netns.delete()
        self.members.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)
        if failure is not None:
            raise failure


class EtcdClusterStore(EtcdLabStore):
    """The lab's store as an EtcdCluster: flanneld gets every member in --etcd-endpoints
    (and the client certificate with `tls`). The members sit at the top of segment 0,
    below the switch, router and outside host."""

    def __init__(self, prefix: str = "/coreos.com/network", *, tls: bool = False,
                 size: int = 3) -> None:
        super().__init__(prefix)
        self.tls = tls
        self.size = size
        self.cluster: EtcdCluster | None = None

    @property
    def members(self) -> EtcdCluster:
        assert self.cluster is not None, "the lab is not started"
        return self.cluster

    def start(self, cluster: Cluster) -> None:
        assert cluster.switch is not None
        seg = cluster.segments[0]
        top = int(seg.net.broadcast_address)
        hosts = [IPv4Address(top - 10 - i) for i in range(self.size)]
        self.cluster = EtcdCluster(cluster.switch, seg.bridge, seg.net, hosts, tls=self.tls,
                                   name=cluster.name)
        self.cluster.start()

    @property
    def endpoint(self) -> str:
        return ",".join(self.members.endpoints)

    def etcdctl(self, *args: str) -> str:
        return self.members.etcdctl(*args)

    def flanneld_args(self, node: LabNode) -> list[str]:
        args = super().flanneld_args(node)
        tls = self.members.tls
        if tls is not None:
            args += [f"--etcd-cafile={tls.ca}", f"--etcd-certfile={tls.client_cert}",
                     f"--etcd-keyfile={tls.client_key}"]
        return args

    def lease_key(self, subnet: str) -> str:
        return f"{self.prefix}/subnets/{subnet.replace('/', '-')}"

    def put_lease(self, subnet: str, public_ip: str) -> None:
        """A host-gw lease with no daemon behind it (written through a healthy member)."""
        self.etcdctl("put", self.lease_key(subnet), json.dumps(
            {"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "host-gw"}))

    def stop(self) -> None:
        for m in self.members.members:
            m.stop()

    def resume(self) -> None:
        for m in self.members.members:
            if not m.running:
                m.spawn()
        for m in self.members.members:
            m.wait_ready()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
