"""The backends this pyflannel has, by net-conf.json's Backend.Type, and the ones it
refuses (with why: see the README's Backends section)."""

from __future__ import annotations

from pyflannel.backend.alloc import AllocBackend
from pyflannel.backend.base import Backend
from pyflannel.backend.extension import ExtensionBackend
from pyflannel.backend.hostgw import HostGwBackend
from pyflannel.backend.vxlan import VxlanBackend
from pyflannel.reconcile.hooks import CommandPort

BACKENDS: dict[str, type[Backend]] = {"host-gw": HostGwBackend, "vxlan": VxlanBackend,
                                      "extension": ExtensionBackend, "alloc": AllocBackend}

_CLOUD = ("programs the routes in the {}'s VPC route table through its API; not "
          "implemented (no such cloud to test against): use host-gw or vxlan")
# Upstream's other backends, and why pyflannel has none of them.
REFUSED: dict[str, str] = {
    "udp": "upstream's debugging-only backend (amd64 only, a TUN device and a userspace "
           "packet proxy); not implemented: use vxlan",
    "ipip": "needs the kernel's ipip tunnel device, and pyflannel implements no ipip "
            "backend: use vxlan (or host-gw on one L2 segment)",
    "ipsec": "needs strongSwan's charon and the kernel's xfrm ESP support; not "
             "implemented: use vxlan",
    "aws-vpc": _CLOUD.format("AWS VPC"),
    "gce": _CLOUD.format("Google Cloud network"),
    "ali-vpc": _CLOUD.format("Alibaba Cloud VPC"),
    "tencent-vpc": _CLOUD.format("Tencent Cloud VPC"),
}


def make_backend(backend_type: str, *, commands: CommandPort | None = None) -> Backend:
    """A new backend of `backend_type` (KeyError when there is none); `commands` runs the
    extension backend's commands."""
    cls = BACKENDS[backend_type]
    if cls is ExtensionBackend:
        return ExtensionBackend(commands)
    return cls()


def unknown_backend_message(backend_type: str) -> str:
    """The one-line start-up error for a Backend.Type we do not have."""
    why = REFUSED.get(backend_type)
    if why is not None:
        return f"Backend.Type: {backend_type!r} is not supported by pyflannel: {why}"
    return (f"Backend.Type: unknown backend type: {backend_type} (this version of "
            f"pyflannel supports {', '.join(BACKENDS)})")
