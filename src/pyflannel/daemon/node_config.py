"""Settings derived from net-conf.json, the flags and our lease, shared by the daemon and
`pyflannel status` so that the status check judges the kernel by the daemon's rules."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyflannel.backend.vxlan import vtep_claims
from pyflannel.config.flags import Flags
from pyflannel.config.netconf import NetConf
from pyflannel.lease.table import LeasePolicy
from pyflannel.traffic import TrafficConfig


def lease_policy(nc: NetConf, *, store: str, backend_type: str,
                 own_subnet: IPv4Network | None, own_ipv6_subnet: IPv6Network | None,
                 own_public_ip: IPv4Address | None,
                 own_public_ipv6: IPv6Address | None,
                 segments: tuple[IPv4Network | IPv6Network, ...] = ()) -> LeasePolicy:
    return LeasePolicy(
        network=nc.network if nc.enable_ipv4 else None,
        ipv6_network=nc.ipv6_network if nc.enable_ipv6 else None,
        # etcd leases all have SubnetLen; kube podCIDRs are sized by the controller.
        subnet_len=nc.subnet_len if nc.enable_ipv4 and store == "etcd" else None,
        ipv6_subnet_len=nc.ipv6_subnet_len if nc.enable_ipv6 and store == "etcd" else None,
        backend_type=backend_type, own_subnet=own_subnet, own_ipv6_subnet=own_ipv6_subnet,
        own_public_ip=own_public_ip if nc.enable_ipv4 else None,
        own_public_ipv6=own_public_ipv6 if nc.enable_ipv6 else None,
        unique=vtep_claims if backend_type == "vxlan" else None, segments=segments)


def traffic_config(flags: Flags, nc: NetConf, subnet: IPv4Network | None,
                   ipv6_subnet: IPv6Network | None) -> TrafficConfig:
    return TrafficConfig(
        network=nc.network if nc.enable_ipv4 else None,
        subnet=subnet if nc.enable_ipv4 else None,
        ipv6_network=nc.ipv6_network if nc.enable_ipv6 else None,
        ipv6_subnet=ipv6_subnet if nc.enable_ipv6 else None,
        masquerade=flags.ip_masq, forward=flags.iptables_forward_rules,
        fully_random=not flags.ip_masq_fully_random_disable)
