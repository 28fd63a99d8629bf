"""Subnet leases: the subnet managers (etcd, kube) and the subnet.env file they lead to."""
