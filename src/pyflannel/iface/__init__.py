"""Choosing the external interface and the addresses a node publishes (upstream §1.2)."""
