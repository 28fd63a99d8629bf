"""`pyflannel cleanup-nexthops` on the real kernel, in a throw-away namespace: routes on our
nexthop objects (IPv4, IPv6, onlink as vxlan has them, another table, with
nexthop_compat_mode 1 and 0) become upstream's plain form in place, then only our nexthops
go; and RouteGapWatch, which the migration tests rely on, does see a gap when there is one.
What the kernel holds is read with iproute2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyflannel.reconcile.plan import NHID_BASE
from pyflannel_lab.netns import NetNamespace
from pyflannel_lab.sampling import RouteGapWatch

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2"),
]

A, B, C, D = (str(NHID_BASE + i) for i in (7, 8, 9, 10))


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    n = NetNamespace.create("pnhc")
    try:
        n.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        for dev in ("eth0", "eth0p"):
            n.ip("link", "set", dev, "up")  # a nexthop needs carrier on its device
        n.ip("addr", "add", "192.168.77.1/24", "dev", "eth0")
        n.ip("-6", "addr", "add", "fd77::1/64", "dev", "eth0", "nodad")
        yield n
    finally:
        n.delete()


def program(ns: NetNamespace) -> None:
    """What pyflannel leaves (ids in its range), and someone else's nexthop and route."""
    ns.ip("nexthop", "add", "id", A, "via", "192.168.77.2", "dev", "eth0")
    ns.ip("nexthop", "add", "id", B, "via", "10.244.4.0", "dev", "eth0", "onlink")
    ns.ip("nexthop", "add", "id", C, "via", "fd77::2", "dev", "eth0")
    ns.ip("nexthop", "add", "id", D, "via", "192.168.77.9", "dev", "eth0")  # unused
    ns.ip("nexthop", "add", "id", "77", "via", "192.168.77.3", "dev", "eth0")  # not ours
    ns.ip("route", "add", "10.244.2.0/24", "nhid", A)
    ns.ip("route", "add", "10.244.3.0/24", "nhid", A, "table", "100")
    ns.ip("route", "add", "10.244.4.0/24", "nhid", B)
    ns.ip("-6", "route", "add", "fd10:244:0:2::/64", "nhid", C)
    ns.ip("route", "add", "10.244.9.0/24", "nhid", "77")


def cleanup(ns: NetNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run(sys.executable, "-m", "pyflannel.cli", "cleanup-nexthops", *args, check=False)


def nexthop_ids(ns: NetNamespace) -> list[str]:
    return sorted(str(nh["id"]) for nh in json.loads(ns.ip("-j", "nexthop", "show").stdout))


def lines(ns: NetNamespace, *args: str) -> list[str]:
    return [ln.strip() for ln in ns.ip(*args).stdout.splitlines()]


@pytest.mark.parametrize("compat", ["1", "0"])
def test_routes_become_upstreams_form_in_place_then_only_our_nexthops_go(
        ns: NetNamespace, compat: str) -> None:
    program(ns)
    ns.sysctl("net.ipv4.nexthop_compat_mode", compat)
    watched = {"10.244.2.0/24", "10.244.4.0/24", "fd10:244:0:2::/64"}
    dry = cleanup(ns, "--dry-run")
    assert dry.returncode == 0, dry
    assert nexthop_ids(ns) == sorted([A, B, C, D, "77"])  # nothing changed
    with RouteGapWatch(ns.name, watched) as watch:
        done = cleanup(ns)
    assert done.returncode == 0, done
    assert watch.gaps == [] and watch.dump_misses == 0
    assert all(seen == {"nhid", "plain"} for seen in watch.forms.values()), watch.forms
    assert done.stdout.splitlines() == [
        f"converted route 10.244.2.0/24 via 192.168.77.2 dev eth0 (was nhid {A})",
        f"converted route 10.244.3.0/24 table 100 via 192.168.77.2 dev eth0 (was nhid {A})",
        f"converted route 10.244.4.0/24 via 10.244.4.0 dev eth0 onlink (was nhid {B})",
        f"converted route fd10:244:0:2::/64 via fd77::2 dev eth0 (was nhid {C})",
        f"removed nexthop {A} (via 192.168.77.2 dev eth0)",
        f"removed nexthop {B} (via 10.244.4.0 dev eth0 onlink)",
        f"removed nexthop {C} (via fd77::2 dev eth0)",
        f"removed nexthop {D} (via 192.168.77.9 dev eth0)",
        "done: 4 routes converted, 4 nexthop objects removed, 0 kept, 0 failed",
    ]
    assert dry.stdout.splitlines()[:-1] == [
        ln.replace("converted", "would convert").replace("removed", "would remove")
        for ln in done.stdout.splitlines()[:-1]]
    assert nexthop_ids(ns) == ["77"]
    v4 = lines(ns, "route", "show")
    assert "10.244.2.0/24 via 192.168.77.2 dev eth0" in v4
    assert "10.244.4.0/24 via 10.244.4.0 dev eth0 onlink" in v4
    assert "10.244.9.0/24 nhid 77" in " ".join(v4)  # someone else's: untouched
    assert lines(ns, "route", "show", "table", "100") == [
        "10.244.3.0/24 via 192.168.77.2 dev eth0"]
    assert "fd10:244:0:2::/64 via fd77::2 dev eth0 metric 1024 pref medium" in lines(
        ns, "-6", "route", "show")
    again = cleanup(ns)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again


def test_unused_only_changes_no_route_and_says_what_it_kept(ns: NetNamespace) -> None:
    program(ns)
    before = lines(ns, "route", "show")
    out = cleanup(ns, "--unused-only")
    assert out.returncode == 1, out
    assert lines(ns, "route", "show") == before
    assert nexthop_ids(ns) == sorted([A, B, C, "77"])
    assert f"removed nexthop {D} (via 192.168.77.9 dev eth0)" in out.stdout
    assert (f"kept nexthop {A} (via 192.168.77.2 dev eth0): still used by 10.244.2.0/24, "
            "10.244.3.0/24 table 100 (--unused-only)") in out.stdout


def test_a_namespace_without_our_nexthops_is_left_alone(ns: NetNamespace) -> None:
    ns.ip("nexthop", "add", "id", "77", "via", "192.168.77.3", "dev", "eth0")
    out = cleanup(ns)
    assert out.returncode == 0 and "no pyflannel nexthop objects here" in out.stdout, out
    assert nexthop_ids(ns) == ["77"]


def test_the_gap_watch_sees_a_deleted_route_and_a_nexthop_deleted_under_a_route(
        ns: NetNamespace) -> None:
    program(ns)
    with RouteGapWatch(ns.name, {"10.244.2.0/24", "10.244.4.0/24"}) as watch:
        ns.ip("route", "replace", "10.244.2.0/24", "via", "192.168.77.2", "dev", "eth0")
        ns.ip("nexthop", "del", "id", B)  # takes 10.244.4.0/24 along, silently
    assert watch.gaps == [f"nexthop {B} deleted under the route to 10.244.4.0/24"]
    with RouteGapWatch(ns.name, {"10.244.2.0/24"}) as watch:
        ns.ip("route", "del", "10.244.2.0/24")
        ns.ip("route", "add", "10.244.2.0/24", "via", "192.168.77.2", "dev", "eth0")
    assert watch.gaps == ["route to 10.244.2.0/24 deleted"]
