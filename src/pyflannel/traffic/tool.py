"""Running iptables/nft: one subprocess per read or apply, payload on stdin."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

# iptables-restore --wait waits for the xtables lock without bound; a stuck holder must
# not stall the daemon's resync loop forever.
TOOL_TIMEOUT = 60.0


class TrafficError(RuntimeError):
    """A firewall tool failed; the message carries the command and its stderr."""


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: str
    stderr: str


async def run_tool(argv: Sequence[str], *, stdin: str | None = None,
                   timeout: float = TOOL_TIMEOUT) -> ToolResult:
    """Run a command to completion. A missing binary raises FileNotFoundError."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout)
    except BaseException:
        # Timeout or cancellation: do not leave the child running.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return ToolResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def run_checked(argv: Sequence[str], *, stdin: str | None = None) -> ToolResult:
    result = await run_tool(argv, stdin=stdin)
    if result.returncode != 0:
        raise TrafficError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return result
