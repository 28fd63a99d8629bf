"""The desired masquerade and forward rules, rendered from the config. Pure: no I/O.

Both modes own whole chains (iptables) or whole tables (nftables) and rewrite them in
one transaction, so the live ruleset is never seen half-built (upstream #2237). The
rule text is rendered in exactly the canonical form that `iptables-save` and
`nft list table` print, so a resync can compare text and apply nothing when in order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal, Protocol

IpVersion = Literal[4, 6]
AnyNetwork = IPv4Network | IPv6Network

MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
# kube-proxy marks packets it will masquerade itself; flannel must not NAT them twice.
KUBE_PROXY_MARK = "0x4000/0x4000"

NAT_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"

NFT_FORWARD_CHAIN = "forward"
NFT_NAT_CHAIN = "postrtg"


@dataclass(frozen=True)
class TrafficConfig:
    network: IPv4Network | None  # cluster CIDR (C), None when IPv4 disabled
    subnet: IPv4Network | None  # own lease subnet (P)
    ipv6_network: IPv6Network | None
    ipv6_subnet: IPv6Network | None
    masquerade: bool  # --ip-masq
    forward: bool  # --iptables-forward-rules
    fully_random: bool = True  # False with --ip-masq-fully-random-disable

    def family(self, version: IpVersion) -> FamilyConfig | None:
        """This config's slice for one IP family; None when the family is disabled."""
        network: AnyNetwork | None = self.network if version == 4 else self.ipv6_network
        subnet: AnyNetwork | None = self.subnet if version == 4 else self.ipv6_subnet
        if network is None:
            return None
        if self.masquerade and subnet is None:
            raise ValueError(f"IPv{version} masquerade needs the node's subnet, got only {network}")
        return FamilyConfig(version, network, subnet, self.masquerade, self.forward,
                            self.fully_random)


@dataclass(frozen=True)
class FamilyConfig:
    version: IpVersion
    network: AnyNetwork
    subnet: AnyNetwork | None
    masquerade: bool
    forward: bool
    fully_random: bool


class TrafficRules(Protocol):
    mode: str  # "iptables" | "nftables"

    async def ensure(self, cfg: TrafficConfig, *, previous: TrafficConfig | None = None) -> bool:
        """Make the kernel hold exactly the desired rules; True when something was changed."""
        ...

    async def drift(self, cfg: TrafficConfig) -> list[str]:
        """What is missing, extra or wrong, one readable line each; [] when in order."""
        ...

    async def cleanup(self) -> None:
        """Remove every flannel rule, chain and table of this mode."""
        ...


def is_reconfiguration(cfg: TrafficConfig, previous: TrafficConfig | None,
                       last: TrafficConfig | None) -> bool:
    """Whether differences from the kernel are expected (a new lease or config, logged as
    such) rather than drift made by someone else (logged as a warning)."""
    return (previous is not None and previous != cfg) or (last is not None and last != cfg)


def multicast_of(version: IpVersion) -> str:
    return "224.0.0.0/4" if version == 4 else "ff00::/8"


# --------------------------------------------------------------------------- iptables

@dataclass(frozen=True)
class IptablesChain:
    """One flannel-owned chain, the base chain that jumps to it, and its rules."""

    table: str
    name: str
    parent: str
    comment: str
    rules: tuple[str, ...]  # rule specs as iptables-save prints them, without "-A <chain> "

    @property
    def jump(self) -> str:
        return f'-m comment --comment "{self.comment}" -j {self.name}'


def masq_rule_specs(fam: FamilyConfig, *, random_fully: bool) -> tuple[str, ...]:
    """Upstream's FLANNEL-POSTRTG rules, in order."""
    assert fam.subnet is not None
    c, p, comment = fam.network, fam.subnet, f'-m comment --comment "{MASQ_COMMENT}"'
    masq = "MASQUERADE --random-fully" if random_fully else "MASQUERADE"
    return (
        f"-m mark --mark {KUBE_PROXY_MARK} {comment} -j RETURN",
        f"-s {p} -d {c} {comment} -j RETURN",
        f"-s {c} -d {p} {comment} -j RETURN",
        f"! -s {c} -d {p} {comment} -j RETURN",
        f"-s {c} ! -d {multicast_of(fam.version)} {comment} -j {masq}",
        f"! -s {c} -d {c} {comment} -j {masq}",
    )


def forward_rule_specs(fam: FamilyConfig) -> tuple[str, ...]:
    comment = f'-m comment --comment "{FORWARD_COMMENT}"'
    return (f"-s {fam.network} {comment} -j ACCEPT", f"-d {fam.network} {comment} -j ACCEPT")


def desired_iptables(fam: FamilyConfig | None, *, random_fully_supported: bool
                     ) -> dict[str, IptablesChain]:
    """The flannel chains one family should hold, by table ("nat", "filter")."""
    chains: dict[str, IptablesChain] = {}
    if fam is None:
        return chains
    if fam.masquerade:
        rules = masq_rule_specs(fam, random_fully=fam.fully_random and random_fully_supported)
        chains["nat"] = IptablesChain("nat", NAT_CHAIN, "POSTROUTING", MASQ_COMMENT, rules)
    if fam.forward:
        chains["filter"] = IptablesChain("filter", FORWARD_CHAIN, "FORWARD", FORWARD_COMMENT,
                                         forward_rule_specs(fam))
    return chains


