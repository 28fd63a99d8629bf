"""Pure rendering of the traffic rules: exact iptables-restore payloads and nft scripts."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from pyflannel.traffic import check_br_netfilter
from pyflannel.traffic.rules import (
    OWNED_IPTABLES,
    TrafficConfig,
    desired_iptables,
    desired_nft_table,
    iptables_table_drift,
    nft_table_drift,
    normalise_nft_listing,
    parse_iptables_save,
    render_iptables_restore,
    render_iptables_table,
    render_nft_script,
)

C4, P4 = IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24")
C6, P6 = IPv6Network("fd00:10:244::/56"), IPv6Network("fd00:10:244:1::/64")


def cfg(*, v4: bool = True, v6: bool = False, masq: bool = True, fwd: bool = True,
        fully_random: bool = True) -> TrafficConfig:
    return TrafficConfig(C4 if v4 else None, P4 if v4 else None, C6 if v6 else None,
                         P6 if v6 else None, masq, fwd, fully_random)


def full_payload(c: TrafficConfig, version: int, *, random_fully_supported: bool = True) -> str:
    """The payload for a kernel without any flannel state."""
    fam = c.family(4 if version == 4 else 6)
    want = desired_iptables(fam, random_fully_supported=random_fully_supported)
    return render_iptables_restore(
        {t: render_iptables_table(t, want.get(t), None) for t in OWNED_IPTABLES})


V4_FULL = """\
*nat
:FLANNEL-POSTRTG - [0:0]
-F FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" \
-j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" \
-j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" \
-j MASQUERADE --random-fully
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
COMMIT
*filter
:FLANNEL-FWD - [0:0]
-F FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
COMMIT
"""


def test_iptables_v4_full_payload() -> None:
    assert full_payload(cfg(), 4) == V4_FULL


def test_iptables_v6_uses_v6_networks_and_ff00() -> None:
    payload = full_payload(cfg(v4=False, v6=True), 6)
    assert payload == (
        V4_FULL.replace("10.244.1.0/24", str(P6)).replace("10.244.0.0/16", str(C6))
        .replace("224.0.0.0/4", "ff00::/8"))
    assert "! -d ff00::/8" in payload


def test_iptables_without_fully_random() -> None:
    disabled = full_payload(cfg(fully_random=False), 4)
    unsupported = full_payload(cfg(), 4, random_fully_supported=False)
    assert disabled == unsupported == V4_FULL.replace(" --random-fully", "")


def test_iptables_masq_only_and_forward_only() -> None:
    masq_only = full_payload(cfg(fwd=False), 4)
    assert masq_only == V4_FULL[:V4_FULL.index("*filter")]
    forward_only = full_payload(cfg(masq=False), 4)
    assert forward_only == V4_FULL[V4_FULL.index("*filter"):]


def test_disabled_family_renders_nothing() -> None:
    assert full_payload(cfg(), 6) == ""
    assert desired_nft_table(cfg().family(6), random_fully_supported=True) is None


def test_masquerade_without_subnet_is_rejected() -> None:
    with pytest.raises(ValueError, match="subnet"):
        TrafficConfig(C4, None, None, None, True, True).family(4)


def save_dump(payload_lines: list[str], table: str = "nat") -> str:
    base = {"nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            "filter": ["INPUT", "FORWARD", "OUTPUT"]}[table]
    return "\n".join([f"*{table}", *(f":{c} ACCEPT [0:0]" for c in base), *payload_lines,
                      "COMMIT", ""])


def applied_nat_dump(extra: list[str] | None = None) -> str:
    """iptables-save's view of the v4 nat rules after a full apply."""
    lines = [ln for ln in V4_FULL[:V4_FULL.index("COMMIT")].splitlines()[1:]
             if not ln.startswith("-F")]
    return save_dump(lines + (extra or []))


def test_iptables_in_order_has_no_drift_and_no_payload() -> None:
    have = parse_iptables_save(applied_nat_dump())
    want = desired_iptables(cfg().family(4), random_fully_supported=True)
    assert iptables_table_drift("nat", want["nat"], have["nat"]) == []
    # The caller applies only tables with drift; a table in order gives no block at all.
    assert render_iptables_restore({}) == ""


