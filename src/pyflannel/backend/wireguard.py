"""wireguard: pods' packets are encrypted in UDP between nodes (reference §2.1, §7).

As upstream: device `flannel-wg` (and `flannel-wg-v6` in the default "separate" mode with
IPv6), MTU = (Backend.MTU or the external MTU) − 80, address `<subnet .0>/32` (/128), one
route for the whole cluster network via the device (scope link), and per peer node one
WireGuard peer: its public key, endpoint `PublicIP:Port`, AllowedIPs = its subnet(s), our
PSK and keepalive. The private key lives in /run/flannel/wgkey (0400) or
$WIREGUARD_KEY_FILE and survives restarts; the lease carries `{"PublicKey":…,"Port":…}`.

Modes: "separate" keeps one device per family (v4 peers on ListenPort, v6 peers on
ListenPortV6); "ipv4", "ipv6" and "auto" use one device for both families, with the peer's
endpoint in that family ("auto": upstream's choice, IPv4 unless only IPv6 looks public).

Beyond upstream: the device is kept across restarts (upstream deletes it on exit, so every
tunnel drops), the kernel's module or wireguard-go is used (kernel/wireguard.py), a peer
lease that copies another's public key is refused (LeaseTable claims), and a deleted device
is recreated with every peer (on_link_event).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Container
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from pyflannel.backend.base import BackendError, BackendSetup, PeerState
from pyflannel.config.netconf import NetConf, NetConfError, WireguardOptions, wireguard_options
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.ports import Addr, LinkPort, WgError, WgPort
from pyflannel.kernel.wgkeys import (
    WgKeyError,
    decode_key,
    encode_key,
    load_or_create_private_key,
    public_key,
)
from pyflannel.lease.model import Lease, StoredNodeState, compact_json
from pyflannel.netlink import RT_SCOPE_LINK, LinkEvent, Route
from pyflannel.reconcile.plan import KernelScope, WgDevice, WgPeer

log = logging.getLogger(__name__)

BACKEND_TYPE = "wireguard"
OVERHEAD = 80  # outer IPv6 40 + UDP 8 + WireGuard 32 (type, index, nonce, tag)
DEVICE, DEVICE_V6 = "flannel-wg", "flannel-wg-v6"
DEFAULT_KEY_FILE = "/run/flannel/wgkey"

Net = IPv4Network | IPv6Network


def key_file() -> Path:
    return Path(os.environ.get("WIREGUARD_KEY_FILE") or DEFAULT_KEY_FILE)


def backend_data(key: str, port: int) -> str:
    """upstream's wireguardLeaseAttrs as Go marshals it."""
    return compact_json({"PublicKey": key, "Port": port})


def lease_key_port(data: str) -> tuple[str | None, int]:
    """(PublicKey, Port) from a lease's backend data; (None, 0) when unusable. Go matches
    the keys case-insensitively; a missing Port (older upstream) is 0."""
    if not data:
        return None, 0
    try:
        obj: Any = json.loads(data)
    except ValueError:
        return None, 0
    if not isinstance(obj, dict):
        return None, 0
    key: str | None = None
    port = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        if k.lower() == "publickey" and isinstance(v, str):
            try:
                key = encode_key(decode_key(v))
            except WgKeyError:
                key = None
        elif k.lower() == "port" and isinstance(v, int) and not isinstance(v, bool) \
                and 0 <= v <= 65535:
            port = v
    return key, port


def wg_claims(lease: Lease) -> tuple[str, ...]:
    """The public keys a lease claims: a peer is keyed by its key, so a second lease with a
    copied key would take the first one's allowed IPs (LeaseTable refuses it)."""
    out = []
    for fam, data in ((4, lease.attrs.backend_data), (6, lease.attrs.backend_v6_data)):
        key, _ = lease_key_port(data)
        if key is not None:
            out.append(f"wg{fam}:{key}")
    return tuple(out)


def _private(addr: Addr) -> bool:
    return addr.is_private or addr.is_link_local


@dataclass
class _Device:
    name: str
    port: int
    families: tuple[int, ...]  # 4 and/or 6: whose networks it routes
    mtu: int
    index: int = 0


