"""The kernel behind small ports: what the engine and the backends may ask of it."""
