"""Backends: how a peer lease becomes kernel state (host-gw routes, vxlan neighbours, ...)."""
