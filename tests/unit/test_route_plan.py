"""The pure part of host-gw: desired routes from leases, and the diff against the kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from pyflannel.backend.hostgw import desired_routes
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.netlink import Op, Route
from pyflannel.reconcile.routes import RouteScope, plan_routes

NET = IPv4Network("10.244.0.0/16")
SCOPE = RouteScope(oif=2, networks=(NET,))


def lease(third: int, gw: str) -> Lease:
    return Lease(IPv4Network(f"10.244.{third}.0/24"),
                 LeaseAttrs(public_ip=IPv4Address(gw), backend_type="host-gw"))


def route(third: int, gw: str, oif: int = 2, **kw: object) -> Route:
    return Route(dst=IPv4Network(f"10.244.{third}.0/24"), gateway=IPv4Address(gw), oif=oif,
                 **kw)  # type: ignore[arg-type]


def test_desired_is_one_route_per_peer_via_its_public_ip() -> None:
    d = desired_routes([lease(1, "192.168.1.11"), lease(2, "192.168.1.12")], 2)
    assert d == {"10.244.1.0/24": route(1, "192.168.1.11"),
                 "10.244.2.0/24": route(2, "192.168.1.12")}


def test_plan_adds_missing_replaces_wrong_deletes_stale_and_ignores_foreign() -> None:
    desired = desired_routes([lease(1, "192.168.1.11"), lease(2, "192.168.1.12"),
                              lease(3, "192.168.1.13")], 2)
    observed = [
        route(1, "192.168.1.11"),                 # correct: untouched
        route(2, "192.168.1.99"),                 # wrong gateway: replaced
        route(9, "192.168.1.19"),                 # no lease: stale, deleted
        route(8, "192.168.1.18", oif=7),          # another interface: not ours
        Route(dst=IPv4Network("10.1.0.0/16"), gateway=IPv4Address("192.168.1.1"), oif=2),
    ]
    ops = plan_routes(desired, observed, SCOPE)
    assert sorted((o.action, str(o.obj.dst)) for o in ops) == [  # type: ignore[union-attr]
        ("delete", "10.244.9.0/24"), ("replace", "10.244.2.0/24"),
        ("replace", "10.244.3.0/24")]


def test_plan_is_empty_when_in_sync() -> None:
    desired = desired_routes([lease(i, f"192.168.1.{i}") for i in range(1, 50)], 2)
    assert plan_routes(desired, list(desired.values()), SCOPE) == []


routes_strategy = st.dictionaries(
    st.integers(0, 255), st.integers(1, 254), max_size=40)


@given(want=routes_strategy, have=routes_strategy)
def test_applying_the_plan_yields_the_desired_state(want: dict[int, int],
                                                    have: dict[int, int]) -> None:
    desired = desired_routes([lease(k, f"192.168.1.{v}") for k, v in want.items()], 2)
    kernel = {str(r.dst): r for r in (route(k, f"192.168.1.{v}") for k, v in have.items())}
    for op in plan_routes(desired, list(kernel.values()), SCOPE):
        assert isinstance(op, Op)
        r = op.obj
        assert isinstance(r, Route)
        if op.action == "replace":
            kernel[str(r.dst)] = r
        else:
            kernel.pop(str(r.dst))
    assert kernel == desired
    # and a second plan has nothing left to do
    assert plan_routes(desired, list(kernel.values()), SCOPE) == []