class WireguardBackend:
    backend_type = BACKEND_TYPE
    direct_routing = False

    def __init__(self, wg: WgPort) -> None:
        self.wg = wg
        self.own = PeerState()
        self._links: LinkPort | None = None
        self._ext: ExternalInterface | None = None
        self._opts = WireguardOptions()
        self._devices: list[_Device] = []
        self._private = ""
        self._public = ""
        self._psk: str | None = None
        self._nc: NetConf | None = None
        self._lease: Lease | None = None
        self._warned: set[str] = set()

    @property
    def public_key(self) -> str:
        return self._public

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d.name for d in self._devices)

    # -- start-up -----------------------------------------------------------------------

    async def register(self, ext: ExternalInterface, nc: NetConf, stored: StoredNodeState,
                       links: LinkPort, *, create: bool = True) -> BackendSetup:
        self._ext, self._links, self._nc = ext, links, nc
        try:
            self._opts = opts = wireguard_options(nc)
        except NetConfError as e:
            raise BackendError(str(e)) from None
        # canonical base64, so the key read back from the device compares equal
        self._psk = encode_key(decode_key(opts.psk)) if opts.psk else None
        mtu = (opts.mtu or ext.mtu) - OVERHEAD
        if opts.mode == "separate":
            if nc.enable_ipv4:
                self._devices.append(_Device(DEVICE, opts.listen_port, (4,), mtu))
            if nc.enable_ipv6:
                self._devices.append(_Device(DEVICE_V6, opts.listen_port_v6, (6,), mtu))
        else:
            fams = tuple(f for f, on in ((4, nc.enable_ipv4), (6, nc.enable_ipv6)) if on)
            self._devices.append(_Device(DEVICE, opts.listen_port, fams, mtu))
        if opts.mode == "ipv6" and ext.ext_addr6 is None:
            raise BackendError("Backend.Mode ipv6 needs an IPv6 public address on "
                               f"{ext.name} (or --public-ipv6)")
        if not create:  # `pyflannel status`: look only
            for d in self._devices:
                found = await links.find(d.name)
                d.index = found.index if found is not None else 0
            return BackendSetup(BACKEND_TYPE, mtu)
        path = key_file()
        try:
            raw, created = load_or_create_private_key(path)
        except WgKeyError as e:
            raise BackendError(str(e)) from None
        except OSError as e:
            raise BackendError(f"could not write key file {path}: {e.strerror or e}") from None
        self._private, self._public = encode_key(raw), encode_key(public_key(raw))
        log.info("WireGuard key %s %s (public key %s)", path,
                 "created" if created else "loaded", self._public)
        for d in self._devices:
            await self._ensure(d)
        log.info("wireguard: using the %s for %s", self.wg.implementation,
                 ", ".join(self.devices))
        ports = {fam: d.port for d in self._devices for fam in d.families}
        return BackendSetup(
            backend_type=BACKEND_TYPE, mtu=mtu,
            backend_data=backend_data(self._public, ports[4]) if nc.enable_ipv4 else "",
            backend_v6_data=backend_data(self._public, ports[6]) if nc.enable_ipv6 else "")

    def _spec(self, d: _Device) -> WgDevice:
        return WgDevice(d.name, self._private, d.port, d.mtu)

    async def _ensure(self, d: _Device) -> None:
        assert self._links is not None
        try:
            d.index = await self.wg.ensure(self._spec(d))
            await self._links.set_up(d.index, mtu=d.mtu)
        except (WgError, OSError) as e:
            raise BackendError(f"failed to set up {d.name}: {e}") from None

    async def configure(self, lease: Lease) -> None:
        self._lease = lease
        for d in self._devices:
            await self._configure(d)
        self._own()

    async def _configure(self, d: _Device) -> None:
        assert self._links is not None and self._nc is not None and self._lease is not None
        nc, lease = self._nc, self._lease
        try:
            for fam in d.families:
                subnet = lease.subnet if fam == 4 else lease.ipv6_subnet
                network = nc.network if fam == 4 else nc.ipv6_network
                if subnet is None:
                    raise BackendError(f"our lease has no IPv{fam} subnet for {d.name}")
                await self._links.set_up(d.index, address=(subnet.network_address, network))
        except OSError as e:
            raise BackendError(f"failed to configure {d.name}: {e}") from None

    def _own(self) -> None:
        """The devices' keys and the cluster network's route via each device."""
        nc = self._nc
        assert nc is not None
        routes = []
        for d in self._devices:
            if not d.index:
                continue
            for fam in d.families:
                net = nc.network if fam == 4 else nc.ipv6_network
                if net is not None:
                    routes.append(Route(dst=net, gateway=None, oif=d.index,
                                        scope=RT_SCOPE_LINK))
        self.own = PeerState(routes=tuple(routes),
                             wg_devices=tuple(self._spec(d) for d in self._devices))

    # -- what the reconciler owns and programs -------------------------------------------

    def scope(self) -> KernelScope:
        assert self._nc is not None
        nc = self._nc
        networks = tuple(n for n in (nc.network if nc.enable_ipv4 else None,
                                     nc.ipv6_network if nc.enable_ipv6 else None) if n)
        return KernelScope(route_oifs=frozenset(d.index for d in self._devices if d.index),
                           networks=networks)

    def peer_state(self, lease: Lease, direct: Container[Addr] = ()) -> PeerState:
        """Pure: one WireGuard peer per device that carries one of the lease's families."""
        peers: list[WgPeer] = []
        for d in self._devices:
            subnets: list[Net] = []
            key: str | None = None
            endpoint: tuple[Addr, int] | None = None
            for fam in d.families:
                subnet: Net | None = lease.subnet if fam == 4 else lease.ipv6_subnet
                if subnet is not None:
                    subnets.append(subnet)
            fam = self._endpoint_family(d, lease)
            data = lease.attrs.backend_data if fam == 4 else lease.attrs.backend_v6_data
            key, port = lease_key_port(data)
            ip = lease.attrs.public_ip if fam == 4 else lease.attrs.public_ipv6
            if ip is not None and not ip.is_unspecified:
                endpoint = (ip, port or d.port)
            if key is None or not subnets:
                self._warn(lease, d, f"its backend data has no valid PublicKey "
                                     f"({data or 'none'})")
                continue
            if key == self._public:
                self._warn(lease, d, "it claims our own public key")
                continue
            peers.append(WgPeer(device=d.name, public_key=key, endpoint=endpoint,
                                allowed_ips=frozenset(subnets),
                                preshared_key=self._psk,
                                keepalive=self._opts.keepalive))
        return PeerState(wg=tuple(peers))

    def _endpoint_family(self, d: _Device, lease: Lease) -> int:
        if len(d.families) == 1 and self._opts.mode == "separate":
            return d.families[0]
        mode = self._opts.mode
        if mode in ("ipv4", "ipv6"):
            return 4 if mode == "ipv4" else 6
        # auto, upstream's selectMode: IPv4 unless the peer has IPv6 and only IPv6 looks
        # public on both ends
        v4, v6 = lease.attrs.public_ip, lease.attrs.public_ipv6
        ext = self._ext
        if v6 is None or ext is None:
            return 4
        if not _private(v4) and ext.ext_addr is not None:
            return 4
        if not _private(v6) and ext.ext_addr6 is not None and not _private(ext.ext_addr6):
            return 6
        return 4

    def _warn(self, lease: Lease, d: _Device, why: str) -> None:
        what = f"{lease.key}/{d.name}/{why}"
        if what not in self._warned:
            self._warned.add(what)
            log.warning("Ignoring lease %s for %s: %s", lease.key, d.name, why)

    # -- the device going away -------------------------------------------------------------

    async def on_link_event(self, kind: str, link: LinkEvent) -> bool:
        """Recreate a deleted device (wireguard-go's TUN also goes when the process dies)
        with its address; True when an ifindex changed (every peer is then replayed)."""
        changed = False
        for d in self._devices:
            ours = link.ifname == d.name
            gone = ours and kind == "link_del" and link.ifindex == d.index
            if not (gone or (d.index == 0 and self._lease is not None)):
                continue
            log.warning("Device %s was deleted; recreating it and replaying every peer", d.name)
            try:
                await self._ensure(d)
                await self._configure(d)
            except BackendError as e:
                log.error("Failed to recreate %s: %s (retrying on the next link event)",
                          d.name, e)
                d.index = 0
            changed = True
        if changed:
            self._own()
        return changed
