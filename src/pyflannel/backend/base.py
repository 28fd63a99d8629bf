"""The seam between the daemon and a backend.

A backend turns one peer lease into the kernel objects that reach it (`peer_state`, a
pure function of the lease and facts handed in), owns a part of the kernel (`scope`), and
may need devices before and after the lease is acquired (`register`, `configure`, through
the LinkPort). Everything else (diffing, applying, drift repair) is the engine's job, the
same for every backend.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pyflannel.config.netconf import NetConf
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.ports import Addr, LinkPort
from pyflannel.lease.model import Lease, StoredNodeState
from pyflannel.netlink import FdbEntry, LinkEvent, Neighbour, Route
from pyflannel.reconcile.hooks import PeerHook
from pyflannel.reconcile.plan import (
    DesiredState,
    KernelScope,
    WgDevice,
    WgPeer,
    fdb_key,
    neighbour_key,
    net_key,
)

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class PeerState:
    """What one peer needs in our kernel."""

    routes: tuple[Route, ...] = ()
    neighbours: tuple[Neighbour, ...] = ()
    fdb: tuple[FdbEntry, ...] = ()
    wg: tuple[WgPeer, ...] = ()
    wg_devices: tuple[WgDevice, ...] = ()
    hook: PeerHook | None = None  # extension: the commands this peer's changes run


@dataclass(frozen=True)
class BackendSetup:
    """What the backend publishes in our lease, and the MTU pods get (FLANNEL_MTU)."""

    backend_type: str
    mtu: int
    backend_data: str = ""  # compact JSON, "" for none
    backend_v6_data: str = ""
    # False (alloc): no data path, so peers' leases are not watched at all (upstream's
    # alloc network never runs a lease watch; in kube mode not even the node informer).
    watch_peers: bool = True


class BackendError(Exception):
    """A backend cannot start; the message is one line that says what to do."""


class Backend(Protocol):
    backend_type: str
    # What the backend needs whatever the peers (wireguard: its devices' keys and the route
    # for the cluster network via its device); read after configure() and every rebuild.
    own: PeerState

    @property
    def direct_routing(self) -> bool:
        """Whether peer_state needs to know which peers' public IPs are on our segment
        (the engine looks them up, asynchronously, and hands them in)."""
        ...

    async def register(self, ext: ExternalInterface, nc: NetConf, stored: StoredNodeState,
                       links: LinkPort, *, create: bool = True) -> BackendSetup:
        """Set up (create=False: only find) the backend's devices through `links`."""
        ...

    async def configure(self, lease: Lease) -> None: ...

    def scope(self) -> KernelScope: ...

    def peer_state(self, lease: Lease, direct: Container[Addr] = ()) -> PeerState:
        """Pure: what `lease` needs in our kernel, given the facts handed in."""
        ...

    async def on_link_event(self, kind: str, link: LinkEvent) -> bool:
        """A link appeared or vanished; True when scope() or peer states changed."""
        ...


@dataclass
class DesiredTable:
    """The DesiredState kept up to date incrementally from per-peer states, so a lease
    event costs O(1) instead of recomputing every peer. Keyed by lease ident; an entry is
    removed only by the peer that put it, so one lease's removal can never take another
    lease's route, neighbour or FDB entry with it."""

    state: DesiredState = field(default_factory=DesiredState)
    peers: dict[str, PeerState] = field(default_factory=dict)
    # The peers' commands (extension), kept beside the kernel state: the HookRunner, not
    # the engine, takes the changed idents.
    hooks: dict[str, PeerHook] = field(default_factory=dict)
    hooks_changed: set[str] = field(default_factory=set)

    def remove(self, key: str) -> None:
        old = self.peers.pop(key, None)
        if old is None:
            return
        st = self.state
        ch = st.changed
        for r in old.routes:
            _pop_if(st.routes, net_key(r.dst), r, ch.routes)
        for n in old.neighbours:
            _pop_if(st.neighbours, neighbour_key(n), n, ch.neighbours)
        for f in old.fdb:
            _pop_if(st.fdb, fdb_key(f), f, ch.fdb)
        for w in old.wg:
            _pop_if(st.wg, (w.device, w.public_key), w, st.wg_changed)
        for d in old.wg_devices:
            if st.wg_devices.get(d.name) is d:
                del st.wg_devices[d.name]
        if old.hook is not None:
            _pop_if(self.hooks, key, old.hook, self.hooks_changed)

    def put(self, key: str, peer: PeerState) -> None:
        self.remove(key)
        self.peers[key] = peer
        st = self.state
        ch = st.changed
        for r in peer.routes:
            k = net_key(r.dst)
            st.routes[k] = r
            ch.routes.add(k)
        for n in peer.neighbours:
            nk = neighbour_key(n)
            st.neighbours[nk] = n
            ch.neighbours.add(nk)
        for f in peer.fdb:
            fk = fdb_key(f)
            st.fdb[fk] = f
            ch.fdb.add(fk)
        for w in peer.wg:
            wk = (w.device, w.public_key)
            st.wg[wk] = w
            st.wg_changed.add(wk)
        for d in peer.wg_devices:
            st.wg_devices[d.name] = d
        if peer.hook is not None:
            self.hooks[key] = peer.hook
            self.hooks_changed.add(key)


def _pop_if(table: dict[K, V], key: K, entry: V, changed: set[K]) -> None:
    # `is`: the very object this peer put; an equal-keyed entry of another peer stays.
    if table.get(key) is entry:
        del table[key]
        changed.add(key)
