"""host-gw: one route per peer, `<peer subnet> via <peer public IP> dev <external iface>`.

The desired state is a pure function of the peer leases, so it is tested without a
kernel; the RouteReconciler makes the kernel match it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyflannel.iface.select import ExternalInterface
from pyflannel.lease.model import Lease
from pyflannel.netlink import Route

BACKEND_TYPE = "host-gw"


class HostGwConfigError(Exception):
    pass


def check_host_gw(ext: ExternalInterface) -> None:
    """host-gw cannot work behind NAT: peers route to our public IP directly."""
    if ext.ext_addr != ext.iface_addr or ext.ext_addr6 != ext.iface_addr6:
        raise HostGwConfigError(
            "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
            "which is not supported by host-gw backend (drop --public-ip / the node-public-ip "
            "annotation, or use the vxlan backend)"
        )


def desired_routes(peers: Iterable[Lease], oif: int, *, ipv4: bool = True,
                   ipv6: bool = False) -> dict[str, Route]:
    """The routes host-gw wants, keyed by destination prefix (str) for cheap diffing."""
    out: dict[str, Route] = {}
    for lease in peers:
        if ipv4 and lease.subnet is not None:
            out[str(lease.subnet)] = Route(dst=lease.subnet, gateway=lease.attrs.public_ip,
                                           oif=oif)
        if ipv6 and lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None:
            out[str(lease.ipv6_subnet)] = Route(dst=lease.ipv6_subnet,
                                                gateway=lease.attrs.public_ipv6, oif=oif)
    return out
