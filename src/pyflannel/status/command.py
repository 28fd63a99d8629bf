"""`pyflannel status [--check] [--svg FILE] [flanneld flags...]`.

It takes flanneld's own flags and FLANNELD_* variables, so run with the daemon's
configuration it looks at exactly what the daemon looks at: the same store, interface,
network config and rules. Exit status: 0 all in order, 1 problems found, 2 could not look.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pyflannel.backend.base import BackendError
from pyflannel.backend.registry import BACKENDS, unknown_backend_message
from pyflannel.backend.wireguard import WireguardBackend
from pyflannel.config.flags import ConfigError, Flags, parse_flags
from pyflannel.config.netconf import NetConf
from pyflannel.dataplane import NodeDataplane, lease_policy, traffic_config
from pyflannel.iface.select import InterfaceError
from pyflannel.kernel.netlink_ports import NetlinkRoutePort
from pyflannel.kernel.ports import WgError, WgPort, collect
from pyflannel.lease.events import LeaseSnapshot
from pyflannel.lease.model import Lease, StoredNodeState, subnet_key
from pyflannel.netlink import Route
from pyflannel.platform import Platform
from pyflannel.reconcile.plan import DesiredState, plan
from pyflannel.status.report import describe_plan, lease_rows, table
from pyflannel.status.svg import GraphEdge, GraphNode, render_svg
from pyflannel.subnet.base import NodeConfig, StoreError, SubnetManager
from pyflannel.subnet.etcd.manager import EtcdSubnetManager
from pyflannel.subnet.select import make_subnet_manager
from pyflannel.subnet.subnetenv import SubnetEnv, read_subnet_env

OK, PROBLEMS, FAILED = 0, 1, 2
USAGE = ("usage: pyflannel status [--check] [--svg FILE] [flanneld flags...]\n"
         "  --check     also compare this node's kernel (routes, neighbours, FDB, rules) with "
         "the leases\n  --svg FILE  write a picture of the nodes and routes\n"
         "  flanneld's flags and FLANNELD_* variables select the store, interface and rules")


class StatusError(Exception):
    pass


def split_args(argv: Sequence[str]) -> tuple[bool, str | None, list[str]]:
    check, svg, rest = False, None, []
    it = iter(argv)
    for arg in it:
        if arg in ("--check", "-check"):
            check = True
        elif arg in ("--svg", "-svg"):
            svg = next(it, None)
            if svg is None:
                raise StatusError("--svg needs a file name")
        elif arg.startswith(("--svg=", "-svg=")):
            svg = arg.split("=", 1)[1]
        elif arg in ("-h", "--help", "-help"):
            raise StatusError(USAGE)
        else:
            rest.append(arg)
    return check, svg, rest


async def first_snapshot(mgr: SubnetManager, timeout: float = 15) -> LeaseSnapshot:
    async def get() -> LeaseSnapshot:
        async for update in mgr.updates():
            if isinstance(update, LeaseSnapshot):
                return update
        raise StatusError("the store ended its updates")

    try:
        return await asyncio.wait_for(get(), timeout)
    except TimeoutError:
        raise StatusError(f"no answer from the {mgr.name} store within {timeout:.0f} s") from None


async def _node_config(mgr: SubnetManager, attempts: int = 4) -> NodeConfig:
    """The store's config, asked again for a few seconds when the store is briefly out of
    reach (a loaded machine can make one connect time out); the daemon retries the same."""
    for attempt in range(attempts):
        try:
            return await mgr.node_config()
        except StoreError as e:
            if not e.retryable or attempt == attempts - 1:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def expirations(mgr: SubnetManager, leases: Sequence[Lease]) -> dict[str, int] | None:
    """Remaining seconds of every etcd lease (one call each: fine for a status command)."""
    if not isinstance(mgr, EtcdSubnetManager):
        return None  # kube leases do not expire
    return await mgr.lease_ttls([le for le in leases if not le.reservation])


async def check_node(flags: Flags, nc: NetConf, leases: Sequence[Lease],
                     env: SubnetEnv | None, store: str,
                     platform: Platform | None = None) -> tuple[list[str], list[GraphEdge]]:
    """Problems on this node, and its routes as graph edges. The same data plane as the
    daemon's, on the platform's ports (this machine by default)."""
    platform = platform or Platform.real()
    if env is None or (env.subnet is None and env.ipv6_subnet is None):
        return [f"no lease on this node: {flags.subnet_file} is missing or empty (flanneld has "
                "not started here, or uses another --subnet-file)"], []
    own4 = env.subnet.network if env.subnet else None
    own6 = env.ipv6_subnet.network if env.ipv6_subnet else None
    own_key = subnet_key(own4, own6)
    problems: list[str] = []
    own = next((le for le in leases if le.key == own_key), None)
    if own is None:
        problems.append(f"our lease {own_key} (from {flags.subnet_file}) is not in the store: "
                        "it expired or was deleted; restart flanneld")
    backend_cls = BACKENDS.get(nc.backend_type)
    if backend_cls is None:
        return problems + [unknown_backend_message(nc.backend_type)], []
    backend = backend_cls(platform)
    try:
        ext = await platform.find_interface(
            ifaces=flags.iface, iface_regexes=flags.iface_regex, can_reach=flags.iface_can_reach,
            ipv4=nc.enable_ipv4, ipv6=nc.enable_ipv6)
    except InterfaceError as e:
        return problems + [str(e)], []
    links = platform.links
    try:
        # Read-only: finds the backend's devices, creates nothing.
        await backend.register(ext, nc, StoredNodeState(), links, create=False)
    except BackendError as e:
        return problems + [str(e)], []
    finally:
        await links.aclose()
    policy = lease_policy(nc, store=store, backend_type=backend.backend_type, own_subnet=own4,
                          own_ipv6_subnet=own6, own_public_ip=ext.ext_addr,
                          own_public_ipv6=ext.ext_addr6, segments=ext.segments)
    port = platform.open_routes()
    try:
        # kube mode names leases by Node: ours is the one whose subnets subnet.env records.
        blackhole = tuple(n for n in (own4, own6) if n is not None) \
            if flags.ip_blackhole_route else ()
        dp = NodeDataplane(backend, policy, own.ident if own is not None else own_key, port,
                           blackhole=blackhole)
        delta = await dp.apply(LeaseSnapshot(tuple(leases)))
        for lease, reason in delta.refused:
            problems.append(f"refused lease {lease.ident}: {reason.message}")
        observed = await collect(port.dump(dp.scope, nexthops=True))
        ops = plan(dp.desired, observed, dp.scope,
                   nexthops=bool(observed.nexthops) or not observed.routes)
        names = {ext.index: ext.name}
        if isinstance(port, NetlinkRoutePort):  # the devices' names, for the messages
            names.update({link.index: link.name async for link in port.nl.dump_links()})
    finally:
        port.close()
    problems += describe_plan(ops, observed, names)
    if isinstance(backend, WireguardBackend):
        problems += await wireguard_problems(backend.devices, dp.desired, platform.wireguard)
    rules = platform.make_rules(nc.enable_nftables)
    problems += [f"{rules.mode} rules: {d}"
                 for d in await rules.drift(traffic_config(flags, nc, own4, own6))]
    missing = {str(o.obj.dst) for o in ops if o.action == "replace" and isinstance(o.obj, Route)}
    me = str(ext.ext_addr or ext.ext_addr6)
    edges = [GraphEdge(me, str(le.attrs.public_ip),
                       "missing" if str(le.subnet) in missing else "ok",
                       f"via {le.attrs.public_ip}") for le in dp.table.peers.values()]
    return problems, edges


async def wireguard_problems(devices: Sequence[str], desired: DesiredState,
                             wg: WgPort) -> list[str]:
    """Our WireGuard devices' peers against the leases (read-only); prints which
    implementation answers."""
    problems: list[str] = []
    try:
        for name in devices:
            try:
                st = await wg.state(name)
            except WgError as e:
                problems.append(f"WireGuard device {name}: {e}")
                continue
            if st is None:
                problems.append(f"WireGuard device {name} is missing")
                continue
            print(f"WireGuard: {name} on the {wg.implementation}, listening on "
                  f"{st.listen_port}, {len(st.peers)} peer(s), public key {st.public_key}")
            want = {k[1]: p for k, p in desired.wg.items() if k[0] == name}
            for key, p in want.items():
                got = st.peers.get(key)
                if got is None:
                    problems.append(f"missing WireGuard {p.describe()}")
                elif got != p:
                    problems.append(f"WireGuard peer differs: has {got.describe()}; the "
                                    f"lease wants {p.describe()}")
            problems += [f"stale WireGuard {got.describe()} (no lease)"
                         for key, got in st.peers.items() if key not in want]
    finally:
        await wg.aclose()
    return problems


async def status(argv: Sequence[str]) -> int:
    check, svg, rest = split_args(argv)
    flags = parse_flags(rest, os.environ)
    env = read_subnet_env(Path(flags.subnet_file))
    mgr = make_subnet_manager(flags, env)
    try:
        nc = (await _node_config(mgr)).netconf
        snap = await first_snapshot(mgr)
        ttls = await expirations(mgr, snap.leases)
        print(f"{len(snap.leases)} leases in the {mgr.name} store; network {nc.network or '-'}"
              f"{'  ' + str(nc.ipv6_network) if nc.enable_ipv6 else ''}, backend "
              f"{nc.backend_type}")
        print(table(lease_rows(snap.leases, ttls), ipv6=nc.enable_ipv6))
        problems: list[str] = []
        edges: list[GraphEdge] = []
        if check:
            problems, edges = await check_node(flags, nc, snap.leases, env, mgr.name)
            print()
            if problems:
                print(f"This node: {len(problems)} problem(s)")
                for p in problems:
                    print(f"  {p}")
            else:
                print("This node: kernel routes, neighbours, FDB entries and rules match the "
                      "leases")
        if svg:
            nodes = [GraphNode(str(le.attrs.public_ip), str(le.subnet or le.ipv6_subnet),
                               str(le.attrs.public_ip), le.attrs.backend_type)
                     for le in snap.leases]
            if not check:  # the leases alone say every node routes to every other
                edges = [GraphEdge(a.name, b.name, "unknown", f"via {b.address}")
                         for a in nodes for b in nodes if a is not b]
            Path(svg).write_text(render_svg(nodes, edges, title=f"flannel {nc.network}"))
            print(f"\nWrote {svg}")
        return PROBLEMS if problems else OK
    finally:
        await mgr.aclose()


def main(argv: Sequence[str]) -> int:
    # The client libraries' warnings (e.g. "connecting to etcd with http") are the daemon's
    # business; status prints its own findings.
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    try:
        return asyncio.run(status(argv))
    except (StatusError, ConfigError, StoreError, OSError) as e:
        print(f"pyflannel status: {e}", file=sys.stderr)
        return FAILED
    except Exception as e:  # the store's errors: one line, not a trace
        print(f"pyflannel status: {type(e).__name__}: {e}", file=sys.stderr)
        return FAILED
