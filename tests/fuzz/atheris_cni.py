"""Coverage-guided fuzzing (atheris) of the CNI plugin's hand-written parsers.

The plugin re-implements JSON decoding limits, CIDR parsing and subnet.env reading
without the stdlib's json/ipaddress packages, so differential oracles are cheap here:
load_json must agree with json.loads on every input within its limits, and parse_cidr
with ipaddress. Run by tests/unit/test_atheris.py with a bounded budget, or by hand:
    python tests/fuzz/atheris_cni.py -runs=100000
"""

from __future__ import annotations

import ipaddress
import json
import math

import atheris

with atheris.instrument_imports():
    from pyflannel.cni import flannel_plugin as plugin


def _depth(value: object) -> int:
    # Iterative: values here are at most MAX_JSON_DEPTH deep anyway.
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, list | dict):
            level += 1
            deepest = max(deepest, level)
            stack.extend((v, level) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _finite(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > 1.8e308:
            return False
        if isinstance(item, list | dict):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return True


def check_json(data: bytes) -> None:
    try:
        ours: object = plugin.load_json(data)
    except ValueError:
        ours = ValueError
    text = data.decode("utf-8", "replace")
    try:
        theirs: object = json.loads(text, parse_constant=lambda c: ValueError)
        # Go (and we) refuse what json.loads accepts beyond float64 or the depth limit.
        if not _finite(theirs) or _depth(theirs) > plugin.MAX_JSON_DEPTH or "NaN" in text \
                or "Infinity" in text:
            theirs = ValueError
    except (ValueError, RecursionError):
        theirs = ValueError
    if ours is ValueError or theirs is ValueError:
        # NaN/Infinity inside strings are fine; only compare when both decided.
        if (ours is ValueError) != (theirs is ValueError) and not (
                ours is not ValueError and ("NaN" in text or "Infinity" in text)):
            raise AssertionError(f"load_json and json.loads disagree on {data!r}: "
                                 f"{ours!r} vs {theirs!r}")
        return
    # Go's float64 decoding: integers beyond 2**53 become floats.
    assert plugin.load_json(json.dumps(theirs)) == ours, (data, ours, theirs)
    plugin.go_json(ours)


def check_cidr(text: str) -> None:
    try:
        raw, prefix = plugin.parse_cidr(text)
    except ValueError:
        raw = None
    try:
        iface = ipaddress.ip_interface(text)
        ok = "/" in text and "%" not in text and text.split("/")[1].isdigit() and \
            text.split("/")[1].isascii()
    except ValueError:
        ok = False
    if raw is not None:
        assert ok, f"parse_cidr accepted {text!r}, ipaddress does not"
        assert int.from_bytes(raw, "big") == int(iface.ip) and prefix == iface.network.prefixlen
    elif ok and not any(part.startswith("0") and len(part) > 1
                        for part in text.split("/")[0].split(".")) and len(text.split("/")[1]) <= 3:
        raise AssertionError(f"parse_cidr refused {text!r}, ipaddress accepts it")


def check_subnet_env(data: bytes) -> None:
    try:
        env = plugin.parse_subnet_env(data, "subnet.env")
    except ValueError as err:
        assert "\n" not in str(err) and "\r" not in str(err), err
        return
    assert env.mtu is not None and 68 <= env.mtu <= 65535


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        check_json(rest)
    elif mode == 1:
        check_cidr(rest.decode("utf-8", "replace"))
    else:
        check_subnet_env(rest)


# The first byte picks the target: 0 = load_json, 1 = parse_cidr, 2 = subnet.env.
SEEDS = [
    b'\x00{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","delegate":{"hairpinMode":'
    b'true,"isDefaultGateway":true},"prevResult":{"ips":[{"address":"10.1.17.2/24"}]}}',
    b'\x00[1,-2.5e-3,1e308,9007199254740993,"\\ud83d\\ude00",{"a":null}]',
    b"\x0110.244.1.7/24", b"\x01fd00:1::1/64", b"\x01::ffff:10.0.0.1/120",
    b"\x02FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n"
    b"FLANNEL_IPMASQ=true\n",
    b"\x02FLANNEL_NETWORK=10.1.0.0/16,10.2.0.0/16\r\nFLANNEL_IPV6_NETWORK=fd00::/56\n"
    b"FLANNEL_IPV6_SUBNET=fd00:0:0:1::1/64\nFLANNEL_MTU=1280\nFLANNEL_IPMASQ=false",
]
TOKENS = [b"FLANNEL_NETWORK=", b"FLANNEL_SUBNET=", b"FLANNEL_IPV6_NETWORK=",
          b"FLANNEL_IPV6_SUBNET=", b"FLANNEL_MTU=", b"FLANNEL_IPMASQ=", b"\r\n", b"/24",
          b"::", b"::ffff:", b"255", b"true", b"false", b"null", b"1e999", b"NaN",
          b"Infinity", b'\\"', b'\\u0000', b"[", b"{", b'"cniVersion"']


if __name__ == "__main__":
    from fuzzcommon import run

    run(test_one_input, SEEDS, TOKENS)
