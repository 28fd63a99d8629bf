"""The Debian layer of the image: a rootfs made by mmdebstrap, cached per machine.

Only what flanneld needs at run time: the `essential` variant (no apt) plus python3,
iproute2, iptables, nftables, ca-certificates and wireguard-go (the wireguard backend on
kernels without the module; 2.5 MB). Packages that only installation needs
(perl, login, util-linux, ...) are purged once everything is configured, documentation,
man pages, locales and glibc's gconv modules are never unpacked (dpkg path-exclude), and
Debian's .pyc files are dropped (the Python layer compiles what flanneld imports,
deterministically). The mirror is the machine's own Debian apt source, so this works
wherever `apt-get install` does.

Cache key: the recipe (packages, options) and the dates of the host's apt lists for
those mirrors, i.e. `apt-get update` on the host makes the next build fetch a new
rootfs. The cached entry is the tree (the Python layer is built over it in an overlay)
and its layer tar.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyflannel_lab.image.oci import Blob, write_layer

CACHE_ROOT = Path(os.environ.get("PYFLANNEL_CACHE", "/var/cache/pyflannel")) / "image"
RECIPE_VERSION = 3  # bump when the recipe below changes in a way the key does not see

PACKAGES = ("python3", "iproute2", "iptables", "nftables", "ca-certificates", "wireguard-go")
# Installed by the essential set or as dependencies, useless once the rootfs is built.
# perl comes with usrmerge (the rootfs is merged-/usr already); the rest is Essential.
PURGE = ("usrmerge", "libfile-find-rule-perl", "libnumber-compare-perl", "libtext-glob-perl",
         "perl", "libperl5.36", "perl-modules-5.36", "libgdbm-compat4")
PURGE_ESSENTIAL = ("perl-base", "login", "util-linux", "util-linux-extra", "bash",
                   "diffutils", "findutils", "tar", "sysvinit-utils", "ncurses-bin",
                   "hostname", "libpam-modules", "libpam-modules-bin", "libpam-runtime")
PATH_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*",
                 "/usr/share/info/*", "/usr/share/lintian/*", "/usr/share/bash-completion/*",
                 "/usr/lib/x86_64-linux-gnu/gconv/*")
# Not excluded at unpack time (python3's postinst byte-compiles them), removed after.
UNUSED_STDLIB = ("pydoc_data", "lib2to3", "test", "ensurepip", "idlelib", "turtledemo")
PATH_INCLUDES = ("/usr/share/doc/*/copyright",)  # licences stay with the binaries
# Written at build time by tools, not owned by packages, and different on every run.
VOLATILE = ("var/log", "var/cache/debconf", "var/cache/ldconfig", "var/lib/dpkg/triggers",
            "tmp", "run", "dev", "proc", "sys")
VOLATILE_FILES = ("etc/machine-id", "etc/hostname", "etc/resolv.conf", "etc/hosts",
                  "var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old",
                  "var/lib/dpkg/statoverride-old", "var/cache/apt")


class RootfsError(RuntimeError):
    """The Debian rootfs could not be built."""


@dataclass(frozen=True)
class Rootfs:
    """A built rootfs: the tree, its layer, and the Debian packages in it."""

    tree: Path
    layer: Blob
    packages: dict[str, str]  # name -> version
    mirrors: tuple[str, ...]
    suite: str


def debian_suite() -> str:
    """The host's Debian codename: the image's Debian release follows the machine's."""
    text = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    if not match:
        raise RootfsError("/etc/os-release has no VERSION_CODENAME: not a Debian machine?")
    return match.group(1)


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def debian_mirrors(suite: str, apt_dir: Path = Path("/etc/apt")) -> tuple[str, ...]:
    """One-line `deb URI SUITE COMPONENTS` entries for the machine's Debian sources of
    `suite` (and -updates, -security); other vendors' repositories are left out."""
    lines: list[str] = []
    files = sorted(apt_dir.glob("sources.list.d/*.sources"))
    for path in files:
        for s in _deb822_stanzas(path.read_text()):
            if "deb" not in s.get("types", "").split() or s.get("enabled", "yes") == "no":
                continue
            for uri in s.get("uris", "").split():
                for dist in s.get("suites", "").split():
                    if dist.split("-")[0] == suite and "debian" in uri:
                        lines.append(f"deb {uri} {dist} {s.get('components', 'main')}")
    legacy = [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]
    for path in legacy:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            parts = line.split("#")[0].split()
            if (len(parts) >= 3 and parts[0] == "deb" and not parts[1].startswith("[")
                    and parts[2].split("-")[0] == suite and "debian" in parts[1]):
                lines.append(" ".join(parts))
    if not lines:
        raise RootfsError(f"no Debian apt source for {suite!r} in {apt_dir} (the rootfs comes "
                          "from the machine's own Debian mirror)")
    return tuple(dict.fromkeys(lines))


def apt_lists_state(mirrors: tuple[str, ...]) -> list[str]:
    """The `Date:` of each host apt list for our mirrors: what the key knows of the
    archive's state without asking the network."""
    dates: list[str] = []
    lists = Path("/var/lib/apt/lists")
    for line in mirrors:
        _, uri, dist, *_ = line.split()
        prefix = re.sub(r"^\w+://", "", uri).rstrip("/").replace("/", "_")
        release = lists / f"{prefix}_dists_{dist}_InRelease"
        date = "unknown"
        if release.is_file():
            found = re.search(r"^Date: (.+)$", release.read_text(errors="replace"), re.M)
            date = found.group(1) if found else date
        dates.append(f"{line} @ {date}")
    return dates


