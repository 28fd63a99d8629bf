"""flanneld's entry point and the Daemon that wires the parts together.

Start-up follows upstream's main.go order (reference §0): flags, subnet manager,
signal handlers, health server, network config, interface, backend + lease, traffic
rules, subnet.env, then the long-running loops. Data flows one way:
store updates -> NodeDataplane (LeaseTable -> desired state) -> engine -> RoutePort.
Everything outside Python (kernel ports, interface lookup, firewall, store) comes from a
Platform, so unit tests run the whole loop on fakes. Shutdown removes nothing: routes,
rules, lease and subnet.env stay, so a restart does not interrupt pod traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from pyflannel import __version__
from pyflannel.backend.base import Backend, BackendError, BackendSetup
from pyflannel.backend.registry import BACKENDS, make_backend, unknown_backend_message
from pyflannel.config.flags import ConfigError, Flags, HelpRequested, help_text, parse_flags
from pyflannel.config.netconf import NetConf
from pyflannel.daemon.http import HealthServer
from pyflannel.daemon.logging_setup import setup_logging
from pyflannel.daemon.metrics import DaemonMetrics
from pyflannel.dataplane import NodeDataplane, lease_policy, traffic_config
from pyflannel.iface.select import ExternalInterface, InterfaceError
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState
from pyflannel.netlink import LinkEvent, RtEvent
from pyflannel.platform import Platform
from pyflannel.reconcile.engine import KernelReconciler, ReconcileStats, RuleSync
from pyflannel.reconcile.hookrunner import HookRunner
from pyflannel.reconcile.wgsync import WgReconciler
from pyflannel.subnet.base import LeaseRevoked, StoreError, SubnetManager
from pyflannel.subnet.subnetenv import (
    SubnetEnv,
    read_subnet_env,
    render_subnet_env,
    subnet_env_for,
    write_subnet_env,
)
from pyflannel.traffic import TrafficConfig

log = logging.getLogger("main")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
# /readyz turns 503 when the lease watch has been failing for longer than this: peers that
# join or change meanwhile are not programmed. Short outages (a store restart) stay ready.
WATCH_DOWN_READY_LIMIT = 30.0

class StartupError(Exception):
    """A fatal start-up problem; the message is one line that says what to do."""


class Daemon:
    def __init__(self, flags: Flags, platform: Platform | None = None) -> None:
        self.flags = flags
        self.platform = platform or Platform.real()
        self.metrics = DaemonMetrics()
        self.ready = False
        self._subnet_env_problem = ""  # why subnet.env is not what we wrote, "" when it is
        self._stop = asyncio.Event()
        self._drift_seen = 0
        self._mgr: SubnetManager | None = None
        self._settled = False  # the first full pass is done (see _record_pass)

    # -- start-up steps -----------------------------------------------------------------

    async def _node_config(self, mgr: SubnetManager) -> tuple[NetConf, IPv4Address | None,
                                                              IPv6Address | None]:
        while True:
            try:
                cfg = await mgr.node_config()
                return cfg.netconf, cfg.public_ip, cfg.public_ipv6
            except StoreError as e:
                if not e.retryable:
                    raise
                log.error("Couldn't fetch network config: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1)
            if self._stop.is_set():
                raise asyncio.CancelledError

    async def _external_interface(self, nc: NetConf, stored4: IPv4Address | None,
                                  stored6: IPv6Address | None) -> ExternalInterface:
        f = self.flags
        if not (f.iface or f.iface_regex or f.iface_can_reach):
            log.info("Determining IP address of default interface")
        public_ip = IPv4Address(f.public_ip) if f.public_ip else None
        public_ipv6 = IPv6Address(f.public_ipv6) if f.public_ipv6 else None
        try:
            # The store may override the flags (kube: the node-public-ip annotations).
            ext = await self.platform.find_interface(
                ifaces=f.iface, iface_regexes=f.iface_regex, can_reach=f.iface_can_reach,
                public_ip=stored4 or public_ip, public_ipv6=stored6 or public_ipv6,
                ipv4=nc.enable_ipv4, ipv6=nc.enable_ipv6)
        except InterfaceError as e:
            raise StartupError(str(e)) from None
        log.info("Using interface with name %s and address %s", ext.name,
                 ext.iface_addr or ext.iface_addr6)
        if ext.ext_addr == ext.iface_addr and ext.ext_addr6 == ext.iface_addr6:
            log.info("Defaulting external address to interface address (%s)",
                     ext.iface_addr or ext.iface_addr6)
        return ext

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> int:
        f = self.flags
        loop = asyncio.get_running_loop()
        log.info("Installing signal handlers")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        subnet_file = Path(f.subnet_file)
        old_env = read_subnet_env(subnet_file)
        try:
            mgr = self._mgr = self.platform.make_store(f, old_env)
        except StoreError as e:
            log.error("%s", e)
            return EXIT_ERROR
        http: HealthServer | None = None
        if f.healthz_port > 0:
            http = HealthServer(f.healthz_ip, f.healthz_port, ready=self.unready_reason,
                                registry=self.metrics.registry)
            await http.start()
        try:
            return await self._run(mgr, subnet_file, old_env)
        except asyncio.CancelledError:
            log.info("Exiting cleanly...")
            return EXIT_OK
        except (StartupError, StoreError) as e:
            log.error("%s", e)
            return EXIT_ERROR
        finally:
            if http is not None:
                await http.close()
            await mgr.aclose()
            await self.platform.links.aclose()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run(self, mgr: SubnetManager, subnet_file: Path,
                   old_env: SubnetEnv | None) -> int:
        f = self.flags
        nc, stored4, stored6 = await self._node_config(mgr)
        log.info("Created subnet manager: %s", mgr.description)
        log.info("Found network config - Backend type: %s", nc.backend_type)
        if not (nc.enable_ipv4 or nc.enable_ipv6):
            raise StartupError("none defined stack: enable EnableIPv4 and/or EnableIPv6 in "
                               "net-conf.json")
        if nc.backend_type not in BACKENDS:
            raise StartupError(unknown_backend_message(nc.backend_type))
        backend: Backend = make_backend(nc.backend_type, self.platform)
        if not nc.enable_nftables:
            problem = self.platform.br_netfilter(nc.enable_ipv4, nc.enable_ipv6)
            if problem:
                raise StartupError(f"Failed to check br_netfilter: {problem}")
        ext = await self._external_interface(nc, stored4, stored6)
        attrs = LeaseAttrs(public_ip=ext.ext_addr or IPv4Address("0.0.0.0"),
                           public_ipv6=ext.ext_addr6 if nc.enable_ipv6 else None,
                           backend_type=backend.backend_type)
        setups: list[BackendSetup] = []

        async def setup(stored: StoredNodeState) -> LeaseAttrs:
            try:
                s = await backend.register(ext, nc, stored, self.platform.links)
            except BackendError as e:
                raise StartupError(f"Error registering network: {e}") from None
            setups.append(s)
            return LeaseAttrs(public_ip=attrs.public_ip, public_ipv6=attrs.public_ipv6,
                              backend_type=s.backend_type, backend_data=s.backend_data,
                              backend_v6_data=s.backend_v6_data)

        try:
            lease = await mgr.acquire_lease(nc, attrs, setup)
        except StoreError as e:
            raise StartupError(f"Error registering network: failed to acquire lease: {e}") \
                from None
        backend_setup = setups[0]
        if lease.expiration:
            self.metrics.lease_expiration.set(lease.expiration)
        try:
            await backend.configure(lease)
        except BackendError as e:
            raise StartupError(f"Error registering network: {e}") from None

        rules_sync = await self._setup_traffic(nc, lease, old_env)
        env = subnet_env_for(nc.network if nc.enable_ipv4 else None,
                             lease.subnet if nc.enable_ipv4 else None,
                             nc.ipv6_network if nc.enable_ipv6 else None,
                             lease.ipv6_subnet if nc.enable_ipv6 else None,
                             backend_setup.mtu, f.ip_masq)
        self._sync_subnet_env(subnet_file, env)
        self.ready = True
        log.info("flannel is ready")

        policy = lease_policy(nc, store=mgr.name, backend_type=backend_setup.backend_type,
                              own_subnet=lease.subnet, own_ipv6_subnet=lease.ipv6_subnet,
                              own_public_ip=attrs.public_ip, own_public_ipv6=attrs.public_ipv6,
                              segments=ext.segments)
        port = self.platform.open_routes()
        blackhole = tuple(s for s in (lease.subnet, lease.ipv6_subnet) if s is not None) \
            if f.ip_blackhole_route else ()
        dataplane = NodeDataplane(backend, policy, lease.ident, port, blackhole=blackhole)
        engine = KernelReconciler(port, dataplane.scope, nexthops=self.platform.nexthops,
                                  rules=rules_sync, compat_mode=self.platform.nexthop_compat)
        engine.on_pass = self._record_pass
        # WireGuard peers have no netlink objects: their own reconciler, same desired state.
        wg = WgReconciler(self.platform.wireguard) if dataplane.desired.wg_devices else None
        if wg is not None:
            wg.on_repair = self.metrics.drift_repairs.labels(kind="wireguard").inc
        engine.on_links = lambda batch: self._on_links(batch, backend, dataplane, engine, wg)
        hooks = HookRunner(self.platform.commands)
        log.info("Running backend.")
        rc = EXIT_OK
        try:
            async with asyncio.TaskGroup() as tg:
                if backend_setup.watch_peers:
                    tg.create_task(self._watch_leases(mgr, dataplane, engine, wg, hooks=hooks))
                    tg.create_task(hooks.run())
                else:  # alloc: no data path, peers are never asked for
                    log.info("Backend %s has no data path: not watching peers' leases",
                             nc.backend_type)
                    engine.set_desired(dataplane.desired)
                tg.create_task(engine.run())
                if wg is not None:
                    tg.create_task(wg.run())
                tg.create_task(self._keep_subnet_env(subnet_file, env))
                tg.create_task(mgr.keep_lease(lease))
                tg.create_task(self._stop_waiter())
        except* LeaseRevoked:
            rc = EXIT_ERROR
        except* _Stopping:
            log.info("Exiting cleanly...")
        finally:
            port.close()
            await self.platform.wireguard.aclose()
        return rc

    async def _setup_traffic(self, nc: NetConf, lease: Lease,
                             old_env: SubnetEnv | None) -> RuleSync:
        f = self.flags
        # The other mode's leftovers go first (upstream PR #2239 does this at start-up).
        await self.platform.make_rules(not nc.enable_nftables).cleanup()
        rules = self.platform.make_rules(nc.enable_nftables)
        cfg = traffic_config(f, nc, lease.subnet, lease.ipv6_subnet)
        # Rules computed from the previous subnet.env are removed if they differ (a new
        # lease or network after a long downtime).
        previous = None
        if old_env is not None and (old_env.subnet or old_env.ipv6_subnet):
            previous = TrafficConfig(
                network=old_env.network,
                subnet=old_env.subnet.network if old_env.subnet else None,
                ipv6_network=old_env.ipv6_network,
                ipv6_subnet=old_env.ipv6_subnet.network if old_env.ipv6_subnet else None,
                masquerade=cfg.masquerade, forward=cfg.forward, fully_random=cfg.fully_random)
        try:
            await rules.ensure(cfg, previous=previous)
        except Exception as e:  # a masq setup failure is fatal upstream too
            raise StartupError(f"Failed to set up {rules.mode} rules: {e}") from None
        repaired = self.metrics.drift_repairs.labels(kind="rule")
        return RuleSync(rules, cfg, f.iptables_resync, on_repair=repaired.inc)

    def unready_reason(self) -> str:
        """/readyz: "" when ready, else why not (the probe's body says it)."""
        if not self.ready:
            return "starting up (network config, lease, backend)"
        if self._subnet_env_problem:
            return self._subnet_env_problem
        down = self._mgr.watch_down_since if self._mgr is not None else None
        if down is not None and time.monotonic() - down > WATCH_DOWN_READY_LIMIT:
            return (f"the lease watch has been down for {time.monotonic() - down:.0f} s "
                    f"(limit {WATCH_DOWN_READY_LIMIT:.0f} s): peers' changes are not seen")
        return ""

    def _sync_subnet_env(self, path: Path, env: SubnetEnv) -> None:
        """Make subnet.env hold exactly our bytes (rewritten when changed or removed); the
        CNI plugin reads it for every pod, so a stale one makes us not ready."""
        first = not self.ready  # start-up writes it always, as upstream does
        try:
            if not first:
                with contextlib.suppress(FileNotFoundError):
                    if path.read_bytes() == render_subnet_env(env):
                        self._subnet_env_problem = ""
                        return
            write_subnet_env(path, env)
            if first:
                log.info("Wrote subnet file to %s", path)
            else:
                log.warning("%s was changed or removed; rewrote it", path)
            self._subnet_env_problem = ""
        except OSError as e:
            if not self._subnet_env_problem:
                log.error("Failed to write subnet file %s: %s (retrying every %d s)", path,
                          e.strerror or e, self.flags.iptables_resync)
            self._subnet_env_problem = f"cannot write {path}: {e.strerror or e}"

    async def _keep_subnet_env(self, path: Path, env: SubnetEnv) -> None:
        while True:
            await asyncio.sleep(self.flags.iptables_resync)
            # Read, compared and rewritten off the loop: a slow disk never stalls it.
            await asyncio.to_thread(self._sync_subnet_env, path, env)

    async def _stop_waiter(self) -> None:
        await self._stop.wait()
        raise _Stopping

    async def _watch_leases(self, mgr: SubnetManager, dataplane: NodeDataplane,
                            engine: KernelReconciler, wg: WgReconciler | None = None,
                            *, hooks: HookRunner | None = None) -> None:
        log.info("Watching for new subnet leases")
        async for update in mgr.updates():
            delta = await dataplane.apply(update)
            for _lease, reason in delta.refused:
                self.metrics.refused_leases.labels(reason=reason.kind).inc()
            self.metrics.leases.set(len(dataplane.table.peers))
            self.metrics.observe_reconnects(mgr.watch_reconnects)
            if delta.changed or not engine.stats.runs:
                engine.set_desired(dataplane.desired)
                if wg is not None:
                    wg.set_desired(dataplane.desired)
            if hooks is not None and (changed := dataplane.take_hook_changes()):
                hooks.update(dataplane.hooks, changed)

    async def _on_links(self, batch: list[RtEvent], backend: Backend,
                        dataplane: NodeDataplane, engine: KernelReconciler,
                        wg: WgReconciler | None = None) -> None:
        changed = False
        for ev in batch:
            if ev.kind in ("link_new", "link_del") and isinstance(ev.obj, LinkEvent):
                changed = await backend.on_link_event(ev.kind, ev.obj) or changed
        if changed:
            # A device was recreated: new ifindex, so every peer state is rebuilt.
            await dataplane.rebuild()
            engine.set_scope(dataplane.scope)
            engine.set_desired(dataplane.desired)
            if wg is not None:
                wg.resync()  # a recreated device has no peers
                wg.set_desired(dataplane.desired)

    def _record_pass(self, s: ReconcileStats) -> None:
        if not self._settled and s.full_runs:
            self._settled = True
            settle_collector()
        m = self.metrics
        if self._mgr is not None:
            m.observe_reconnects(self._mgr.watch_reconnects)
        m.routes.set(s.routes)
        m.neighbours.set(s.neighbours)
        m.fdb_entries.set(s.fdb)
        m.unreachable_peers.set(len(s.unreachable))
        m.reconcile_seconds.observe(s.last_duration)
        m.last_sync.set(s.last_success)
        if s.drift_repairs > self._drift_seen:
            m.drift_repairs.labels(kind="kernel").inc(s.drift_repairs - self._drift_seen)
            self._drift_seen = s.drift_repairs


class _Stopping(Exception):
    """SIGTERM/SIGINT: leave everything in place and exit 0."""


def tune_collector() -> None:
    """The daemon allocates in bursts of long-lived objects without cycles (a cold start at
    50k peers: over a million). With CPython's default thresholds the collector keeps
    re-scanning them as they pile up, about a quarter of such a start; so the imports are
    frozen out of its scans and it runs ten times less often. (The engine's benchmarks run
    it so too.)"""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def settle_collector() -> None:
    """After the first full pass: what the cold start built (leases, desired and cached
    routes: 50k each) lives as long as the daemon, out of the collector's way as the
    imports are (tune_collector)."""
    gc.collect()
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        flags = parse_flags(args, os.environ)
    except HelpRequested:
        print(help_text(), file=sys.stderr)
        return EXIT_OK
    except ConfigError as e:
        print(f"flanneld: {e}", file=sys.stderr)
        return EXIT_USAGE
    if flags.version:
        print(__version__, file=sys.stderr)
        return EXIT_OK
    setup_logging(flags.v)
    log.info("CLI flags config: %s", flags.redacted())
    tune_collector()
    try:
        return asyncio.run(Daemon(flags).run())
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
