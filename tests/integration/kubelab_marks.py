"""The marks every test of the kubelet lab carries (imported by those test modules)."""

from __future__ import annotations

import os

import pytest

from pyflannel_lab.controlplane import kube_binaries_missing

KUBELET_LAB = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, cgroups, mounts)"),
    pytest.mark.skipif(bool(kube_binaries_missing()),
                       reason="Kubernetes binaries not cached "
                       f"({', '.join(kube_binaries_missing())}): run "
                       "scripts/build-kubernetes.sh as root"),
]


def other_kube_labs(own_label: str) -> bool:
    """Whether another --kubernetes lab is up on the machine (it shares the host-path
    mountpoints, which then stay until the last lab goes)."""
    from pyflannel_lab.session import STATE_DIR

    return any(p.parent.name != own_label for p in STATE_DIR.glob("*/kube.json"))
