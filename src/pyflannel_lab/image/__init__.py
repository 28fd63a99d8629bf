"""The pyflannel image, built from scratch on this machine: Debian packages (mmdebstrap),
pyflannel and its locked wheels, written as a reproducible, signed OCI archive.

API (also `scripts/image.sh build|sign|verify|lock`):
- build(out_dir, sign_key=None) -> BuiltImage: the archive, its digest, SBOM, signature;
- verify(archive, pubkey) -> manifest digest, or ImageVerificationError saying why not;
- ensure_verified() -> VerifiedImage: the lab's image, built once per source state and
  signed with a per-machine lab key, verified on every call (what the lab imports).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pyflannel_lab.image import oci, pylayer, rootfs, sbom, trust
from pyflannel_lab.image.trust import ImageVerificationError, verify

__all__ = ["BuiltImage", "ImageBuildError", "ImageVerificationError", "VerifiedImage",
           "build", "ensure_verified", "verify", "DEFAULT_REFERENCE"]

REPO_ROOT = Path(__file__).resolve().parents[3]
VERSION = "0.1.0"
# Where an operator would push it; a placeholder organisation (see README "The image").
DEFAULT_REFERENCE = f"ghcr.io/pyflannel/pyflannel:v{VERSION}"
LOCK_FILE = Path("deploy/requirements.lock")
SBOM_IN_IMAGE = "usr/share/pyflannel/sbom.spdx.json"
CMD = ["flanneld", "--ip-masq", "--kube-subnet-mgr"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageBuildError(RuntimeError):
    """The image could not be built; the message says which step failed."""


@dataclass(frozen=True)
class BuiltImage:
    archive: Path
    digest: str  # the manifest digest: the image's name by content
    reference: str
    size: int  # uncompressed bytes of all layers
    layers: tuple[str, ...]
    sbom: Path
    signature: Path | None
    debian_packages: int
    wheels: int


@dataclass(frozen=True)
class VerifiedImage:
    archive: Path
    digest: str
    reference: str
    pubkey: Path


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def source_date_epoch(repo: Path = REPO_ROOT) -> int:
    """SOURCE_DATE_EPOCH if set, else the time of the checkout's last commit."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value:
        if not value.isdigit():
            raise ImageBuildError(f"SOURCE_DATE_EPOCH must be a number of seconds: {value!r}")
        return int(value)
    return int(_git(repo, "log", "-1", "--format=%ct"))


def _runtime_requires() -> list[str]:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requires: list[str] = project["dependencies"]
    return requires


def build(out_dir: Path, *, sign_key: str | None = None, gnupghome: Path | None = None,
          reference: str = DEFAULT_REFERENCE, repo: Path = REPO_ROOT,
          cache_root: Path = rootfs.CACHE_ROOT, use_cache: bool = True) -> BuiltImage:
    """Build the image archive into `out_dir` (pyflannel-<version>.oci.tar, .spdx.json,
    and .sig when `sign_key`, a gpg fingerprint, is given); return what was made."""
    os.umask(0o022)  # file modes in the layer must not depend on the caller's umask
    cache_root.mkdir(parents=True, exist_ok=True)
    # One build at a time per machine: builds share the cached rootfs (the overlay's
    # lower layer) and the wheel directory.
    with (cache_root / "build.lock").open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        return _build_locked(out_dir, sign_key=sign_key, gnupghome=gnupghome,
                             reference=reference, repo=repo, cache_root=cache_root,
                             use_cache=use_cache)


