"""What flanneld and `pyflannel status` use outside Python, in one place: the kernel
(route and link ports, interface lookup, br_netfilter), the firewall, the store, and
the extension backend's commands.
`Platform.real()` is this machine; unit tests build one from fakes (tests/fakes/)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pyflannel.config.flags import Flags
from pyflannel.iface.select import ExternalInterface, find_external_interface
from pyflannel.kernel.netlink_ports import NetlinkRoutePort, PyrouteLinkPort
from pyflannel.kernel.ports import LinkPort, RoutePort, WgPort
from pyflannel.kernel.wireguard import AutoWgPort
from pyflannel.reconcile.hookrunner import SubprocessCommands
from pyflannel.reconcile.hooks import CommandPort
from pyflannel.subnet.base import SubnetManager
from pyflannel.subnet.select import make_subnet_manager
from pyflannel.subnet.subnetenv import SubnetEnv
from pyflannel.traffic import TrafficRules, check_br_netfilter, make_traffic_rules

InterfaceFinder = Callable[..., Awaitable[ExternalInterface]]


def nexthops_wanted() -> bool:
    """PYFLANNEL_NEXTHOP_OBJECTS=off gives exactly upstream's route form (read once)."""
    return os.environ.get("PYFLANNEL_NEXTHOP_OBJECTS", "auto").lower() not in (
        "off", "false", "0", "no")


@dataclass
class Platform:
    open_routes: Callable[[], RoutePort]
    links: LinkPort
    find_interface: InterfaceFinder
    make_rules: Callable[[bool], TrafficRules]
    make_store: Callable[[Flags, SubnetEnv | None], SubnetManager]
    br_netfilter: Callable[[bool, bool], str | None] = check_br_netfilter
    nexthops: bool = field(default_factory=nexthops_wanted)
    # The wireguard backend's devices and peers (nothing happens until it is used).
    wireguard: WgPort = field(default_factory=AutoWgPort)
    commands: CommandPort = field(default_factory=SubprocessCommands)  # extension's

    @classmethod
    def real(cls) -> Platform:
        return cls(open_routes=NetlinkRoutePort.open, links=PyrouteLinkPort(),
                   find_interface=find_external_interface, make_rules=make_traffic_rules,
                   make_store=make_subnet_manager)
