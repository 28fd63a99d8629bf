"""FakeWgPort: the WgPort in memory (a test fake), on a FakeKernel whose device table holds
the WireGuard devices, so the backend's LinkPort calls and link events work as on the
kernel. Tests change peers behind the daemon's back (`foreign_*`) to see drift repaired."""

from __future__ import annotations

from collections.abc import Sequence

from pyflannel.kernel.ports import ExistingDevice, WgState
from pyflannel.kernel.wgkeys import decode_key, encode_key, public_key
from pyflannel.netlink import LinkEvent, RtEvent
from pyflannel.reconcile.plan import WgDevice, WgPeer
from tests.fakes.kernel import FakeKernel


class FakeWgPort:
    implementation = "fake implementation (tests)"

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.states: dict[str, WgState] = {}
        self.updates = 0  # update() calls, for tests that count work
        self.reads = 0

    async def ensure(self, dev: WgDevice) -> int:
        k = self.kernel
        have = k.devices.get(dev.name)
        if have is None:
            index = k._next_index
            k._next_index += 1
            k.devices[dev.name] = ExistingDevice(index=index, kind="wireguard", mtu=dev.mtu)
            k._emit([RtEvent("link_new", LinkEvent(index, dev.name))])
            self.states[dev.name] = WgState(public_key=None, listen_port=0)
        st = self.states[dev.name]
        # as the real ports: set only when different (an adopted device keeps its sessions)
        if st.public_key != encode_key(public_key(decode_key(dev.private_key))) or \
                st.listen_port != dev.listen_port:
            await self.update(dev.name, private_key=dev.private_key,
                              listen_port=dev.listen_port)
        return k.devices[dev.name].index

    async def state(self, name: str) -> WgState | None:
        self.reads += 1
        if name not in self.kernel.devices:
            self.states.pop(name, None)
            return None
        st = self.states[name]
        return WgState(st.public_key, st.listen_port, dict(st.peers))

    async def update(self, name: str, *, put: Sequence[WgPeer] = (),
                     remove: Sequence[str] = (), private_key: str | None = None,
                     listen_port: int | None = None) -> None:
        self.updates += 1
        st = self.states[name]
        if private_key is not None:
            st.public_key = encode_key(public_key(decode_key(private_key)))
        if listen_port is not None:
            st.listen_port = listen_port
        for key in remove:
            st.peers.pop(key, None)
        for p in put:
            # WireGuard's allowed IPs are exclusive: a prefix moves to the last peer given it
            for other in st.peers.values():
                if other.allowed_ips & p.allowed_ips:
                    st.peers[other.public_key] = WgPeer(
                        other.device, other.public_key, other.endpoint,
                        other.allowed_ips - p.allowed_ips, other.preshared_key, other.keepalive)
            st.peers[p.public_key] = p

    async def aclose(self) -> None:
        return None

    # -- what tests do behind the daemon's back ---------------------------------------------

    def foreign_remove(self, name: str, key: str) -> None:
        del self.states[name].peers[key]

    def foreign_put(self, peer: WgPeer) -> None:
        self.states[peer.device].peers[peer.public_key] = peer
