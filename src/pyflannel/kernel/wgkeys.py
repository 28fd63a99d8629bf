"""WireGuard keys: Curve25519 (X25519, RFC 7748) in pure Python, and the key file.

The public key is derived here because wireguard-go's UAPI reports the private key only
(the kernel reports both). One scalar multiplication costs a few milliseconds and happens
once per start, so the stdlib suffices. Keys travel as base64 (flannel's lease and key
file, `wg`) and as hex (UAPI).
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
from pathlib import Path

_P = 2**255 - 19
_A24 = 121665
KEY_LEN = 32


class WgKeyError(ValueError):
    """A key that is not 32 bytes of base64 (or hex)."""


def _x25519(scalar: bytes, u: bytes) -> bytes:
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    for t in range(254, -1, -1):
        bit = (n >> t) & 1
        if swap ^ bit:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")


def decode_key(text: str, what: str = "key") -> bytes:
    """32 bytes from base64 (44 characters, as `wg genkey` writes), else WgKeyError."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_LEN:
        raise WgKeyError(f"{what}: expected a base64 WireGuard key (32 bytes, 44 characters)")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def generate_private_key() -> bytes:
    k = bytearray(os.urandom(KEY_LEN))
    k[0] &= 248  # clamped as `wg genkey` does, so other tools show the same key
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def public_key(private: bytes) -> bytes:
    return _x25519(private, (9).to_bytes(32, "little"))


@functools.lru_cache(maxsize=64)
def public_key_of(private: str) -> str:
    """The base64 public key of a base64 private key. Cached: the engine compares a device's
    key at every pass and every read-back, and one derivation costs ~1.3 ms."""
    return encode_key(public_key(decode_key(private)))


def load_or_create_private_key(path: Path) -> tuple[bytes, bool]:
    """The key in `path` (upstream's /run/flannel/wgkey), or a new one written there with
    mode 0400 (atomically: a half-written key file would change our identity). True when
    it was created."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        key = generate_private_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, encode_key(key).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return key, True
    return decode_key(text, f"could not parse private key from file {path}"), False
