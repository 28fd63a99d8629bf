"""Shared fixtures. Kernel tests build their own namespaces and always delete them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from pyflannel_lab.netns import NetNamespace

NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (run the README's test command as root)",
)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[str], NetNamespace]]:
    """Creates namespaces on demand; all of them are deleted at teardown, also on failure."""
    made: list[NetNamespace] = []

    def make(prefix: str = "pft") -> NetNamespace:
        ns = NetNamespace.create(prefix)
        made.append(ns)
        return ns

    yield make
    for ns in reversed(made):
        ns.delete()


@pytest.fixture
def netns(netns_factory: Callable[[str], NetNamespace]) -> NetNamespace:
    return netns_factory("pft")
