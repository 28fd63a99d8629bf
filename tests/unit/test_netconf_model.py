"""The NetConf value type itself: strict construction, immutability, deriving copies, and
that decoding net-conf.json pulls in no third-party model library (start-up RSS budget)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from pyflannel.config.netconf import NetConf, check_network_config, parse_netconf

ALL_FIELDS = [f.name for f in dataclasses.fields(NetConf)]


@pytest.mark.parametrize(
    ("fields", "attribute"),
    [
        ({"subnet_len": True}, "subnet_len"),          # bool is not an int here
        ({"subnet_len": 24.0}, "subnet_len"),
        ({"subnet_len": -1}, "subnet_len"),
        ({"ipv6_subnet_len": -64}, "ipv6_subnet_len"),
        ({"network": "10.0.0.0/8"}, "network"),        # no coercion from text
        ({"network": IPv6Network("fd00::/8")}, "network"),
        ({"ipv6_network": IPv4Network("10.0.0.0/8")}, "ipv6_network"),
        ({"subnet_min": IPv6Address("::1")}, "subnet_min"),
        ({"ipv6_subnet_max": IPv4Address("10.0.0.1")}, "ipv6_subnet_max"),
        ({"enable_ipv4": 1}, "enable_ipv4"),
        ({"enable_ipv6": None}, "enable_ipv6"),
        ({"backend_type": None}, "backend_type"),
        ({"backend": None}, "backend"),
        ({"backend": {1: "x"}}, "backend"),
    ],
)
def test_construction_is_strict(fields: dict[str, Any], attribute: str) -> None:
    with pytest.raises(ValueError, match=rf"^NetConf\.{attribute}: "):
        NetConf(**fields)


@pytest.mark.parametrize("attribute", ALL_FIELDS)
def test_every_attribute_is_type_checked(attribute: str) -> None:
    with pytest.raises(ValueError, match=rf"^NetConf\.{attribute}: "):
        wrong: dict[str, Any] = {attribute: object()}
        NetConf(**wrong)


def test_optional_attributes_accept_none() -> None:
    nc = NetConf(network=None, ipv6_network=None, subnet_min=None, subnet_max=None,
                 ipv6_subnet_min=None, ipv6_subnet_max=None)
    assert nc == NetConf()


def test_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        NetConf(IPv4Network("10.0.0.0/8"))  # type: ignore[call-arg]
    nc = NetConf()
    with pytest.raises(dataclasses.FrozenInstanceError):
        nc.subnet_len = 24  # type: ignore[misc]


def test_backend_is_copied_and_default_not_shared() -> None:
    given = {"Type": "host-gw"}
    nc = NetConf(backend_type="host-gw", backend=given)
    given["Type"] = "vxlan"
    assert nc.backend == {"Type": "host-gw"}
    first, second = NetConf(), NetConf()
    first.backend["Type"] = "changed"
    assert second.backend == {"Type": "vxlan"}


def test_replace_and_model_copy_derive_validated_copies() -> None:
    nc = parse_netconf('{"Network": "10.5.0.0/16"}')
    derived = dataclasses.replace(nc, subnet_len=20)
    assert derived.subnet_len == 20 and derived.network == nc.network and nc.subnet_len == 0
    assert nc.model_copy(update={"subnet_len": 20}) == derived
    assert nc.model_copy() == nc
    with pytest.raises(ValueError, match=r"^NetConf\.subnet_len: "):
        nc.model_copy(update={"subnet_len": -3})


def test_checked_config_is_a_netconf_with_filled_defaults() -> None:
    checked = check_network_config(parse_netconf('{"Network": "10.5.0.0/16"}'))
    assert type(checked) is NetConf
    assert checked == NetConf(network=IPv4Network("10.5.0.0/16"), subnet_len=24,
                              subnet_min=IPv4Address("10.5.1.0"),
                              subnet_max=IPv4Address("10.5.255.0"))


def test_unhashable_like_any_value_holding_a_dict() -> None:
    with pytest.raises(TypeError):
        hash(NetConf())


@pytest.mark.parametrize("module", ["pyflannel.config.netconf", "pyflannel.daemon.main"])
def test_no_pydantic_at_import(module: str) -> None:
    # pydantic is no longer a dependency; importing it cost the daemon ~10 MiB RSS.
    code = (f"import sys, {module}\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pydantic', 'pydantic_core'))\n"
            "print(','.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
