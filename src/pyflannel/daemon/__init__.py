"""flanneld: the per-node daemon that wires store, leases, backend and traffic rules."""
