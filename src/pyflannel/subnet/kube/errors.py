"""Errors of the Kubernetes subnet manager. Kept free of client imports so the daemon can
catch them without loading the Kubernetes client in etcd mode."""

from __future__ import annotations

from pyflannel.subnet.base import StoreError

# Upstream's ClusterRole "flannel" (Documentation/kube-flannel.yml), quoted in the
# permission error so an operator sees at once what the role must contain.
UPSTREAM_CLUSTER_ROLE = ("pods: get; nodes: get, list, watch; nodes/status: patch")


class KubeError(StoreError):
    """The kube subnet manager cannot go on; the message is one line that says what to do."""


class KubeApiError(KubeError):
    """The API server answered a request with an error status (or could not be reached:
    status 0)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "",
                 verb: str = "", resource: str = "", name: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.verb = verb
        self.resource = resource
        self.name = name

    @property
    def gone(self) -> bool:
        """410: the resourceVersion is older than the server's history (relist)."""
        return self.status == 410


class KubePermissionError(KubeApiError):
    """403: RBAC does not allow the request. The message names the missing verb and
    resource and the ClusterRole rule that grants it."""


def permission_message(verb: str, resource: str, name: str, server_message: str) -> str:
    target = f"{resource} {name!r}" if name else resource
    return (f"permission denied: cannot {verb} {target}; the ClusterRole bound to flannel's "
            f"ServiceAccount needs the rule {{apiGroups: [\"\"], resources: [\"{resource}\"], "
            f"verbs: [\"{verb}\"]}} (upstream's ClusterRole \"flannel\" grants "
            f"{UPSTREAM_CLUSTER_ROLE}); server said: {server_message}")
