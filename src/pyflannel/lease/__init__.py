"""Leases: who owns which pod subnet, how that is written in the store, and the peer table."""
