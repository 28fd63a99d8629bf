"""Which subnet manager the flags ask for, built and ready to use."""

from __future__ import annotations

from pyflannel.config.flags import Flags
from pyflannel.subnet.base import SubnetManager
from pyflannel.subnet.etcd.client import EtcdClient
from pyflannel.subnet.etcd.manager import EtcdSubnetManager
from pyflannel.subnet.subnetenv import SubnetEnv


class StoreError(Exception):
    """The store cannot be set up; one line that says what to do."""


def make_subnet_manager(flags: Flags, old_env: SubnetEnv | None) -> SubnetManager:
    if flags.kube_subnet_mgr:
        # Imported here: etcd mode never loads the Kubernetes client.
        from pyflannel.subnet.kube.errors import KubeError
        from pyflannel.subnet.kube.manager import KubeSubnetManager

        try:
            return KubeSubnetManager.from_flags(
                kubeconfig_file=flags.kubeconfig_file, kube_api_url=flags.kube_api_url,
                net_config_path=flags.net_config_path,
                annotation_prefix=flags.kube_annotation_prefix,
                set_node_network_unavailable=flags.set_node_network_unavailable)
        except KubeError as e:
            raise StoreError(str(e)) from None
    client = EtcdClient(list(flags.etcd_endpoints), cafile=flags.etcd_cafile,
                        certfile=flags.etcd_certfile, keyfile=flags.etcd_keyfile,
                        username=flags.etcd_username, password=flags.etcd_password)
    return EtcdSubnetManager(
        client, prefix=flags.etcd_prefix,
        previous_subnet=old_env.subnet.network if old_env and old_env.subnet else None,
        previous_ipv6_subnet=(old_env.ipv6_subnet.network
                              if old_env and old_env.ipv6_subnet else None),
        renew_margin=flags.subnet_lease_renew_margin * 60.0)


def describe(flags: Flags) -> str:
    """For the "Created subnet manager" log line."""
    if flags.kube_subnet_mgr:
        return "Kubernetes Subnet Manager"
    return f"Etcd Local Manager with Previous Subnet: etcd {','.join(flags.etcd_endpoints)}"
