"""A small typed REST layer over the `kubernetes` client's transport (auth, TLS, proxies).

The generated API classes cover neither server-side apply with a field manager on custom
resources nor metadata-only reads, so requests are built here from (group, version, plural).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes.client import ApiClient

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
# Asks for metadata only: the API server never sends a Secret's data for this Accept header.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if sub:
            base += f"/{sub}"
        return base


HOLYSHEEPCONFIGS = Resource("holysheep.ai", "v1", "holysheepconfigs", "HolySheepConfig")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
SECRETS = Resource("", "v1", "secrets", "Secret")
EVENTS = Resource("", "v1", "events", "Event")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
SERVICEENTRIES = Resource("networking.istio.io", "v1", "serviceentries", "ServiceEntry")
DESTINATIONRULES = Resource("networking.istio.io", "v1", "destinationrules", "DestinationRule")
VIRTUALSERVICES = Resource("networking.istio.io", "v1", "virtualservices", "VirtualService")
ENVOYFILTERS = Resource("networking.istio.io", "v1alpha3", "envoyfilters", "EnvoyFilter")
GATEWAYS = Resource("networking.istio.io", "v1", "gateways", "Gateway")
AUTHORIZATIONPOLICIES = Resource("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy")

# Every kind the controller generates, in apply order (config before the objects that use it;
# the ext_proc's ALLOW before the EnvoyFilter that makes proxies call it).
GENERATED = (
    CONFIGMAPS, SERVICEENTRIES, DESTINATIONRULES, VIRTUALSERVICES, GATEWAYS, AUTHORIZATIONPOLICIES, ENVOYFILTERS,
)
BY_KIND = {r.kind: r for r in GENERATED}


class KubeError(Exception):
    """A request the API server refused. The subclasses say how; `reason` is the Status object's
    machine-readable reason ("NotFound", "AlreadyExists", "Expired") or else the HTTP reason."""

    def __init__(self, status: int, reason: str, body: Any = None) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        message = body.get("message") if isinstance(body, dict) else None
        super().__init__(f"{status} {reason}: {message or body}")


class BadRequest(KubeError):
    """400: a malformed request (our bug, not the cluster's)."""


class Unauthorized(KubeError):
    """401: the credentials are missing or no longer valid."""


class Forbidden(KubeError):
    """403: RBAC (or an admission webhook) does not allow this request."""


class NotFound(KubeError):
    """404."""


class Conflict(KubeError):
    """409: a stale resourceVersion, a failed precondition, or (subclass) a name already taken."""


class AlreadyExists(Conflict):
    """409 with reason AlreadyExists: a create lost to an object of the same name."""


class Gone(KubeError):
    """410: the resourceVersion asked for was compacted away (a watch must list again)."""


class Invalid(KubeError):
    """422: the object fails validation (schema, admission)."""


class TooManyRequests(KubeError):
    """429: API priority and fairness throttled us; retry later."""


class ServerError(KubeError):
    """5xx: the API server (or etcd, or a webhook) failed; retry later."""


_BY_STATUS: dict[int, type[KubeError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
    429: TooManyRequests,
}


def error_for(status: int, http_reason: str, body: Any) -> KubeError:
    """The typed error for an API server answer (a failed response or a watch ERROR event)."""
    reason = str(body.get("reason") or "") if isinstance(body, dict) else ""
    if status == 409 and reason == "AlreadyExists":
        cls: type[KubeError] = AlreadyExists
    elif status >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(status, KubeError)
    return cls(status, reason or http_reason, body)


class Kube:
    def __init__(self, api: ApiClient, user_agent: str = "holysheep-mesh") -> None:
        self.api = api
        self.user_agent = user_agent

    def _url(self, path: str, query: Mapping[str, Any] | None) -> str:
        q = {
            k: ("true" if v is True else "false" if v is False else v)
            for k, v in (query or {}).items()
            if v is not None
        }
        return self.api.configuration.host.rstrip("/") + path + (f"?{urlencode(q)}" if q else "")

    def _headers(self, accept: str, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": self.user_agent}
        if content_type:
            headers["Content-Type"] = content_type
        token = self.api.configuration.get_api_key_with_prefix(
            "authorization"
        ) or self.api.configuration.get_api_key_with_prefix("BearerToken")
        if token:
            headers["Authorization"] = token
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        accept: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        if body is not None and content_type is None:
            content_type = "application/json"
        # The transport serialises dict bodies for JSON and structured-YAML content types.
        resp = self.api.rest_client.request(
            method,
            self._url(path, query),
            headers=self._headers(accept, content_type),
            body=body,
            _request_timeout=timeout,
        )
        data = resp.read()
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = data.decode(errors="replace") if isinstance(data, bytes) else data
        if not 200 <= resp.status < 300:
            raise error_for(resp.status, resp.reason or "", decoded)
        return decoded

    # Typed helpers -------------------------------------------------------------------------

    def get(self, res: Resource, namespace: str | None, name: str, *, metadata_only: bool = False) -> Any:
        return self.request(
            "GET", res.path(namespace, name), accept=METADATA_ONLY if metadata_only else "application/json"
        )

    def list(self, res: Resource, namespace: str | None = None, label_selector: str | None = None) -> Any:
        return self.request("GET", res.path(namespace), query={"labelSelector": label_selector})

    def apply(self, obj: Mapping[str, Any], field_manager: str) -> Any:
        res = BY_KIND[obj["kind"]]
        meta = obj["metadata"]
        return self.request(
            "PATCH",
            res.path(meta["namespace"], meta["name"]),
            query={"fieldManager": field_manager, "force": True},
            body=obj,
            content_type=APPLY_PATCH,
        )

    def delete(self, res: Resource, namespace: str, name: str, uid: str | None = None) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
        }
        if uid:
            # Never delete an object that was replaced by someone else since we listed it.
            body["preconditions"] = {"uid": uid}
        self.request("DELETE", res.path(namespace, name), body=body)

    def patch_status(self, res: Resource, namespace: str, name: str, status: Mapping[str, Any]) -> Any:
        return self.request(
            "PATCH", res.path(namespace, name, "status"), body={"status": status}, content_type=MERGE_PATCH
        )

    def create(self, res: Resource, namespace: str, obj: Mapping[str, Any]) -> Any:
        return self.request("POST", res.path(namespace), body=obj)

    def replace(self, res: Resource, namespace: str, name: str, obj: Mapping[str, Any]) -> Any:
        return self.request("PUT", res.path(namespace, name), body=obj)

    def watch(
        self,
        res: Resource,
        namespace: str | None,
        resource_version: str,
        timeout_seconds: int,
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events; returns when the server ends the stream.

        An ERROR event (a Status object, such as 410 Expired) is raised as its typed error, so
        callers handle a failed watch the same way whether it failed at the start or midway.
        """
        query = {
            "watch": True,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": True,
            "timeoutSeconds": timeout_seconds,
        }
        resp = self.api.rest_client.request(
            "GET",
            self._url(res.path(namespace), query),
            headers=self._headers("application/json", None),
            _request_timeout=(10.0, timeout_seconds + 10.0),
        )
        raw = resp.response
        try:
            if not 200 <= resp.status < 300:
                data = resp.read()
                try:
                    body = json.loads(data)
                except ValueError:
                    body = data
                raise error_for(resp.status, resp.reason or "", body)
            buffer = b""
            for chunk in raw.stream(4096, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield _event(json.loads(line))
            if buffer.strip():
                yield _event(json.loads(buffer))
        finally:
            raw.release_conn()


def _event(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        code = status.get("code") if isinstance(status, dict) else None
        raise error_for(int(code or 500), "", status)
    return event
