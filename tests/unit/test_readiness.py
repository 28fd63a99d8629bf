"""/readyz's reasons, from the daemon's own state (no kernel, no store)."""

from __future__ import annotations

import time

import pytest

from pyflannel.config.flags import parse_flags
from pyflannel.daemon.main import WATCH_DOWN_READY_LIMIT, Daemon


class FakeStore:
    """Only what unready_reason reads of a SubnetManager (a test fake)."""

    def __init__(self) -> None:
        self.watch_down_since: float | None = None


def test_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Daemon(parse_flags([], {}))
    assert d.unready_reason().startswith("starting up")
    store = FakeStore()
    d._mgr = store  # type: ignore[assignment]
    d.ready = True
    assert d.unready_reason() == ""
    store.watch_down_since = time.monotonic() - 5  # a short outage: still ready
    assert d.unready_reason() == ""
    store.watch_down_since = time.monotonic() - WATCH_DOWN_READY_LIMIT - 1
    assert d.unready_reason().startswith("the lease watch has been down for 3")
    store.watch_down_since = None
    d._subnet_env_problem = "cannot write /run/flannel/subnet.env: Read-only file system"
    assert d.unready_reason() == d._subnet_env_problem
