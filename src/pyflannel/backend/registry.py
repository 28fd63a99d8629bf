"""The backends this pyflannel has, by net-conf.json's Backend.Type, each made from the ports
it needs (wireguard: a WgPort; extension: a CommandPort), and the ones it refuses (with why:
see the README's Backends section)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pyflannel.backend.alloc import AllocBackend
from pyflannel.backend.base import Backend
from pyflannel.backend.extension import ExtensionBackend
from pyflannel.backend.hostgw import HostGwBackend
from pyflannel.backend.vxlan import VxlanBackend
from pyflannel.backend.wireguard import WireguardBackend
from pyflannel.kernel.ports import WgPort
from pyflannel.reconcile.hooks import CommandPort


class BackendPorts(Protocol):
    """What a backend may be given (pyflannel.platform.Platform has both)."""

    @property
    def wireguard(self) -> WgPort: ...

    @property
    def commands(self) -> CommandPort: ...


BACKENDS: dict[str, Callable[[BackendPorts], Backend]] = {
    "host-gw": lambda p: HostGwBackend(),
    "vxlan": lambda p: VxlanBackend(),
    "wireguard": lambda p: WireguardBackend(p.wireguard),
    "extension": lambda p: ExtensionBackend(p.commands),
    "alloc": lambda p: AllocBackend(),
}

_CLOUD = ("programs the routes in the {}'s VPC route table through its API; not "
          "implemented (no such cloud to test against): use host-gw, vxlan or wireguard")
# Upstream's other backends, and why pyflannel has none of them.
REFUSED: dict[str, str] = {
    "udp": "upstream's debugging-only backend (amd64 only, a TUN device and a userspace "
           "packet proxy); not implemented: use vxlan or wireguard",
    "ipip": "needs the kernel's ipip tunnel device, and pyflannel implements no ipip "
            "backend: use vxlan (or host-gw on one L2 segment)",
    "ipsec": "needs strongSwan's charon and the kernel's xfrm ESP support; not "
             "implemented: use wireguard for encryption",
    "aws-vpc": _CLOUD.format("AWS VPC"),
    "gce": _CLOUD.format("Google Cloud network"),
    "ali-vpc": _CLOUD.format("Alibaba Cloud VPC"),
    "tencent-vpc": _CLOUD.format("Tencent Cloud VPC"),
}


def make_backend(backend_type: str, ports: BackendPorts) -> Backend:
    """A new backend of `backend_type` (KeyError when there is none)."""
    return BACKENDS[backend_type](ports)


def unknown_backend_message(backend_type: str) -> str:
    """The one-line start-up error for a Backend.Type we do not have."""
    why = REFUSED.get(backend_type)
    if why is not None:
        return f"Backend.Type: {backend_type!r} is not supported by pyflannel: {why}"
    return (f"Backend.Type: unknown backend type: {backend_type} (this version of "
            f"pyflannel supports {', '.join(BACKENDS)})")
