"""The pod sandbox image every node's containerd needs, and where the Kubernetes binaries
are cached.

No registry is reachable from the machine, so the pause image is built from the static
`pause` binary that scripts/build-kubernetes.sh compiles: one layer holding /pause,
written with the image builder's deterministic layer and archive writers
(pyflannel_lab.image.oci), under the name kubelet v1.20 and containerd's sandbox_image use.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pyflannel_lab.image.oci import image_config, write_archive, write_layer

KUBE_CACHE = Path("/var/cache/pyflannel/kubernetes-v1.20.2")
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"  # kubelet v1.20's default --pod-infra-container-image


def pause_image(out: Path, binary: Path = KUBE_CACHE / "pause",
                name: str = PAUSE_IMAGE) -> Path:
    """Writes the pause image as an OCI archive at `out`."""
    tmp = Path(tempfile.mkdtemp(prefix="pyflannel-pause-"))
    try:
        root = tmp / "root"
        root.mkdir()
        shutil.copyfile(binary, root / "pause")
        (root / "pause").chmod(0o755)
        layer = write_layer(root, tmp / "layer.tar", 0, force_root_owner=True)
        config = image_config((layer,), {"Entrypoint": ["/pause"]},
                              ["/pause from scripts/build-kubernetes.sh"])
        return write_archive(out, (layer,), config, name, 0).path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