def cache_key(suite: str, mirrors: tuple[str, ...], epoch: int) -> str:
    recipe = {"version": RECIPE_VERSION, "epoch": epoch, "suite": suite, "packages": PACKAGES,
              "purge": PURGE, "purge_essential": PURGE_ESSENTIAL, "excludes": PATH_EXCLUDES,
              "includes": PATH_INCLUDES, "unused": UNUSED_STDLIB, "apt": apt_lists_state(mirrors)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]


def mmdebstrap_argv(suite: str, mirrors: tuple[str, ...], target: Path) -> list[str]:
    # --force-depends: init-system-helpers "needs" usrmerge, dpkg "needs" tar; not at run time.
    purge = ('chroot "$1" dpkg --purge --force-remove-essential --force-depends '
             + " ".join(PURGE + PURGE_ESSENTIAL))
    argv = ["mmdebstrap", "--mode=root", "--variant=essential", "--quiet",
            "--include=" + ",".join(PACKAGES), f"--customize-hook={purge}"]
    argv += [f"--dpkgopt=path-exclude={p}" for p in PATH_EXCLUDES]
    argv += [f"--dpkgopt=path-include={p}" for p in PATH_INCLUDES]
    return [*argv, suite, str(target), *mirrors]


def _installed_packages(tree: Path) -> dict[str, str]:
    """name -> version of every installed package, from dpkg's status file."""
    packages: dict[str, str] = {}
    for stanza in _deb822_stanzas((tree / "var/lib/dpkg/status").read_text()):
        if stanza.get("status", "").endswith(" installed"):
            packages[stanza["package"]] = stanza["version"]
    return dict(sorted(packages.items()))


def _strip(tree: Path) -> None:
    """Remove what differs run to run or that nothing reads at run time."""
    for rel in VOLATILE:
        directory = tree / rel
        if directory.is_dir():
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    for rel in VOLATILE_FILES:
        path = tree / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for name in UNUSED_STDLIB:
        shutil.rmtree(tree / "usr/lib/python3.11" / name, ignore_errors=True)
    for cache in sorted(tree.glob("usr/lib/python3*/**/__pycache__")):
        shutil.rmtree(cache)  # Debian's: hash-seed dependent; the Python layer compiles


def debian_epoch(mirrors: tuple[str, ...], fallback: int) -> int:
    """The newest `Date:` of the host's apt lists for our mirrors, as SOURCE_DATE_EPOCH of
    the Debian layer: it then depends on the archive's state only, not on our commits, so
    a new pyflannel commit leaves that 69 MB layer (and its digest) as it was."""
    dates = [line.rpartition(" @ ")[2] for line in apt_lists_state(mirrors)]
    stamps = []
    for date in dates:
        try:
            stamps.append(int(email.utils.parsedate_to_datetime(date).timestamp()))
        except (TypeError, ValueError):
            continue
    return max(stamps) if stamps else fallback


def build_rootfs(fallback_epoch: int, *, cache_root: Path = CACHE_ROOT,
                 use_cache: bool = True) -> Rootfs:
    """The cached rootfs for this recipe and apt state, built first if needed (~75 s).
    Its SOURCE_DATE_EPOCH is debian_epoch(), or `fallback_epoch` without apt lists.
    The caller holds the machine's build lock (pyflannel_lab.image.build does)."""
    suite = debian_suite()
    mirrors = debian_mirrors(suite)
    # The tree itself depends on the epoch (files mmdebstrap and dpkg generate), so the
    # epoch is part of the key.
    epoch = debian_epoch(mirrors, fallback_epoch)
    key = cache_key(suite, mirrors, epoch)
    entry = cache_root / f"rootfs-{key}"
    meta_path = entry / "rootfs.json"
    if use_cache and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        layer = Blob(entry / "layer.tar", meta["layer_digest"], meta["layer_size"])
        if meta.get("epoch") == epoch and layer.path.is_file():
            return Rootfs(entry / "tree", layer, meta["packages"], mirrors, suite)
    for tool in ("mmdebstrap", "unshare"):
        if shutil.which(tool) is None:
            raise RootfsError(f"{tool} is not installed (scripts/setup.sh installs it)")
    if os.geteuid() != 0:
        raise RootfsError("building the rootfs needs root (mmdebstrap --mode=root)")
    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".rootfs-{key}-", dir=cache_root))
    try:
        tree = work / "tree"
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "LC_ALL": "C.UTF-8"}
        # A private mount namespace: mmdebstrap's /proc, /sys and /dev mounts in the
        # target vanish with it, even if it is killed half-way.
        argv = ["unshare", "--mount", "--propagation", "private",
                *mmdebstrap_argv(suite, mirrors, tree)]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RootfsError(f"mmdebstrap failed ({proc.returncode}): "
                              f"{proc.stderr.strip()[-2000:]}")
        _strip(tree)
        packages = _installed_packages(tree)
        blob = write_layer(tree, work / "layer.tar", epoch)
        meta = {"epoch": epoch, "layer_digest": blob.digest, "layer_size": blob.size,
                "packages": packages, "mirrors": list(mirrors), "suite": suite,
                "apt": apt_lists_state(mirrors)}
        (work / "rootfs.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(work, entry)  # a cache entry appears complete or not at all
        # Older entries (another apt state or recipe) and leftovers of killed builds:
        # the caller holds the build lock, so nobody is using them.
        for stale in [*cache_root.glob("rootfs-*"), *cache_root.glob(".rootfs-*")]:
            if stale != entry:
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Rootfs(entry / "tree", Blob(entry / "layer.tar", blob.digest, blob.size),
                  packages, mirrors, suite)
