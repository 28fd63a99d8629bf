"""The br_netfilter check flanneld runs at start in iptables mode (upstream since v0.26).

Without br_netfilter, bridged pod-to-pod traffic bypasses iptables, so kube-proxy's
Service rules silently miss it. kubeadm >= 1.30 stopped checking, hence flannel does.
The caller skips the check in nftables mode, as upstream does.
"""

from __future__ import annotations

from pathlib import Path

_KEYS = {4: "bridge-nf-call-iptables", 6: "bridge-nf-call-ip6tables"}


def check_br_netfilter(ipv4: bool, ipv6: bool, proc: Path = Path("/proc")) -> str | None:
    """None when every needed bridge-nf-call key exists, else a one-line error."""
    for version, wanted in ((4, ipv4), (6, ipv6)):
        key = proc / "sys" / "net" / "bridge" / _KEYS[version]
        if wanted and not key.exists():
            return (f"br_netfilter is not loaded ({key} missing): run 'modprobe br_netfilter' "
                    "on the node, or set EnableNFTables")
    return None
