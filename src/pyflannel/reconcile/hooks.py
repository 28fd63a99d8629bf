"""The pure half of the extension backend's commands: what must run for a peer (PeerHook,
described by the backend's pure peer_state), which runs a change of peers calls for
(`plan_hooks`), and how a command's words are expanded. No I/O: the runner
(reconcile/hookrunner.py) executes them.

Upstream's command form (v0.28.2+, after CVE-2026-32241): the command text is split on
white space, each word's `$VAR` / `${VAR}` is expanded from flanneld's environment plus the
command's variables (Go's os.Expand), and the words are executed directly, without a shell:
a value can never become shell syntax.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Env = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PeerHook:
    """What runs for one peer: `add` when it appears or changes, `remove` when it goes,
    each with `env` added to flanneld's environment and `stdin` (+ a newline) as input.
    `problem` (non-empty): run nothing for this peer, say this once."""

    add: tuple[str, ...]
    remove: tuple[str, ...]
    env: Env
    stdin: str = ""
    problem: str = ""

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.env if k == name), None)


@dataclass(frozen=True)
class HookRun:
    ident: str  # the lease's
    action: Literal["add", "remove"]
    hook: PeerHook

    @property
    def words(self) -> tuple[str, ...]:
        return self.hook.add if self.action == "add" else self.hook.remove


@dataclass(frozen=True)
class CommandResult:
    """`error` is "" on success, else Go's words for it ("exit status 1", "signal:
    killed", ...); `output` is stdout and stderr together, trimmed, at most the runner's
    bound (`dropped` bytes more were read and dropped)."""

    error: str
    output: str
    dropped: int = 0


class CommandPort(Protocol):
    async def run(self, words: Sequence[str], env: Mapping[str, str], stdin: str,
                  *, timeout: float) -> CommandResult:
        """Expand `words` (flanneld's environment + `env`), run them with that
        environment and `stdin` + "\\n"; never raises for the command's failure."""
        ...


def split_command(text: str) -> tuple[str, ...]:
    """Go's strings.Fields: runs of Unicode white space separate the words."""
    return tuple(text.split())


def plan_hooks(desired: Mapping[str, PeerHook], applied: Mapping[str, PeerHook],
               changed: Iterable[str]) -> list[HookRun]:
    """The runs that take the peers in `changed` from `applied` to `desired`, in order.

    A new or changed peer gets its add command (upstream runs it for every added or
    updated lease). A peer that went gets its remove command with what its add had. A
    peer whose subnet changed under the same ident (a kube node's new podCIDR) gets the
    old one's remove first: the old subnet's state would otherwise stay forever."""
    runs: list[HookRun] = []
    for ident in sorted(changed):
        new, old = desired.get(ident), applied.get(ident)
        if new == old:
            continue
        if old is not None and (new is None or _subnets(old) != _subnets(new)):
            runs.append(HookRun(ident, "remove", old))
        if new is not None:
            runs.append(HookRun(ident, "add", new))
    return runs


def _subnets(h: PeerHook) -> tuple[str | None, str | None]:
    return h.get("SUBNET"), h.get("IPV6SUBNET")


def expand(word: str, env: Mapping[str, str]) -> str:
    """Go's os.Expand(word, env lookup): `${NAME}` and `$NAME` (letters, digits, `_`), and
    the one-character special names (`$1`, `$?`, ...); unset names become "". A `$` not
    followed by a name stays; bad syntax (`${}`, an unclosed `${`) is dropped, as Go does."""
    out: list[str] = []
    i, n = 0, len(word)
    start = 0
    while i < n:
        if word[i] != "$" or i + 1 >= n:
            i += 1
            continue
        out.append(word[start:i])
        name, width = _shell_name(word[i + 1:])
        if name == "" and width > 0:
            pass  # invalid syntax: eaten
        elif name == "":
            out.append("$")  # `$` not followed by a name: left as it is
        else:
            out.append(env.get(name, ""))
        i += 1 + width
        start = i
    out.append(word[start:])
    return "".join(out)


_SPECIAL = frozenset("*#$@!?-0123456789")


def _is_name_char(c: str) -> bool:
    return c == "_" or ("0" <= c <= "9") or ("a" <= c <= "z") or ("A" <= c <= "Z")


def _shell_name(s: str) -> tuple[str, int]:
    """The name at the start of `s` (after a `$`) and how many characters it takes."""
    if s[0] == "{":
        if len(s) > 2 and s[1] in _SPECIAL and s[2] == "}":
            return s[1], 3
        end = s.find("}", 1)
        if end < 0:
            return "", 1  # no closing brace: the `{` is eaten
        return ("", 2) if end == 1 else (s[1:end], end + 1)
    if s[0] in _SPECIAL:
        return s[0], 1
    i = 0
    while i < len(s) and _is_name_char(s[i]):
        i += 1
    return s[:i], i
