"""subnet.env: the file flanneld writes for the CNI plugin (and docker's mk-docker-opts.sh).

The bytes match upstream's `WriteSubnetFile` exactly: `KEY=value` lines in a fixed
order, each ending in `\\n`, no quoting, no blank lines:

    FLANNEL_NETWORK=10.244.0.0/16          (IPv4 enabled)
    FLANNEL_SUBNET=10.244.1.1/24           (IPv4 enabled: lease address + 1, lease prefix)
    FLANNEL_IPV6_NETWORK=2001:cafe:42::/56 (IPv6 enabled)
    FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64 (IPv6 enabled)
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=true

Reading back is lenient like godotenv: a missing file is simply "no previous lease",
and a value that does not parse is dropped with a log line instead of failing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_interface
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755


@dataclass(frozen=True)
class SubnetEnv:
    """The content of subnet.env. A family is present when its network is not None."""

    network: IPv4Network | None
    subnet: IPv4Interface | None
    ipv6_network: IPv6Network | None
    ipv6_subnet: IPv6Interface | None
    mtu: int
    ipmasq: bool


def subnet_env_for(
    network: IPv4Network | None,
    lease_subnet: IPv4Network | None,
    ipv6_network: IPv6Network | None,
    ipv6_lease_subnet: IPv6Network | None,
    mtu: int,
    ipmasq: bool,
) -> SubnetEnv:
    """Build the SubnetEnv for a lease: the subnet lines carry the lease's first address
    plus one (the bridge/gateway address the CNI plugin uses) with the lease's prefix."""

    def first_host4(lease: IPv4Network | None) -> IPv4Interface | None:
        if lease is None:
            return None
        return IPv4Interface((lease.network_address + 1, lease.prefixlen))

    def first_host6(lease: IPv6Network | None) -> IPv6Interface | None:
        if lease is None:
            return None
        return IPv6Interface((lease.network_address + 1, lease.prefixlen))

    return SubnetEnv(network=network, subnet=first_host4(lease_subnet),
                     ipv6_network=ipv6_network, ipv6_subnet=first_host6(ipv6_lease_subnet),
                     mtu=mtu, ipmasq=ipmasq)


def render_subnet_env(env: SubnetEnv) -> bytes:
    """The file's exact bytes (upstream's line order and formatting)."""
    if (env.network is None) != (env.subnet is None):
        raise ValueError("subnet.env needs both FLANNEL_NETWORK and FLANNEL_SUBNET, or neither")
    if (env.ipv6_network is None) != (env.ipv6_subnet is None):
        raise ValueError("subnet.env needs both FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET, "
                         "or neither")
    lines: list[str] = []
    if env.network is not None:
        lines.append(f"FLANNEL_NETWORK={env.network}")
        lines.append(f"FLANNEL_SUBNET={env.subnet}")
    if env.ipv6_network is not None:
        lines.append(f"FLANNEL_IPV6_NETWORK={env.ipv6_network}")
        lines.append(f"FLANNEL_IPV6_SUBNET={env.ipv6_subnet}")
    lines.append(f"FLANNEL_MTU={env.mtu}")
    lines.append(f"FLANNEL_IPMASQ={'true' if env.ipmasq else 'false'}")
    return "".join(line + "\n" for line in lines).encode("ascii")


