"""FakeRules: the TrafficRules seam in memory (records what was ensured; a test fake)."""

from __future__ import annotations

from pyflannel.traffic import TrafficConfig


class FakeRules:
    def __init__(self, mode: str = "iptables") -> None:
        self.mode = mode
        self.ensured: list[TrafficConfig] = []
        self.cleaned = 0

    async def ensure(self, cfg: TrafficConfig, *, previous: TrafficConfig | None = None) -> bool:
        self.ensured.append(cfg)
        return False

    async def drift(self, cfg: TrafficConfig) -> list[str]:
        return []

    async def cleanup(self) -> None:
        self.cleaned += 1
