"""The extension backend's commands, executed: `SubprocessCommands` (the real CommandPort,
asyncio subprocesses: the loop never blocks) and `HookRunner`, which runs each peer's add
command when it appears or changes and its remove command when it goes, one at a time in
event order, as upstream does. A failing or hanging command is logged (once per peer
until it succeeds again) and never stops the daemon; it is not retried (upstream does not
either: the next change of that peer runs it again)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from pyflannel.reconcile.hooks import (
    CommandPort,
    CommandResult,
    HookRun,
    PeerHook,
    expand,
    plan_hooks,
)

log = logging.getLogger("extension")

MAX_OUTPUT = 16 * 1024  # bytes of a command's output kept (logged, or BackendData)
PEER_COMMAND_TIMEOUT = 60.0  # s; upstream has none: a hung command would stall every peer


class SubprocessCommands:
    """CommandPort on this machine: each command in its own process group, so a timeout
    kills what it started too."""

    def __init__(self, environ: Mapping[str, str] | None = None,
                 max_output: int = MAX_OUTPUT) -> None:
        self._environ = environ
        self.max_output = max_output

    async def run(self, words: Sequence[str], env: Mapping[str, str], stdin: str,
                  *, timeout: float) -> CommandResult:
        merged = {**(os.environ if self._environ is None else self._environ), **env}
        argv = [expand(w, merged) for w in words]
        if not argv or not argv[0]:
            return CommandResult("exec: no command", "")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=merged, start_new_session=True)
        except FileNotFoundError:
            return CommandResult(f'exec: "{argv[0]}": executable file not found in $PATH', "")
        except OSError as e:
            return CommandResult(f'fork/exec {argv[0]}: {e.strerror or e}', "")
        try:
            async with asyncio.timeout(timeout):
                output, dropped = await self._talk(proc, stdin)
                rc = await proc.wait()
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            return CommandResult(f"timed out after {timeout:g} s (killed)", "")
        except BaseException:
            _kill_group(proc)  # cancelled (shutdown): nothing of ours outlives the daemon
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
            raise
        text = output.decode("utf-8", "replace").strip()
        if rc == 0:
            return CommandResult("", text, dropped)
        err = f"signal: {_signal_name(-rc)}" if rc < 0 else f"exit status {rc}"
        return CommandResult(err, text, dropped)

    async def _talk(self, proc: asyncio.subprocess.Process, stdin: str) -> tuple[bytes, int]:
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(stdin.encode() + b"\n")
            await proc.stdin.drain()
        proc.stdin.close()
        kept = bytearray()
        dropped = 0
        while chunk := await proc.stdout.read(65536):
            room = self.max_output - len(kept)
            kept += chunk[:room]
            dropped += max(0, len(chunk) - room)  # read on, so the command never blocks
        return bytes(kept), dropped


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own group (start_new_session): ours only


def _signal_name(num: int) -> str:
    try:
        return {signal.SIGKILL: "killed", signal.SIGTERM: "terminated"}.get(
            signal.Signals(num), signal.Signals(num).name)
    except ValueError:
        return str(num)


def describe(words: Sequence[str]) -> str:
    return " ".join(words)


class HookRunner:
    """Peers' add/remove commands, as the lease table changes. `update` is synchronous
    and cheap (called from the lease loop); `run` executes the queue."""

    def __init__(self, commands: CommandPort, *, timeout: float = PEER_COMMAND_TIMEOUT
                 ) -> None:
        self._commands = commands
        self._timeout = timeout
        self._applied: dict[str, PeerHook] = {}
        self._queue: deque[HookRun] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failing: set[str] = set()  # idents whose failure was logged
        self.ran = 0
        self.failed = 0

    def update(self, desired: Mapping[str, PeerHook], changed: Iterable[str]) -> None:
        changed = list(changed)
        runs = plan_hooks(desired, self._applied, changed)
        for ident in changed:
            hook = desired.get(ident)
            if hook is None:
                self._applied.pop(ident, None)
            else:
                self._applied[ident] = hook
        if runs:
            self._queue.extend(runs)
            self._idle.clear()
            self._wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._run_one(self._queue.popleft())
            self._idle.set()

    async def _run_one(self, r: HookRun) -> None:
        h = r.hook
        subnet = h.get("SUBNET")
        if r.action == "add":
            log.info("Subnet added: %s via %s", subnet, h.get("PUBLIC_IP"))
        else:
            log.info("Subnet removed: %s", subnet)
        if h.problem:
            self._fail(r.ident, "%s", h.problem)
            return
        if not r.words:
            return
        cmd = describe(r.words)
        try:
            res = await self._commands.run(r.words, dict(h.env), h.stdin, timeout=self._timeout)
        except Exception as e:  # a port bug must not end the lease loop
            res = CommandResult(f"{type(e).__name__}: {e}", "")
        self.ran += 1
        out = res.output + (f" ... ({res.dropped} bytes more)" if res.dropped else "")
        if res.error:
            self.failed += 1
            self._fail(r.ident, "failed to run command: %s Err: %s Output: %s", cmd,
                       res.error, out)
        else:
            self._failing.discard(r.ident)
            log.info("Ran command: %s\n Output: %s", cmd, out)

    def _fail(self, ident: str, fmt: str, *args: object) -> None:
        # Once per peer until it succeeds again: a flapping peer cannot flood the log.
        level = logging.DEBUG if ident in self._failing else logging.ERROR
        self._failing.add(ident)
        log.log(level, fmt, *args)
