"""FakeCommands: the CommandPort in memory, for unit tests. Records every call; answers
with the result set for the command's first word (default: success, no output)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pyflannel.reconcile.hooks import CommandResult


@dataclass
class Call:
    words: tuple[str, ...]
    env: dict[str, str]
    stdin: str


@dataclass
class FakeCommands:
    results: dict[str, CommandResult] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    raises: Exception | None = None

    async def run(self, words: Sequence[str], env: Mapping[str, str], stdin: str,
                  *, timeout: float) -> CommandResult:
        self.calls.append(Call(tuple(words), dict(env), stdin))
        if self.raises is not None:
            raise self.raises
        return self.results.get(words[0], CommandResult("", ""))

    def of(self, first: str) -> list[Call]:
        return [c for c in self.calls if c.words[0] == first]