# The chains flannel may own in each table, desired or not: used to find leftovers.
OWNED_IPTABLES = {
    "nat": ("POSTROUTING", NAT_CHAIN, MASQ_COMMENT),
    "filter": ("FORWARD", FORWARD_CHAIN, FORWARD_COMMENT),
}


@dataclass
class IptablesTable:
    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)  # chain -> specs in order


def parse_iptables_save(text: str) -> dict[str, IptablesTable]:
    """Tables of an `iptables-save` dump: declared chains and each chain's rule specs."""
    tables: dict[str, IptablesTable] = {}
    current: IptablesTable | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), IptablesTable())
        elif current is None:
            continue
        elif line.startswith(":"):
            current.chains.add(line[1:].split(" ", 1)[0])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            current.rules.setdefault(chain, []).append(spec)
    return tables


def _targets(spec: str, chain: str) -> bool:
    return spec.endswith(f"-j {chain}") or f"-j {chain} " in spec


def _stale_parent_rules(table: IptablesTable, parent: str, chain: str, comment: str,
                        jump: str | None) -> list[str]:
    """Rules in the base chain that are flannel's (by comment or by jumping to our chain)
    but not the one jump we want, e.g. the pre-v0.20 layout or a duplicated jump."""
    stale: list[str] = []
    kept_jump = False
    for spec in table.rules.get(parent, []):
        if spec == jump and not kept_jump:
            kept_jump = True
            continue
        if f'--comment "{comment}"' in spec or _targets(spec, chain):
            stale.append(spec)
    return stale


def iptables_table_drift(table_name: str, want: IptablesChain | None,
                         have: IptablesTable | None) -> list[str]:
    """Readable differences between one table's flannel state and the desired one."""
    parent, chain, comment = OWNED_IPTABLES[table_name]
    have = have or IptablesTable()
    problems: list[str] = []
    jump = want.jump if want else None
    if want is not None:
        if chain not in have.chains:
            problems.append(f"{table_name}: chain {chain} missing")
        live = have.rules.get(chain, [])
        if live != list(want.rules):
            problems.extend(_rule_diff(f"{table_name} {chain}", want.rules, live))
        if jump not in have.rules.get(parent, []):
            problems.append(f"{table_name}: jump missing: -A {parent} {jump}")
    elif chain in have.chains:
        problems.append(f"{table_name}: chain {chain} present but not wanted")
    for spec in _stale_parent_rules(have, parent, chain, comment, jump):
        problems.append(f"{table_name}: extra rule: -A {parent} {spec}")
    return problems


def _rule_diff(where: str, want: Sequence[str], live: Sequence[str]) -> list[str]:
    # Multiset differences, so a duplicated rule is reported as extra.
    missing = list((Counter(want) - Counter(live)).elements())
    extra = list((Counter(live) - Counter(want)).elements())
    out = [f"{where}: missing rule: {r}" for r in missing]
    out += [f"{where}: extra rule: {r}" for r in extra]
    if not out:
        out.append(f"{where}: rules out of order")
    return out


def render_iptables_table(table_name: str, want: IptablesChain | None,
                          have: IptablesTable | None) -> list[str]:
    """iptables-restore lines (without the `*table`/COMMIT frame) that turn `have` into
    `want`. The flannel chain is flushed and refilled inside the same table transaction,
    and an existing jump is left alone, so traffic never passes an empty or unhooked chain."""
    parent, chain, comment = OWNED_IPTABLES[table_name]
    have = have or IptablesTable()
    jump = want.jump if want else None
    lines = [f"-D {parent} {spec}" for spec in _stale_parent_rules(have, parent, chain, comment,
                                                                      jump)]
    if want is not None:
        # In --noflush mode the chain line creates the chain, or flushes it if it exists.
        lines += [f":{chain} - [0:0]", f"-F {chain}"]
        lines += [f"-A {chain} {spec}" for spec in want.rules]
        if jump not in have.rules.get(parent, []):
            lines.append(f"-A {parent} {jump}")
    elif chain in have.chains:
        # Other chains' jumps to ours would make -X fail; they only exist if flannel made them.
        for other, specs in have.rules.items():
            if other != parent:
                lines += [f"-D {other} {s}" for s in specs if _targets(s, chain)]
        lines += [f"-F {chain}", f"-X {chain}"]
    return lines


