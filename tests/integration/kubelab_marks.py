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