def _build_locked(out_dir: Path, *, sign_key: str | None, gnupghome: Path | None,
                  reference: str, repo: Path, cache_root: Path, use_cache: bool) -> BuiltImage:
    epoch = source_date_epoch(repo)
    commit = _git(repo, "rev-parse", "HEAD")
    lock = repo / LOCK_FILE
    try:
        wheels = pylayer.read_lock(lock)
        base = rootfs.build_rootfs(epoch, cache_root=cache_root, use_cache=use_cache)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".pylayer-", dir=cache_root) as tmp:
            upper = Path(tmp) / "upper"
            upper.mkdir()
            wheel_dir = cache_root / "wheels"
            pylayer.fetch_wheels(lock, wheel_dir, sys.executable)
            pylayer.install_dependencies(lock, wheel_dir, upper, sys.executable)
            pylayer.install_pyflannel(repo, upper, VERSION, _runtime_requires())
            plugin_modules = pylayer.compile_and_find_plugin_modules(base.tree, upper)
            pylayer.build_cni_runtime(base.tree, upper / pylayer.RUNTIME_DIR, plugin_modules,
                                      overlay=upper)
            document = sbom.spdx_document(version=VERSION, commit=commit, epoch=epoch,
                                          suite=base.suite, debian=base.packages,
                                          wheels=wheels, mirrors=base.mirrors)
            (upper / SBOM_IN_IMAGE).parent.mkdir(parents=True, exist_ok=True)
            (upper / SBOM_IN_IMAGE).write_bytes(document)
            layer2 = oci.write_layer(upper, Path(tmp) / "python.tar", epoch,
                                     force_root_owner=True)
            layers = (base.layer, layer2)
            config = oci.image_config(layers, {
                "Env": [f"PATH={PATH}"], "Cmd": CMD,
                "Labels": {"org.opencontainers.image.title": "pyflannel",
                           "org.opencontainers.image.version": VERSION,
                           "org.opencontainers.image.revision": commit,
                           "org.opencontainers.image.licenses": "Apache-2.0"},
            }, [f"mmdebstrap {base.suite}: {', '.join(rootfs.PACKAGES)}",
                "pyflannel and deploy/requirements.lock"])
            archive_path = out_dir / f"pyflannel-{VERSION}.oci.tar"
            archive = oci.write_archive(archive_path, layers, config, reference, epoch)
    except (rootfs.RootfsError, pylayer.PythonLayerError, OSError,
            subprocess.CalledProcessError) as exc:
        raise ImageBuildError(f"image build failed: {exc}") from exc
    sbom_path = archive_path.with_name(archive_path.name + ".spdx.json")
    sbom_path.write_bytes(document)
    signature: Path | None = None
    stale = trust.signature_path(archive_path)
    if sign_key:
        signature = trust.sign(archive_path, sign_key, gnupghome=gnupghome)
    elif stale.exists():
        stale.unlink()  # a signature of an earlier build must not sit beside this one
    return BuiltImage(archive_path, archive.manifest_digest, reference,
                      archive.uncompressed_size, tuple(x.digest for x in layers), sbom_path,
                      signature, len(base.packages), len(wheels))


# --------------------------------------------------------------------------- the lab's image

LAB_DIR = rootfs.CACHE_ROOT / "lab"


def _gpg(home: Path, *args: str, input: str | None = None) -> str:
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", *args], input=input,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"gpg {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def make_signing_key(home: Path, name: str) -> tuple[str, Path]:
    """A new passphrase-less gpg key in its own GNUPGHOME (never the user's keyring);
    return (fingerprint, exported public key file)."""
    home.mkdir(parents=True, mode=0o700, exist_ok=True)
    _gpg(home, "--passphrase", "", "--quick-gen-key", f"{name} <{name}@pyflannel.invalid>",
         "ed25519", "sign", "never")
    fpr = next(line.split(":")[9] for line in
               _gpg(home, "--with-colons", "--list-secret-keys").splitlines()
               if line.startswith("fpr:"))
    pubkey = home.parent / f"{home.name}.pub.asc"
    pubkey.write_text(_gpg(home, "--armor", "--export", fpr))
    trust.stop_gpg_agent(home)
    return fpr, pubkey


def source_key(repo: Path = REPO_ROOT) -> str:
    """What the image is built from, as a hash: tracked files of the product, the lock
    and this builder, and the rootfs recipe key."""
    digest = hashlib.sha256()
    for sub in ("src/pyflannel", "src/pyflannel_lab/image", str(LOCK_FILE), "pyproject.toml"):
        for rel in pylayer.tracked_files(repo, sub):
            path = repo / rel
            digest.update(rel.encode() + b"\0")
            digest.update(os.readlink(path).encode() if path.is_symlink()
                          else path.read_bytes())
    suite = rootfs.debian_suite()
    mirrors = rootfs.debian_mirrors(suite)
    epoch = source_date_epoch(repo)
    digest.update(rootfs.cache_key(suite, mirrors, rootfs.debian_epoch(mirrors, epoch)).encode())
    digest.update(str(epoch).encode())
    return digest.hexdigest()[:20]


def ensure_verified(lab_dir: Path = LAB_DIR, repo: Path = REPO_ROOT) -> VerifiedImage:
    """The image for the lab: rebuilt only when its sources changed, signed with this
    machine's lab key (made on first use under `lab_dir`), and verified on every call,
    so the lab imports nothing that does not pass verify()."""
    home = lab_dir / "gnupg"
    fpr_file = lab_dir / "key.fpr"
    if not fpr_file.is_file():
        if home.exists():
            shutil.rmtree(home)
        fpr, _ = make_signing_key(home, "pyflannel-lab")
        fpr_file.write_text(fpr + "\n")
    fpr = fpr_file.read_text().strip()
    pubkey = lab_dir / "gnupg.pub.asc"
    key = source_key(repo)
    out = lab_dir / f"image-{key}"
    archive = out / f"pyflannel-{VERSION}.oci.tar"
    if not trust.signature_path(archive).is_file():
        # Older builds go, but not one another process (a lab or test of another
        # checkout) may be importing right now: only those unused for an hour.
        for old in lab_dir.glob("image-*"):
            if old != out and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        build(out, sign_key=fpr, gnupghome=home, repo=repo)
    digest = verify(archive, pubkey)
    meta = {"archive": str(archive), "digest": digest, "pubkey": str(pubkey)}
    (lab_dir / "verified.json").write_text(json.dumps(meta, indent=1) + "\n")
    return VerifiedImage(archive, digest, DEFAULT_REFERENCE, pubkey)
