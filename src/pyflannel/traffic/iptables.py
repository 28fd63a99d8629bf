"""iptables mode: FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter), one restore per apply.

Each apply is a single `iptables-restore --noflush` payload per IP family. Within a
table block the chain is flushed and refilled and the jump added in one nf_tables
transaction; an existing jump is never deleted, so no packet sees the chain empty or
unhooked (upstream flushes first and refills later: #2237). Blocks of different tables
commit separately, which is harmless: each table is consistent on its own.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence

from pyflannel.traffic.rules import (
    OWNED_IPTABLES,
    IptablesTable,
    IpVersion,
    TrafficConfig,
    desired_iptables,
    iptables_table_drift,
    is_reconfiguration,
    parse_iptables_save,
    render_iptables_restore,
    render_iptables_table,
)
from pyflannel.traffic.tool import TrafficError, run_checked

log = logging.getLogger(__name__)

_VERSION = re.compile(r"v(\d+)\.(\d+)\.(\d+)")
# --random-fully arrived in iptables 1.6.2 (upstream's HasRandomFully uses the same bound).
RANDOM_FULLY_SINCE = (1, 6, 2)

VERSIONS: tuple[IpVersion, ...] = (4, 6)


def _binary(version: IpVersion, tool: str) -> str:
    return tool if version == 4 else tool.replace("iptables", "ip6tables", 1)


class IptablesRules:
    mode = "iptables"

    def __init__(self, exec_prefix: Sequence[str] = ()) -> None:
        self._prefix = tuple(exec_prefix)
        # One apply at a time: the resync loop and a lease change must not interleave.
        self._lock = asyncio.Lock()
        self._random_fully: dict[IpVersion, bool] = {}
        # Families enabled at the previous ensure; None before the first one.
        self._last_families: frozenset[IpVersion] | None = None
        self._last_cfg: TrafficConfig | None = None

    async def ensure(self, cfg: TrafficConfig, *, previous: TrafficConfig | None = None) -> bool:
        async with self._lock:
            reconfigured = is_reconfiguration(cfg, previous, self._last_cfg)
            changed = False
            for version in self._families_to_check(cfg, previous):
                plan = await self._plan(cfg, version)
                if plan is None:
                    continue
                problems, payload, fresh = plan
                if not payload:
                    continue
                if fresh and self._last_cfg is None:
                    log.info("Adding flannel's IPv%d iptables rules", version)
                elif reconfigured:
                    log.info("Network or subnet changed; replacing flannel's IPv%d iptables "
                             "rules", version)
                else:
                    log.warning("Some iptables rules are missing; deleting and recreating rules "
                                "(IPv%d): %s", version, "; ".join(problems))
                await run_checked([*self._prefix, _binary(version, "iptables-restore"),
                                   "--noflush", "--wait"], stdin=payload)
                changed = True
            self._last_families = frozenset(v for v in VERSIONS if cfg.family(v) is not None)
            self._last_cfg = cfg
            return changed

    async def drift(self, cfg: TrafficConfig) -> list[str]:
        async with self._lock:
            problems: list[str] = []
            for version in VERSIONS:
                plan = await self._plan(cfg, version)
                if plan is not None:
                    problems += [f"IPv{version} {p}" for p in plan[0]]
            return problems

    async def cleanup(self) -> None:
        async with self._lock:
            for version in VERSIONS:
                have = await self._read(version, required=False)
                if have is None:
                    continue
                blocks = {t: render_iptables_table(t, None, have.get(t)) for t in OWNED_IPTABLES}
                payload = render_iptables_restore(blocks)
                if payload:
                    log.info("Removing flannel's IPv%d iptables chains", version)
                    await run_checked([*self._prefix, _binary(version, "iptables-restore"),
                                       "--noflush", "--wait"], stdin=payload)
            self._last_families = None
            self._last_cfg = None

    def _families_to_check(self, cfg: TrafficConfig, previous: TrafficConfig | None
                           ) -> list[IpVersion]:
        """Enabled families always; a disabled one only when it may hold leftovers (first
        run, or it was enabled before), so a v4-only node does not run ip6tables-save every
        resync (ip6tables may not even work on a host with IPv6 off)."""
        out: list[IpVersion] = []
        for v in VERSIONS:
            if (cfg.family(v) is not None or self._last_families is None
                    or v in self._last_families
                    or (previous is not None and previous.family(v) is not None)):
                out.append(v)
        return out

    async def _plan(self, cfg: TrafficConfig, version: IpVersion
                    ) -> tuple[list[str], str, bool] | None:
        """(problems, restore payload, whether the kernel holds no flannel chain yet) for
        one family; None when a disabled family's tools cannot be read."""
        fam = cfg.family(version)
        have = await self._read(version, required=fam is not None)
        if have is None:
            return None
        random_fully = (fam is not None and fam.masquerade and fam.fully_random
                        and await self._random_fully_supported(version))
        want = desired_iptables(fam, random_fully_supported=random_fully)
        problems: list[str] = []
        blocks: dict[str, list[str]] = {}
        for table in OWNED_IPTABLES:
            table_problems = iptables_table_drift(table, want.get(table), have.get(table))
            if table_problems:
                problems += table_problems
                blocks[table] = render_iptables_table(table, want.get(table), have.get(table))
        return problems, render_iptables_restore(blocks), not _holds_flannel_state(have)

    async def _read(self, version: IpVersion, *, required: bool
                    ) -> dict[str, IptablesTable] | None:
        argv = [*self._prefix, _binary(version, "iptables-save")]
        try:
            result = await run_checked(argv)
        except (TrafficError, FileNotFoundError) as err:
            if required:
                raise
            log.debug("Skipping IPv%d iptables: %s", version, err)
            return None
        return parse_iptables_save(result.stdout)

    async def _random_fully_supported(self, version: IpVersion) -> bool:
        if version not in self._random_fully:
            argv = [*self._prefix, _binary(version, "iptables"), "--version"]
            result = await run_checked(argv)
            match = _VERSION.search(result.stdout + result.stderr)
            found = tuple(int(x) for x in match.groups()) if match else (0, 0, 0)
            self._random_fully[version] = found >= RANDOM_FULLY_SINCE
            if not self._random_fully[version]:
                log.warning("%s %s has no --random-fully; masquerading without it",
                            argv[-2], ".".join(map(str, found)))
        return self._random_fully[version]


def _holds_flannel_state(have: dict[str, IptablesTable]) -> bool:
    for table_name, (_parent, chain, _comment) in OWNED_IPTABLES.items():
        if chain in have.get(table_name, IptablesTable()).chains:
            return True
    return False
