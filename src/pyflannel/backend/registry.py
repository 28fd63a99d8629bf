"""The backends this pyflannel has, by net-conf.json's Backend.Type."""

from __future__ import annotations

from pyflannel.backend.base import Backend
from pyflannel.backend.hostgw import HostGwBackend
from pyflannel.backend.vxlan import VxlanBackend

BACKENDS: dict[str, type[Backend]] = {"host-gw": HostGwBackend, "vxlan": VxlanBackend}
