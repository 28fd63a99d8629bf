"""The image builder's own logic, without building an image: deterministic tars and
archives, the lock file, apt sources, ELF interpreter rewriting, archive integrity."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from pyflannel.cni.install import InstallError, read_elf_interpreter, set_elf_interpreter
from pyflannel_lab.image import oci, pylayer, rootfs, trust


def make_tree(root: Path, mtime: int) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("#!/bin/sh\n")
    (root / "usr/bin/tool").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc/b.conf").write_text("b\n")
    (root / "etc/a.conf").write_text("a\n")
    (root / "etc/link").symlink_to("a.conf")
    os.link(root / "etc/a.conf", root / "etc/hard")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return root


def test_layer_depends_on_content_only(tmp_path: Path) -> None:
    first = oci.write_layer(make_tree(tmp_path / "one", 1_000), tmp_path / "1.tar", 42)
    second = oci.write_layer(make_tree(tmp_path / "two", 2_000_000), tmp_path / "2.tar", 42)
    assert first.digest == second.digest
    assert first.digest == "sha256:" + hashlib.sha256((tmp_path / "1.tar").read_bytes()).hexdigest()
    with tarfile.open(tmp_path / "1.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["etc", "etc/a.conf", "etc/b.conf", "etc/hard",
                                         "etc/link", "usr", "usr/bin", "usr/bin/tool"]
    assert {m.mtime for m in members} == {42}
    assert {(m.uname, m.gname) for m in members} == {("", "")}
    assert members[3].islnk() and members[4].issym()
    other_epoch = oci.write_layer(tmp_path / "one", tmp_path / "3.tar", 43)
    assert other_epoch.digest != first.digest


def test_layer_refuses_device_nodes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", 1)
    os.mkfifo(tree / "etc/fifo")
    with pytest.raises(ValueError, match="not a file, directory or link"):
        oci.write_layer(tree, tmp_path / "x.tar", 1)


def archive_of(tmp_path: Path) -> oci.ImageArchive:
    layer = oci.write_layer(make_tree(tmp_path / "t", 1), tmp_path / "layer.tar", 7)
    config = oci.image_config((layer,), {"Cmd": ["true"]}, ["test"])
    return oci.write_archive(tmp_path / "image.tar", (layer,), config,
                             "registry.example/org/img:v1", 7)


def test_archive_layout_and_names(tmp_path: Path) -> None:
    archive = archive_of(tmp_path)
    assert archive.manifest_digest == "sha256:" + hashlib.sha256(archive.manifest).hexdigest()
    assert b"\"created\"" not in archive.config  # no timestamp (history has created_by)
    with tarfile.open(archive.path) as tar:
        names = tar.getnames()
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.loads(index_file.read())
    assert names[:2] == ["blobs", "blobs/sha256"] and names[-2:] == ["index.json", "oci-layout"]
    annotations = index["manifests"][0]["annotations"]
    assert annotations == {"org.opencontainers.image.ref.name": "v1",
                           "io.containerd.image.name": "registry.example/org/img:v1"}
    digest, manifest, reference = trust.read_archive(archive.path)
    assert (digest, manifest, reference) == (archive.manifest_digest, archive.manifest,
                                             "registry.example/org/img:v1")


def test_read_archive_finds_a_changed_byte(tmp_path: Path) -> None:
    archive = archive_of(tmp_path)
    with tarfile.open(archive.path) as tar:
        member = tar.getmember("blobs/sha256/" + archive.layers[0].digest[7:])
    data = bytearray(archive.path.read_bytes())
    data[member.offset_data + 10] ^= 0xFF
    archive.path.write_bytes(bytes(data))
    with pytest.raises(trust.ImageVerificationError, match="does not match its digest"):
        trust.read_archive(archive.path)


def test_read_archive_rejects_what_is_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "x.tar"
    bogus.write_bytes(b"not a tar")
    with pytest.raises(trust.ImageVerificationError, match="not a readable OCI archive"):
        trust.read_archive(bogus)
    with pytest.raises(trust.ImageVerificationError, match="no such file"):
        trust.read_archive(tmp_path / "missing.tar")


def test_lock_file(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("# c\nfoo==1.0 \\\n    --hash=sha256:" + "a" * 64 + "\n")
    assert pylayer.read_lock(lock) == [pylayer.LockedWheel("foo", "1.0", "a" * 64)]
    lock.write_text("foo>=1.0\n")
    with pytest.raises(pylayer.PythonLayerError, match="lock:1: expected 'name==version"):
        pylayer.read_lock(lock)


def test_the_repository_lock_pins_every_runtime_dependency() -> None:
    wheels = pylayer.read_lock(Path(__file__).resolve().parents[2] / "deploy/requirements.lock")
    names = {w.name.lower().replace("_", "-") for w in wheels}
    assert {"pyroute2", "httpx", "lightkube"} <= names
    assert "prometheus-client" not in names  # the daemon writes its own exposition


def test_debian_mirrors_from_both_source_formats(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: https://vendor.example/apt\n"
        "Suites: bookworm\nComponents: main\n")
    (tmp_path / "sources.list").write_text(
        "deb http://security.debian.org/debian-security bookworm-security main # c\n"
        "deb-src http://deb.debian.org/debian bookworm main\n")
    assert rootfs.debian_mirrors("bookworm", tmp_path) == (
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://security.debian.org/debian-security bookworm-security main")
    with pytest.raises(rootfs.RootfsError, match="no Debian apt source for 'trixie'"):
        rootfs.debian_mirrors("trixie", tmp_path)


@pytest.mark.skipif(not Path("/usr/bin/python3.11").exists(), reason="needs an ELF binary")
def test_elf_interpreter_is_rewritten_in_place(tmp_path: Path) -> None:
    binary = tmp_path / "python"
    shutil.copyfile("/usr/bin/python3.11", binary)
    original = read_elf_interpreter(binary)
    assert original.endswith("ld-linux-x86-64.so.2")
    size = binary.stat().st_size
    set_elf_interpreter(binary, "/lib64//ld.so")
    assert read_elf_interpreter(binary) == "/lib64//ld.so"
    assert binary.stat().st_size == size
    with pytest.raises(InstallError, match="longer than the"):
        set_elf_interpreter(binary, "/" + "x" * len(original))
    (tmp_path / "text").write_text("hello")
    with pytest.raises(InstallError, match="not a 64-bit little-endian ELF"):
        read_elf_interpreter(tmp_path / "text")


def test_install_cni_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyflannel.cli import main

    assert main(["install-cni", "--dest", str(tmp_path / "a"), "--runtime",
                 str(tmp_path / "none")]) == 1
    assert "not the pyflannel image: pass --python" in capsys.readouterr().err
    assert main(["install-cni", "--dest", str(tmp_path / "b"), "--python",
                 "/usr/bin/python3"]) == 0
    assert (tmp_path / "b/flannel").read_text().startswith("#!/usr/bin/python3 -IS\n")
