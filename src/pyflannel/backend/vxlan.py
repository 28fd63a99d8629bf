"""vxlan: pods' packets are encapsulated in UDP between nodes (reference §7).

Device `flannel.<VNI>` (and `flannel-v6.<VNI>` for IPv6): a vxlan device bound to the
external interface, `nolearning` by default, MTU = outer MTU − 50 (−70 for the IPv6 device:
the outer IPv6 header is 20 bytes longer). Its address is our subnet's network address as a
/32 (/128), so no connected route covers the cluster network: every peer has its own route.

Per peer (lease `{"VNI":1,"VtepMAC":"…"}`), exactly what upstream programs, in this order:
  1. `ip neigh replace <peer subnet .0> lladdr <VtepMAC> dev flannel.1 nud permanent`
  2. `bridge fdb replace <VtepMAC> dev flannel.1 dst <peer PublicIP> self permanent`
  3. `ip route replace <peer subnet> via <peer subnet .0> dev flannel.1 onlink`
The KernelReconciler applies neighbour → FDB → route, so the kernel never resolves the
gateway itself. With DirectRouting, a peer whose public IP `ip route get` resolves to one
route without a gateway (it shares our L2 segment) gets a host-gw route instead.

Local (source) address of the tunnel (reference §14.6): the *interface* address, not
--public-ip. The local address is the outer packets' source; it must be assigned on this
host, or the kernel sends packets from an address that is not ours, which reverse-path
filters and NAT devices drop. --public-ip (ExtAddr) is what peers send *to* (their FDB dst,
published in our lease); when it differs from the interface address, a NAT in front of us
maps it to the interface address. Upstream ≤ v0.27.3 did the same; v0.27.4+ uses ExtAddr,
which breaks exactly that NAT case.

The VTEP MAC survives restarts: it is taken from the store's memory of our previous lease
(StoredNodeState), else from a compatible existing device, else random (locally
administered unicast). Peers' permanent neighbour/FDB entries therefore stay valid.

Beyond upstream: a deleted device is recreated at once and every peer's entries are
replayed (on_link_event returns True and the daemon rebuilds all peer states, §14.7).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Container
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from pyflannel.backend.base import BackendError, BackendSetup, PeerState
from pyflannel.config.netconf import NetConf, VxlanOptions, vxlan_options
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.ports import DeviceSpec, ExistingDevice, LinkPort
from pyflannel.lease.model import Lease, StoredNodeState, compact_json
from pyflannel.netlink import FdbEntry, LinkEvent, Neighbour, Route
from pyflannel.reconcile.plan import KernelScope

log = logging.getLogger(__name__)

BACKEND_TYPE = "vxlan"
ENCAP_OVERHEAD = 50  # inner Ethernet 14 + outer IPv4 20 + UDP 8 + VXLAN 8
ENCAP_OVERHEAD_V6 = 70  # the outer IPv6 header is 40 bytes
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

Addr = IPv4Address | IPv6Address
Net = IPv4Network | IPv6Network


def device_name(vni: int, *, ipv6: bool = False) -> str:
    return f"flannel-v6.{vni}" if ipv6 else f"flannel.{vni}"


def random_vtep_mac() -> str:
    """6 random bytes, multicast bit cleared, locally-administered bit set (as upstream)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return b.hex(":")


