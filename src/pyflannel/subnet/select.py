"""Which subnet manager the flags ask for, built and ready to use (daemon and status)."""

from __future__ import annotations

from pyflannel.config.flags import Flags
from pyflannel.subnet.base import StoreError, SubnetManager
from pyflannel.subnet.etcd.client import EtcdClient
from pyflannel.subnet.etcd.manager import EtcdSubnetManager
from pyflannel.subnet.subnetenv import SubnetEnv


def make_subnet_manager(flags: Flags, old_env: SubnetEnv | None) -> SubnetManager:
    if flags.kube_subnet_mgr:
        # Imported here: etcd mode never loads the Kubernetes client.
        from pyflannel.subnet.kube.manager import KubeSubnetManager

        return KubeSubnetManager.from_flags(
            kubeconfig_file=flags.kubeconfig_file, kube_api_url=flags.kube_api_url,
            net_config_path=flags.net_config_path,
            annotation_prefix=flags.kube_annotation_prefix,
            set_node_network_unavailable=flags.set_node_network_unavailable)
    client = EtcdClient(list(flags.etcd_endpoints), cafile=flags.etcd_cafile,
                        certfile=flags.etcd_certfile, keyfile=flags.etcd_keyfile,
                        username=flags.etcd_username, password=flags.etcd_password)
    return EtcdSubnetManager(
        client, prefix=flags.etcd_prefix,
        previous_subnet=old_env.subnet.network if old_env and old_env.subnet else None,
        previous_ipv6_subnet=(old_env.ipv6_subnet.network
                              if old_env and old_env.ipv6_subnet else None),
        renew_margin=flags.subnet_lease_renew_margin * 60.0)


__all__ = ["StoreError", "make_subnet_manager"]
