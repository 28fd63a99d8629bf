"""nftables mode: tables `ip flannel-ipv4` / `ip6 flannel-ipv6`, replaced whole.

Every apply is one `nft -f -` script, one netlink transaction: the table is deleted and
redefined with all its chains and rules, so observers see either the old or the new
table, never an empty chain. Unlike upstream (which writes once and never looks again),
`ensure` is meant to be called every resync period: it lists the tables, compares them
with the desired text and applies only when they differ.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Literal

from pyflannel.traffic.rules import (
    NFT_TABLES,
    IpVersion,
    TrafficConfig,
    desired_nft_table,
    is_reconfiguration,
    nft_table_drift,
    normalise_nft_listing,
    render_nft_script,
)
from pyflannel.traffic.tool import TrafficError, run_checked, run_tool

log = logging.getLogger(__name__)

VERSIONS: tuple[IpVersion, ...] = (4, 6)


class NftablesRules:
    mode = "nftables"

    def __init__(self, exec_prefix: Sequence[str] = ()) -> None:
        self._prefix = tuple(exec_prefix)
        self._lock = asyncio.Lock()
        self._random_fully: bool | None = None
        # Desired text -> what this nft actually lists for it, learnt after an apply, for
        # nft versions that print a rule differently from how we render it. Without it every
        # resync would see drift and rewrite the table.
        self._listed_as: dict[str, str] = {}
        self._last_families: frozenset[IpVersion] | None = None
        self._last_cfg: TrafficConfig | None = None

    async def ensure(self, cfg: TrafficConfig, *, previous: TrafficConfig | None = None) -> bool:
        async with self._lock:
            reconfigured = is_reconfiguration(cfg, previous, self._last_cfg)
            changes: list[tuple[IpVersion, str | None]] = []
            for version in self._families_to_check(cfg, previous):
                fam = cfg.family(version)
                have = await self._read(version, required=fam is not None)
                if have is False:
                    continue
                want = desired_nft_table(fam, random_fully_supported=await self._fully_random(
                    cfg, version))
                if self._matches(want, have):
                    continue
                _family, name = NFT_TABLES[version]
                if have is None and self._last_cfg is None:
                    log.info("Creating nftables table %s", name)
                elif reconfigured:
                    log.info("Network or subnet changed; replacing nftables table %s", name)
                else:
                    log.warning("Some nftables rules are missing; recreating table %s: %s", name,
                                "; ".join(nft_table_drift(version, want, have)))
                changes.append((version, want))
            if changes:
                await self._apply(render_nft_script(changes))
                await self._learn_listing(changes)
            self._last_families = frozenset(v for v in VERSIONS if cfg.family(v) is not None)
            self._last_cfg = cfg
            return bool(changes)

    async def drift(self, cfg: TrafficConfig) -> list[str]:
        async with self._lock:
            problems: list[str] = []
            for version in VERSIONS:
                fam = cfg.family(version)
                have = await self._read(version, required=fam is not None)
                if have is False:
                    continue
                want = desired_nft_table(fam, random_fully_supported=await self._fully_random(
                    cfg, version))
                if not self._matches(want, have):
                    problems += nft_table_drift(version, want, have)
            return problems

    async def cleanup(self) -> None:
        async with self._lock:
            present: list[tuple[IpVersion, str | None]] = []
            for version in VERSIONS:
                have = await self._read(version, required=False)
                if isinstance(have, str):
                    present.append((version, None))
            if present:
                log.info("Removing flannel's nftables tables: %s",
                         ", ".join(NFT_TABLES[v][1] for v, _ in present))
                await self._apply(render_nft_script(present))
            self._last_families = None
            self._last_cfg = None

    def _families_to_check(self, cfg: TrafficConfig, previous: TrafficConfig | None
                           ) -> list[IpVersion]:
        # As in iptables mode: a disabled family is looked at only when it may hold leftovers.
        return [v for v in VERSIONS
                if cfg.family(v) is not None or self._last_families is None
                or v in self._last_families
                or (previous is not None and previous.family(v) is not None)]

    def _matches(self, want: str | None, have: str | None) -> bool:
        if want is None or have is None:
            return want is None and have is None
        return have == normalise_nft_listing(want) or have == self._listed_as.get(want)

    async def _apply(self, script: str) -> None:
        await run_checked([*self._prefix, "nft", "-f", "-"], stdin=script)

    async def _learn_listing(self, changes: list[tuple[IpVersion, str | None]]) -> None:
        for version, want in changes:
            if want is None:
                continue
            have = await self._read(version, required=True)
            if isinstance(have, str) and have != normalise_nft_listing(want):
                log.info("nft lists table %s differently from how it was written; "
                         "comparing against the listing from now on", NFT_TABLES[version][1])
                self._listed_as[want] = have

    async def _read(self, version: IpVersion, *, required: bool) -> str | None | Literal[False]:
        """The table's normalised listing; None when it does not exist; False when it could
        not be read and the family is not required."""
        family, name = NFT_TABLES[version]
        argv = [*self._prefix, "nft", "list", "table", family, name]
        try:
            result = await run_tool(argv)
        except FileNotFoundError:
            if required:
                raise
            log.debug("nft not available, skipping table %s", name)
            return False
        if result.returncode == 0:
            return normalise_nft_listing(result.stdout)
        if "No such file or directory" in result.stderr:
            return None
        if required:
            raise TrafficError(f"{' '.join(argv)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        log.debug("Cannot list table %s: %s", name, result.stderr.strip())
        return False

    async def _fully_random(self, cfg: TrafficConfig, version: IpVersion) -> bool:
        fam = cfg.family(version)
        if fam is None or not (fam.masquerade and fam.fully_random):
            return False
        if self._random_fully is None:
            self._random_fully = await self._probe_fully_random()
            if not self._random_fully:
                log.warning("nftables: random fully unsupported")
        return self._random_fully

    async def _probe_fully_random(self) -> bool:
        # A dry run (-c) of upstream's probe chain: the kernel validates it, nothing is kept.
        name = f"flannel-probe-{os.urandom(3).hex()}"
        script = (f"table ip {name} {{\n\tchain masqueradeTest {{\n"
                  "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
                  "\t\tip saddr != 127.0.0.1 masquerade fully-random\n\t}\n}\n")
        result = await run_tool([*self._prefix, "nft", "-c", "-f", "-"], stdin=script)
        return result.returncode == 0
