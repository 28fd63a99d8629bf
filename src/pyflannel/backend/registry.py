"""The backends this pyflannel has, by net-conf.json's Backend.Type: each made from the
Platform, so a backend gets the ports it needs (wireguard: its WgPort)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pyflannel.backend.base import Backend
from pyflannel.backend.hostgw import HostGwBackend
from pyflannel.backend.vxlan import VxlanBackend
from pyflannel.backend.wireguard import WireguardBackend
from pyflannel.kernel.ports import WgPort


class BackendPorts(Protocol):
    """What a backend may be given (pyflannel.platform.Platform has it)."""

    @property
    def wireguard(self) -> WgPort: ...


BACKENDS: dict[str, Callable[[BackendPorts], Backend]] = {
    "host-gw": lambda p: HostGwBackend(),
    "vxlan": lambda p: VxlanBackend(),
    "wireguard": lambda p: WireguardBackend(p.wireguard),
}
