"""The etcd subnet manager: upstream flannel's key layout and lease rules on etcd v3.

Differences from upstream, all deliberate:
- a lost create race is retried (upstream exits, reference §14.2);
- keys without an etcd lease are reservations that never expire (upstream skips them
  after a failed TimeToLive, §14.1); peers' expirations are never looked up;
- watch resume points come from event revisions, not header revisions (see
  EtcdClient.watch), and a compaction yields a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from typing import NoReturn

from pyflannel.config.flags import ConfigError
from pyflannel.config.netconf import NetConf, check_network_config, parse_netconf
from pyflannel.lease.allocate import allocate_subnet, fits
from pyflannel.lease.events import LeaseChanges, LeaseSnapshot, LeaseUpdate
from pyflannel.lease.model import (
    UNSET_IPV4,
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    StoredNodeState,
    parse_subnet_key,
    stored_lease,
    subnet_key,
)
from pyflannel.subnet.backoff import ReconnectBackoff
from pyflannel.subnet.base import LeaseRevoked, LeaseSetup, NodeConfig
from pyflannel.subnet.etcd.client import EtcdClient, EtcdCompacted, EtcdError, KeyValue

log = logging.getLogger(__name__)

SUBNET_TTL = 24 * 3600  # upstream subnetTTL
RACE_RETRIES = 10  # upstream raceRetries


def _lease_from_kv(kv: KeyValue, key_suffix: str) -> Lease:
    """A peer lease from a stored key/value; raises LeaseFormatError for foreign data."""
    return stored_lease(key_suffix, kv.value, reservation=kv.lease == 0,
                        origin=str(kv.lease), created=kv.create_revision,
                        revision=kv.mod_revision)


class EtcdSubnetManager:
    """Acquires, renews and watches flannel leases under `<prefix>/subnets/`.

    Owns the client: aclose() closes it."""

    name = "etcd"
    # Seconds between renewal attempts after a failure (upstream: 1 min).
    renew_retry_interval: float = 60.0

    def __init__(self, client: EtcdClient, *, prefix: str = "/coreos.com/network",
                 previous_subnet: IPv4Network | None = None,
                 previous_ipv6_subnet: IPv6Network | None = None,
                 renew_margin: float = 3600.0, rng: random.Random | None = None) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.config_key = f"{self.prefix}/config"
        self.subnets_prefix = f"{self.prefix}/subnets/"
        self.previous_subnet = previous_subnet
        self.previous_ipv6_subnet = previous_ipv6_subnet
        self.renew_margin = renew_margin
        self._rng = rng or random.Random()
        self._primed: tuple[LeaseSnapshot, int] | None = None
        self.watch_reconnects = 0
        self._skipped: dict[str, int] = {}  # key -> mod revision whose refusal was logged
        self.watch_backoff = ReconnectBackoff("lease watch", log,
                                              recovered="connected to etcd again")

    # -- config ----------------------------------------------------------------------
    async def node_config(self) -> NodeConfig:
        """The network config from etcd; etcd keeps no per-node settings (the flags decide
        the public IPs). A missing or invalid config is an EtcdError: upstream waits for
        an operator to write a good one, and so do we."""
        kv = await self.client.get(self.config_key)
        if kv is None:
            raise EtcdError(f"flannel config not found in etcd store at {self.config_key}. "
                            "Did you create your config using etcdv3 API?")
        where = f"network config at etcd key {self.config_key}"
        try:
            nc = check_network_config(parse_netconf(kv.value, source=where), source=where)
        except ConfigError as e:
            raise EtcdError(str(e)) from None
        return NodeConfig(nc)

    # -- reading leases ----------------------------------------------------------------
    def _suffix(self, key: str) -> str | None:
        """The part of a key under <prefix>/subnets/ (to be parsed), else None."""
        return key[len(self.subnets_prefix):] if key.startswith(self.subnets_prefix) else None

    def _parse(self, kv: KeyValue) -> Lease | None:
        """The lease in `kv`, or None (logged once per key revision) for anything else."""
        suffix = self._suffix(kv.key)
        if suffix is None:
            log.debug("%s: not a subnet, skipping", kv.key[:200])
            return None
        try:
            lease = _lease_from_kv(kv, suffix)
        except LeaseFormatError as e:
            if self._skipped.get(kv.key) != kv.mod_revision:
                self._skipped[kv.key] = kv.mod_revision
                log.warning("Skipping %s: %s", kv.key[:200], e)
            return None
        self._skipped.pop(kv.key, None)
        return lease

    async def _read_leases(self) -> tuple[list[Lease], int]:
        # Parsed page by page: the raw values of 50k leases are never held at once. etcd
        # counts the rest of the range for every page, so pages of 5,000 (about 1.3 MB of
        # JSON) read 50k leases in 0.8 s where pages of 1,000 take 1.2 s.
        return await self.client.range_prefix(self.subnets_prefix, page=5000,
                                              parse=self._parse)

    def _remembered(self, nc: NetConf, mine: list[Lease]) -> StoredNodeState:
        """The backend data of our previous lease (keeps our VTEP MAC stable across
        restarts, so peers' neighbour entries stay valid): the one subnet.env records,
        else any lease with our public IP (upstream's order)."""
        recorded = self._recorded_lease(nc, mine)
        for s in [recorded] if recorded is not None else mine:
            return StoredNodeState(backend_data=s.attrs.backend_data,
                                   backend_v6_data=s.attrs.backend_v6_data)
        return StoredNodeState()

    # -- acquiring -------------------------------------------------------------------
    @staticmethod
    def _fits(nc: NetConf, v4: IPv4Network | None, v6: IPv6Network | None) -> bool:
        """Whether a lease with these subnets is acceptable under the config: one subnet
        per enabled family, inside SubnetMin..SubnetMax, of the configured length."""
        if nc.enable_ipv4:
            if (v4 is None or nc.network is None or nc.subnet_min is None
                    or nc.subnet_max is None or not v4.subnet_of(nc.network)
                    or not fits(v4, nc.subnet_len, nc.subnet_min, nc.subnet_max)):
                return False
        elif v4 is not None:
            return False
        if nc.enable_ipv6:
            if (v6 is None or nc.ipv6_network is None or nc.ipv6_subnet_min is None
                    or nc.ipv6_subnet_max is None or not v6.subnet_of(nc.ipv6_network)
                    or not fits(v6, nc.ipv6_subnet_len, nc.ipv6_subnet_min,
                                nc.ipv6_subnet_max)):
                return False
        elif v6 is not None:
            return False
        return True

    @staticmethod
    def _same_node(lease: Lease, attrs: LeaseAttrs) -> bool:
        # Upstream matches on the IPv4 public address; v6-only nodes have none.
        if attrs.public_ip != UNSET_IPV4:
            return lease.attrs.public_ip == attrs.public_ip
        return attrs.public_ipv6 is not None and lease.attrs.public_ipv6 == attrs.public_ipv6

    def _key(self, v4: IPv4Network | None, v6: IPv6Network | None) -> str:
        return self.subnets_prefix + subnet_key(v4, v6)

    async def _write(self, v4: IPv4Network | None, v6: IPv6Network | None, attrs: LeaseAttrs,
                     *, reservation: bool, must_exist: bool = False) -> Lease:
        """Put the lease with a fresh 24 h etcd lease (none for a reservation). With
        `must_exist` (renewal) the write is conditional on the key still being there: a
        renewal racing with a deletion must not bring a revoked lease back (upstream's
        plain put would)."""
        key, value = self._key(v4, v6), attrs.to_json().encode()
        if reservation:
            if must_exist:
                if not await self.client.update(key, value):
                    _revoked(key)
            else:
                await self.client.put(key, value)
            return Lease(v4, attrs, v6, expiration=None, reservation=True, origin="0")
        lease_id, ttl = await self.client.grant(SUBNET_TTL)
        try:
            if must_exist:
                if not await self.client.update(key, value, lease=lease_id):
                    await self._revoke_quietly(lease_id)
                    _revoked(key)
            else:
                await self.client.put(key, value, lease=lease_id)
        except EtcdError:
            await self._revoke_quietly(lease_id)
            raise
        return Lease(v4, attrs, v6, expiration=time.time() + ttl, reservation=False,
                     origin=str(lease_id))

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self.client.revoke(lease_id)
        except EtcdError as e:
            # It expires on its own within 24 h; nothing else holds it.
            log.warning("Could not revoke unused etcd lease %x: %s", lease_id, e)

    async def _create(self, v4: IPv4Network | None, v6: IPv6Network | None,
                      attrs: LeaseAttrs, read_at: int) -> Lease | None:
        """Create-if-absent in one transaction; None when another node got there first,
        also with another key: in dual stack two keys (`v4&v6`) can share one subnet."""
        lease_id, ttl = await self.client.grant(SUBNET_TTL)
        key = self._key(v4, v6)
        try:
            created = await self.client.create(key, attrs.to_json().encode(), lease=lease_id)
            rival = await self._older_rival(key, v4, v6, read_at, created) if created \
                else None
            if rival is not None:
                # Two nodes picked the same subnet under different keys (the other family's
                # subnet differs) since we read: the older key keeps it (as LeaseTable
                # decides), so ours goes and we pick again.
                log.info("Subnet (ip: %s ipv6: %s) is also in %s, created just before ours; "
                         "picking another", v4, v6, rival)
                await self.client.delete(key)
                created = 0
        except EtcdError:
            await self._revoke_quietly(lease_id)
            raise
        if not created:
            await self._revoke_quietly(lease_id)
            return None
        return Lease(v4, attrs, v6, expiration=time.time() + ttl, reservation=False,
                     origin=str(lease_id), created=created)

    async def _older_rival(self, key: str, v4: IPv4Network | None, v6: IPv6Network | None,
                           read_at: int, created: int) -> str | None:
        """A key created between our read and our create whose subnets overlap ours."""
        for other, crev in await self.client.created_since(self.subnets_prefix, read_at):
            if crev >= created or other == key:
                continue
            try:
                o4, o6 = parse_subnet_key(other[len(self.subnets_prefix):])
            except ValueError:  # not a lease key: LeaseTable refuses it anyway
                continue
            if (v4 is not None and o4 is not None and v4.overlaps(o4)) or \
                    (v6 is not None and o6 is not None and v6.overlaps(o6)):
                return other
        return None

    def _recorded_lease(self, nc: NetConf, mine: list[Lease]) -> Lease | None:
        """Our lease as subnet.env records it, when the store still has it with our public
        IP: it wins over any other lease carrying our IP (one planted there must not be
        adopted by a restart)."""
        v4 = self.previous_subnet if nc.enable_ipv4 else None
        v6 = self.previous_ipv6_subnet if nc.enable_ipv6 else None
        if v4 is None and v6 is None:
            return None
        key = subnet_key(v4, v6)
        return next((s for s in mine if s.key == key
                     and self._fits(nc, s.subnet, s.ipv6_subnet)), None)

    def _previous_choice(self, nc: NetConf, stored: list[Lease]
                         ) -> tuple[IPv4Network | None, IPv6Network | None] | None:
        v4 = self.previous_subnet if nc.enable_ipv4 else None
        v6 = self.previous_ipv6_subnet if nc.enable_ipv6 else None
        if (nc.enable_ipv4 and v4 is None) or (nc.enable_ipv6 and v6 is None):
            return None
        if not self._fits(nc, v4, v6):
            return None
        for s in stored:
            held4 = v4 is not None and s.subnet is not None and v4.overlaps(s.subnet)
            held6 = (v6 is not None and s.ipv6_subnet is not None
                     and v6.overlaps(s.ipv6_subnet))
            if held4 or held6:
                return None  # since upstream #1505: never take another node's subnet
        return v4, v6

    def _allocate(self, nc: NetConf, stored: list[Lease]
                  ) -> tuple[IPv4Network | None, IPv6Network | None]:
        v4: IPv4Network | None = None
        v6: IPv6Network | None = None
        if nc.enable_ipv4:
            assert nc.network and nc.subnet_min and nc.subnet_max  # check_network_config
            taken4 = [s.subnet for s in stored if s.subnet is not None]
            v4 = allocate_subnet(nc.network, nc.subnet_len, nc.subnet_min, nc.subnet_max,
                                 taken4, self._rng)
            if v4 is None:
                raise EtcdError(
                    f"out of subnets: no free /{nc.subnet_len} left in Network {nc.network} "
                    f"between SubnetMin {nc.subnet_min} and SubnetMax {nc.subnet_max}")
        if nc.enable_ipv6:
            assert nc.ipv6_network and nc.ipv6_subnet_min and nc.ipv6_subnet_max
            taken6 = [s.ipv6_subnet for s in stored if s.ipv6_subnet is not None]
            v6 = allocate_subnet(nc.ipv6_network, nc.ipv6_subnet_len, nc.ipv6_subnet_min,
                                 nc.ipv6_subnet_max, taken6, self._rng)
            if v6 is None:
                raise EtcdError(
                    f"out of subnets: no free /{nc.ipv6_subnet_len} left in IPv6Network "
                    f"{nc.ipv6_network} between IPv6SubnetMin {nc.ipv6_subnet_min} and "
                    f"IPv6SubnetMax {nc.ipv6_subnet_max}")
        return v4, v6

    async def acquire_lease(self, netconf: NetConf, attrs: LeaseAttrs,
                            setup: LeaseSetup | None = None) -> Lease:
        """Reuse our lease (subnet.env's, else by public IP), else our previous subnet, else a
        random free one. `setup` runs once, on the first read, with what the store
        remembers of us, and gives the attributes we publish."""
        ready: LeaseAttrs | None = None
        for attempt in range(1, RACE_RETRIES + 1):
            stored, rev = await self._read_leases()

            mine = [s for s in stored if self._same_node(s, attrs)]
            recorded = self._recorded_lease(netconf, mine)
            if ready is None:
                ready = attrs if setup is None else await setup(self._remembered(netconf, mine))
            attrs = ready
            if recorded is not None:
                for s in mine:
                    if s is not recorded:
                        log.warning("Lease %s carries our public IP (%s) but is not the one "
                                    "subnet.env records (%s): not ours, leaving it alone",
                                    s.key, attrs.public_ip, recorded.key)
                mine = [recorded]
            for s in mine:
                if self._fits(netconf, s.subnet, s.ipv6_subnet):
                    log.info("Found lease (ip: %s ipv6: %s) for current IP (%s), reusing",
                             s.subnet, s.ipv6_subnet, attrs.public_ip)
                    lease = await self._write(s.subnet, s.ipv6_subnet, attrs,
                                              reservation=s.reservation)
                    self._prime(stored, rev, lease)
                    return lease
            for s in mine:
                log.info("Found lease (ip: %s ipv6: %s) for current IP (%s) but not compatible "
                         "with current config, deleting", s.subnet, s.ipv6_subnet,
                         attrs.public_ip)
                await self.client.delete(self.subnets_prefix + s.key)
            if mine:
                stored = [s for s in stored if s not in mine]

            previous = self._previous_choice(netconf, stored)
            if previous is not None:
                v4, v6 = previous
                log.info("Found previously leased subnet (ip: %s ipv6: %s), reusing", v4, v6)
            else:
                v4, v6 = self._allocate(netconf, stored)

            created = await self._create(v4, v6, attrs, rev)
            if created is not None:
                log.info("Allocated lease (ip: %s ipv6: %s) to current node (%s)",
                         v4, v6, attrs.public_ip)
                self._prime(stored, rev, created)
                return created
            log.info("Subnet (ip: %s ipv6: %s) was taken by another node meanwhile, retrying "
                     "(attempt %d of %d)", v4, v6, attempt, RACE_RETRIES)
        raise EtcdError(f"max retries reached trying to acquire a subnet ({RACE_RETRIES} "
                        "attempts lost a race to other nodes)")

    def _prime(self, stored: list[Lease], rev: int, lease: Lease) -> None:
        """The first snapshot of updates() reuses acquire_lease's read (at 10k peers a
        second range + parse costs most of a second at start-up): the leases read at
        `rev`, with ours as written. The watch starts at rev + 1, so it replays our own
        write (an identical upsert) and everything else since."""
        leases = [s for s in stored if s.key != lease.key]
        leases.append(lease)
        self._primed = (LeaseSnapshot(tuple(leases)), rev)

    # -- keeping ---------------------------------------------------------------------
    async def renew_lease(self, lease: Lease) -> Lease:
        """Rewrite our key with a new 24 h etcd lease (a reservation stays without)."""
        return await self._write(lease.subnet, lease.ipv6_subnet, lease.attrs,
                                 reservation=lease.reservation, must_exist=True)

    async def keep_lease(self, lease: Lease) -> None:
        """Renew `lease` before it expires, forever; raise LeaseRevoked when our key is
        deleted or expires."""
        state = _KeepState(lease)
        tasks = [asyncio.create_task(self._renew_loop(state), name="etcd-lease-renew"),
                 asyncio.create_task(self._watch_own(state), name="etcd-lease-watch")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raises LeaseRevoked (or a bug) here
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _renew_loop(self, state: _KeepState) -> None:
        while True:
            lease = state.lease
            if lease.reservation or lease.expiration is None:
                # A reservation never expires; wait for the watch to tell us otherwise.
                await state.changed.wait()
                state.changed.clear()
                continue
            delay = lease.expiration - self.renew_margin - time.time()
            if delay > 0:
                log.info("Waiting for %.0fs to renew lease", delay)
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow our own
                # cancellation when the event fires at the same moment.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await state.changed.wait()
                if state.changed.is_set():
                    state.changed.clear()
                    continue  # our key changed: recompute from its new expiration
            try:
                state.lease = await self.renew_lease(state.lease)
            except EtcdError as e:
                log.error("Error renewing lease (trying again in 1 min): %s", e)
                await asyncio.sleep(self.renew_retry_interval)
                continue
            log.info("Lease renewed, new expiration: %s",
                     time.strftime("%Y-%m-%d %H:%M:%S %z",
                                   time.localtime(state.lease.expiration or 0)))

    async def _watch_own(self, state: _KeepState) -> None:
        key = self._key(state.lease.subnet, state.lease.ipv6_subnet)
        revision: int | None = None  # everything up to here has been seen
        backoff = ReconnectBackoff("watch of our own lease", log,
                                   recovered="connected to etcd again")
        while True:
            try:
                if revision is None:
                    kv = await self.client.get(key)
                    if kv is None:
                        _revoked(key)
                    revision = kv.mod_revision
                    await self._own_key_changed(state, kv)
                async with contextlib.aclosing(
                        self.client.watch(key, start_revision=revision + 1)) as events:
                    async for batch, rev in events:
                        backoff.succeeded()
                        revision = rev
                        for ev in batch:
                            if ev.kv.key != key:
                                continue  # a dual-stack key sharing our prefix
                            if ev.type == "DELETE":
                                _revoked(key)
                            await self._own_key_changed(state, ev.kv)
                raise EtcdError("watch stream ended")
            except EtcdCompacted:
                revision = None  # re-read the key: gone means revoked
            except EtcdError as e:
                await backoff.fail(e)

    async def _own_key_changed(self, state: _KeepState, kv: KeyValue) -> None:
        """Someone (we, or an admin) rewrote our key: follow its etcd lease."""
        current = state.lease
        if kv.lease == 0:
            if not current.reservation:
                log.info("Our lease %s became a reservation: no more renewals", kv.key)
                state.lease = replace(current, reservation=True, expiration=None, origin="0")
                state.changed.set()
            return
        if str(kv.lease) == current.origin:
            return
        ttl = await self.client.time_to_live(kv.lease)
        if ttl < 0:
            return  # expired already: the DELETE event follows
        state.lease = replace(current, reservation=False, expiration=time.time() + ttl,
                              origin=str(kv.lease))
        state.changed.set()

    # -- watching --------------------------------------------------------------------
    async def _snapshot(self) -> tuple[LeaseSnapshot, int]:
        stored, rev = await self._read_leases()
        return LeaseSnapshot(tuple(stored)), rev

    def _changes(self, batch: list[tuple[str, KeyValue]]) -> LeaseChanges | None:
        # Last event per key wins: consumers apply removals before upserts.
        final: dict[str, Lease | None] = {}
        for typ, kv in batch:
            suffix = self._suffix(kv.key)
            if suffix is None:
                log.debug("%s: not a subnet, skipping", kv.key[:200])
                continue
            try:
                parse_subnet_key(suffix)
            except LeaseFormatError as e:
                # Never a lease, so its deletion cannot remove one either.
                if typ == "DELETE":
                    self._skipped.pop(kv.key, None)
                elif self._skipped.get(kv.key) != kv.mod_revision:
                    self._skipped[kv.key] = kv.mod_revision
                    log.warning("Skipping %s: %s", kv.key[:200], e)
                continue
            if typ == "DELETE":
                self._skipped.pop(kv.key, None)
                final[suffix] = None
                continue
            # A key that no longer holds a lease must not keep its old route.
            final[suffix] = self._parse(kv)
        if not final:
            return None
        return LeaseChanges(
            upserted=tuple(v for v in final.values() if v is not None),
            removed=tuple(k for k, v in final.items() if v is None),
        )

    async def updates(self) -> AsyncIterator[LeaseUpdate]:
        """A snapshot of all leases, then changes; never ends, never gives up."""
        revision: int | None = None
        backoff = self.watch_backoff
        watched = False
        while True:
            try:
                if revision is None:
                    if self._primed is not None:
                        (snapshot, revision), self._primed = self._primed, None
                    else:
                        snapshot, revision = await self._snapshot()
                    backoff.succeeded()
                    yield snapshot
                if watched:
                    self.watch_reconnects += 1  # for the flannel_watch_reconnects metric
                watched = True
                async with contextlib.aclosing(self.client.watch(
                        self.subnets_prefix, start_revision=revision + 1)) as events:
                    async for batch, rev in events:
                        backoff.succeeded()
                        changes = self._changes([(ev.type, ev.kv) for ev in batch])
                        revision = rev
                        if changes is not None:
                            yield changes
                raise EtcdError("watch stream ended")
            except EtcdCompacted as e:
                log.warning("Lease watch fell behind a compaction (%s): re-listing", e)
                revision = None
            except EtcdError as e:
                await backoff.fail(e)

    @property
    def watch_down_since(self) -> float | None:
        return self.watch_backoff.failing_since

    @property
    def description(self) -> str:
        return f"Etcd Local Manager with Previous Subnet: {self.previous_subnet or '0.0.0.0/0'}"

    async def lease_ttls(self, leases: Sequence[Lease]) -> dict[str, int]:
        """Remaining seconds of each lease's etcd lease (-1: none or expired), one call
        each: for `pyflannel status`, never the daemon."""
        out: dict[str, int] = {}
        for le in leases:
            if le.origin and le.origin != "0":
                out[le.key] = await self.client.time_to_live(int(le.origin))
        return out

    async def aclose(self) -> None:
        await self.client.aclose()


def _revoked(key: str) -> NoReturn:
    log.error("Lease has been revoked. Shutting down daemon.")
    raise LeaseRevoked(f"lease {key} has been revoked (deleted or expired in etcd)")


class _KeepState:
    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.changed = asyncio.Event()


