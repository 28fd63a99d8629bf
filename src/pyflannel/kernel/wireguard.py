"""The WireGuard port: devices and peers, on the kernel's wireguard or on wireguard-go.

One Protocol (WgPort), three implementations:

- UserspaceWgPort: Debian's wireguard-go, started and supervised by flanneld, configured
  through its UAPI socket (/var/run/wireguard/<dev>.sock, the text protocol `wg` speaks).
  It is started in its own session and never stopped by us: a flanneld restart adopts the
  running one, so established tunnels stay. If it dies, its TUN device goes with it; the
  link event makes the backend ensure the device again, which starts a new one.
- KernelWgPort: `ip link add type wireguard` and generic netlink (pyroute2), where the
  kernel has the module.
- AutoWgPort: the kernel's when a wireguard link can be created, else userspace
  (PYFLANNEL_WIREGUARD=auto|kernel|userspace).

Peers are keyed by public key; a peer's state is what WireGuard lets us set.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import subprocess
from collections.abc import Sequence
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyflannel.kernel.ports import Addr, WgError, WgState, WgUnsupported
from pyflannel.kernel.wgkeys import decode_key, encode_key, public_key_of
from pyflannel.reconcile.plan import WgDevice, WgPeer, endpoint_text

if TYPE_CHECKING:
    from pyroute2 import AsyncIPRoute

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")  # fixed in wireguard-go and in `wg`
ZERO_KEY = bytes(32)


def parse_endpoint(text: str) -> tuple[Addr, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep:
        return None
    try:
        return ip_address(host.strip("[]")), int(port)
    except ValueError:
        return None


# -- the UAPI text protocol (wireguard.com/xplatform) ----------------------------------------


def render_set(*, put: Sequence[WgPeer] = (), remove: Sequence[str] = (),
               private_key: str | None = None, listen_port: int | None = None) -> bytes:
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={decode_key(private_key).hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for key in remove:
        lines += [f"public_key={decode_key(key).hex()}", "remove=true"]
    for p in put:
        lines.append(f"public_key={decode_key(p.public_key).hex()}")
        psk = decode_key(p.preshared_key) if p.preshared_key else ZERO_KEY
        lines.append(f"preshared_key={psk.hex()}")
        if p.endpoint is not None:
            lines.append(f"endpoint={endpoint_text(p.endpoint)}")
        lines.append(f"persistent_keepalive_interval={p.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={n}" for n in sorted(p.allowed_ips, key=str)]
    return ("\n".join(lines) + "\n\n").encode()


def parse_get(device: str, text: str) -> WgState:
    """The answer to `get=1`: device keys first, then one block per peer."""
    st = WgState(public_key=None, listen_port=0)
    peer: dict[str, Any] | None = None

    def flush() -> None:
        if peer is not None:
            p = WgPeer(device=device, public_key=peer["key"], endpoint=peer.get("endpoint"),
                       allowed_ips=frozenset(peer["ips"]), preshared_key=peer.get("psk"),
                       keepalive=peer.get("keepalive", 0))
            st.peers[p.public_key] = p

    errno_seen: int | None = None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        try:
            if key == "errno":
                errno_seen = int(value)
            elif key == "private_key":
                raw = bytes.fromhex(value)
                st.public_key = public_key_of(encode_key(raw)) if raw != ZERO_KEY else None
            elif key == "listen_port":
                st.listen_port = int(value)
            elif key == "public_key":
                flush()
                peer = {"key": encode_key(bytes.fromhex(value)), "ips": []}
            elif peer is None:
                continue
            elif key == "preshared_key":
                raw = bytes.fromhex(value)
                peer["psk"] = encode_key(raw) if raw != ZERO_KEY else None
            elif key == "endpoint":
                peer["endpoint"] = parse_endpoint(value)
            elif key == "persistent_keepalive_interval":
                peer["keepalive"] = int(value)
            elif key == "allowed_ip":
                peer["ips"].append(ip_network(value, strict=False))
        except ValueError:
            raise WgError(f"{device}: unreadable UAPI line {line[:60]!r}") from None
    flush()
    if errno_seen:
        raise WgError(f"{device}: UAPI get failed: errno {errno_seen}")
    return st


async def _uapi(path: Path, request: bytes, timeout: float = 5.0) -> str:
    """One request on the device's UAPI socket; the answer up to its blank line."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(request)
                await writer.drain()
                chunks: list[bytes] = []
                size = 0
                while True:
                    line = await reader.readline()
                    if not line or line == b"\n":
                        break
                    size += len(line)
                    if size > 64 << 20:
                        raise WgError(f"{path}: UAPI answer too large")
                    chunks.append(line)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise WgError(f"{path}: no UAPI answer within {timeout:.0f} s") from None
    except OSError as e:
        raise WgError(f"{path}: {e.strerror or e}") from None
    return b"".join(chunks).decode("ascii", "replace")


