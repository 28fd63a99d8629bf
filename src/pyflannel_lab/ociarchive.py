"""Tiny OCI image archives written by hand, for images no registry can give us here.

No registry is reachable from the machine, so the pause image (the pod sandbox every
containerd needs) is built from the static `pause` binary that scripts/build-kubernetes.sh
compiles. An OCI archive is simple: uncompressed layer tars (digest == diff_id), a config,
a manifest and an index.json whose annotations name the image, all in one tar that
`ctr images import` reads. Tars have fixed mtimes, owners and order, so the same input
gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KUBE_CACHE = Path("/var/cache/pyflannel/kubernetes-v1.20.2")
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"  # kubelet v1.20's default --pod-infra-container-image


@dataclass(frozen=True)
class LayerFile:
    """One file of a layer: its path inside the image, content and mode."""

    path: str
    data: bytes
    mode: int = 0o755


def _tar_bytes(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, *, size: int = 0, mode: int = 0o755, dir_: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
    info.mode, info.size = mode, size
    info.type = tarfile.DIRTYPE if dir_ else tarfile.REGTYPE
    return info


def layer_tar(files: Sequence[LayerFile]) -> bytes:
    """An uncompressed layer holding `files` (and their parent directories)."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    dirs: set[str] = set()
    for f in sorted(files, key=lambda f: f.path):
        parts = f.path.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                members.append((_info(d, dir_=True), None))
        members.append((_info("/".join(parts), size=len(f.data), mode=f.mode), f.data))
    return _tar_bytes(members)


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write_image(out: Path, name: str, layers: Sequence[Path], entrypoint: Sequence[str],
                *, env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                         "/usr/bin:/sbin:/bin",)) -> Path:
    """Writes an OCI archive for image `name` (e.g. k8s.gcr.io/pause:3.2) from
    uncompressed layer tars, bottom first."""
    digests = [_file_digest(p) for p in layers]
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": list(entrypoint), "Env": list(env)},
              "rootfs": {"type": "layers", "diff_ids": digests}}
    config_digest, config_bytes = _blob(json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": d, "size": p.stat().st_size}
                           for d, p in zip(digests, layers, strict=True)]}
    manifest_digest, manifest_bytes = _blob(json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": len(manifest_bytes),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}]}
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_info(d, dir_=True))
        blobs: dict[str, bytes | Path] = {config_digest: config_bytes,
                                          manifest_digest: manifest_bytes}
        blobs.update(zip(digests, layers, strict=True))
        for digest in sorted(blobs):
            blob = blobs[digest]
            member = f"blobs/sha256/{digest[7:]}"
            if isinstance(blob, Path):
                with open(blob, "rb") as f:
                    tar.addfile(_info(member, size=blob.stat().st_size, mode=0o644), f)
            else:
                tar.addfile(_info(member, size=len(blob), mode=0o644), io.BytesIO(blob))
        for fname, obj in (("index.json", index),
                           ("oci-layout", {"imageLayoutVersion": "1.0.0"})):
            data = json.dumps(obj, sort_keys=True).encode()
            tar.addfile(_info(fname, size=len(data), mode=0o644), io.BytesIO(data))
    tmp.rename(out)
    return out


def pause_image(out: Path, binary: Path = KUBE_CACHE / "pause",
                name: str = PAUSE_IMAGE) -> Path:
    """The pod sandbox image: the static pause binary as /pause."""
    layer = out.with_name(out.name + ".layer")
    layer.write_bytes(layer_tar([LayerFile("pause", binary.read_bytes())]))
    try:
        return write_image(out, name, [layer], ["/pause"])
    finally:
        layer.unlink()
