"""Masquerade and forward rules, in iptables or nftables mode."""

from __future__ import annotations

from collections.abc import Sequence

from pyflannel.traffic.iptables import IptablesRules
from pyflannel.traffic.netfilter_check import check_br_netfilter
from pyflannel.traffic.nftables import NftablesRules
from pyflannel.traffic.rules import TrafficConfig, TrafficRules
from pyflannel.traffic.tool import TrafficError

__all__ = [
    "IptablesRules",
    "NftablesRules",
    "TrafficConfig",
    "TrafficError",
    "TrafficRules",
    "check_br_netfilter",
    "make_traffic_rules",
]


def make_traffic_rules(nftables: bool, *, exec_prefix: Sequence[str] = ()) -> TrafficRules:
    """The rule manager for the configured mode (`EnableNFTables`). `exec_prefix` is put
    before every command, e.g. `ip netns exec NAME` in tests."""
    if nftables:
        return NftablesRules(exec_prefix)
    return IptablesRules(exec_prefix)
