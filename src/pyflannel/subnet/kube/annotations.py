"""The node annotations flannel reads and writes, under a configurable prefix
(--kube-annotation-prefix), normalised as upstream's newAnnotations does (reference §5.2)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyflannel.subnet.kube.errors import KubeError

DEFAULT_PREFIX = "flannel.alpha.coreos.com"
_PREFIX_RE = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")


def normalise_prefix(prefix: str) -> str:
    """`example.com` -> `example.com/`; `example.com/foo` -> `example.com/foo-`.

    Raises KubeError for a prefix upstream refuses."""
    if prefix.count("/") > 1:
        raise KubeError(f"--kube-annotation-prefix {prefix!r}: subnet/kube: prefix can "
                        "contain at most single slash")
    if "/" not in prefix:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_RE.match(prefix):
        raise KubeError(f"--kube-annotation-prefix {prefix!r}: subnet/kube: prefix must match "
                        f"{_PREFIX_RE.pattern}")
    return prefix


@dataclass(frozen=True)
class Annotations:
    """Full annotation names for one prefix."""

    kube_managed: str
    backend_type: str
    backend_data: str
    backend_v6_data: str
    public_ip: str
    public_ipv6: str
    public_ip_overwrite: str
    public_ipv6_overwrite: str
    node_public_ip: str
    node_public_ipv6: str

    @classmethod
    def for_prefix(cls, prefix: str = DEFAULT_PREFIX) -> Annotations:
        p = normalise_prefix(prefix)
        return cls(
            kube_managed=p + "kube-subnet-manager",
            backend_type=p + "backend-type",
            backend_data=p + "backend-data",
            backend_v6_data=p + "backend-v6-data",
            public_ip=p + "public-ip",
            public_ipv6=p + "public-ipv6",
            public_ip_overwrite=p + "public-ip-overwrite",
            public_ipv6_overwrite=p + "public-ipv6-overwrite",
            node_public_ip=p + "node-public-ip",
            node_public_ipv6=p + "node-public-ipv6",
        )
