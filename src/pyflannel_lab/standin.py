"""A stand-in pyflannel image for the kubelet lab, until the verified image build
(pyflannel_lab.image) is there: Debian bookworm minbase with python3, iproute2, iptables
and nftables (mmdebstrap, cached per machine), plus a layer with this checkout's
pyflannel and the lab venv's copies of its dependencies. Not reproducible, not signed:
it only lets the walk-through run the real daemon from a real image today.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
from pathlib import Path

from pyflannel_lab.ociarchive import LayerFile, layer_tar, write_image

IMAGE = "ghcr.io/pyflannel/pyflannel:v0.1.0"  # what deploy/kube-flannel.yml names
CACHE = Path("/var/cache/pyflannel/standin")
PACKAGES = "python3,iproute2,iptables,nftables,ca-certificates"
SITE = "usr/lib/python3/dist-packages"
SCRIPT = "#!/usr/bin/python3\nimport sys\nfrom {mod} import main\nsys.exit(main())\n"


def _mirrors() -> list[str]:
    """The machine's own Debian mirrors (deb822 or one-line sources)."""
    out = []
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for para in deb822.read_text().split("\n\n"):
            f = dict(line.split(": ", 1) for line in para.splitlines()
                     if ": " in line and not line.startswith("#"))
            for suite in f.get("Suites", "").split():
                if not suite.endswith("-updates"):
                    out.append(f"deb {f['URIs']} {suite} {f.get('Components', 'main')}")
    return out or ["deb http://deb.debian.org/debian bookworm main"]


def base_rootfs() -> Path:
    """Debian minbase as a layer tar, built once per machine (~1 minute)."""
    out = CACHE / "bookworm-minbase.tar"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                        f"--include={PACKAGES}", "bookworm", str(tmp), *_mirrors()],
                       check=True, capture_output=True)
        tmp.rename(out)
    return out


def _dependency_files() -> list[LayerFile]:
    """pyflannel (from the source tree) and its dependencies' files (from this venv)."""
    files: list[LayerFile] = []
    src = Path(__file__).resolve().parents[1] / "pyflannel"
    for p in sorted(src.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            files.append(LayerFile(f"{SITE}/pyflannel/{p.relative_to(src)}", p.read_bytes(),
                                   0o755 if p.stat().st_mode & 0o111 else 0o644))
    seen: set[str] = set()
    todo = [r for r in md.distribution("pyflannel").requires or [] if "extra ==" not in r]
    while todo:
        name = re.split(r"[ ;<>=!\[~(]", todo.pop())[0]
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a dependency for another platform or Python
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
        for f in dist.files or []:
            path = Path(str(dist.locate_file(f)))
            if path.is_file() and not str(f).startswith("..") and "__pycache__" not in str(f):
                files.append(LayerFile(f"{SITE}/{f}", path.read_bytes(), 0o644))
    for cmd, mod in (("flanneld", "pyflannel.daemon.main"), ("pyflannel", "pyflannel.cli")):
        files.append(LayerFile(f"usr/local/bin/{cmd}", SCRIPT.format(mod=mod).encode()))
    return files


def standin_image(out: Path, name: str = IMAGE) -> Path:
    layer = out.with_name(out.name + ".layer")
    layer.write_bytes(layer_tar(_dependency_files()))
    try:
        return write_image(out, name, [base_rootfs(), layer], ["flanneld"])
    finally:
        layer.unlink()