async def _link_index(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


class UserspaceWgPort:
    """wireguard-go, one process per device."""

    def __init__(self, binary: str | None = None, socket_dir: Path = SOCKET_DIR) -> None:
        import shutil  # (0.5 MiB of imports, for this backend only)

        self.binary = binary or os.environ.get("PYFLANNEL_WIREGUARD_GO") or \
            shutil.which("wireguard-go") or ""
        self.socket_dir = socket_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._adopted: set[str] = set()

    @property
    def implementation(self) -> str:
        return f"userspace implementation (wireguard-go, {self.binary})"

    def sock(self, name: str) -> Path:
        return self.socket_dir / f"{name}.sock"

    def ownership(self, name: str) -> tuple[int | None, bool]:
        """(the PID of the wireguard-go we started for `name`, or None; whether we adopted
        one that was running already)."""
        proc = self._procs.get(name)
        return (proc.pid if proc else None), name in self._adopted

    async def answers(self, name: str) -> bool:
        """A wireguard-go serves `name` here (its device exists and its socket answers)."""
        return await _link_index(name) is not None and await self._alive(name)

    async def _alive(self, name: str) -> bool:
        try:
            await _uapi(self.sock(name), b"get=1\n\n", timeout=2.0)
        except WgError:
            return False
        return True

    async def ensure(self, dev: WgDevice) -> int:
        if not self.binary or not os.access(self.binary, os.X_OK):
            what = f"at {self.binary} is not executable" if self.binary else "not found"
            raise WgUnsupported(f"wireguard-go {what} (install Debian's wireguard-go or set "
                                "PYFLANNEL_WIREGUARD_GO)")
        if not os.path.exists("/dev/net/tun"):
            raise WgUnsupported("/dev/net/tun is missing: wireguard-go needs TUN")
        self._reap()
        index = await _link_index(dev.name)
        if index is not None and await self._alive(dev.name):
            if dev.name not in self._procs:
                self._adopted.add(dev.name)
                log.info("Adopting the running wireguard-go for %s (its tunnels stay up)",
                         dev.name)
        else:
            if index is not None:
                # A device without a live UAPI socket: a kernel device, or wireguard-go's
                # TUN while it exits. Ours to replace.
                log.warning("%s exists but no wireguard-go answers on %s; recreating it",
                            dev.name, self.sock(dev.name))
                await _delete_link(dev.name)
            index = await self._start_retrying(dev.name)
        await _configure(self, dev)
        return index

    async def _start_retrying(self, name: str, attempts: int = 5) -> int:
        # Right after a device went away, the old wireguard-go may still hold the UAPI
        # socket for a moment; the new one then exits at once ("socket in use").
        old = self._procs.pop(name, None)
        if old is not None and old.poll() is None:
            old.terminate()  # ours, and its device is gone: it cannot carry traffic
            await asyncio.to_thread(_wait, old, 2.0)
        for attempt in range(attempts):
            try:
                return await self._start(name)
            except WgError as e:
                if attempt == attempts - 1:
                    raise
                log.warning("%s; retrying", e)
                await asyncio.sleep(0.3)
        raise AssertionError("unreachable")

    async def _start(self, name: str) -> int:
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
        # Own session, output to our stderr: it outlives this flanneld, so a restart keeps
        # the tunnels (a pipe to us would break when we exit).
        proc = await asyncio.to_thread(
            subprocess.Popen, [self.binary, "-f", name], env=env, stdin=subprocess.DEVNULL,
            stdout=2, stderr=2, start_new_session=True)
        self._procs[name] = proc
        self._adopted.discard(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            rc = proc.poll()
            if rc is not None:
                raise WgError(f"wireguard-go for {name} exited with status {rc} at start")
            index = await _link_index(name)
            if index is not None and await self._alive(name):
                log.info("Started wireguard-go for %s (pid %d)", name, proc.pid)
                return index
            await asyncio.sleep(0.02)
        raise WgError(f"wireguard-go for {name} did not come up within 10 s")

    def _reap(self) -> None:
        for name, proc in list(self._procs.items()):
            rc = proc.poll()
            if rc is not None:
                log.warning("wireguard-go for %s exited with status %d", name, rc)
                del self._procs[name]

    async def state(self, name: str) -> WgState | None:
        if await _link_index(name) is None:
            return None
        return parse_get(name, await _uapi(self.sock(name), b"get=1\n\n"))

    async def update(self, name: str, *, put: Sequence[WgPeer] = (),
                     remove: Sequence[str] = (), private_key: str | None = None,
                     listen_port: int | None = None) -> None:
        answer = await _uapi(self.sock(name), render_set(
            put=put, remove=remove, private_key=private_key, listen_port=listen_port))
        for line in answer.splitlines():
            if line.startswith("errno=") and line != "errno=0":
                raise WgError(f"{name}: UAPI set failed: {line}")

    async def aclose(self) -> None:
        # wireguard-go keeps running: see the module docstring.
        self._reap()


async def _configure(port: UserspaceWgPort | KernelWgPort, dev: WgDevice) -> None:
    """dev's key and port, set only when they differ: setting them on an adopted device
    would make every peer handshake again."""
    st = await port.state(dev.name)
    want = public_key_of(dev.private_key)
    key = dev.private_key if st is None or st.public_key != want else None
    listen = dev.listen_port if st is None or st.listen_port != dev.listen_port else None
    if key is not None or listen is not None:
        await port.update(dev.name, private_key=key, listen_port=listen)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _delete_link(name: str) -> None:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        found = await ipr.link_lookup(ifname=name)
        if found:
            await ipr.link("del", index=found[0])


class KernelWgPort:
    """The kernel's wireguard through pyroute2 (generic netlink), imported on first use."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._ipr: AsyncIPRoute | None = None
        self._wg: Any = None

    @property
    def implementation(self) -> str:
        return "kernel implementation"

    async def _iproute(self) -> AsyncIPRoute:
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute

            self._ipr = await self._stack.enter_async_context(AsyncIPRoute())
        return self._ipr

    async def _handles(self) -> tuple[AsyncIPRoute, Any]:
        await self._iproute()
        assert self._ipr is not None
        if self._wg is None:
            from pyroute2.netlink.generic.wireguard import AsyncWireGuard

            wg = AsyncWireGuard()
            await wg.setup_endpoint()
            self._stack.callback(wg.close)
            self._wg = wg
        return self._ipr, self._wg

    async def ensure(self, dev: WgDevice) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        ipr = await self._iproute()
        found = await ipr.link_lookup(ifname=dev.name)
        if found:
            msg = (await ipr.link("get", index=found[0]))[0]
            if msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "wireguard":
                log.warning("%s exists but is not a wireguard device; recreating it", dev.name)
                await ipr.link("del", index=found[0])
                found = []
        if not found:
            try:
                await ipr.link("add", ifname=dev.name, kind="wireguard", mtu=dev.mtu)
            except NetlinkError as e:
                if e.code in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise WgUnsupported("the kernel has no wireguard module") from None
                raise WgError(f"could not create {dev.name}: {e}") from None
            found = await ipr.link_lookup(ifname=dev.name)
        await _configure(self, dev)
        return int(found[0])

    async def state(self, name: str) -> WgState | None:
        _, wg = await self._handles()
        if await _link_index(name) is None:
            return None
        try:
            msgs = [m async for m in await wg.info(name)]
        except Exception as e:  # pyroute2 raises NetlinkError and friends
            raise WgError(f"{name}: {e}") from None
        st = WgState(public_key=None, listen_port=0)
        for m in msgs:
            pub = m.get("WGDEVICE_A_PUBLIC_KEY")
            if pub:
                st.public_key = pub.decode() if isinstance(pub, bytes) else str(pub)
            st.listen_port = int(m.get("WGDEVICE_A_LISTEN_PORT") or st.listen_port)
            for p in m.get("WGDEVICE_A_PEERS") or ():
                key = p.get("WGPEER_A_PUBLIC_KEY")
                key = key.decode() if isinstance(key, bytes) else str(key)
                ep = p.get("WGPEER_A_ENDPOINT") or {}
                psk = p.get("WGPEER_A_PRESHARED_KEY")
                psk = psk.decode() if isinstance(psk, bytes) else psk
                ips = frozenset(ip_network(f"{a.get('addr')}/{a.get('WGALLOWEDIP_A_CIDR_MASK')}",
                                           strict=False)
                                for a in p.get("WGPEER_A_ALLOWEDIPS") or ()
                                if a.get("addr") is not None)
                st.peers[key] = WgPeer(
                    device=name, public_key=key,
                    endpoint=(ip_address(ep["addr"]), int(ep["port"])) if ep.get("addr")
                    else None, allowed_ips=ips,
                    preshared_key=None if not psk or decode_key(psk) == ZERO_KEY else psk,
                    keepalive=int(p.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0))
        return st

    async def update(self, name: str, *, put: Sequence[WgPeer] = (),
                     remove: Sequence[str] = (), private_key: str | None = None,
                     listen_port: int | None = None) -> None:
        _, wg = await self._handles()
        try:
            if private_key is not None or listen_port is not None:
                await wg.set(name, private_key=private_key, listen_port=listen_port)
            for key in remove:
                await wg.set(name, peer={"public_key": key, "remove": True})
            for p in put:
                peer: dict[str, Any] = {
                    "public_key": p.public_key, "persistent_keepalive": p.keepalive,
                    "replace_allowed_ips": True,
                    "allowed_ips": sorted(str(n) for n in p.allowed_ips),
                    "preshared_key": p.preshared_key or encode_key(ZERO_KEY)}
                if p.endpoint is not None:
                    peer["endpoint_addr"], peer["endpoint_port"] = str(p.endpoint[0]), \
                        p.endpoint[1]
                await wg.set(name, peer=peer)
        except Exception as e:  # pyroute2's NetlinkError and ValueError
            raise WgError(f"{name}: {e}") from None

    async def aclose(self) -> None:
        self._ipr, self._wg = None, None
        await self._stack.aclose()


class AutoWgPort:
    """The kernel's wireguard where a device can be created, else wireguard-go."""

    def __init__(self, preference: str | None = None) -> None:
        self.preference = (preference or os.environ.get("PYFLANNEL_WIREGUARD", "auto")).lower()
        self.chosen: KernelWgPort | UserspaceWgPort | None = None
        self._why_not_kernel = ""

    @property
    def implementation(self) -> str:
        if self.chosen is None:
            return ""
        impl = self.chosen.implementation
        return f"{impl}, as {self._why_not_kernel}" if self._why_not_kernel else impl

    async def ensure(self, dev: WgDevice) -> int:
        if self.chosen is not None:
            return await self.chosen.ensure(dev)
        if self.preference not in ("auto", "kernel", "userspace"):
            raise WgUnsupported(f"PYFLANNEL_WIREGUARD={self.preference}: expected auto, "
                                "kernel or userspace")
        problems = []
        user = UserspaceWgPort()
        if self.preference == "auto" and await user.answers(dev.name):
            # our wireguard-go from before a restart: adopt it (probing the kernel would
            # replace its device and drop every tunnel)
            self.chosen = user
            return await user.ensure(dev)
        if self.preference in ("auto", "kernel"):
            kernel = KernelWgPort()
            try:
                index = await kernel.ensure(dev)
                self.chosen = kernel
                return index
            except WgUnsupported as e:
                await kernel.aclose()
                if self.preference == "kernel":
                    raise WgUnsupported(f"PYFLANNEL_WIREGUARD=kernel: {e}") from None
                self._why_not_kernel = str(e)
                problems.append(f"kernel: {e}")
        try:
            index = await user.ensure(dev)
        except WgUnsupported as e:
            problems.append(f"userspace: {e}")
            raise WgUnsupported("no WireGuard implementation available (" +
                                "; ".join(problems) + ")") from None
        self.chosen = user
        return index

    async def state(self, name: str) -> WgState | None:
        return await self._port(name).state(name)

    async def update(self, name: str, *, put: Sequence[WgPeer] = (),
                     remove: Sequence[str] = (), private_key: str | None = None,
                     listen_port: int | None = None) -> None:
        await self._port(name).update(name, put=put, remove=remove, private_key=private_key,
                                      listen_port=listen_port)

    def _port(self, name: str) -> KernelWgPort | UserspaceWgPort:
        if self.chosen is None:
            # `pyflannel status` reads without ensure(): a UAPI socket means wireguard-go.
            user = UserspaceWgPort()
            self.chosen = user if self.preference != "kernel" and user.sock(name).exists() \
                else KernelWgPort()
        return self.chosen

    async def aclose(self) -> None:
        if self.chosen is not None:
            await self.chosen.aclose()