def test_iptables_missing_jump_adds_only_the_jump_and_refills() -> None:
    dump = applied_nat_dump().replace(
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG\n', "")
    have = parse_iptables_save(dump)["nat"]
    want = desired_iptables(cfg().family(4), random_fully_supported=True)["nat"]
    assert iptables_table_drift("nat", want, have) == [
        'nat: jump missing: -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG']
    lines = render_iptables_table("nat", want, have)
    assert lines[-1] == '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
    assert not any(ln.startswith("-D") for ln in lines)


def test_iptables_present_jump_is_never_deleted_or_duplicated() -> None:
    # A deleted rule in the chain: the chain is rewritten, the jump stays untouched.
    dump = applied_nat_dump().replace(
        '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" '
        "-j RETURN\n", "")
    have = parse_iptables_save(dump)["nat"]
    want = desired_iptables(cfg().family(4), random_fully_supported=True)["nat"]
    assert iptables_table_drift("nat", want, have) == [
        'nat FLANNEL-POSTRTG: missing rule: -m mark --mark 0x4000/0x4000 -m comment --comment '
        '"flanneld masq" -j RETURN']
    lines = render_iptables_table("nat", want, have)
    assert not any("POSTROUTING" in ln for ln in lines)
    assert lines[:2] == [":FLANNEL-POSTRTG - [0:0]", "-F FLANNEL-POSTRTG"]


def test_iptables_duplicate_jump_and_legacy_rules_are_removed_foreign_kept() -> None:
    jump = '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
    legacy = ('-A POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment '
              '--comment "flanneld masq" -j RETURN')
    foreign = '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTRTG'
    have = parse_iptables_save(applied_nat_dump([jump, legacy, foreign]))["nat"]
    want = desired_iptables(cfg().family(4), random_fully_supported=True)["nat"]
    drift = iptables_table_drift("nat", want, have)
    assert drift == [f"nat: extra rule: {jump}", f"nat: extra rule: {legacy}"]
    lines = render_iptables_table("nat", want, have)
    assert lines[:2] == ["-D" + jump[2:], "-D" + legacy[2:]]
    assert not any("KUBE" in ln for ln in lines)


def test_iptables_unwanted_chain_is_unhooked_then_deleted() -> None:
    have = parse_iptables_save(applied_nat_dump())["nat"]
    assert iptables_table_drift("nat", None, have) == [
        "nat: chain FLANNEL-POSTRTG present but not wanted",
        'nat: extra rule: -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG']
    assert render_iptables_table("nat", None, have) == [
        '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        "-F FLANNEL-POSTRTG", "-X FLANNEL-POSTRTG"]
    assert render_iptables_table("nat", None, None) == []


def test_iptables_reordered_or_duplicated_rules_are_drift() -> None:
    want = desired_iptables(cfg().family(4), random_fully_supported=True)["nat"]
    dump = applied_nat_dump()
    rules = [ln for ln in dump.splitlines() if ln.startswith("-A FLANNEL-POSTRTG")]
    swapped = dump.replace(rules[0] + "\n", "").replace(rules[1] + "\n",
                                                          rules[1] + "\n" + rules[0] + "\n")
    assert iptables_table_drift("nat", want, parse_iptables_save(swapped)["nat"]) == [
        "nat FLANNEL-POSTRTG: rules out of order"]
    doubled = dump.replace(rules[2] + "\n", rules[2] + "\n" + rules[2] + "\n")
    assert iptables_table_drift("nat", want, parse_iptables_save(doubled)["nat"]) == [
        f"nat FLANNEL-POSTRTG: extra rule: {rules[2][len('-A FLANNEL-POSTRTG '):]}"]


NFT_V4 = """\
table ip flannel-ipv4 {
\tcomment "rules for flannel-ipv4"
\tchain forward {
\t\tcomment "chain to accept flannel traffic"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr 10.244.0.0/16 accept
\t\tip daddr 10.244.0.0/16 accept
\t}

\tchain postrtg {
\t\tcomment "chain to manage traffic masquerading by flannel"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 return
\t\tip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
\t\tip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
\t}
}
"""


def test_nft_v4_table() -> None:
    assert desired_nft_table(cfg().family(4), random_fully_supported=True) == NFT_V4


def test_nft_fixes_upstream_rule_4_and_mark_mask() -> None:
    """Upstream §14.4: nft rule 4 was `saddr != P daddr C return`, which returned
    host->cluster traffic before the masquerade rule; and `meta mark 0x4000` matched the
    exact value instead of the bit. Both now mean what iptables mode means."""
    table = desired_nft_table(cfg().family(4), random_fully_supported=True)
    assert table is not None
    assert "ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return" in table
    assert "ip saddr != 10.244.1.0/24" not in table
    assert "meta mark & 0x00004000 == 0x00004000 return" in table
    assert "meta mark 0x" not in table


def test_nft_v6_table() -> None:
    table = desired_nft_table(cfg(v4=False, v6=True).family(6), random_fully_supported=True)
    assert table == (
        NFT_V4.replace("table ip flannel-ipv4", "table ip6 flannel-ipv6")
        .replace('"rules for flannel-ipv4"', '"rules for flannel-ipv6"')
        .replace("ip saddr", "ip6 saddr").replace("ip daddr", "ip6 daddr")
        .replace("10.244.1.0/24", str(P6)).replace("10.244.0.0/16", str(C6))
        .replace("224.0.0.0/4", "ff00::/8"))


def test_nft_without_fully_random_masq_only_forward_only() -> None:
    assert desired_nft_table(cfg(fully_random=False).family(4), random_fully_supported=True) \
        == NFT_V4.replace(" fully-random", "")
    assert desired_nft_table(cfg().family(4), random_fully_supported=False) \
        == NFT_V4.replace(" fully-random", "")
    fwd_end = NFT_V4.index("\n\tchain postrtg")
    forward_only = desired_nft_table(cfg(masq=False).family(4), random_fully_supported=True)
    assert forward_only == NFT_V4[:fwd_end - 1] + "\n}\n"
    masq_only = desired_nft_table(cfg(fwd=False).family(4), random_fully_supported=True)
    assert masq_only == NFT_V4[:NFT_V4.index("\tchain forward")] + NFT_V4[fwd_end + 1:]
    assert desired_nft_table(cfg(masq=False, fwd=False).family(4),
                             random_fully_supported=True) is None


def test_nft_script_replaces_tables_in_one_transaction() -> None:
    script = render_nft_script([(4, NFT_V4), (6, None)])
    assert script == ("add table ip flannel-ipv4\ndelete table ip flannel-ipv4\n" + NFT_V4
                      + "add table ip6 flannel-ipv6\ndelete table ip6 flannel-ipv6\n")
    assert render_nft_script([]) == ""


def test_nft_drift_messages() -> None:
    assert nft_table_drift(4, NFT_V4, normalise_nft_listing(NFT_V4)) == []
    assert nft_table_drift(4, NFT_V4, None) == ["table ip flannel-ipv4 missing"]
    assert nft_table_drift(4, None, NFT_V4) == ["table ip flannel-ipv4 present but not wanted"]
    without = NFT_V4.replace("\t\tip daddr 10.244.0.0/16 accept\n", "")
    assert nft_table_drift(4, NFT_V4, without) == [
        "table ip flannel-ipv4 chain forward: missing rule: ip daddr 10.244.0.0/16 accept"]
    extra_chain = NFT_V4.replace("}\n", "}\n", 2)[:-2] + "\tchain mine {\n\t}\n}\n"
    assert nft_table_drift(4, NFT_V4, extra_chain) == [
        "table ip flannel-ipv4 chain mine not wanted"]


def test_nft_listing_normalisation_drops_handles_and_comments() -> None:
    listing = "# Warning: x\ntable ip t { # handle 7\n\tchain c { # handle 1\n\t}\n}\n"
    assert normalise_nft_listing(listing) == "table ip t {\n\tchain c {\n\t}\n}\n"


def test_parse_iptables_save_ignores_other_tables_lines() -> None:
    dump = ("# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n"
            "-A FLANNEL-FWD -s 10.0.0.0/8 -j ACCEPT\nCOMMIT\n# Completed\n")
    tables = parse_iptables_save(dump)
    assert tables["filter"].chains == {"INPUT", "FLANNEL-FWD"}
    assert tables["filter"].rules == {"FLANNEL-FWD": ["-s 10.0.0.0/8 -j ACCEPT"]}


@pytest.mark.parametrize(("ipv4", "ipv6", "present", "missing"), [
    (True, False, ["bridge-nf-call-iptables"], None),
    (True, True, ["bridge-nf-call-iptables"], "bridge-nf-call-ip6tables"),
    (True, False, [], "bridge-nf-call-iptables"),
    (False, True, ["bridge-nf-call-ip6tables"], None),
    (False, True, ["bridge-nf-call-iptables"], "bridge-nf-call-ip6tables"),
])
def test_br_netfilter_check(tmp_path: Path, ipv4: bool, ipv6: bool, present: list[str],
                            missing: str | None) -> None:
    bridge = tmp_path / "sys" / "net" / "bridge"
    bridge.mkdir(parents=True)
    for key in present:
        (bridge / key).write_text("1\n")
    error = check_br_netfilter(ipv4, ipv6, proc=tmp_path)
    if missing is None:
        assert error is None
    else:
        assert error == (f"br_netfilter is not loaded ({bridge / missing} missing): "
                         "run 'modprobe br_netfilter' on the node, or set EnableNFTables")
