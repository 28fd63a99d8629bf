"""The engine's WireGuard half: makes our devices' keys, ports and peers match
DesiredState.wg / wg_devices through a WgPort.

WireGuard sends no notification when a peer is changed, so the reconciler keeps what it
last read or wrote per device (the observed cache) and:
- applies a change of the desired peers at once, for the changed keys only (O(changes));
- reads every device back every `resync_interval` seconds (2 s: one UAPI `get`, a few
  hundred microseconds per peer) and repairs what differs (a peer removed or altered by
  hand, a changed key or port), logging each difference once as drift;
- forgets the cache when asked (`resync()`: the device was recreated).
The first pass waits for the first desired state (the lease snapshot), so a restart never
removes the peers it is about to want again: established tunnels stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from pyflannel.kernel.ports import WgError, WgPort, WgState
from pyflannel.kernel.wgkeys import public_key_of
from pyflannel.reconcile.plan import DesiredState, WgDevice, WgPeer, endpoint_text

log = logging.getLogger("pyflannel.reconcile.engine")

RESYNC_INTERVAL = 2.0


class WgReconciler:
    def __init__(self, port: WgPort, *, resync_interval: float = RESYNC_INTERVAL) -> None:
        self.port = port
        self.resync_interval = resync_interval
        self.on_repair: Callable[[int], None] | None = None
        self.passes = 0
        self.repairs = 0
        self._desired = DesiredState()
        self._have_desired = False
        self._dirty = asyncio.Event()
        self._cache: dict[str, WgState] = {}  # device -> what it has, as last read/written
        self._failing: dict[str, str] = {}  # device -> error logged

    def set_desired(self, desired: DesiredState) -> None:
        self._desired = desired
        self._have_desired = True
        self._dirty.set()

    def resync(self) -> None:
        """Read every device again with the next pass (a device was recreated)."""
        self._cache.clear()
        self._dirty.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_read = loop.time()
        while True:
            wait = next_read - loop.time()
            if wait > 0 and not self._dirty.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), timeout=wait)
            self._dirty.clear()
            if not self._have_desired:
                next_read = loop.time() + self.resync_interval
                continue
            periodic = loop.time() >= next_read
            if periodic:
                next_read = loop.time() + self.resync_interval
            await self.reconcile_once(read=periodic)

    async def reconcile_once(self, *, read: bool = False) -> int:
        """One pass; the number of changes made. `read`: read every device back first."""
        self.passes += 1
        st = self._desired
        changed, st.wg_changed = st.wg_changed, set()
        made = 0
        for name, dev in list(st.wg_devices.items()):
            try:
                made += await self._device(dev, changed, read=read)
                if name in self._failing:
                    log.info("WireGuard device %s is in order again", name)
                    del self._failing[name]
            except WgError as e:
                self._cache.pop(name, None)  # read it again next time
                if self._failing.get(name) != str(e):
                    log.error("Failed to reconcile WireGuard device %s: %s (retrying in "
                              "%.0f s)", name, e, self.resync_interval)
                    self._failing[name] = str(e)
        return made

    async def _device(self, dev: WgDevice, changed: set[tuple[str, str]], *,
                      read: bool) -> int:
        name = dev.name
        fresh = read or name not in self._cache
        if fresh:
            have = await self.port.state(name)
            if have is None:
                return 0  # no device: the backend recreates it (link event)
            first = name not in self._cache
            self._cache[name] = have
        else:
            first = False
            have = self._cache[name]
        desired = self._desired.wg
        if fresh:
            keys = {k for k in desired if k[0] == name} | {(name, k) for k in have.peers}
        else:
            keys = {k for k in changed if k[0] == name}
        put: list[WgPeer] = []
        remove: list[str] = []
        notes: list[str] = []
        for k in keys:
            want = desired.get(k)
            got = have.peers.get(k[1])
            if want == got:
                continue
            if want is None:
                assert got is not None
                remove.append(k[1])
                notes.append(f"stale {got.describe()}")
            else:
                put.append(want)
                notes.append(f"{'missing' if got is None else 'changed'} {want.describe()}")
        private = None
        want_pub = public_key_of(dev.private_key)
        if have.public_key != want_pub:
            private = dev.private_key
            notes.append(f"{name}'s key is not ours")
        port = dev.listen_port if have.listen_port != dev.listen_port else None
        if port is not None:
            notes.append(f"{name} listens on {have.listen_port}, not {dev.listen_port}")
        if not (put or remove or private or port):
            return 0
        if fresh and not first:
            # Between reads only we change the device: a difference now is someone else's.
            for n in notes:
                log.warning("Drift: WireGuard %s; repairing", n)
            self.repairs += len(notes)
            if self.on_repair is not None:
                self.on_repair(len(notes))
        else:
            if remove and first:
                log.info("Removing %d stale WireGuard peer(s) from %s (nodes that left)",
                         len(remove), name)
            for p in put:
                log.info("Subnet added: %s via %s (WireGuard peer %s on %s)",
                         ", ".join(sorted(str(n) for n in p.allowed_ips)),
                         endpoint_text(p.endpoint) if p.endpoint else "no endpoint",
                         p.public_key, name)
            if not first:
                for key in remove:
                    log.info("Subnet removed: WireGuard peer %s on %s", key, name)
        await self.port.update(name, put=put, remove=remove, private_key=private,
                               listen_port=port)
        for key in remove:
            have.peers.pop(key, None)
        for p in put:
            have.peers[p.public_key] = p
        if private is not None:
            have.public_key = want_pub
        if port is not None:
            have.listen_port = port
        return len(put) + len(remove) + bool(private) + bool(port)
