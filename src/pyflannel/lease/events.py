"""What a subnet manager tells the daemon: a full snapshot, or changes since the last one.

A snapshot always comes first (and again after a compaction, a 410 Gone or a reconnect
that lost history), so consumers can remove what is gone without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyflannel.lease.model import Lease


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    leases: tuple[Lease, ...]


@dataclass(frozen=True, slots=True)
class LeaseChanges:
    upserted: tuple[Lease, ...] = ()
    removed: tuple[str, ...] = ()  # lease keys (subnet_key)


LeaseUpdate = LeaseSnapshot | LeaseChanges