def _makedirs(directory: Path) -> None:
    """`mkdir -p` where every directory we create gets exactly 0755, whatever the umask."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer may race us
            path.mkdir(mode=DIR_MODE)
            os.chmod(path, DIR_MODE)


def write_subnet_env(path: Path, env: SubnetEnv) -> None:
    """Write subnet.env atomically: readers (the CNI plugin) see the old or the new file,
    never a partial one, and after a crash the new content is on disk once we return."""
    data = render_subnet_env(env)
    directory = path.parent
    _makedirs(directory)
    # A name of our own rather than tempfile.mkstemp: tempfile's imports (shutil, random,
    # bz2, lzma) cost the daemon 0.8 MiB of RSS. O_EXCL, and a fresh name on a clash.
    while True:
        tmp_name = str(directory / f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            # created 0600 (no reader sees it half-written); 0644 regardless of the umask
            os.fchmod(tmp.fileno(), FILE_MODE)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # Persist the rename itself.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- reading -------------------------------------------------------------------------


def _unquote(value: str) -> str:
    """godotenv-style value: quoted values lose their quotes ("" also expands \\n), unquoted
    values lose an inline ` #` comment and surrounding blanks."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        if value[0] == '"':
            inner = inner.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        return inner
    comment = value.find(" #")
    if comment >= 0:
        value = value[:comment]
    return value.strip()


def parse_env_text(text: str) -> dict[str, str]:
    """`KEY=value` lines as godotenv reads them; lines it cannot read are skipped."""
    values: dict[str, str] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            log.warning("subnet file line %d is not KEY=value, ignored: %r", number, raw_line)
            continue
        values[key] = _unquote(value.strip())
    return values


def _single_cidr(path: Path, values: dict[str, str], key: str) -> str | None:
    """The one CIDR stored under `key`; upstream stores lists, and ignores any with >1 entry."""
    value = values.get(key)
    if value is None or value == "":
        return None
    entries = value.split(",")
    if len(entries) > 1:
        log.error("error reading %s from subnet file at %s: expected 1 CIDR, found %d",
                  key, path, len(entries))
        return None
    return entries[0]


def _interface(path: Path, values: dict[str, str], key: str,
               version: int) -> IPv4Interface | IPv6Interface | None:
    text = _single_cidr(path, values, key)
    if text is None:
        return None
    try:
        if "/" not in text:
            raise ValueError(text)
        iface = ip_interface(text)
        if iface.version != version:
            raise ValueError(text)
    except ValueError:
        log.error("Couldn't parse previous %s from subnet file at %s: %r", key, path, text)
        return None
    return iface


def read_subnet_env(path: Path) -> SubnetEnv | None:
    """Read a subnet.env back; None when the file does not exist (or cannot be read).
    Values that do not parse come back as None / 0 / False and are logged."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("Couldn't read previous subnet file at %s: %s", path, exc)
        return None
    values = parse_env_text(text)

    network4 = _interface(path, values, "FLANNEL_NETWORK", 4)
    subnet4 = _interface(path, values, "FLANNEL_SUBNET", 4)
    network6 = _interface(path, values, "FLANNEL_IPV6_NETWORK", 6)
    subnet6 = _interface(path, values, "FLANNEL_IPV6_SUBNET", 6)
    assert network4 is None or isinstance(network4, IPv4Interface)
    assert subnet4 is None or isinstance(subnet4, IPv4Interface)
    assert network6 is None or isinstance(network6, IPv6Interface)
    assert subnet6 is None or isinstance(subnet6, IPv6Interface)

    mtu = 0
    mtu_text = values.get("FLANNEL_MTU", "")
    if mtu_text:
        try:
            mtu = int(mtu_text, 10)
        except ValueError:
            log.error("Couldn't parse FLANNEL_MTU from subnet file at %s: %r", path, mtu_text)
    return SubnetEnv(
        network=network4.network if network4 is not None else None,
        subnet=subnet4,
        ipv6_network=network6.network if network6 is not None else None,
        ipv6_subnet=subnet6,
        mtu=mtu,
        ipmasq=values.get("FLANNEL_IPMASQ", "").strip().lower() == "true",
    )


def previous_lease_subnets(path: Path) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The lease networks recorded in an existing subnet.env (FLANNEL_SUBNET 10.244.1.1/24 →
    10.244.1.0/24), used to ask for the same lease again and to recycle old masq rules."""
    env = read_subnet_env(path)
    if env is None:
        return None, None
    return (env.subnet.network if env.subnet is not None else None,
            env.ipv6_subnet.network if env.ipv6_subnet is not None else None)
