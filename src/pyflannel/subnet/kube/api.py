"""The few Kubernetes API calls flannel makes, on lightkube's configuration layer
(kubeconfig, in-cluster service account with token rotation, TLS) and its HTTP client.

Requests and responses stay JSON dicts: the node watch parses thousands of Nodes and only
ever needs a handful of their fields, so no model objects are built. Every error becomes a
KubeApiError whose message is one line; 403 becomes KubePermissionError naming the rule
the ClusterRole lacks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from lightkube.config.client_adapter import AsyncClient as make_httpx_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import SERVICE_ACCOUNT, KubeConfig, SingleConfig
from lightkube.config.models import Cluster
from lightkube.core.exceptions import ConfigError as LightkubeConfigError

from pyflannel.subnet.kube.errors import (
    KubeApiError,
    KubeError,
    KubePermissionError,
    permission_message,
)

# httpx logs every request at INFO: a watch renewal every few minutes per node is noise
# in flanneld's log. Failures are logged by us, with what to do about them.
logging.getLogger("httpx2").setLevel(logging.WARNING)

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
# Seconds a request may take; watches set their own (server-side timeoutSeconds + slack).
REQUEST_TIMEOUT = 30.0


def load_config(kubeconfig_file: str = "", api_url: str = "",
                service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT) -> SingleConfig:
    """As client-go's BuildConfigFromFlags: the kubeconfig file if given (its server
    replaced by --kube-api-url when both are set); else the in-cluster service account
    (KUBERNETES_SERVICE_HOST/PORT, token, CA), with --kube-api-url as the server if set;
    else --kube-api-url alone, unauthenticated."""
    try:
        if kubeconfig_file:
            conf = KubeConfig.from_file(kubeconfig_file).get()
        elif _in_cluster(service_account_dir, need_env=not api_url):
            conf = _service_account_config(service_account_dir, api_url)
        elif api_url:
            conf = KubeConfig.from_server(api_url).get()
        else:
            raise KubeError(
                "no Kubernetes API configuration: not running in a pod (no service account "
                f"in {service_account_dir} or KUBERNETES_SERVICE_HOST unset); pass "
                "--kubeconfig-file or --kube-api-url")
    except LightkubeConfigError as e:
        raise KubeError(f"kubeconfig: {e}") from None
    except (OSError, ValueError, KeyError) as e:
        raise KubeError(f"kubeconfig {kubeconfig_file}: {e}") from None
    if conf is None:
        raise KubeError(f"kubeconfig {kubeconfig_file}: no current-context")
    if api_url and conf.cluster.server != api_url:
        conf = conf._replace(cluster=Cluster(
            server=api_url, certificate_auth=conf.cluster.certificate_auth,
            certificate_auth_data=conf.cluster.certificate_auth_data,
            insecure=conf.cluster.insecure))
    return conf


def _in_cluster(sa_dir: str | os.PathLike[str], *, need_env: bool) -> bool:
    if not (Path(sa_dir) / "token").is_file():
        return False
    return not need_env or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _service_account_config(sa_dir: str | os.PathLike[str], api_url: str) -> SingleConfig:
    if not api_url:
        conf = KubeConfig.from_service_account(sa_dir).get()
        assert conf is not None
        return conf
    # The token and CA of the pod, against an explicitly named server.
    d = Path(sa_dir)
    ca = d / "ca.crt"
    conf = KubeConfig.from_one(
        cluster=Cluster(server=api_url, certificate_auth=str(ca) if ca.is_file() else None),
        user=KubeConfig.from_service_account(sa_dir).get().user,  # type: ignore[union-attr]
    ).get()
    assert conf is not None
    return conf


@dataclass(frozen=True)
class NodeListPage:
    items: list[dict[str, Any]]
    resource_version: str
    continue_token: str


class KubeApi:
    """Async access to pods/nodes for one configuration. aclose() when done."""

    def __init__(self, config: SingleConfig, *, user_agent: str = "pyflannel") -> None:
        self.config = config
        self.server = config.cluster.server
        # trust_env=False: a proxy named in the environment of a node must not carry its
        # traffic to the API server (client-go honours NO_PROXY; we simply go direct).
        params = ConnectionParams(timeout=httpx2.Timeout(REQUEST_TIMEOUT), trust_env=False)
        try:
            self._http = make_httpx_client(config, params)
        except (LightkubeConfigError, OSError, ValueError) as e:
            raise KubeError(f"Kubernetes client configuration ({self.server}): {e}") from None
        self._http.headers["User-Agent"] = user_agent
        self._http.headers["Accept"] = "application/json"

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- errors ------------------------------------------------------------------------
    def _error(self, resp: httpx2.Response, verb: str, resource: str,
               name: str = "") -> KubeApiError:
        try:
            status_obj = json.loads(resp.content)
            message = str(status_obj.get("message") or resp.reason_phrase)
            reason = str(status_obj.get("reason") or "")
        except ValueError:
            message, reason = resp.text[:200] or resp.reason_phrase, ""
        target = f"{resource} {name!r}" if name else resource
        if resp.status_code == 403:
            return KubePermissionError(permission_message(verb, resource, name, message),
                                       status=403, reason=reason, verb=verb,
                                       resource=resource, name=name)
        if resp.status_code == 401:
            message = (f"unauthorized ({message}): the token or client certificate in the "
                       "Kubernetes client configuration is not accepted")
        return KubeApiError(f"{verb} {target}: {resp.status_code} {reason}: {message}",
                            status=resp.status_code, reason=reason, verb=verb,
                            resource=resource, name=name)

    def _unreachable(self, e: Exception, verb: str, resource: str) -> KubeApiError:
        return KubeApiError(f"{verb} {resource}: cannot reach the API server at "
                            f"{self.server}: {type(e).__name__}: {e}", verb=verb,
                            resource=resource)

    async def _request(self, method: str, url: str, verb: str, resource: str, name: str = "",
                       **kw: Any) -> dict[str, Any]:
        try:
            resp = await self._http.request(method, url, **kw)
        except (httpx2.HTTPError, OSError) as e:
            raise self._unreachable(e, verb, resource) from None
        if resp.status_code >= 400:
            raise self._error(resp, verb, resource, name)
        try:
            out = resp.json()
        except ValueError as e:
            raise KubeApiError(f"{verb} {resource}: the answer is not JSON: {e}",
                               status=resp.status_code) from None
        if not isinstance(out, dict):
            raise KubeApiError(f"{verb} {resource}: the answer is not a JSON object")
        return out

    # -- calls -------------------------------------------------------------------------
    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}",
                                   "get", "pods", f"{namespace}/{name}")

    async def get_node(self, name: str) -> dict[str, Any]:
        return await self._request("GET", f"/api/v1/nodes/{name}", "get", "nodes", name)

    async def patch_node_status(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Strategic-merge PATCH of nodes/<name>/status: upstream's ClusterRole grants
        only this subresource (annotations and conditions both go through it)."""
        return await self._request(
            "PATCH", f"/api/v1/nodes/{name}/status", "patch", "nodes/status", name,
            content=json.dumps(body).encode(), headers={"Content-Type": STRATEGIC_MERGE})

    async def list_nodes(self, *, limit: int = 500, continue_token: str = "",
                         resource_version: str | None = None) -> NodeListPage:
        params: dict[str, str] = {"limit": str(limit)}
        if continue_token:
            params["continue"] = continue_token
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        out = await self._request("GET", "/api/v1/nodes", "list", "nodes", params=params)
        meta = out.get("metadata") or {}
        return NodeListPage(items=list(out.get("items") or []),
                            resource_version=str(meta.get("resourceVersion", "")),
                            continue_token=str(meta.get("continue") or ""))

    async def watch_nodes(self, resource_version: str, *, timeout_seconds: int = 300
                          ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Node events after `resource_version`, with bookmarks, until the server ends the
        watch (after `timeout_seconds`). An in-stream ERROR event is raised as
        KubeApiError (410 when the version is too old)."""
        params = {"watch": "1", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        # The server closes the stream itself; the read timeout only catches a peer that
        # vanished without a FIN (bookmarks arrive about once a minute).
        timeout = httpx2.Timeout(REQUEST_TIMEOUT, read=timeout_seconds + 60.0)
        try:
            async with self._http.stream("GET", "/api/v1/nodes", params=params,
                                         timeout=timeout) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise self._error(resp, "watch", "nodes")
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError as e:
                        raise KubeApiError(f"watch nodes: undecodable event: {e}") from None
                    typ = str(event.get("type", ""))
                    obj = event.get("object") or {}
                    if typ == "ERROR":
                        code = int(obj.get("code") or 0)
                        raise KubeApiError(
                            f"watch nodes: {code} {obj.get('reason', '')}: "
                            f"{obj.get('message', '')}", status=code,
                            reason=str(obj.get("reason") or ""), verb="watch",
                            resource="nodes")
                    yield typ, obj
        except (httpx2.HTTPError, OSError) as e:
            raise self._unreachable(e, "watch", "nodes") from None