def valid_vtep_mac(mac: object) -> str | None:
    """`mac` lower-cased when it is a unicast colon-hex MAC other than all-zero, else None."""
    if not isinstance(mac, str):
        return None
    mac = mac.lower()
    if not _MAC.match(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return None
    return mac


def backend_data(vni: int, mac: str) -> str:
    """Upstream's vxlanLeaseAttrs as Go marshals it: `{"VNI":1,"VtepMAC":"0e:..."}`."""
    return compact_json({"VNI": vni, "VtepMAC": mac})


def vtep_mac_of(data: str) -> str | None:
    """The VtepMAC in a lease's backend data, None when absent or malformed."""
    if not data:
        return None
    # Fast path for the form Go writes (a 10k-peer resync parses 10k of these).
    at = data.find('"VtepMAC":"')
    if at >= 0 and data[at + 28:at + 29] == '"':
        return valid_vtep_mac(data[at + 11:at + 28])
    try:
        obj: Any = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    # Go's decoder matches the key case-insensitively.
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == "vtepmac":
            return valid_vtep_mac(v)
    return None


def vtep_claims(lease: Lease) -> tuple[str, ...]:
    """The VTEP MACs a lease claims, per device family: they key the FDB, so a second lease
    with a copied MAC would redirect the first one's traffic (LeaseTable refuses it)."""
    macs = (vtep_mac_of(lease.attrs.backend_data), vtep_mac_of(lease.attrs.backend_v6_data))
    return tuple(f"vtep{fam}:{mac.lower()}" for fam, mac in zip((4, 6), macs, strict=True)
                 if mac is not None)


def incompatibility(want: DeviceSpec, have: ExistingDevice) -> str | None:
    """Why `have` cannot be reused for `want` (upstream's vxlanLinksIncompat, plus the
    learning flag), or None. Unset values on either side are not compared, as upstream."""
    if have.kind != "vxlan":
        return f"type {have.kind} is not vxlan"
    if have.vni != want.vni:
        return f"vni {have.vni} != {want.vni}"
    if have.link and want.link and have.link != want.link:
        return f"vtep (external) interface {have.link} != {want.link}"
    if have.local is not None and have.local != want.local:
        return f"vtep IP {have.local} != {want.local}"
    if have.group:
        return f"group address {have.group} is set"
    if have.l2miss:
        return "l2miss is on"
    if have.port and want.port and have.port != want.port:
        return f"port {have.port} != {want.port}"
    if have.gbp != want.gbp:
        return f"gbp {have.gbp} != {want.gbp}"
    if have.learning != want.learning:
        return f"learning {have.learning} != {want.learning}"
    return None


@dataclass
class _Family:
    """One address family's device and what it was built from."""

    ipv6: bool
    spec: DeviceSpec
    mac: str
    index: int = 0
    network: Net | None = None
    subnet: Net | None = None


class VxlanBackend:
    backend_type = BACKEND_TYPE
    own = PeerState()

    def __init__(self) -> None:
        self._links: LinkPort | None = None
        self._ext: ExternalInterface | None = None
        self._opts = VxlanOptions()
        self._v4: _Family | None = None
        self._v6: _Family | None = None
        self._warned: set[str] = set()

    @property
    def direct_routing(self) -> bool:
        """Whether peer_state needs to know which peers are on our segment."""
        return self._opts.direct_routing

    @property
    def _devices(self) -> LinkPort:
        assert self._links is not None, "register() first"
        return self._links

    @property
    def families(self) -> tuple[_Family, ...]:
        return tuple(f for f in (self._v4, self._v6) if f is not None)

    # -- start-up -----------------------------------------------------------------------

    async def register(self, ext: ExternalInterface, nc: NetConf, stored: StoredNodeState,
                       links: LinkPort, *, create: bool = True) -> BackendSetup:
        """Find or create our devices. create=False (`pyflannel status --check`) only
        attaches to existing ones: a missing device leaves the family's index 0, so its
        peers show as missing entries."""
        self._ext, self._links = ext, links
        try:
            self._opts = opts = vxlan_options(nc)
        except ValueError as e:
            raise BackendError(str(e)) from None
        outer = opts.mtu or ext.mtu
        for ipv6, enabled, addr, data, network in (
                (False, nc.enable_ipv4, ext.iface_addr, stored.backend_data, nc.network),
                (True, nc.enable_ipv6, ext.iface_addr6, stored.backend_v6_data,
                 nc.ipv6_network)):
            if not enabled:
                continue
            if addr is None:
                raise BackendError(f"vxlan over IPv{6 if ipv6 else 4} needs an "
                                   f"IPv{6 if ipv6 else 4} address on {ext.name}")
            fam = _Family(ipv6, DeviceSpec(
                device_name(opts.vni, ipv6=ipv6), opts.vni, ext.index, addr, opts.port,
                opts.gbp, opts.learning,
                outer - (ENCAP_OVERHEAD_V6 if ipv6 else ENCAP_OVERHEAD)),
                vtep_mac_of(data) or "", network=network)
            if ipv6:
                self._v6 = fam
            else:
                self._v4 = fam
            if create:
                await self._ensure_device(fam)
            else:
                have = await self._find(fam.spec.name)
                if have is not None:
                    fam.index, fam.mac = have.index, (have.mac or "").lower()
        # Pods get upstream's FLANNEL_MTU (outer − 50) whenever IPv4 is on; IPv6 traffic
        # through the smaller v6 device is then sized by path-MTU discovery.
        mtu = outer - (ENCAP_OVERHEAD if nc.enable_ipv4 else ENCAP_OVERHEAD_V6)
        return BackendSetup(
            backend_type=BACKEND_TYPE, mtu=mtu,
            backend_data=backend_data(opts.vni, self._v4.mac) if self._v4 else "",
            backend_v6_data=backend_data(opts.vni, self._v6.mac) if self._v6 else "")

    async def _find(self, name: str) -> ExistingDevice | None:
        try:
            return await self._devices.find(name)
        except OSError as e:
            raise BackendError(f"failed to look up device {name}: {e}") from None

    async def _ensure_device(self, fam: _Family) -> None:
        """Create the device, or reuse a compatible one (keeping its MAC unless the store
        remembers another), or recreate an incompatible one."""
        spec = fam.spec
        try:
            have = await self._devices.find(spec.name)
            if have is not None:
                why = incompatibility(spec, have)
                if why is None:
                    fam.index = have.index
                    fam.mac = fam.mac or valid_vtep_mac(have.mac) or random_vtep_mac()
                    await self._devices.set_up(
                        have.index,
                        mac=fam.mac if (have.mac or "").lower() != fam.mac else None,
                        mtu=spec.mtu if have.mtu != spec.mtu else None)
                    log.info("Using existing device %s (index %d, MAC %s)", spec.name,
                             have.index, fam.mac)
                    return
                log.warning("%r already exists with incompatible configuration: %s; "
                            "recreating device", spec.name, why)
                await self._devices.delete(have.index)
            fam.mac = fam.mac or random_vtep_mac()
            fam.index = await self._devices.ensure(spec, fam.mac)
        except OSError as e:
            raise BackendError(f"failed to set up device {spec.name}: {e}") from None
        log.info("Created device %s (index %d, VNI %d, local %s, MAC %s, MTU %d)", spec.name,
                 fam.index, spec.vni, spec.local, fam.mac, spec.mtu)

    async def configure(self, lease: Lease) -> None:
        for fam in self.families:
            subnet = lease.ipv6_subnet if fam.ipv6 else lease.subnet
            if subnet is None:
                raise BackendError(f"our lease has no subnet for {fam.spec.name}")
            fam.subnet = subnet
            await self._configure_device(fam)

    async def _configure_device(self, fam: _Family) -> None:
        assert fam.subnet is not None
        try:
            await self._devices.set_up(fam.index,
                                       address=(fam.subnet.network_address, fam.network))
            have = await self._devices.find(fam.spec.name)
        except OSError as e:
            raise BackendError(f"failed to configure {fam.spec.name}: {e}") from None
        # A MAC policy (systemd MACAddressPolicy=random) may have replaced ours (#1795).
        if have is None or (have.mac or "").lower() != fam.mac:
            raise BackendError(f"{fam.spec.name}'s mac address wanted: {fam.mac}, but got: "
                               f"{have.mac if have else None}")

    # -- what the reconciler owns and programs -------------------------------------------

    def scope(self) -> KernelScope:
        assert self._ext is not None
        devs = frozenset(f.index for f in self.families if f.index)
        networks = tuple(f.network for f in self.families if f.network is not None)
        # The external interface too: DirectRouting routes live there, and host-gw routes
        # left behind by a backend switch are cleaned up.
        return KernelScope(route_oifs=devs | {self._ext.index}, networks=networks,
                           neighbour_ifindexes=devs)

    def peer_state(self, lease: Lease, direct: Container[Addr] = ()) -> PeerState:
        """Pure: `direct` holds the public IPs the engine found on our segment (asked
        only with DirectRouting)."""
        assert self._ext is not None
        routes: list[Route] = []
        neighbours: list[Neighbour] = []
        fdb: list[FdbEntry] = []
        for fam in self.families:
            subnet: Net | None = lease.ipv6_subnet if fam.ipv6 else lease.subnet
            public: Addr | None = lease.attrs.public_ipv6 if fam.ipv6 else lease.attrs.public_ip
            if subnet is None or public is None:
                continue
            if self._opts.direct_routing and public in direct:
                routes.append(Route(dst=subnet, gateway=public, oif=self._ext.index))
                continue
            data = lease.attrs.backend_v6_data if fam.ipv6 else lease.attrs.backend_data
            mac = vtep_mac_of(data)
            if mac is None:
                what = f"{lease.key}/{fam.spec.name}"
                if what not in self._warned:
                    self._warned.add(what)
                    log.warning("Ignoring lease %s for %s: its backend data has no valid "
                                "VtepMAC (%s)", lease.key, fam.spec.name, data or "none")
                continue
            if not fam.index:
                continue  # the device is gone and could not be recreated yet
            gw = subnet.network_address
            neighbours.append(Neighbour(ifindex=fam.index, ip=gw, lladdr=mac))
            fdb.append(FdbEntry(ifindex=fam.index, lladdr=mac, dst=public))
            routes.append(Route(dst=subnet, gateway=gw, oif=fam.index, onlink=True))
        return PeerState(routes=tuple(routes), neighbours=tuple(neighbours), fdb=tuple(fdb))

    # -- the device going away -------------------------------------------------------------

    async def on_link_event(self, kind: str, link: LinkEvent) -> bool:
        """Recreate our device when it was deleted (or replaced by someone else's); True
        when its ifindex changed, so the daemon rebuilds every peer's state and the scope."""
        changed = False
        for fam in self.families:
            ours = link.ifname == fam.spec.name
            gone = ours and kind == "link_del" and link.ifindex == fam.index
            # Someone else's device under our name (we would know its ifindex otherwise).
            replaced = ours and kind == "link_new" and link.ifindex != fam.index
            if not (gone or replaced or fam.index == 0):  # 0: an earlier recreation failed
                continue
            log.warning("Device %s was %s; recreating it and replaying every peer",
                        fam.spec.name, "replaced" if replaced else "deleted")
            try:
                await self._recreate(fam)
            except BackendError as e:
                log.error("Failed to recreate %s: %s (retrying on the next link event)",
                          fam.spec.name, e)
                fam.index = 0
            changed = True
        return changed

    async def _recreate(self, fam: _Family) -> None:
        await self._ensure_device(fam)
        if fam.subnet is not None:
            await self._configure_device(fam)
