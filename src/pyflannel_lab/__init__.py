"""The lab: a flannel cluster built from network namespaces on one machine."""
