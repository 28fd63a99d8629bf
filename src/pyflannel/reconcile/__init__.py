"""Reconcilers: compute the difference between desired and kernel state, apply only that."""
