"""Desired objects for one HolySheepConfig: a pure function, shared by `render` and the controller.

Nothing here talks to a cluster, so `holysheep-mesh render` prints exactly what a reconcile
applies (minus the ownerReference, which needs the live object's uid).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from controller import naming
from protos.durations import format_duration
from protos.filter_config import (
    FILTER_NAME,
    HCM_TYPE,
    ext_proc_filter,
    ext_proc_per_route,
    local_reply_config,
    message_timeout_for,
)
from protos.spec import ConfigError, HealthCheckSpec, HolySheepConfig, ProviderSpec, apply_defaults

NETWORKING_V1 = "networking.istio.io/v1"
NETWORKING_V1ALPHA3 = "networking.istio.io/v1alpha3"
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
# Connecting is quick or hopeless: a provider that does not accept a TCP connection within 10s
# should be failed over, not waited for for the whole request timeout.
MAX_CONNECT_TIMEOUT = 10.0
RETRY_ON = "5xx,reset,connect-failure,retriable-status-codes,429"


@dataclass(frozen=True)
class RenderOptions:
    extproc_service: str = naming.DEFAULT_EXTPROC_SERVICE
    extproc_namespace: str = naming.DEFAULT_EXTPROC_NAMESPACE
    extproc_port: int = naming.DEFAULT_EXTPROC_PORT
    root_namespace: str = naming.DEFAULT_ROOT_NAMESPACE

    @property
    def extproc_cluster(self) -> str:
        return naming.extproc_cluster(self.extproc_service, self.extproc_namespace, self.extproc_port)


@dataclass(frozen=True)
class HostGroup:
    """Providers that share a host share the Istio objects: Istio keys them by host."""

    host: str
    scheme: str
    port: int
    providers: tuple[ProviderSpec, ...]

    @property
    def mesh_port(self) -> int:
        # HTTPS providers are reached by apps as plain http://host/ (port 80) and the sidecar
        # originates TLS; that is what lets ext_proc see and rewrite the request.
        return 80 if self.scheme == "https" else self.port

    @property
    def route_stem(self) -> str:
        return self.providers[0].name


def host_groups(cfg: HolySheepConfig) -> list[HostGroup]:
    by_host: dict[str, list[ProviderSpec]] = {}
    for p in cfg.providers:
        by_host.setdefault(p.host, []).append(p)
    groups = []
    for host in sorted(by_host):
        providers = by_host[host]
        first = providers[0]
        for other in providers[1:]:
            if (other.scheme, other.port) != (first.scheme, first.port):
                raise ConfigError(
                    f"{cfg.namespace}/{cfg.name}",
                    "spec.providers",
                    f"providers {first.name!r} and {other.name!r} share host {host!r} with different "
                    "scheme or port; the mesh routes by host, so they must agree",
                )
        groups.append(HostGroup(host=host, scheme=first.scheme, port=first.port, providers=tuple(providers)))
    return groups


def _meta(cfg: HolySheepConfig, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.namespace, "labels": naming.selector_labels(cfg.name)}


def _export_to(cfg: HolySheepConfig, opts: RenderOptions) -> list[str]:
    # Same reach as the EnvoyFilter: the CR's namespace, or the whole mesh from the root namespace.
    return ["*"] if cfg.namespace == opts.root_namespace else ["."]


def _group_timeout(cfg: HolySheepConfig, group: HostGroup) -> float:
    return max(cfg.timeout_for(p) for p in group.providers)


def service_entry(cfg: HolySheepConfig, group: HostGroup, opts: RenderOptions) -> dict[str, Any]:
    if group.scheme == "https":
        ports = [
            {"number": 80, "name": "http", "protocol": "HTTP", "targetPort": group.port},
            {"number": group.port, "name": "https", "protocol": "HTTPS"},
        ]
    else:
        ports = [{"number": group.port, "name": "http", "protocol": "HTTP"}]
    return {
        "apiVersion": NETWORKING_V1,
        "kind": "ServiceEntry",
        "metadata": _meta(cfg, naming.host_object_name(cfg.name, group.host)),
        "spec": {
            "hosts": [group.host],
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": ports,
            "exportTo": _export_to(cfg, opts),
        },
    }


def destination_rule(cfg: HolySheepConfig, group: HostGroup, opts: RenderOptions) -> dict[str, Any]:
    timeout = _group_timeout(cfg, group)
    policy: dict[str, Any] = {
        "connectionPool": {"tcp": {"connectTimeout": format_duration(min(timeout, MAX_CONNECT_TIMEOUT))}},
    }
    cb = cfg.circuit_breaker
    if cb.enabled:
        # Without active checks, Envoy's outlier detection still runs at the checks' default pace.
        interval = (cfg.health_check or HealthCheckSpec()).interval
        policy["outlierDetection"] = {
            "consecutive5xxErrors": cb.failure_threshold,
            "interval": format_duration(interval),
            "baseEjectionTime": format_duration(cb.reset_timeout),
            "maxEjectionPercent": 100,
        }
    if group.scheme == "https":
        # Only the port apps call in plain HTTP originates TLS; 443 stays pass-through.
        policy["portLevelSettings"] = [
            {"port": {"number": group.mesh_port}, "tls": {"mode": "SIMPLE", "sni": group.host}},
        ]
    return {
        "apiVersion": NETWORKING_V1,
        "kind": "DestinationRule",
        "metadata": _meta(cfg, naming.host_object_name(cfg.name, group.host)),
        "spec": {"host": group.host, "trafficPolicy": policy, "exportTo": _export_to(cfg, opts)},
    }


def _retries(cfg: HolySheepConfig, per_try: float) -> dict[str, Any]:
    if cfg.max_retries == 0:
        return {"attempts": 0}
    return {"attempts": cfg.max_retries, "perTryTimeout": format_duration(per_try), "retryOn": RETRY_ON}


def virtual_service(cfg: HolySheepConfig, group: HostGroup, opts: RenderOptions) -> dict[str, Any]:
    per_try = _group_timeout(cfg, group)
    destination = {"destination": {"host": group.host, "port": {"number": group.mesh_port}}}

    route: dict[str, Any] = {
        # Named, so the EnvoyFilter can switch the ext_proc filter on for exactly this route.
        "name": naming.route_name(group.route_stem),
        "route": [destination],
        # The route timeout spans every attempt; each attempt gets the provider's timeout.
        "timeout": format_duration(per_try * (cfg.max_retries + 1)),
        "retries": _retries(cfg, per_try),
    }
    return {
        "apiVersion": NETWORKING_V1,
        "kind": "VirtualService",
        "metadata": _meta(cfg, naming.host_object_name(cfg.name, group.host)),
        "spec": {
            "hosts": [group.host],
            "exportTo": _export_to(cfg, opts),
            "http": [route],
        },
    }


def envoy_filter(cfg: HolySheepConfig, groups: list[HostGroup], opts: RenderOptions) -> dict[str, Any]:
    slowest = max(cfg.timeout_for(p) for p in cfg.providers)
    filter_value = ext_proc_filter(opts.extproc_cluster, message_timeout_for(slowest, cfg.max_retries))
    patches: list[dict[str, Any]] = []
    ports = sorted({g.mesh_port for g in groups})
    for port in ports:
        patches.append(
            {
                "applyTo": "HTTP_FILTER",
                "match": {
                    "context": "SIDECAR_OUTBOUND",
                    "listener": {
                        "portNumber": port,
                        "filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}},
                    },
                },
                "patch": {"operation": "INSERT_BEFORE", "value": filter_value},
            }
        )
    for group in groups:
        patches.append(
            {
                "applyTo": "HTTP_ROUTE",
                "match": {
                    "context": "SIDECAR_OUTBOUND",
                    "routeConfiguration": {
                        "portNumber": group.mesh_port,
                        "vhost": {
                            # Istio names outbound virtual hosts "<host>:<port>".
                            "name": f"{group.host}:{group.mesh_port}",
                            "route": {"name": naming.route_name(group.route_stem)},
                        },
                    },
                },
                "patch": {
                    "operation": "MERGE",
                    "value": {"typed_per_filter_config": {FILTER_NAME: ext_proc_per_route()}},
                },
            }
        )
    for port in ports:
        # Envoy's own replies on this port become OpenAI-style errors, for this config's hosts only.
        hosts = [h for g in groups if g.mesh_port == port for h in (g.host, f"{g.host}:{port}")]
        patches.append(
            {
                "applyTo": "NETWORK_FILTER",
                "match": {
                    "context": "SIDECAR_OUTBOUND",
                    "listener": {"portNumber": port, "filterChain": {"filter": {"name": HCM}}},
                },
                "patch": {
                    "operation": "MERGE",
                    "value": {"typed_config": {"@type": HCM_TYPE, "local_reply_config": local_reply_config(hosts)}},
                },
            }
        )
    spec: dict[str, Any] = {}
    labels = cfg.workload_selector.match_labels if cfg.workload_selector else {}
    if labels:
        spec["workloadSelector"] = {"labels": dict(sorted(labels.items()))}
    spec["configPatches"] = patches
    return {
        "apiVersion": NETWORKING_V1ALPHA3,
        "kind": "EnvoyFilter",
        "metadata": _meta(cfg, naming.envoyfilter_name(cfg.name)),
        "spec": spec,
    }


def data_plane_document(cfg: HolySheepConfig) -> dict[str, Any]:
    """The CR as the data plane reads it; defaults filled in so file and cluster agree."""
    spec = apply_defaults(dict(cfg.raw.get("spec") or {}))
    return {
        "apiVersion": cfg.raw.get("apiVersion"),
        "kind": cfg.raw.get("kind"),
        "metadata": {"name": cfg.name, "namespace": cfg.namespace},
        "spec": spec,
    }


def config_map(cfg: HolySheepConfig) -> dict[str, Any]:
    text = yaml.safe_dump(data_plane_document(cfg), sort_keys=True, default_flow_style=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, naming.configmap_name(cfg.name)),
        "data": {naming.CONFIGMAP_KEY: text},
    }


def render_config(cfg: HolySheepConfig, opts: RenderOptions | None = None) -> list[dict[str, Any]]:
    opts = opts or RenderOptions()
    groups = host_groups(cfg)
    objects: list[dict[str, Any]] = [config_map(cfg)]
    for group in groups:
        objects += [
            service_entry(cfg, group, opts),
            destination_rule(cfg, group, opts),
            virtual_service(cfg, group, opts),
        ]
    objects.append(envoy_filter(cfg, groups, opts))
    return objects


def render_all(configs: Iterable[HolySheepConfig], opts: RenderOptions | None = None) -> list[dict[str, Any]]:
    return [obj for cfg in configs for obj in render_config(cfg, opts)]


class _Dumper(yaml.SafeDumper):
    """Plain, diff-friendly YAML: no anchors, multi-line strings (the ConfigMap) as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_stream(objects: Iterable[dict[str, Any]]) -> str:
    return yaml.dump_all(list(objects), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
