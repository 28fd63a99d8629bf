"""`pyflannel cleanup-nexthops`: hand a node back to upstream flannel's plain routes and
remove pyflannel's nexthop objects, with no moment in which a peer's route is missing.

Ours are the nexthop objects whose id is in the range the engine allocates from
(NHID_BASE .. NHID_BASE + NHID_SPAN - 1: 0x0f1a0000-0x0f29ffff, 253362176-254410751);
nothing else is touched.

Why routes are converted here instead of waiting for upstream to replace them: upstream's
host-gw backend compares a route by destination, gateway and device only (`routeEqual`),
and the kernel reports a route on a nexthop object with that nexthop's gateway and device
(nexthop_compat_mode 1), so upstream takes our route for its own and leaves it on our
nexthop for good (its vxlan backend does `RouteReplace`, which converts it). So every route
still on one of our nexthops is replaced in place by exactly upstream's form, `<dst> via
<gateway> dev <device> [onlink]` with the same table, metric and protocol: one
RTM_NEWROUTE with NLM_F_REPLACE, which the kernel swaps atomically (no deletion, no gap).
Routes are then dumped again, and only the nexthops that no route uses are deleted: a
nexthop that is still in use (a pyflannel daemon still running puts its routes back on
it) is kept and reported, because deleting it would delete its routes with it.

Exit status: 0 nothing of ours is left (or there was nothing), 1 something of ours is left
(kept, or an operation failed), 2 the kernel could not be read.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from pyflannel.netlink import (
    NetlinkError,
    Nexthop,
    Op,
    OpResult,
    Route,
    RtNetlink,
    dump_consistently,
)
from pyflannel.reconcile.plan import NHID_BASE, NHID_SPAN, is_our_nhid

OUR_IDS = f"{NHID_BASE}-{NHID_BASE + NHID_SPAN - 1}"


@dataclass
class HandBack:
    """What `plan_handback` decided: the routes to convert, the nexthops to delete now,
    and the ones kept with the routes that still use them."""

    converts: list[tuple[Route, Route]] = field(default_factory=list)  # (now, plain)
    deletes: list[Nexthop] = field(default_factory=list)
    kept: list[tuple[Nexthop, list[Route]]] = field(default_factory=list)


def plain_route(r: Route, nh: Nexthop) -> Route:
    """`r` (on nexthop object `nh`) in upstream's form: the nexthop's gateway, device and
    onlink flag on the route itself; same destination, table, metric, protocol, scope."""
    return Route(dst=r.dst, gateway=nh.gateway, oif=nh.oif, table=r.table,
                 protocol=r.protocol, onlink=nh.onlink, scope=r.scope, type=r.type,
                 priority=r.priority)


def plan_handback(nexthops: Iterable[Nexthop], routes: Iterable[Route], *,
                  convert: bool) -> HandBack:
    """Pure. `routes`: the kernel's routes (any table, either family). With `convert`,
    every route on one of our nexthops becomes plain and its nexthop is deleted after it;
    without, only the nexthops no route uses are deleted. A nexthop without a device (a
    blackhole) has no plain form: it is kept while used."""
    ours = {nh.id: nh for nh in nexthops if is_our_nhid(nh.id)}
    users: dict[int, list[Route]] = {}
    for r in routes:
        if r.nhid is not None and r.nhid in ours:
            users.setdefault(r.nhid, []).append(r)
    for used in users.values():  # the main table first, then by destination
        used.sort(key=lambda r: (r.table != 254, r.table, r.dst.version, r.dst))
    out = HandBack()
    for nhid in sorted(ours):
        nh, used = ours[nhid], users.get(nhid, [])
        if used and (not convert or nh.oif is None):
            out.kept.append((nh, used))
            continue
        out.converts.extend((r, plain_route(r, nh)) for r in used)
        out.deletes.append(nh)
    return out


class _Names:
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names

    def via(self, gateway: object, oif: int | None, onlink: bool) -> str:
        parts = [f"via {gateway}"] if gateway is not None else []
        if oif is not None:
            parts.append(f"dev {self.names.get(oif, f'#{oif}')}")
        if onlink:
            parts.append("onlink")
        return " ".join(parts) or "blackhole"

    def nexthop(self, nh: Nexthop) -> str:
        return f"nexthop {nh.id} ({self.via(nh.gateway, nh.oif, nh.onlink)})"


def _table(r: Route) -> str:
    return "" if r.table == 254 else f" table {r.table}"


async def _dump_state(nl: RtNetlink) -> tuple[list[Nexthop], list[Route]]:
    nexthops = [nh for nh in await dump_consistently(nl.dump_nexthops) if is_our_nhid(nh.id)]
    routes: list[Route] = []
    if nexthops:
        for fam in (socket.AF_INET, socket.AF_INET6):
            routes += [r for r in await dump_consistently(
                lambda f=fam: nl.dump_routes(f, table=None)) if r.nhid is not None]  # type: ignore[misc]
    return nexthops, routes


def _failed(res: OpResult) -> str:
    return os.strerror(res.errno) + (f" ({res.message})" if res.message else "")


async def cleanup(nl: RtNetlink, *, convert: bool = True, dry_run: bool = False,
                  out: TextIO = sys.stdout) -> int:
    """The command's work on an open handle; its exit status (see the module)."""
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    names = _Names({link.index: link.name for link in await dump_consistently(nl.dump_links)})
    try:
        nexthops, routes = await _dump_state(nl)
    except NetlinkError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        say("this kernel has no nexthop objects; nothing to do")
        return 0
    if not nexthops:
        say(f"no pyflannel nexthop objects here (ids {OUR_IDS}); nothing to do")
        return 0
    first = plan_handback(nexthops, routes, convert=convert)
    failed = converted = removed = 0
    ops = [Op("replace", plain) for _was, plain in first.converts]
    results = await nl.apply(ops) if ops and not dry_run else [OpResult(o, 0) for o in ops]
    for (was, plain), res in zip(first.converts, results, strict=True):
        form = f"{plain.dst}{_table(plain)} {names.via(plain.gateway, plain.oif, plain.onlink)}"
        if res.errno:
            failed += 1
            say(f"error converting route {form} (nhid {was.nhid}): {_failed(res)}")
        else:
            converted += 1
            say(f"{'would convert' if dry_run else 'converted'} route {form} "
                f"(was nhid {was.nhid})")
    if dry_run:
        final = first
    else:
        # What the kernel has now decides, not what we sent: a route that someone (a
        # pyflannel daemon still running) put back on its nexthop keeps that nexthop.
        nexthops, routes = await _dump_state(nl)
        final = plan_handback(nexthops, routes, convert=False)
    ops = [Op("delete", nh) for nh in final.deletes]
    results = await nl.apply(ops) if ops and not dry_run else [OpResult(o, 0) for o in ops]
    for nh, res in zip(final.deletes, results, strict=True):
        if res.errno:
            failed += 1
            say(f"error removing {names.nexthop(nh)}: {_failed(res)}")
        else:
            removed += 1
            say(f"{'would remove' if dry_run else 'removed'} {names.nexthop(nh)}")
    for nh, used in final.kept:
        shown = ", ".join(f"{r.dst}{_table(r)}" for r in used[:5])
        more = f" and {len(used) - 5} more" if len(used) > 5 else ""
        why = ("--unused-only" if not convert else "it has no plain form" if nh.oif is None
               else "is a pyflannel daemon still running here?")
        say(f"kept {names.nexthop(nh)}: still used by {shown}{more} ({why})")
    if dry_run:
        say(f"dry run: {converted} routes to convert, {removed} nexthop objects to remove, "
            f"{len(final.kept)} to keep")
    else:
        say(f"done: {converted} routes converted, {removed} nexthop objects removed, "
            f"{len(final.kept)} kept, {failed} failed")
    return 1 if final.kept or failed else 0


def main(*, convert: bool, dry_run: bool) -> int:
    try:
        nl = RtNetlink.open()
    except OSError as e:
        print(f"pyflannel cleanup-nexthops: cannot open rtnetlink: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(cleanup(nl, convert=convert, dry_run=dry_run))
    except OSError as e:
        print(f"pyflannel cleanup-nexthops: cannot read or change the kernel's routes and "
              f"nexthop objects: {e}", file=sys.stderr)
        return 2
    finally:
        nl.close()
