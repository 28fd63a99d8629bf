"""Coverage-guided fuzzing (atheris) of net-conf.json decoding and the bounded JSON loader.

Contract: parse_netconf, check_network_config and vxlan_options return or raise
NetConfError with a one-line message; loads_bounded returns or raises JsonLimitError,
and agrees with json.loads on everything within its limits. Run by
tests/unit/test_atheris.py with a bounded budget, or by hand:
    python tests/fuzz/atheris_netconf.py -runs=100000
"""

from __future__ import annotations

import json
import math

import atheris

with atheris.instrument_imports():
    from pyflannel import jsonlimits
    from pyflannel.config import netconf


def _within_limits(value: object, max_depth: int) -> bool:
    """Iteratively: finite numbers only and nesting within max_depth."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, list | dict):
            if level + 1 > max_depth:
                return False
            stack.extend((v, level + 1)
                         for v in (item.values() if isinstance(item, dict) else item))
    return True


def check_loader(data: bytes) -> None:
    try:
        ours = jsonlimits.loads_bounded(data, what="x", max_bytes=4096, max_depth=8)
    except jsonlimits.JsonLimitError as err:
        assert "\n" not in str(err), err
        ours = err
    text = data.decode("utf-8", "replace")
    try:
        theirs = json.loads(text, parse_constant=lambda c: float("nan"))
        accepted = _within_limits(theirs, 8) and len(data) <= 4096
    except (ValueError, RecursionError):
        accepted = False
    if isinstance(ours, jsonlimits.JsonLimitError):
        assert not accepted, f"refused what json.loads accepts within limits: {data!r}: {ours}"
    else:
        assert accepted and ours == theirs, f"disagree on {data!r}: {ours!r} vs json.loads"


def check_netconf(data: bytes) -> None:
    try:
        nc = netconf.parse_netconf(data, source="fuzz")
        netconf.check_network_config(nc, source="fuzz")
    except netconf.NetConfError as err:
        message = str(err)
        assert "\n" not in message and message.startswith("fuzz: "), message
        return
    try:
        netconf.vxlan_options(nc)
    except netconf.NetConfError as err:  # named by field: the backend reads its options
        assert "\n" not in str(err) and str(err).startswith("Backend."), err


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2:
        check_loader(data[1:])
    else:
        check_netconf(data[1:])


# The first byte picks the target: even = net-conf.json, odd = the loader.
SEEDS = [
    b'\x00{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}',
    b'\x00{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":'
    b'"10.99.0.0","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"DirectRouting":true}}',
    b'\x00{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:cafe:42::/56",'
    b'"IPv6SubnetLen":64,"IPv6SubnetMin":"2001:cafe:42:1::","Backend":{"Type":"host-gw"}}',
    b'\x01{"a":[1,2.5,-3e2,true,false,null,"x\\u00e9\\""],"b":{"c":[[[]]]}}',
]
TOKENS = [b'"Network"', b'"IPv6Network"', b'"SubnetLen"', b'"SubnetMin"', b'"SubnetMax"',
          b'"IPv6SubnetLen"', b'"EnableIPv4"', b'"EnableIPv6"', b'"EnableNFTables"',
          b'"Backend"', b'"Type"', b'"VNI"', b'"Port"', b'"MTU"', b'"GBP"', b'"vxlan"',
          b'"10.244.0.0/16"', b'"fd00::/56"', b"true", b"false", b"null", b"1e999", b"NaN",
          b"[", b"{", b'\\u0000', b'\\ud800']


if __name__ == "__main__":
    from fuzzcommon import run

    run(test_one_input, SEEDS, TOKENS)