def render_iptables_restore(blocks: dict[str, list[str]]) -> str:
    """A complete iptables-restore payload; each table block commits on its own."""
    out: list[str] = []
    for table_name, lines in blocks.items():
        if lines:
            out += [f"*{table_name}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


# --------------------------------------------------------------------------- nftables

NFT_TABLES: dict[IpVersion, tuple[str, str]] = {
    4: ("ip", "flannel-ipv4"),
    6: ("ip6", "flannel-ipv6"),
}
NFT_KUBE_PROXY_MARK = "0x00004000"  # printed form of 0x4000 (nft pads marks to 8 digits)


def nft_masq_rules(fam: FamilyConfig, *, random_fully: bool) -> tuple[str, ...]:
    """Upstream's postrtg rules with two fixes (upstream §14.4), so nft mode NATs the same
    packets as iptables mode:
    - rule 4 is `saddr != C daddr P return` (iptables' `! -s C -d P`); upstream's
      `saddr != P daddr C` returned host->cluster traffic before the last rule could
      masquerade it;
    - the mark is matched under a mask, as iptables' `--mark 0x4000/0x4000`; upstream's
      `meta mark 0x4000` missed packets carrying other mark bits too."""
    assert fam.subnet is not None
    ip = "ip" if fam.version == 4 else "ip6"
    c, p = fam.network, fam.subnet
    masq = "masquerade fully-random" if random_fully else "masquerade"
    return (
        f"meta mark & {NFT_KUBE_PROXY_MARK} == {NFT_KUBE_PROXY_MARK} return",
        f"{ip} saddr {p} {ip} daddr {c} return",
        f"{ip} saddr {c} {ip} daddr {p} return",
        f"{ip} saddr != {c} {ip} daddr {p} return",
        f"{ip} saddr {c} {ip} daddr != {multicast_of(fam.version)} {masq}",
        f"{ip} saddr != {c} {ip} daddr {c} {masq}",
    )


def nft_forward_rules(fam: FamilyConfig) -> tuple[str, ...]:
    ip = "ip" if fam.version == 4 else "ip6"
    return (f"{ip} saddr {fam.network} accept", f"{ip} daddr {fam.network} accept")


def desired_nft_table(fam: FamilyConfig | None, *, random_fully_supported: bool) -> str | None:
    """The family's flannel table exactly as `nft list table` prints it; None = no table."""
    if fam is None or not (fam.masquerade or fam.forward):
        return None
    family, name = NFT_TABLES[fam.version]
    lines = [f"table {family} {name} {{", f'\tcomment "rules for {name}"']
    chains: list[list[str]] = []
    if fam.forward:
        chains.append([f"\tchain {NFT_FORWARD_CHAIN} {{",
                       '\t\tcomment "chain to accept flannel traffic"',
                       "\t\ttype filter hook forward priority filter; policy accept;",
                       *(f"\t\t{r}" for r in nft_forward_rules(fam)), "\t}"])
    if fam.masquerade:
        rules = nft_masq_rules(fam, random_fully=fam.fully_random and random_fully_supported)
        chains.append([f"\tchain {NFT_NAT_CHAIN} {{",
                       '\t\tcomment "chain to manage traffic masquerading by flannel"',
                       "\t\ttype nat hook postrouting priority srcnat; policy accept;",
                       *(f"\t\t{r}" for r in rules), "\t}"])
    for i, chain in enumerate(chains):
        if i:
            lines.append("")
        lines += chain
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_nft_script(changes: Iterable[tuple[IpVersion, str | None]]) -> str:
    """One `nft -f -` script replacing whole flannel tables in a single transaction.
    `add table` first makes the `delete` valid when the table does not exist yet; the
    delete drops whatever drifted (hand-added rules, extra chains) before the redefinition.
    A None body just removes that family's table."""
    out: list[str] = []
    for version, body in changes:
        family, name = NFT_TABLES[version]
        out += [f"add table {family} {name}", f"delete table {family} {name}"]
        if body is not None:
            out.append(body.rstrip("\n"))
    return "\n".join(out) + "\n" if out else ""


_HANDLE = re.compile(r" # handle \d+$")


def normalise_nft_listing(text: str) -> str:
    """Drop the parts of a listing that change without anyone touching the rules."""
    lines = [_HANDLE.sub("", ln.rstrip()) for ln in text.splitlines()]
    return "\n".join(ln for ln in lines if not ln.lstrip().startswith("#")).strip("\n") + "\n"


def parse_nft_table(text: str) -> dict[str, list[str]]:
    """Chain name -> its lines (comment, type and rules) from a `nft list table` listing;
    table-level lines are under the key ""."""
    chains: dict[str, list[str]] = {"": []}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("table ") or line.startswith("#"):
            continue
        if line.startswith("chain ") and line.endswith("{"):
            current = line.split()[1]
            chains[current] = []
        elif line == "}":
            current = ""
        else:
            chains.setdefault(current, []).append(line)
    return chains


def nft_table_drift(version: IpVersion, want: str | None, have: str | None) -> list[str]:
    family, name = NFT_TABLES[version]
    where = f"table {family} {name}"
    if want is None:
        return [f"{where} present but not wanted"] if have is not None else []
    if have is None:
        return [f"{where} missing"]
    want_chains, have_chains = parse_nft_table(want), parse_nft_table(have)
    problems: list[str] = []
    for chain, lines in want_chains.items():
        label = f"{where} chain {chain}" if chain else where
        if chain not in have_chains:
            problems.append(f"{label} missing")
        elif have_chains[chain] != lines:
            problems += _rule_diff(label, lines, have_chains[chain])
    problems += [f"{where} chain {c} not wanted" for c in have_chains if c not in want_chains]
    return problems
