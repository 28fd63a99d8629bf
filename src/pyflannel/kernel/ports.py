"""The kernel ports: the only way the engine and the backends reach the kernel.

Two small Protocols, in the style of httpx's transports, so the whole daemon loop runs on
an in-memory kernel in unit tests (tests/fakes/kernel.py) and on netlink in production
(kernel/netlink_ports.py):

- RoutePort: routes, nexthops, neighbours and FDB entries: the owned objects (dump, a
  stream), a batch of changes (apply), the notifications (events), `ip route get` (lookup),
  close.
- LinkPort: devices, a cold path (start-up, recreation): find, ensure (create), set up
  (address, MAC, MTU, up), delete, close.
- WgPort: WireGuard devices and peers (the kernel's module or wireguard-go): ensure a
  device, read its state, update it, close.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from pyflannel.netlink import FdbEntry, Neighbour, Nexthop, Op, OpResult, Route, RtEvent
from pyflannel.reconcile.plan import KernelScope, Observed, WgDevice, WgPeer

Addr = IPv4Address | IPv6Address
Net = IPv4Network | IPv6Network
Owned = Route | Nexthop | Neighbour | FdbEntry
Keyed = Nexthop | Neighbour | FdbEntry  # what the kernel answers for by key (dump's `only`)
# What a dump lists, in its order; the safety net dumps one kind at a time.
DUMP_KINDS = ("routes", "nexthops", "neighbours", "fdb")


class RoutePort(Protocol):
    def dump(self, scope: KernelScope, *, nexthops: bool,
             kinds: Collection[str] = DUMP_KINDS,
             only: Sequence[Keyed] = ()) -> AsyncGenerator[Owned, None]:
        """The objects `scope` owns (routes also when they use a nexthop object) as the
        kernel lists them: routes, then nexthops, neighbours, FDB entries (those of
        `kinds`; nexthops only with `nexthops`). A stream, so a caller that compares as it
        reads (the safety net) holds no second copy; `apply` may be called while it is
        suspended (the safety net applies lease events in the middle of its listing).
        With `only`: instead, the kernel's state of just those objects, asked for by key,
        the ones it has (the safety net's look at what a disturbed listing did not show)."""
        ...

    async def apply(self, ops: Sequence[Op]) -> list[OpResult]:
        """Every op, in order, one result each (errno 0 for success)."""
        ...

    def events(self) -> AsyncIterator[list[RtEvent]]:
        """Batches of notifications; [RtEvent("overflow", None)] when some were lost."""
        ...

    async def lookup(self, dst: Addr) -> Route | None:
        """The route the kernel would use for `dst`; None when unreachable."""
        ...

    def close(self) -> None: ...


async def collect(stream: AsyncIterator[Owned]) -> Observed:
    """A dump collected, as `plan` takes it."""
    obs = Observed()
    async for o in stream:
        if isinstance(o, Route):
            obs.routes.append(o)
        elif isinstance(o, Nexthop):
            obs.nexthops.append(o)
        elif isinstance(o, Neighbour):
            obs.neighbours.append(o)
        else:
            obs.fdb.append(o)
    return obs


@dataclass(frozen=True)
class DeviceSpec:
    """What a flannel vxlan device must look like."""

    name: str
    vni: int
    link: int  # the external interface's ifindex
    local: Addr
    port: int  # 0: kernel default (8472)
    gbp: bool
    learning: bool
    mtu: int


@dataclass(frozen=True)
class ExistingDevice:
    """The parts of an existing device the compatibility check looks at."""

    index: int
    kind: str | None
    vni: int | None = None
    link: int | None = None
    local: Addr | None = None
    port: int | None = None
    gbp: bool = False
    learning: bool = False
    group: str | None = None
    l2miss: bool = False
    mac: str | None = None
    mtu: int = 0


class LinkPort(Protocol):
    async def find(self, name: str) -> ExistingDevice | None: ...

    async def ensure(self, spec: DeviceSpec, mac: str) -> int:
        """Create the vxlan device `spec` with `mac`; its ifindex. The caller has removed
        an incompatible device of that name first."""
        ...

    async def set_up(self, index: int, *, mac: str | None = None, mtu: int | None = None,
                     address: tuple[Addr, Net | None] | None = None) -> None:
        """Set what is given: the MAC, the MTU, the single address (as /32 or /128; other
        addresses inside the network go), then bring the device up when an address is
        given."""
        ...

    async def delete(self, index: int) -> None: ...

    async def aclose(self) -> None: ...


# -- WireGuard (kernel/wireguard.py) ---------------------------------------------------


class WgError(Exception):
    """A WireGuard operation failed; one line."""


class WgUnsupported(WgError):
    """This implementation is not available here (no module, no binary, no TUN)."""


@dataclass
class WgState:
    """A device as read back: its public key (derived), listen port and peers."""

    public_key: str | None
    listen_port: int
    peers: dict[str, WgPeer] = field(default_factory=dict)


class WgPort(Protocol):
    @property
    def implementation(self) -> str:
        """"kernel" or "userspace (wireguard-go …)"; "" before the first ensure()."""
        ...

    async def ensure(self, dev: WgDevice) -> int:
        """The device exists, is running and has dev's key and port; its ifindex."""
        ...

    async def state(self, name: str) -> WgState | None:
        """The device's configuration; None when there is no such device."""
        ...

    async def update(self, name: str, *, put: Sequence[WgPeer] = (),
                     remove: Sequence[str] = (), private_key: str | None = None,
                     listen_port: int | None = None) -> None:
        """Set what is given: the key, the port, peers (their allowed IPs replaced), peers
        removed by public key. One request."""
        ...

    async def aclose(self) -> None: ...
