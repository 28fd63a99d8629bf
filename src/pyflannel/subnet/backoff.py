"""Reconnect pacing shared by the stores' watches."""

from __future__ import annotations

import asyncio
import logging
import time

RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0


class ReconnectBackoff:
    """Delay 100 ms → `max_delay` (5 s), doubling while failures last; each distinct
    failure is logged once, and the recovery once, so an outage is two log lines rather
    than one per retry."""

    def __init__(self, what: str, log: logging.Logger, *, level: int = logging.WARNING,
                 recovered: str = "working again") -> None:
        self.what = what
        self.log = log
        self.level = level
        self.recovered = recovered
        self.delay = RECONNECT_MIN
        self._last_error: str | None = None
        # time.monotonic() of the first failure of the current outage; None while working.
        self.failing_since: float | None = None

    def succeeded(self) -> None:
        if self._last_error is not None:
            self.log.info("%s: %s", self.what, self.recovered)
        self._last_error = None
        self.failing_since = None
        self.delay = RECONNECT_MIN

    async def fail(self, error: Exception, *, max_delay: float = RECONNECT_MAX) -> None:
        text = str(error) or type(error).__name__
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        if text != self._last_error:
            self.log.log(self.level, "%s: %s (retrying, backing off up to %.0fs)", self.what,
                         text, max_delay)
            self._last_error = text
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, max_delay)
