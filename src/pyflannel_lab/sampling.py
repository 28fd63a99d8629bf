"""Watching a lab cluster's routes during a fault, from a thread: a route that goes
missing for a moment between two checks of a test would go unseen otherwise."""

from __future__ import annotations

import threading

from pyflannel_lab.cluster import Cluster


class RouteSampler:
    """Every `interval` seconds, each node's flannel routes are compared with `expected`
    (node index -> (subnet, gateway) routes); every route missing at a sample is recorded
    in `missing`. Use as a context manager around the fault."""

    def __init__(self, cl: Cluster, expected: dict[int, set[tuple[str, str]]],
                 interval: float = 0.2) -> None:
        self.cl = cl
        self.expected = expected
        self.interval = interval
        self.samples = 0
        self.missing: list[tuple[str, set[tuple[str, str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="route-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for idx, want in self.expected.items():
                lost = want - self.cl.flannel_routes(self.cl.nodes[idx])
                if lost:
                    self.missing.append((f"node{idx}", lost))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RouteSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
