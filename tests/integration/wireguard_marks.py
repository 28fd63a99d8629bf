"""The marks every lab test of the wireguard backend carries (imported by those modules)."""

from __future__ import annotations

import os
import shutil

import pytest

from pyflannel_lab.wireguard import userspace_wireguard_missing

WIREGUARD_LAB = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None or not os.path.exists("/usr/lib/cni/bridge"),
                       reason="needs etcd and containernetworking-plugins (scripts/setup.sh)"),
    pytest.mark.skipif(userspace_wireguard_missing() is not None,
                       reason=str(userspace_wireguard_missing())),
    pytest.mark.etcd,
]
