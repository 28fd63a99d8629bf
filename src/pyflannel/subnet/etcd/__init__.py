"""flannel's etcd subnet manager: an etcd v3 JSON-gateway client and the lease logic."""

from pyflannel.subnet.base import LeaseRevoked
from pyflannel.subnet.etcd.client import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    KeyValue,
    WatchEvent,
)
from pyflannel.subnet.etcd.manager import EtcdSubnetManager

__all__ = [
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdSubnetManager",
    "KeyValue",
    "LeaseRevoked",
    "WatchEvent",
]
