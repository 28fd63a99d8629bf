"""extension: the data path is the operator's commands (reference §2.1, upstream
pkg/backend/extension). Options, all optional command lines:

- PreStartupCommand: runs before the lease; its output (stdout and stderr, trimmed)
  becomes our lease's BackendData as a JSON string, as upstream marshals it.
- PostStartupCommand: runs after the lease, with NETWORK, SUBNET, IPV6SUBNET, PUBLIC_IP and
  PUBLIC_IPV6 set (upstream's values, "0.0.0.0/0", "::/0" and "<nil>" for the unset ones).
- SubnetAddCommand / SubnetRemoveCommand: run for every peer lease that appears (or
  changes) / goes, with SUBNET and PUBLIC_IP of the peer set (and, beyond upstream,
  IPV6SUBNET / PUBLIC_IPV6 when the peer has them), the peer's BackendData string on stdin.

A command is split on white space, `$VAR` expanded, and run without a shell (upstream
v0.28.2+, reconcile/hooks.py). A failing pre- or post-start command stops the daemon, as
upstream; a failing peer command is logged. This module is pure apart from running the two
start-up commands through the CommandPort it is given; the peers' commands are described
by peer_state and run by the engine side (reconcile/hookrunner.py).

Beyond upstream: SubnetRemoveCommand runs in etcd mode too (upstream's etcd delete event
has no attributes, so it skips the command as a "non-extension subnet"), with the values
the peer's add command had. Unlike upstream, the lease's PublicIP is the external address
(as for host-gw), not the interface address; they differ only with a kube node-public-ip
annotation or a second address on the interface.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Container
from ipaddress import IPv4Network, IPv6Network

from pyflannel.backend.base import BackendError, BackendSetup, PeerState
from pyflannel.config.netconf import ExtensionOptions, NetConf, NetConfError, extension_options
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.ports import Addr, LinkPort
from pyflannel.lease.model import Lease, StoredNodeState
from pyflannel.netlink import LinkEvent
from pyflannel.reconcile.hooks import CommandPort, CommandResult, PeerHook, split_command
from pyflannel.reconcile.plan import KernelScope

log = logging.getLogger("extension")

BACKEND_TYPE = "extension"
STARTUP_COMMAND_TIMEOUT = 120.0  # s; upstream waits forever, a hung start would never end


def go_json_string(text: str) -> str:
    """Go's json.Marshal of a string: UTF-8 kept, `<`, `>`, `&`, U+2028/U+2029 escaped."""
    out = json.dumps(text, ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(ch, esc)
    return out


def peer_stdin(backend_data: str) -> tuple[str, str]:
    """(stdin, problem): a peer's BackendData is a JSON string (upstream unmarshals it into
    one); anything else is upstream's "failed to unmarshal BackendData" and runs nothing."""
    if not backend_data:
        return "", ""
    try:
        value = json.loads(backend_data)
    except ValueError as e:
        return "", f"failed to unmarshal BackendData: {e}"
    if not isinstance(value, str):
        kind = {dict: "object", list: "array", bool: "bool"}.get(type(value), "number")
        return "", (f"failed to unmarshal BackendData: json: cannot unmarshal {kind} into "
                    "Go value of type string")
    return value, ""


def extension_peer_hook(lease: Lease, opts: ExtensionOptions) -> PeerHook | None:
    """Pure: what the peer's lease runs, None when no peer command is configured."""
    if not (opts.subnet_add_command or opts.subnet_remove_command):
        return None
    env = [("SUBNET", str(lease.subnet) if lease.subnet is not None else "0.0.0.0/0"),
           ("PUBLIC_IP", str(lease.attrs.public_ip))]
    if lease.ipv6_subnet is not None:
        env.append(("IPV6SUBNET", str(lease.ipv6_subnet)))
    if lease.attrs.public_ipv6 is not None:
        env.append(("PUBLIC_IPV6", str(lease.attrs.public_ipv6)))
    stdin, problem = peer_stdin(lease.attrs.backend_data)
    return PeerHook(add=split_command(opts.subnet_add_command),
                    remove=split_command(opts.subnet_remove_command),
                    env=tuple(env), stdin=stdin, problem=problem)


class ExtensionBackend:
    backend_type = BACKEND_TYPE
    own = PeerState()
    direct_routing = False

    def __init__(self, commands: CommandPort | None = None) -> None:
        self._commands = commands
        self._opts = ExtensionOptions()
        self._nc: NetConf | None = None
        self._ext: ExternalInterface | None = None
        self._networks: tuple[IPv4Network | IPv6Network, ...] = ()

    async def register(self, ext: ExternalInterface, nc: NetConf, stored: StoredNodeState,
                       links: LinkPort, *, create: bool = True) -> BackendSetup:
        try:
            self._opts = extension_options(nc)
        except NetConfError as e:
            raise BackendError(str(e)) from None
        self._nc, self._ext = nc, ext
        self._networks = tuple(n for n in (nc.network if nc.enable_ipv4 else None,
                                           nc.ipv6_network if nc.enable_ipv6 else None) if n)
        data = ""
        pre = self._opts.pre_startup_command
        if pre and create:  # create=False (`pyflannel status`): look, run nothing
            res = await self._run(pre, {})
            if res.dropped:
                raise BackendError(f"PreStartupCommand {pre}: its output is longer than "
                                   f"BackendData may be ({res.dropped} bytes over the limit)")
            data = go_json_string(res.output)
        elif create:
            log.info("No pre startup command configured - skipping")
        return BackendSetup(backend_type=BACKEND_TYPE, mtu=ext.mtu, backend_data=data)

    async def configure(self, lease: Lease) -> None:
        post = self._opts.post_startup_command
        if not post:
            log.info("No post startup command configured - skipping")
            return
        assert self._nc is not None
        nc = self._nc
        env = {
            "NETWORK": str(nc.network) if nc.enable_ipv4 and nc.network else "0.0.0.0/0",
            "SUBNET": str(lease.subnet) if lease.subnet is not None else "0.0.0.0/0",
            "IPV6SUBNET": str(lease.ipv6_subnet) if lease.ipv6_subnet is not None else "::/0",
            "PUBLIC_IP": str(lease.attrs.public_ip),
            "PUBLIC_IPV6": str(lease.attrs.public_ipv6) if lease.attrs.public_ipv6 else "<nil>",
        }
        await self._run(post, env)

    async def _run(self, command: str, env: dict[str, str]) -> CommandResult:
        if self._commands is None:
            raise BackendError("extension backend built without a command runner")
        res = await self._commands.run(split_command(command), env, "",
                                       timeout=STARTUP_COMMAND_TIMEOUT)
        if res.error:
            raise BackendError(f"failed to run command: {command} Err: {res.error} "
                               f"Output: {res.output}")
        log.info("Ran command: %s\n Output: %s", command, res.output)
        return res

    def scope(self) -> KernelScope:
        # The commands' routes are theirs: we own nothing of the kernel's state.
        return KernelScope(route_oifs=frozenset(), networks=self._networks)

    def peer_state(self, lease: Lease, direct: Container[Addr] = ()) -> PeerState:
        return PeerState(hook=extension_peer_hook(lease, self._opts))

    async def on_link_event(self, kind: str, link: LinkEvent) -> bool:
        return False
