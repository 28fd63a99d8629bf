"""The image: built from Debian packages and locked wheels, reproducible, signed, refused
when anything about it is off, and working under a real containerd (`ctr run`).

Slow (a warm build is ~10-20 s, the first on a machine ~1.5 min): marked `image`, run
with `-m image` alone. Keys are throw-away, each in its own temp GNUPGHOME."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyflannel_lab import image
from pyflannel_lab.image import make_signing_key, pylayer, trust
from pyflannel_lab.image.containerd import PrivateContainerd
from pyflannel_lab.image.trust import ImageVerificationError

TOOLS = ("mmdebstrap", "skopeo", "gpg", "patchelf", "unshare")
pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the rootfs needs root"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} (scripts/setup.sh)"),
]


@dataclass
class Key:
    home: Path
    fingerprint: str
    pubkey: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Key]]:
    made = {}
    for name in ("operator", "stranger"):
        home = tmp_path_factory.mktemp(name) / "gnupg"
        fpr, pubkey = make_signing_key(home, name)
        made[name] = Key(home, fpr, pubkey)
    yield made
    for key in made.values():  # the tests' own gpg and skopeo runs start agents here
        trust.stop_gpg_agent(key.home)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Key]) -> image.BuiltImage:
    out = tmp_path_factory.mktemp("image")
    result = image.build(out, sign_key=keys["operator"].fingerprint,
                         gnupghome=keys["operator"].home)
    print(f"\nimage {result.digest}: {result.size / 1e6:.1f} MB uncompressed, "
          f"{result.debian_packages} Debian packages, {result.wheels} wheels")
    return result


def layer_members(built: image.BuiltImage) -> dict[str, tarfile.TarInfo]:
    """Every path in the image (all layers), from the archive itself."""
    members: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(built.archive) as archive:
        for digest in built.layers:
            blob = archive.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert blob is not None
            with tarfile.open(fileobj=blob) as layer:
                members.update({m.name: m for m in layer.getmembers()})
    return members


def read_from_image(built: image.BuiltImage, path: str) -> bytes:
    with tarfile.open(built.archive) as archive:
        for digest in reversed(built.layers):
            blob = archive.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert blob is not None
            with tarfile.open(fileobj=blob) as layer:
                try:
                    f = layer.extractfile(path)
                except KeyError:
                    continue
                assert f is not None
                return f.read()
    raise KeyError(path)


def test_two_builds_give_the_same_digest(built: image.BuiltImage, tmp_path: Path) -> None:
    again = image.build(tmp_path)
    assert again.digest == built.digest
    assert again.layers == built.layers
    assert again.sbom.read_bytes() == built.sbom.read_bytes()


def test_size_and_content(built: image.BuiltImage) -> None:
    assert built.size <= 100_000_000, f"{built.size / 1e6:.1f} MB"
    members = layer_members(built)
    names = set(members)
    for present in ("usr/bin/flanneld", "usr/bin/pyflannel", "usr/sbin/iptables",
                    "usr/sbin/nft", "usr/bin/ip", "etc/ssl/certs/ca-certificates.crt",
                    "usr/lib/python3/dist-packages/pyflannel/cni/flannel_plugin.py",
                    "usr/lib/python3/dist-packages/pyroute2/__init__.py",
                    "usr/lib/pyflannel/cni-runtime/bin/flannel-launcher"):
        assert present in names or present.replace("usr/", "", 1) in names, present
    # Nothing of the lab, the tests or the benchmarks; no apt, no docs beyond licences.
    banned = {"pyflannel_lab", "_pytest", "pytest", "hypothesis", "bench", "conftest.py"}
    forbidden = [n for n in names if banned & set(n.split("/")) or n.startswith("usr/bin/apt")
                 or n.startswith("usr/share/man/") or n.startswith("usr/share/locale/")
                 or (n.startswith("usr/share/doc/") and members[n].isfile()
                     and not n.endswith("/copyright"))]
    # pyflannel in the image is exactly the tracked files of src/pyflannel (+ their .pyc).
    site = "usr/lib/python3/dist-packages/"
    shipped = {n.removeprefix(site) for n in names if n.startswith(site + "pyflannel/")
               and not members[n].isdir() and "__pycache__" not in n}
    tracked = {rel.removeprefix("src/")
               for rel in pylayer.tracked_files(image.REPO_ROOT, "src/pyflannel")}
    assert shipped == tracked
    assert forbidden == []
    # One mtime per layer: the Debian layer's is the apt archive's date, the Python
    # layer's the commit's (SOURCE_DATE_EPOCH).
    with tarfile.open(built.archive) as archive:
        for digest in built.layers:
            blob = archive.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert blob is not None
            with tarfile.open(fileobj=blob) as layer:
                assert len({m.mtime for m in layer.getmembers()}) == 1
                assert {(m.uname, m.gname) for m in layer.getmembers()} == {("", "")}
    assert not [n for n in names if n.endswith(".pyc") and "__pycache__" not in n]


def test_sbom_lists_the_packages_and_the_wheel_hashes(built: image.BuiltImage) -> None:
    inside = read_from_image(built, image.SBOM_IN_IMAGE)
    assert inside == built.sbom.read_bytes()
    doc = json.loads(inside)
    assert doc["spdxVersion"] == "SPDX-2.3"
    by_name = {p["name"]: p for p in doc["packages"]}
    status = read_from_image(built, "var/lib/dpkg/status").decode()
    installed = [block.split("\n")[0].removeprefix("Package: ")
                 for block in status.split("\n\n") if " installed\n" in block]
    assert len(installed) == built.debian_packages
    for name in installed:
        assert name in by_name, name
    for wheel in pylayer.read_lock(image.REPO_ROOT / image.LOCK_FILE):
        checksums = by_name[wheel.name]["checksums"]
        assert checksums == [{"algorithm": "SHA256", "checksumValue": wheel.sha256}]


def test_verify_accepts_the_signed_image(built: image.BuiltImage, keys: dict[str, Key]) -> None:
    assert trust.verify(built.archive, keys["operator"].pubkey) == built.digest


@pytest.fixture
def copy(built: image.BuiltImage, tmp_path: Path) -> Iterator[Path]:
    archive = tmp_path / built.archive.name
    shutil.copyfile(built.archive, archive)
    assert built.signature is not None
    shutil.copyfile(built.signature, trust.signature_path(archive))
    yield archive


@pytest.mark.parametrize("layer", [0, 1])
def test_a_changed_byte_in_a_layer_is_refused(built: image.BuiltImage, keys: dict[str, Key],
                                              copy: Path, layer: int) -> None:
    name = "blobs/sha256/" + built.layers[layer].removeprefix("sha256:")
    with tarfile.open(copy) as archive:
        member = archive.getmember(name)
    with copy.open("r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ImageVerificationError,
                       match=f"blob {built.layers[layer]} does not match its digest"):
        trust.verify(copy, keys["operator"].pubkey)


def test_a_signature_by_another_key_is_refused(keys: dict[str, Key], copy: Path) -> None:
    trust.sign(copy, keys["stranger"].fingerprint, gnupghome=keys["stranger"].home)
    with pytest.raises(ImageVerificationError,
                       match=f"it is not signed by the key in .*; it is signed by key "
                             f"{keys['stranger'].fingerprint}"):
        trust.verify(copy, keys["operator"].pubkey)


def test_verifying_with_another_key_is_refused(keys: dict[str, Key], copy: Path) -> None:
    with pytest.raises(ImageVerificationError, match="it is not signed by the key in"):
        trust.verify(copy, keys["stranger"].pubkey)


def test_an_unsigned_image_is_refused(keys: dict[str, Key], copy: Path) -> None:
    trust.signature_path(copy).unlink()
    with pytest.raises(ImageVerificationError, match="is not signed: no signature at"):
        trust.verify(copy, keys["operator"].pubkey)


def test_a_signature_for_another_name_is_refused(keys: dict[str, Key], copy: Path) -> None:
    with pytest.raises(ImageVerificationError, match="the signature is for another name"):
        trust.verify(copy, keys["operator"].pubkey, reference="ghcr.io/else/pyflannel:v0.1.0")


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("containerd", "ctr", "runc")),
                    reason="needs containerd and runc (scripts/setup.sh)")
def test_runs_under_ctr(built: image.BuiltImage, keys: dict[str, Key], tmp_path: Path) -> None:
    containerd = PrivateContainerd(tmp_path)
    containerd.start()
    try:
        name = containerd.import_verified(built.archive, keys["operator"].pubkey)
        assert name == image.DEFAULT_REFERENCE
        version = containerd.run(name, "flanneld", "--version")
        assert version.returncode == 0, version.stderr
        assert (version.stdout + version.stderr).strip() == image.VERSION
        # The tools flanneld runs are there and load (iptables is Debian's nft backend).
        for argv, expect in ((["iptables", "--version"], "nf_tables"),
                             (["nft", "--version"], "nftables"), (["ip", "-V"], "iproute2")):
            tool = containerd.run(name, *argv)
            assert tool.returncode == 0 and expect in tool.stdout, (argv, tool.stderr)
        cni_bin = tmp_path / "opt-cni-bin"
        cni_bin.mkdir()
        installed = containerd.run(
            name, "pyflannel", "install-cni", "--dest", "/opt/cni/bin",
            "--host-dir", str(cni_bin),
            mounts=(f"type=bind,src={cni_bin},dst=/opt/cni/bin,options=rbind:rw",))
        assert installed.returncode == 0, installed.stderr
    finally:
        containerd.stop()
    # What the init container wrote runs on this host, from the host's path.
    plugin = cni_bin / "flannel"
    assert plugin.read_text().startswith(f"#!{cni_bin}/.flannel-runtime-")
    version_call = subprocess.run([str(plugin)], env={"CNI_COMMAND": "VERSION"},
                                  input=b'{"cniVersion":"1.0.0"}', capture_output=True)
    assert version_call.returncode == 0, version_call.stderr
    assert json.loads(version_call.stdout)["cniVersion"] == "1.0.0"


def test_ensure_verified_builds_once_and_refuses_a_tampered_cache(
        built: image.BuiltImage, tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    first = image.ensure_verified(lab_dir)
    assert first.digest == built.digest  # same inputs, same image, whoever builds it
    stamp = first.archive.stat().st_mtime_ns
    second = image.ensure_verified(lab_dir)
    assert second == first and first.archive.stat().st_mtime_ns == stamp  # not rebuilt
    with first.archive.open("r+b") as f:
        f.seek(first.archive.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ImageVerificationError, match="refused|does not match"):
        image.ensure_verified(lab_dir)


def test_verify_command(keys: dict[str, Key], copy: Path) -> None:
    script = str(image.REPO_ROOT / "scripts/image.sh")
    good = subprocess.run(["bash", script, "verify", str(copy), "--key",
                           str(keys["operator"].pubkey)], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.startswith(f"verified {copy}: sha256:")
    bad = subprocess.run(["bash", script, "verify", str(copy), "--key",
                          str(keys["stranger"].pubkey)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith("image: ") and "not signed by the key in" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_signature_of_another_manifest_is_refused(keys: dict[str, Key], copy: Path,
                                                    tmp_path: Path) -> None:
    other = tmp_path / "other-manifest.json"
    _, manifest, reference = trust.read_archive(copy)
    other.write_bytes(manifest.replace(b'"schemaVersion":2', b'"schemaVersion":2 '))
    subprocess.run(["skopeo", "standalone-sign", str(other), reference,
                    keys["operator"].fingerprint, "-o", str(trust.signature_path(copy))],
                   env={**os.environ, "GNUPGHOME": str(keys["operator"].home)}, check=True)
    with pytest.raises(ImageVerificationError, match="refused: the signature is for another"
                                                     " manifest"):
        trust.verify(copy, keys["operator"].pubkey)
