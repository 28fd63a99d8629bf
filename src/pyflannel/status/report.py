"""Turning leases and reconcile plans into what an operator reads.

Pure functions: the command gathers the data, these format it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyflannel.lease.model import Lease
from pyflannel.netlink import FdbEntry, Neighbour, Nexthop, Op, Route
from pyflannel.reconcile.plan import Observed


@dataclass(frozen=True)
class LeaseRow:
    node: str
    subnet: str
    ipv6_subnet: str
    public_ip: str
    backend: str
    expires: str


def lease_rows(leases: Iterable[Lease], ttls: dict[str, int] | None = None,
               now: float | None = None) -> list[LeaseRow]:
    """One row per lease, sorted by subnet. `ttls`: remaining seconds by lease key, for
    stores whose leases expire (etcd)."""
    now = time.time() if now is None else now
    rows = []
    for le in leases:
        if le.reservation:
            expires = "never (reservation)"
        elif ttls is not None and le.key in ttls:
            expires = _duration(ttls[le.key]) if ttls[le.key] >= 0 else "expired"
        elif le.expiration is not None:
            expires = _duration(int(le.expiration - now))
        else:
            expires = "-"
        node = le.origin if le.origin and not le.origin.isdigit() else str(le.attrs.public_ip)
        rows.append(LeaseRow(node=node, subnet=str(le.subnet or "-"),
                             ipv6_subnet=str(le.ipv6_subnet or "-"),
                             public_ip=str(le.attrs.public_ip), backend=le.attrs.backend_type,
                             expires=expires))
    return sorted(rows, key=lambda r: (r.subnet, r.ipv6_subnet))


def _duration(seconds: int) -> str:
    h, rem = divmod(max(seconds, 0), 3600)
    return f"{h}h{rem // 60:02d}m"


def table(rows: Sequence[LeaseRow], *, ipv6: bool) -> str:
    head = ["NODE", "SUBNET"] + (["IPV6 SUBNET"] if ipv6 else []) + [
        "PUBLIC IP", "BACKEND", "EXPIRES"]
    body = [[r.node, r.subnet] + ([r.ipv6_subnet] if ipv6 else []) +
            [r.public_ip, r.backend, r.expires] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])


def _route_text(r: Route, names: dict[int, str]) -> str:
    via = f" via {r.gateway}" if r.gateway is not None else ""
    onlink = " onlink" if r.onlink else ""
    dev = names.get(r.oif, f"#{r.oif}") if r.oif is not None else "-"
    return f"{r.dst}{via} dev {dev}{onlink}"


def describe_plan(ops: Sequence[Op], observed: Observed,
                  ifnames: dict[int, str] | None = None) -> list[str]:
    """Each planned change as a named problem: missing, extra or wrong routes, neighbours
    and FDB entries. Nexthop objects are an implementation detail of routes: a missing
    nexthop shows up as its route."""
    names = ifnames or {}
    have_routes = {str(r.dst): r for r in observed.routes}
    have_neigh = {(n.ifindex, str(n.ip)): n for n in observed.neighbours}
    have_fdb = {(f.ifindex, f.lladdr.lower()): f for f in observed.fdb}
    out: list[str] = []

    def dev(i: int | None) -> str:
        return names.get(i, f"#{i}") if i is not None else "-"

    for op in ops:
        o = op.obj
        if isinstance(o, Nexthop):
            continue
        if isinstance(o, Route):
            text = _route_text(o, names)
            if op.action == "delete":
                out.append(f"extra route: {text}")
            elif str(o.dst) in have_routes:
                have = have_routes[str(o.dst)]
                out.append(f"wrong route: {_route_text(have, names)} (want {text})")
            else:
                out.append(f"missing route: {text}")
        elif isinstance(o, Neighbour):
            text = f"{o.ip} lladdr {o.lladdr} dev {dev(o.ifindex)}"
            if op.action == "delete":
                out.append(f"extra neighbour: {text}")
            elif (o.ifindex, str(o.ip)) in have_neigh:
                out.append(f"wrong neighbour: {text} (kernel has lladdr "
                           f"{have_neigh[(o.ifindex, str(o.ip))].lladdr})")
            else:
                out.append(f"missing neighbour: {text}")
        elif isinstance(o, FdbEntry):
            text = f"{o.lladdr} dst {o.dst} dev {dev(o.ifindex)}"
            if op.action == "delete":
                out.append(f"extra fdb entry: {text}")
            elif (o.ifindex, o.lladdr.lower()) in have_fdb:
                out.append(f"wrong fdb entry: {text} (kernel has dst "
                           f"{have_fdb[(o.ifindex, o.lladdr.lower())].dst})")
            else:
                out.append(f"missing fdb entry: {text}")
    return out
