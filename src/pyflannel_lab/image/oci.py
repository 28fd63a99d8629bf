"""Deterministic layer tars and OCI image archives, written by hand.

Why by hand: no Docker engine or registry here, and the image digest must depend on the
files only. Every tar is sorted by path, every mtime is SOURCE_DATE_EPOCH, owners are
numeric (no user/group names from the build machine), and layers stay uncompressed so
that a layer's digest is also its diff_id. The archive is an OCI image layout
(oci-layout, index.json, blobs/sha256/...) in one tar, which `skopeo` reads as
`oci-archive:` and `ctr images import` imports.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def canonical_json(value: object) -> bytes:
    """One byte form per value: sorted keys, no spaces (the digest is over these bytes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Blob:
    """A content-addressed file: `digest` is "sha256:<hex>"."""

    path: Path
    digest: str
    size: int

    @classmethod
    def of(cls, path: Path) -> Blob:
        return cls(path, "sha256:" + sha256_file(path), path.stat().st_size)

    def descriptor(self, media_type: str) -> dict[str, object]:
        return {"mediaType": media_type, "digest": self.digest, "size": self.size}


def walk_sorted(root: Path, prune: Callable[[str], bool]) -> Iterator[str]:
    """Relative paths under `root`, parents before children, siblings by byte order;
    a pruned directory is left out with everything below it."""
    def walk(rel: str) -> Iterator[str]:
        base = root / rel if rel else root
        names = sorted(os.listdir(base), key=os.fsencode)
        for name in names:
            child = f"{rel}/{name}" if rel else name
            if prune(child):
                continue
            yield child
            if stat.S_ISDIR(os.lstat(root / child).st_mode):
                yield from walk(child)
    yield from walk("")


def write_layer(root: Path, out: Path, epoch: int, *,
                prune: Callable[[str], bool] = lambda rel: False,
                force_root_owner: bool = False) -> Blob:
    """Tar the tree under `root` into `out` deterministically; return the blob.

    Owners stay as the tree has them (Debian's are fixed numbers), or all 0 with
    `force_root_owner`. Device nodes and sockets are refused: a container runtime
    provides /dev, and nothing else in an image should be one."""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for rel in walk_sorted(root, prune):
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            if not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
                raise ValueError(f"{root / rel}: not a file, directory or link")
            info.mtime = epoch
            info.uname = info.gname = ""
            if force_root_owner:
                info.uid = info.gid = 0
            if info.isfile():
                with (root / rel).open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return Blob.of(out)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), epoch, 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = tarfile.DIRTYPE, epoch, 0o755
    tar.addfile(info)


@dataclass(frozen=True)
class ImageArchive:
    """What write_archive produced: the archive and the digest that names the image."""

    path: Path
    manifest_digest: str
    manifest: bytes
    config: bytes
    layers: tuple[Blob, ...]

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


def image_config(layers: tuple[Blob, ...], config: Mapping[str, object],
                 history: list[str]) -> bytes:
    """The image config: no `created` time anywhere, so it depends on content only."""
    return canonical_json({
        "architecture": "amd64",
        "os": "linux",
        "config": dict(config),
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created_by": step} for step in history],
    })


def write_archive(out: Path, layers: tuple[Blob, ...], config: bytes, name: str,
                  epoch: int, annotations: Mapping[str, str] | None = None) -> ImageArchive:
    """Write the OCI layout tar `out` holding one image named `name` (a full reference,
    e.g. ghcr.io/org/pyflannel:v0.1.0)."""
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [layer.descriptor(MEDIA_LAYER) for layer in layers],
        **({"annotations": dict(annotations)} if annotations else {}),
    })
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST, "digest": manifest_digest, "size": len(manifest),
            "annotations": {REF_NAME: name.rpartition(":")[2], CONTAINERD_NAME: name},
        }],
    })
    blobs: dict[str, bytes | Path] = {config_digest: config, manifest_digest: manifest}
    for layer in layers:
        blobs[layer.digest] = layer.path
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        _add_dir(tar, "blobs/", epoch)
        _add_dir(tar, "blobs/sha256/", epoch)
        for digest in sorted(blobs):
            content = blobs[digest]
            arcname = "blobs/sha256/" + digest.removeprefix("sha256:")
            if isinstance(content, bytes):
                _add_bytes(tar, arcname, content, epoch)
            else:
                info = tarfile.TarInfo(arcname)
                info.size, info.mtime, info.mode = content.stat().st_size, epoch, 0o644
                with content.open("rb") as f:
                    tar.addfile(info, f)
        _add_bytes(tar, "index.json", index, epoch)
        _add_bytes(tar, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}), epoch)
    os.replace(tmp, out)
    return ImageArchive(out, manifest_digest, manifest, config, layers)
