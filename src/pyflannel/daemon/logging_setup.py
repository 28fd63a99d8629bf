"""klog-style log lines, so operators' grep patterns and log tooling keep working:
`I1127 08:01:02.123456    4242 main.py:386] message`."""

from __future__ import annotations

import logging
import os
import sys
import time

_LEVEL_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W",
                 logging.ERROR: "E", logging.CRITICAL: "F"}


class KlogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        usec = int((record.created % 1) * 1_000_000)
        letter = _LEVEL_LETTER.get(record.levelno, "I")
        head = (f"{letter}{t.tm_mon:02d}{t.tm_mday:02d} {t.tm_hour:02d}:{t.tm_min:02d}:"
                f"{t.tm_sec:02d}.{usec:06d} {os.getpid():7d} {record.filename}:{record.lineno}]")
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{head} {msg}"


def setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # -v >= 2 shows per-route detail (upstream's V(2)); below that, info and up.
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    for noisy in ("httpx", "httpcore", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
