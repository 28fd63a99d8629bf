"""Shared fixtures. Kernel tests build their own namespaces and always delete them."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator

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


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fails a test that leaves asyncio tasks running (kopf's rule): a task nobody awaits
    hides its exceptions and outlives what it was for."""
    yield
    me = asyncio.current_task()
    for _ in range(3):  # cancellations in progress finish within a few loop turns
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if not left:
            return
        await asyncio.sleep(0)
    pytest.fail(f"the test left {len(left)} asyncio task(s) running: "
                + ", ".join(sorted(t.get_name() + " " + repr(t.get_coro())[:80] for t in left)))
