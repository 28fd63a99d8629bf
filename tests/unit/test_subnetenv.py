"""subnet.env: exact bytes, atomic 0644 write, lenient read-back, round trip."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyflannel.subnet import subnetenv
from pyflannel.subnet.subnetenv import (
    SubnetEnv,
    parse_env_text,
    previous_lease_subnets,
    read_subnet_env,
    render_subnet_env,
    subnet_env_for,
    write_subnet_env,
)

# dist/sample_subnet.env upstream
SAMPLE = (b"FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\n"
          b"FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")


def sample_env() -> SubnetEnv:
    return subnet_env_for(IPv4Network("10.1.0.0/16"), IPv4Network("10.1.74.0/24"),
                          None, None, 1472, False)


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


# --- rendering --------------------------------------------------------------------------


def test_sample_bytes() -> None:
    assert render_subnet_env(sample_env()) == SAMPLE


def test_ipv6_only_bytes() -> None:
    env = subnet_env_for(None, None, IPv6Network("2001:cafe:42::/56"),
                         IPv6Network("2001:cafe:42::/64"), 1450, True)
    assert render_subnet_env(env) == (
        b"FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
        b"FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
        b"FLANNEL_MTU=1450\n"
        b"FLANNEL_IPMASQ=true\n")


def test_dual_stack_bytes_and_order() -> None:
    env = subnet_env_for(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"),
                         IPv6Network("2001:cafe:42::/56"), IPv6Network("2001:cafe:42:1::/64"),
                         1450, True)
    assert render_subnet_env(env) == (
        b"FLANNEL_NETWORK=10.244.0.0/16\n"
        b"FLANNEL_SUBNET=10.244.1.1/24\n"
        b"FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
        b"FLANNEL_IPV6_SUBNET=2001:cafe:42:1::1/64\n"
        b"FLANNEL_MTU=1450\n"
        b"FLANNEL_IPMASQ=true\n")


def test_subnet_env_for_adds_one_to_the_lease() -> None:
    env = subnet_env_for(IPv4Network("10.0.0.0/8"), IPv4Network("10.5.16.0/20"),
                         IPv6Network("fd00::/48"), IPv6Network("fd00:0:0:ff00::/56"), 1500, False)
    assert env.subnet == IPv4Interface("10.5.16.1/20")
    assert env.ipv6_subnet == IPv6Interface("fd00:0:0:ff00::1/56")
    assert env.network == IPv4Network("10.0.0.0/8")


def test_no_family_only_mtu_and_masq() -> None:
    env = SubnetEnv(None, None, None, None, 1500, False)
    assert render_subnet_env(env) == b"FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n"


@pytest.mark.parametrize(
    "env",
    [
        SubnetEnv(IPv4Network("10.0.0.0/8"), None, None, None, 1500, False),
        SubnetEnv(None, IPv4Interface("10.0.0.1/24"), None, None, 1500, False),
        SubnetEnv(None, None, IPv6Network("fd00::/48"), None, 1500, False),
        SubnetEnv(None, None, None, IPv6Interface("fd00::1/64"), 1500, False),
    ],
)
def test_half_a_family_is_refused(env: SubnetEnv) -> None:
    with pytest.raises(ValueError, match="needs both"):
        render_subnet_env(env)


# --- writing ----------------------------------------------------------------------------


def test_write_creates_dirs_mode_0644_despite_umask(tmp_path: Path, umask_077: None) -> None:
    path = tmp_path / "run" / "flannel" / "subnet.env"
    write_subnet_env(path, sample_env())
    assert path.read_bytes() == SAMPLE
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755
    assert sorted(p.name for p in path.parent.iterdir()) == ["subnet.env"]


def test_write_keeps_existing_directory_mode(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)
    write_subnet_env(directory / "subnet.env", sample_env())
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_rewrite_replaces_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    path.write_bytes(b"FLANNEL_MTU=1\n")
    os.chmod(path, 0o600)
    old_inode = path.stat().st_ino
    reader = path.open("rb")   # a reader holding the old file keeps seeing complete old data
    try:
        write_subnet_env(path, sample_env())
        assert reader.read() == b"FLANNEL_MTU=1\n"
    finally:
        reader.close()
    assert path.read_bytes() == SAMPLE
    assert path.stat().st_ino != old_inode   # renamed over, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.env"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "subnet.env"
    path.write_bytes(SAMPLE)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(subnetenv.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_subnet_env(path, subnet_env_for(None, None, None, None, 9000, True))
    assert path.read_bytes() == SAMPLE
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.env"]


def test_write_refuses_inconsistent_env_before_touching_disk(tmp_path: Path) -> None:
    path = tmp_path / "new" / "subnet.env"
    with pytest.raises(ValueError):
        write_subnet_env(path, SubnetEnv(IPv4Network("10.0.0.0/8"), None, None, None, 1, False))
    assert not (tmp_path / "new").exists()


# --- reading ----------------------------------------------------------------------------


def test_read_missing_file_is_none(tmp_path: Path) -> None:
    assert read_subnet_env(tmp_path / "nope.env") is None
    assert previous_lease_subnets(tmp_path / "nope.env") == (None, None)


def test_read_directory_is_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert read_subnet_env(tmp_path) is None
    assert "Couldn't read previous subnet file" in caplog.text


def test_read_sample(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    path.write_bytes(SAMPLE)
    assert read_subnet_env(path) == sample_env()
    assert previous_lease_subnets(path) == (IPv4Network("10.1.74.0/24"), None)


def test_previous_lease_subnets_dual_stack(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    write_subnet_env(path, subnet_env_for(IPv4Network("10.244.0.0/16"),
                                          IPv4Network("10.244.9.0/24"),
                                          IPv6Network("fd00::/56"), IPv6Network("fd00:0:0:9::/64"),
                                          1450, True))
    assert previous_lease_subnets(path) == (IPv4Network("10.244.9.0/24"),
                                            IPv6Network("fd00:0:0:9::/64"))


def test_read_is_lenient_like_godotenv(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    path.write_text(
        "# written by hand\n"
        "\n"
        "export FLANNEL_NETWORK=10.1.0.0/16\n"
        'FLANNEL_SUBNET="10.1.74.1/24"\n'
        "  FLANNEL_MTU = 1472   # inline comment\n"
        "FLANNEL_IPMASQ='true'\n"
        "garbage line\n"
        "OTHER=1\n")
    env = read_subnet_env(path)
    assert env == SubnetEnv(IPv4Network("10.1.0.0/16"), IPv4Interface("10.1.74.1/24"),
                            None, None, 1472, True)


def test_read_ignores_multi_entry_values(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_NETWORK=10.1.0.0/16\n"
                    "FLANNEL_SUBNET=10.1.74.1/24,10.2.74.1/24\n"
                    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
    with caplog.at_level(logging.ERROR):
        env = read_subnet_env(path)
    assert env is not None
    assert env.subnet is None and env.network == IPv4Network("10.1.0.0/16")
    assert "expected 1 CIDR, found 2" in caplog.text
    assert previous_lease_subnets(path) == (None, None)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("FLANNEL_SUBNET=10.1.74.1", "subnet"),            # no prefix: not a CIDR
        ("FLANNEL_SUBNET=fd00::1/64", "subnet"),           # wrong family
        ("FLANNEL_IPV6_SUBNET=10.1.74.1/24", "ipv6_subnet"),
        ("FLANNEL_NETWORK=banana", "network"),
    ],
)
def test_read_drops_bad_values(tmp_path: Path, caplog: pytest.LogCaptureFixture, line: str,
                               field: str) -> None:
    path = tmp_path / "subnet.env"
    path.write_text(line + "\nFLANNEL_MTU=1400\n")
    with caplog.at_level(logging.ERROR):
        env = read_subnet_env(path)
    assert env is not None
    assert getattr(env, field) is None
    assert env.mtu == 1400
    assert "Couldn't parse previous" in caplog.text


def test_read_bad_mtu_is_zero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_MTU=big\n")
    with caplog.at_level(logging.ERROR):
        env = read_subnet_env(path)
    assert env == SubnetEnv(None, None, None, None, 0, False)
    assert "FLANNEL_MTU" in caplog.text


def test_parse_env_text_last_wins_and_export() -> None:
    assert parse_env_text("A=1\nexport A=2\nB=\"x y\"\n") == {"A": "2", "B": "x y"}


# --- round trip -------------------------------------------------------------------------

v4_networks = st.builds(lambda addr, plen: IPv4Network((addr, plen), strict=False),
                        st.integers(0, 2**32 - 1), st.integers(0, 30))
v6_networks = st.builds(lambda addr, plen: IPv6Network((addr, plen), strict=False),
                        st.integers(0, 2**128 - 1), st.integers(0, 126))


@st.composite
def subnet_envs(draw: st.DrawFn) -> SubnetEnv:
    network4 = draw(st.none() | v4_networks)
    network6 = draw(st.none() | v6_networks)
    lease4 = None
    if network4 is not None:
        lease4 = next(network4.subnets(new_prefix=draw(st.integers(network4.prefixlen, 30))))
    lease6 = None
    if network6 is not None:
        lease6 = next(network6.subnets(new_prefix=draw(st.integers(network6.prefixlen, 126))))
    return subnet_env_for(network4, lease4, network6, lease6,
                          draw(st.integers(-(2**31), 2**31)), draw(st.booleans()))


@given(subnet_envs())
def test_round_trip_render_read(env: SubnetEnv) -> None:
    # tmp_path is function-scoped and hypothesis runs many examples per call.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub" / "subnet.env"
        write_subnet_env(path, env)
        assert path.read_bytes() == render_subnet_env(env)
        assert read_subnet_env(path) == env
        assert previous_lease_subnets(path) == (
            env.subnet.network if env.subnet else None,
            env.ipv6_subnet.network if env.ipv6_subnet else None)
