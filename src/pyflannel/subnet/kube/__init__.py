"""The Kubernetes subnet manager (`--kube-subnet-mgr`): leases are the nodes' podCIDRs,
published as annotations on the Node objects (reference §5)."""
