"""Bounded JSON decoding for everything that comes from outside the process.

Lease values, node annotations and net-conf.json are written by whoever can write to
etcd or the Kubernetes API. `json.loads` recurses once per nesting level, so a few KB
of `[[[[...` raise RecursionError (not ValueError) and stop the daemon; it also turns
`1e999` into infinity and accepts `NaN`, which Go's encoding/json refuses. This module
is the one place that bounds all of that: the size is checked before anything is
parsed, the nesting depth by a linear scan (no recursion), then `json.loads` runs on a
text that is known to be shallow. Every failure is one `JsonLimitError` whose message
is a single line naming what was being read.

Go compatibility: bytes are UTF-8 with invalid sequences replaced by U+FFFD (as Go
does), duplicate keys keep the last value (as Go does), NaN/Infinity and numbers out of
float64 range are errors (as in Go).

A leaf module: it imports only the standard library, so lease/ and config/ can use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from itertools import accumulate
from typing import Any

# json.loads needs roughly one Python frame per level; callers' limits stay far below
# the interpreter's recursion limit (1000) so that json.loads can never hit it.
MAX_DEPTH_CAP = 256

# A JSON string (or an unterminated one, up to the end of the text); `[^"\\]+` and
# `\\.` cannot both match at a position, so the scan never backtracks.
_STRING = re.compile(r'"(?:[^"\\]+|\\.)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
PairsHook = Callable[[list[tuple[str, Any]]], Any]

_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__


class JsonLimitError(ValueError):
    """Input that is not acceptable JSON: too large, nested too deeply, or not JSON.

    `what` names the input (e.g. "lease 10.5.34.0-24"), `reason` says what is wrong;
    str() is `"{what}: {reason}"`, always one line."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{one_line(what)}: {one_line(reason)}")


def one_line(text: str) -> str:
    """`text` with control characters escaped, so a message stays one log line even when
    it quotes a key or value written by someone else."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def utf8_size(text: str | bytes) -> int:
    """Size in bytes of `text` as UTF-8 (the unit every limit here is stated in)."""
    if isinstance(text, bytes) or text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def json_depth(text: str) -> int:
    """Maximum nesting of arrays/objects in `text` (0 for a scalar), counted without
    recursion and ignoring brackets inside strings. For text that is not JSON the
    count is still an upper bound of what `json.loads` would descend before failing."""
    if "[" not in text and "{" not in text:
        return 0
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    # A close before its open makes the text invalid at that point (json.loads stops
    # there), so the running maximum over the whole text is a safe bound.
    return max(0, max(accumulate(map(_STEP, brackets))))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (Go refuses NaN and infinities)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range for a float64")
    return value


def _decoder(object_pairs_hook: PairsHook | None) -> json.JSONDecoder:
    return json.JSONDecoder(object_pairs_hook=object_pairs_hook,
                            parse_constant=_reject_constant, parse_float=_finite_float)


# Built once: json.loads with any keyword builds a new decoder per call, which costs
# more than decoding a lease value.
_DECODER = _decoder(None)


def loads_bounded(
    text: str | bytes,
    *,
    what: str,
    max_bytes: int,
    max_depth: int,
    object_pairs_hook: PairsHook | None = None,
) -> Any:
    """Decode `text` as JSON, refusing input over `max_bytes` (UTF-8 bytes) or nested
    more than `max_depth` arrays/objects deep. Raises `JsonLimitError` and nothing else
    for bad input. `object_pairs_hook` is passed to json.loads (e.g. to keep key order
    and duplicates)."""
    if not 1 <= max_depth <= MAX_DEPTH_CAP:
        raise ValueError(f"max_depth must be in 1..{MAX_DEPTH_CAP}, got {max_depth}")
    size = utf8_size(text)
    if size > max_bytes:
        raise JsonLimitError(what, f"too large: {size} bytes (the limit is {max_bytes})")
    if isinstance(text, bytes):
        # Go reads bytes as UTF-8 and replaces invalid sequences instead of failing;
        # json.loads(bytes) would guess UTF-16/32 instead.
        text = text.decode("utf-8", errors="replace")
    # Fewer brackets than the limit cannot nest deeper than it: the usual case, no scan.
    if text.count("[") + text.count("{") > max_depth:
        depth = json_depth(text)
        if depth > max_depth:
            raise JsonLimitError(what, f"nested too deeply: {depth} levels of arrays/objects "
                                       f"(the limit is {max_depth})")
    decoder = _DECODER if object_pairs_hook is None else _decoder(object_pairs_hook)
    try:
        return decoder.decode(text)
    except RecursionError:  # cannot happen below MAX_DEPTH_CAP; never let it escape
        raise JsonLimitError(what, "nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, our hooks, int digit limit
        raise JsonLimitError(what, f"invalid JSON: {exc}") from None
