"""wireguard backend: keys, options, lease data, the UAPI text, the pure peer states in every
mode, and the whole daemon loop on fakes (FakeKernel + FakeWgPort): peers follow leases,
drift is repaired at the read-back, a deleted device is replayed, a restart keeps peers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path

import pytest

from pyflannel.backend.wireguard import (
    WireguardBackend,
    backend_data,
    lease_key_port,
    wg_claims,
)
from pyflannel.config.flags import parse_flags
from pyflannel.config.netconf import NetConfError, parse_netconf, wireguard_options
from pyflannel.daemon.main import Daemon
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.wgkeys import (
    WgKeyError,
    decode_key,
    encode_key,
    generate_private_key,
    load_or_create_private_key,
    public_key,
)
from pyflannel.kernel.wireguard import parse_get, render_set
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState
from pyflannel.platform import Platform
from pyflannel.reconcile.plan import WgPeer
from tests.fakes.kernel import FakeKernel
from tests.fakes.rules import FakeRules
from tests.fakes.store import InMemoryStore
from tests.fakes.wireguard import FakeWgPort
from tests.waiting import until


def key() -> str:
    return encode_key(public_key(generate_private_key()))


# -- keys ------------------------------------------------------------------------------------


def test_x25519_matches_rfc7748() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert public_key(alice).hex() == \
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert public_key(bob).hex() == \
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"


def test_the_key_file_is_created_0400_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "wgkey"
    k1, created = load_or_create_private_key(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o400
    assert len(path.read_text()) == 44 and decode_key(path.read_text()) == k1
    k2, created = load_or_create_private_key(path)
    assert (k2, created) == (k1, False)
    assert [p.name for p in path.parent.iterdir()] == ["wgkey"]  # no temp file left


def test_a_bad_key_file_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "wgkey"
    path.write_text("not a key")
    with pytest.raises(WgKeyError, match=f"could not parse private key from file {path}: "
                                         "expected a base64 WireGuard key"):
        load_or_create_private_key(path)


# -- options and lease data ------------------------------------------------------------------


def opts(backend: str) -> object:
    return wireguard_options(parse_netconf(
        f'{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard"{backend}}}}}'))


def test_options_have_upstreams_defaults_and_go_key_matching() -> None:
    o = opts("")
    assert (o.listen_port, o.listen_port_v6, o.psk, o.keepalive, o.mode, o.mtu) == (  # type: ignore[attr-defined]
        51820, 51821, "", 0, "separate", 0)
    psk = key()
    o = opts(f',"listenport":4000,"PSK":"{psk}","PersistentKeepaliveInterval":25,'
             '"Mode":"auto","MTU":1400')
    assert (o.listen_port, o.psk, o.keepalive, o.mode, o.mtu) == (  # type: ignore[attr-defined]
        4000, psk, 25, "auto", 1400)


@pytest.mark.parametrize("backend, message", [
    (',"Mode":"both"', 'Backend.Mode: no valid Mode configured: "both" (expected separate'),
    (',"PSK":"short"', "Backend.PSK: expected a base64 WireGuard key"),
    (',"PSK":7', "Backend.PSK: expected a string"),
    (',"ListenPort":"51820"', "Backend.ListenPort: expected an integer"),
    (',"ListenPort":70000', "Backend.ListenPort: expected an integer in 1..65535"),
    (',"PersistentKeepaliveInterval":-1', "Backend.PersistentKeepaliveInterval"),
])
def test_bad_options_are_one_line_naming_the_field(backend: str, message: str) -> None:
    with pytest.raises(NetConfError, match="^" + message.replace("(", r"\(").replace(
            ".", r"\.")):
        opts(backend)


def test_lease_data_has_upstreams_bytes_and_reads_as_go_does() -> None:
    k = key()
    assert backend_data(k, 51820) == f'{{"PublicKey":"{k}","Port":51820}}'
    assert lease_key_port(backend_data(k, 4000)) == (k, 4000)
    assert lease_key_port(f'{{"publickey":"{k}"}}') == (k, 0)  # older upstream: no Port
    assert lease_key_port('{"PublicKey":"bad"}') == (None, 0)
    assert lease_key_port('[1]') == (None, 0) and lease_key_port("") == (None, 0)


# -- the UAPI text -----------------------------------------------------------------------------


def test_uapi_set_and_get_round_trip() -> None:
    pk, psk = key(), key()
    peer = WgPeer("wg0", pk, (IPv6Address("fd00::2"), 51821),
                  frozenset({ip_network("10.244.3.0/24"), ip_network("fd00:3::/64")}), psk, 25)
    text = render_set(put=[peer], remove=[key()], listen_port=51820).decode()
    assert text.startswith("set=1\nlisten_port=51820\npublic_key=") and text.endswith("\n\n")
    assert "remove=true\n" in text and "endpoint=[fd00::2]:51821\n" in text
    assert "replace_allowed_ips=true\nallowed_ip=10.244.3.0/24\nallowed_ip=fd00:3::/64\n" in text
    priv = generate_private_key()
    answer = (f"private_key={priv.hex()}\nlisten_port=51820\n"
              f"public_key={decode_key(pk).hex()}\npreshared_key={decode_key(psk).hex()}\n"
              "endpoint=[fd00::2]:51821\nlast_handshake_time_sec=0\n"
              "persistent_keepalive_interval=25\nallowed_ip=10.244.3.0/24\n"
              "allowed_ip=fd00:3::/64\nerrno=0\n")
    st = parse_get("wg0", answer)
    assert st.public_key == encode_key(public_key(priv)) and st.listen_port == 51820
    assert st.peers == {pk: peer}


# -- the pure peer states ----------------------------------------------------------------------


EXT = ExternalInterface("eth0", 2, 1500, IPv4Address("192.168.1.1"), IPv4Address("192.168.1.1"),
                        IPv6Address("fd00::1"), IPv6Address("fd00::1"))


def peer_lease(n: int, k: str, *, port4: int | None = 51820, port6: int | None = 51821,
               v6: bool = True) -> Lease:
    def data(port: int | None) -> str:  # no Port: what older upstream versions write
        return backend_data(k, port) if port is not None else f'{{"PublicKey":"{k}"}}'
    d4, d6 = data(port4), data(port6)
    return Lease(IPv4Network(f"10.244.{n}.0/24"), LeaseAttrs(
        public_ip=IPv4Address(f"192.168.1.{n}"),
        public_ipv6=IPv6Address(f"fd00::{n}") if v6 else None, backend_type="wireguard",
        backend_data=d4, backend_v6_data=d6 if v6 else ""),
        ipv6_subnet=IPv6Network(f"fd00:{n}::/64") if v6 else None)


async def registered(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     extra: str = "") -> tuple[WireguardBackend, FakeKernel]:
    monkeypatch.setenv("WIREGUARD_KEY_FILE", str(tmp_path / "wgkey"))
    kernel = FakeKernel()
    be = WireguardBackend(FakeWgPort(kernel))
    nc = parse_netconf('{"Network":"10.244.0.0/16","IPv6Network":"fd00::/48","EnableIPv6":true,'
                       f'"Backend":{{"Type":"wireguard","Mode":"{mode}"{extra}}}}}')
    setup = await be.register(EXT, nc, StoredNodeState(), kernel)
    assert setup.mtu == 1420
    return be, kernel


async def test_separate_mode_has_a_device_and_a_peer_per_family(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    be, kernel = await registered("separate", tmp_path, monkeypatch)
    assert be.devices == ("flannel-wg", "flannel-wg-v6")
    assert kernel.devices["flannel-wg"].mtu == 1420
    k = key()
    p4, p6 = be.peer_state(peer_lease(3, k, port4=4000, port6=None)).wg
    assert (p4.device, p4.endpoint, p4.allowed_ips) == (
        "flannel-wg", (IPv4Address("192.168.1.3"), 4000), {ip_network("10.244.3.0/24")})
    # no Port in the v6 data: our own v6 listen port, as upstream falls back
    assert (p6.device, p6.endpoint, p6.allowed_ips) == (
        "flannel-wg-v6", (IPv6Address("fd00::3"), 51821), {ip_network("fd00:3::/64")})


@pytest.mark.parametrize("mode, endpoint", [
    ("ipv4", "192.168.1.3"), ("ipv6", "fd00::3"),
    ("auto", "192.168.1.3"),  # all private: IPv4, as upstream's selectMode
])
async def test_one_device_modes_carry_both_subnets(
        mode: str, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    be, _ = await registered(mode, tmp_path, monkeypatch)
    assert be.devices == ("flannel-wg",)
    (p,) = be.peer_state(peer_lease(3, key())).wg
    assert p.endpoint is not None and p.endpoint[0] == ip_address(endpoint)
    assert p.allowed_ips == {ip_network("10.244.3.0/24"), ip_network("fd00:3::/64")}


async def test_psk_keepalive_and_bad_peer_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    psk = key()
    be, _ = await registered("ipv4", tmp_path, monkeypatch,
                             f',"PSK":"{psk}","PersistentKeepaliveInterval":25')
    (p,) = be.peer_state(peer_lease(3, key())).wg
    assert (p.preshared_key, p.keepalive) == (psk, 25)
    bad = peer_lease(4, "x", port4=None, v6=False)
    assert be.peer_state(bad).wg == ()
    assert be.peer_state(peer_lease(5, be.public_key)).wg == ()  # our own key: never a peer
    assert "has no valid PublicKey" in caplog.text and "our own public key" in caplog.text


def test_a_copied_public_key_is_a_claim() -> None:
    k = key()
    assert wg_claims(peer_lease(3, k)) == (f"wg4:{k}", f"wg6:{k}")


# -- the daemon loop on fakes ------------------------------------------------------------------



WG_NET = '{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}'


class Node:
    def __init__(self, tmp_path: Path, store: InMemoryStore, kernel: FakeKernel,
                 wg: FakeWgPort) -> None:
        self.store, self.kernel, self.wg = store, kernel, wg
        flags = parse_flags([f"--subnet-file={tmp_path / 'subnet.env'}"], {})
        self.daemon = Daemon(flags, Platform(
            open_routes=lambda: kernel, links=kernel, find_interface=kernel.find_interface,
            make_rules=lambda _nft: FakeRules(), make_store=lambda _f, _e: store,
            br_netfilter=lambda _4, _6: None, wireguard=wg))
        self.task = asyncio.create_task(self.daemon.run())

    async def stop(self) -> None:
        self.daemon._stop.set()
        await asyncio.wait_for(self.task, 5)

    def peers(self) -> dict[str, WgPeer]:
        st = self.wg.states.get("flannel-wg")
        return dict(st.peers) if st else {}


@pytest.fixture
async def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        Callable[..., Node]]:
    monkeypatch.setenv("WIREGUARD_KEY_FILE", str(tmp_path / "wgkey"))
    made: list[Node] = []

    def go(store: InMemoryStore, kernel: FakeKernel | None = None,
           wg: FakeWgPort | None = None) -> Node:
        kernel = kernel or FakeKernel()
        n = Node(tmp_path, store, kernel, wg or FakeWgPort(kernel))
        made.append(n)
        return n

    yield go
    for n in made:
        if not n.task.done():
            await n.stop()


def peer(store: InMemoryStore, n: int, k: str) -> Lease:
    return store.peer(n, data=backend_data(k, 51820))


async def test_peers_follow_leases_and_drift_is_repaired(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store = InMemoryStore(WG_NET)
    keys = {n: key() for n in range(2, 6)}
    for n in (2, 3, 4):
        store.put(peer(store, n, keys[n]))
    nd = node(store)
    await until(lambda: set(nd.peers()) == {keys[2], keys[3], keys[4]}, "three peers")
    p3 = nd.peers()[keys[3]]
    assert p3.endpoint == (IPv4Address("192.168.77.3"), 51820)
    assert p3.allowed_ips == {ip_network("10.244.3.0/24")}
    # the lease and the one route for the whole network via the device
    own = store.leases["10.244.1.0-24"]
    assert json.loads(own.attrs.backend_data) == {"PublicKey": nd.wg.states[
        "flannel-wg"].public_key, "Port": 51820}
    await until(lambda: nd.kernel.route("10.244.0.0/16") is not None, "the network route")
    route = nd.kernel.route("10.244.0.0/16")
    assert route is not None and route.gateway is None and route.nhid is None
    assert route.oif == nd.kernel.devices["flannel-wg"].index
    assert "FLANNEL_MTU=1420\n" in (nd.daemon.flags.subnet_file and
                                    Path(nd.daemon.flags.subnet_file).read_text())
    # join, key rotation, leave: at once, one update each
    updates = nd.wg.updates
    store.put(peer(store, 5, keys[5]))
    await until(lambda: keys[5] in nd.peers(), "the join")
    new3 = key()
    store.put(peer(store, 3, new3))
    await until(lambda: new3 in nd.peers() and keys[3] not in nd.peers(), "the new key")
    store.delete("10.244.4.0-24")
    await until(lambda: keys[4] not in nd.peers(), "the leave")
    assert nd.wg.updates == updates + 3
    # someone removes a peer and alters another: repaired at the 2 s read-back
    nd.wg.foreign_remove("flannel-wg", keys[2])
    nd.wg.foreign_put(WgPeer("flannel-wg", keys[5], (IPv4Address("192.0.2.9"), 1),
                             frozenset({ip_network("10.244.5.0/24")})))
    await until(lambda: keys[2] in nd.peers() and nd.peers()[keys[5]].endpoint == (
        IPv4Address("192.168.77.5"), 51820), "the repair", timeout=5)
    assert "Drift: WireGuard missing peer" in caplog.text
    assert "Drift: WireGuard changed peer" in caplog.text
    assert "Traceback" not in caplog.text


async def test_a_deleted_device_is_recreated_with_every_peer(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore(WG_NET)
    keys = [key(), key()]
    store.put(peer(store, 2, keys[0]))
    store.put(peer(store, 3, keys[1]))
    nd = node(store)
    await until(lambda: len(nd.peers()) == 2, "two peers")
    old = nd.kernel.devices["flannel-wg"].index
    nd.kernel.delete_device("flannel-wg")
    await until(lambda: len(nd.peers()) == 2 and nd.kernel.route("10.244.0.0/16") is not None,
                "the replay", timeout=1.5)
    assert nd.kernel.devices["flannel-wg"].index != old
    assert "Device flannel-wg was deleted; recreating it" in caplog.text


async def test_a_restart_keeps_wanted_peers_and_removes_stale_ones(
        node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store = InMemoryStore(WG_NET)
    keys = [key(), key()]
    store.put(peer(store, 2, keys[0]))
    store.put(peer(store, 3, keys[1]))
    first = node(store)
    await until(lambda: len(first.peers()) == 2, "two peers")
    await first.stop()
    # while it was down node 3 left; the device (wireguard-go's) stayed with its peers
    store.delete("10.244.3.0-24")
    kept = first.peers()[keys[0]]
    updates = first.wg.updates
    second = node(store, first.kernel, first.wg)
    await until(lambda: set(second.peers()) == {keys[0]}, "the stale peer removed")
    assert second.peers()[keys[0]] is kept  # never rewritten: its tunnel stays
    assert second.wg.updates == updates + 1  # one removal; the device's key/port are kept
    assert "Removing 1 stale WireGuard peer(s) from flannel-wg" in caplog.text
    assert os.path.exists(os.environ["WIREGUARD_KEY_FILE"])


async def test_neither_implementation_is_one_line_naming_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pyflannel.kernel.ports import WgUnsupported
    from pyflannel.kernel.wireguard import AutoWgPort
    from pyflannel.reconcile.plan import WgDevice

    monkeypatch.setenv("PYFLANNEL_WIREGUARD_GO", str(tmp_path / "missing"))
    port = AutoWgPort("userspace")  # never the kernel here: that would touch this namespace
    with pytest.raises(WgUnsupported, match=r"^no WireGuard implementation available "
                       r"\(userspace: wireguard-go at .*missing is not executable"):
        await port.ensure(WgDevice("flannel-wg", encode_key(generate_private_key()), 1, 1420))
    with pytest.raises(WgUnsupported, match="PYFLANNEL_WIREGUARD=both: expected auto, kernel "
                                            "or userspace"):
        await AutoWgPort("both").ensure(WgDevice("x", key(), 1, 1420))
