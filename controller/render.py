"""Desired objects for one HolySheepConfig: a pure function, shared by `render` and the controller.

Nothing here talks to a cluster, so `holysheep-mesh render` prints exactly what a reconcile
applies (minus the ownerReference, which needs the live object's uid).

Two egress modes (spec.egress.mode):

- Sidecar: every app sidecar in reach gets the ext_proc filter (EnvoyFilter SIDECAR_OUTBOUND)
  and originates TLS to the provider itself.
- Gateway: Istio's "egress TLS origination via an egress gateway" pattern. Sidecars send the
  provider hosts over mesh mTLS (DestinationRule ISTIO_MUTUAL, SNI = the host) to the egress
  gateway (Gateway, VirtualService mesh -> gateway -> provider); only the gateway has the
  ext_proc filter (EnvoyFilter GATEWAY, in the gateway's namespace) and originates TLS.

Either way an AuthorizationPolicy in the ext_proc's namespace opens its gRPC port to exactly
the callers of the config: its scope's service accounts, or in Gateway mode the gateway's.
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
    GATEWAY_REQUEST_ATTRIBUTES,
    HCM_TYPE,
    ext_proc_filter,
    ext_proc_per_route,
    local_reply_config,
    message_timeout_for,
)
from protos.spec import ConfigError, HealthCheckSpec, HolySheepConfig, ProviderSpec, apply_defaults

NETWORKING_V1 = "networking.istio.io/v1"
NETWORKING_V1ALPHA3 = "networking.istio.io/v1alpha3"
SECURITY_V1 = "security.istio.io/v1"
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
# Connecting is quick or hopeless: a provider that does not accept a TCP connection within 10s
# should be failed over, not waited for for the whole request timeout.
MAX_CONNECT_TIMEOUT = 10.0
RETRY_ON = "5xx,reset,connect-failure,retriable-status-codes,429"
# Gateway mode: the sidecar retries only what never reached the gateway's router; everything
# else (failover, 5xx, 429) is the gateway's job, and a second try from here would pay twice.
SIDECAR_TO_GATEWAY_RETRY_ON = "connect-failure,refused-stream"
# The egress gateway Service's port the sidecars use (Istio's egress gateway exposes 80 and 443;
# port 80 with protocol HTTPS + ISTIO_MUTUAL is the pattern of Istio's TLS origination task).
GATEWAY_PORT = 80


@dataclass(frozen=True)
class RenderOptions:
    extproc_service: str = naming.DEFAULT_EXTPROC_SERVICE
    extproc_namespace: str = naming.DEFAULT_EXTPROC_NAMESPACE
    extproc_port: int = naming.DEFAULT_EXTPROC_PORT
    root_namespace: str = naming.DEFAULT_ROOT_NAMESPACE
    extproc_selector: tuple[tuple[str, str], ...] = naming.DEFAULT_EXTPROC_SELECTOR

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


def _meta(cfg: HolySheepConfig, name: str, namespace: str | None = None) -> dict[str, Any]:
    """Metadata in the CR's namespace, or (``namespace``) in another one, labelled with the CR's
    namespace too: the controller prunes those by label (no ownerReference across namespaces)."""
    if namespace is None or namespace == cfg.namespace:
        return {"name": name, "namespace": cfg.namespace, "labels": naming.selector_labels(cfg.name)}
    return {"name": name, "namespace": namespace, "labels": naming.remote_labels(cfg.name, cfg.namespace)}


def _gateway_mode(cfg: HolySheepConfig) -> bool:
    return cfg.egress.mode == "Gateway"


def _export_to(cfg: HolySheepConfig, opts: RenderOptions) -> list[str]:
    # Same reach as the EnvoyFilter: the CR's namespace, or the whole mesh from the root namespace.
    return ["*"] if cfg.namespace == opts.root_namespace else ["."]


def _export_to_sidecars_and_gateway(cfg: HolySheepConfig, opts: RenderOptions) -> list[str]:
    """Gateway mode: what the sidecars in scope and the egress gateway both need to see."""
    reach = _export_to(cfg, opts)
    gateway_ns = cfg.egress.gateway.namespace
    if reach == ["*"] or gateway_ns == cfg.namespace:
        return reach
    return [*reach, gateway_ns]


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
            "exportTo": _export_to_sidecars_and_gateway(cfg, opts) if _gateway_mode(cfg) else _export_to(cfg, opts),
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
    export_to = _export_to(cfg, opts)
    if _gateway_mode(cfg):
        # The gateway originates TLS on the provider's own port, as in Istio's egress TLS
        # origination task. Only the gateway sees this rule: an app's sidecar that calls the
        # provider's port itself keeps it pass-through (no TLS inside TLS).
        export_to = [cfg.egress.gateway.namespace]
        if group.scheme == "https":
            policy["portLevelSettings"] = [
                {"port": {"number": group.port}, "tls": {"mode": "SIMPLE", "sni": group.host}},
            ]
    elif group.scheme == "https":
        # Only the port apps call in plain HTTP originates TLS; 443 stays pass-through.
        policy["portLevelSettings"] = [
            {"port": {"number": group.mesh_port}, "tls": {"mode": "SIMPLE", "sni": group.host}},
        ]
    return {
        "apiVersion": NETWORKING_V1,
        "kind": "DestinationRule",
        "metadata": _meta(cfg, naming.host_object_name(cfg.name, group.host)),
        "spec": {"host": group.host, "trafficPolicy": policy, "exportTo": export_to},
    }


def _retries(cfg: HolySheepConfig, per_try: float) -> dict[str, Any]:
    if cfg.max_retries == 0:
        return {"attempts": 0}
    return {"attempts": cfg.max_retries, "perTryTimeout": format_duration(per_try), "retryOn": RETRY_ON}


def virtual_service(cfg: HolySheepConfig, group: HostGroup, opts: RenderOptions) -> dict[str, Any]:
    per_try = _group_timeout(cfg, group)
    # The route timeout spans every attempt; each attempt gets the provider's timeout.
    timeout = format_duration(per_try * (cfg.max_retries + 1))
    if _gateway_mode(cfg):
        return _virtual_service_via_gateway(cfg, group, opts, per_try, timeout)
    route = _provider_route(cfg, group, per_try, timeout, port=group.mesh_port)
    return _virtual_service_object(cfg, group, {"exportTo": _export_to(cfg, opts), "http": [route]})


def _provider_route(
    cfg: HolySheepConfig, group: HostGroup, per_try: float, timeout: str, port: int,
    match: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The route that reaches the provider, with the CR's retries (from the sidecar, or from the
    gateway in the egress-gateway mode)."""
    # Named, so the (sidecar's or gateway's) EnvoyFilter can switch the ext_proc filter on for
    # exactly this route.
    route: dict[str, Any] = {"name": naming.route_name(group.route_stem)}
    if match is not None:
        route["match"] = match
    route["route"] = [{"destination": {"host": group.host, "port": {"number": port}}}]
    route["timeout"] = timeout
    route["retries"] = _retries(cfg, per_try)
    return route


def _virtual_service_object(cfg: HolySheepConfig, group: HostGroup, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": NETWORKING_V1,
        "kind": "VirtualService",
        "metadata": _meta(cfg, naming.host_object_name(cfg.name, group.host)),
        "spec": {"hosts": [group.host], **spec},
    }


def _gateway_ref(cfg: HolySheepConfig) -> str:
    return f"{cfg.namespace}/{naming.gateway_name(cfg.name)}"


def _virtual_service_via_gateway(
    cfg: HolySheepConfig, group: HostGroup, opts: RenderOptions, per_try: float, timeout: str
) -> dict[str, Any]:
    gw = cfg.egress.gateway
    from_sidecars: dict[str, Any] = {"gateways": ["mesh"], "port": group.mesh_port}
    labels = cfg.workload_selector.match_labels if cfg.workload_selector else {}
    if labels:  # the Sidecar mode's workloadSelector: only these workloads' sidecars use the route
        from_sidecars["sourceLabels"] = dict(sorted(labels.items()))
    to_gateway: dict[str, Any] = {
        "name": f"{naming.route_name(group.route_stem)}-to-gateway",
        "match": [from_sidecars],
        "route": [{"destination": {
            "host": naming.service_host(gw.service, gw.namespace),
            "subset": naming.subset_name(group.route_stem),
            "port": {"number": GATEWAY_PORT},
        }}],
        "timeout": timeout,
        "retries": {"attempts": 2, "retryOn": SIDECAR_TO_GATEWAY_RETRY_ON},
    }
    to_provider = _provider_route(
        cfg, group, per_try, timeout, port=group.port,
        match=[{"gateways": [_gateway_ref(cfg)], "port": GATEWAY_PORT}],
    )
    return _virtual_service_object(cfg, group, {
        "gateways": ["mesh", _gateway_ref(cfg)],
        "exportTo": _export_to_sidecars_and_gateway(cfg, opts),
        "http": [to_gateway, to_provider],
    })


def gateway(cfg: HolySheepConfig, groups: list[HostGroup]) -> dict[str, Any]:
    """The egress gateway's servers: one per provider host (one filter chain each, matched by SNI),
    mesh mTLS from the sidecars. "./host": only VirtualServices of the CR's namespace bind here."""
    servers = [
        {
            "port": {"number": GATEWAY_PORT, "name": naming.gateway_port_name(g.route_stem), "protocol": "HTTPS"},
            "hosts": [f"./{g.host}"],
            "tls": {"mode": "ISTIO_MUTUAL"},
        }
        for g in groups
    ]
    return {
        "apiVersion": NETWORKING_V1,
        "kind": "Gateway",
        "metadata": _meta(cfg, naming.gateway_name(cfg.name)),
        "spec": {"selector": dict(sorted(cfg.egress.gateway.selector.items())), "servers": servers},
    }


def egress_gateway_rule(cfg: HolySheepConfig, groups: list[HostGroup], opts: RenderOptions) -> dict[str, Any]:
    """How sidecars reach the egress gateway: mesh mTLS with the provider host as SNI, which
    picks the gateway server (and filter chain) of that host."""
    gw = cfg.egress.gateway
    subsets = [
        {
            "name": naming.subset_name(g.route_stem),
            "trafficPolicy": {"portLevelSettings": [
                {"port": {"number": GATEWAY_PORT}, "tls": {"mode": "ISTIO_MUTUAL", "sni": g.host}},
            ]},
        }
        for g in groups
    ]
    return {
        "apiVersion": NETWORKING_V1,
        "kind": "DestinationRule",
        "metadata": _meta(cfg, naming.egress_gateway_rule_name(cfg.name)),
        "spec": {
            "host": naming.service_host(gw.service, gw.namespace),
            "exportTo": _export_to(cfg, opts),
            "subsets": subsets,
        },
    }


def _message_timeout(cfg: HolySheepConfig) -> float:
    slowest = max(cfg.timeout_for(p) for p in cfg.providers)
    return message_timeout_for(slowest, cfg.max_retries)


def envoy_filter(cfg: HolySheepConfig, groups: list[HostGroup], opts: RenderOptions) -> dict[str, Any]:
    if _gateway_mode(cfg):
        return gateway_envoy_filter(cfg, groups, opts)
    filter_value = ext_proc_filter(opts.extproc_cluster, _message_timeout(cfg))
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


def gateway_envoy_filter(cfg: HolySheepConfig, groups: list[HostGroup], opts: RenderOptions) -> dict[str, Any]:
    """The ext_proc filter in the egress gateway only, in the gateway's namespace (a workloadSelector
    selects only in its own namespace). Each provider host has its own filter chain on the
    gateway (its Gateway server, matched by SNI), so each patch lands exactly once and in no
    other egress traffic of the gateway."""
    gw = cfg.egress.gateway
    filter_value = ext_proc_filter(
        opts.extproc_cluster, _message_timeout(cfg), request_attributes=GATEWAY_REQUEST_ATTRIBUTES
    )
    patches: list[dict[str, Any]] = []
    for group in groups:
        chain = {"sni": group.host, "filter": {"name": HCM, "subFilter": {"name": ROUTER}}}
        patches.append({
            "applyTo": "HTTP_FILTER",
            "match": {"context": "GATEWAY", "listener": {"filterChain": chain}},
            "patch": {"operation": "INSERT_BEFORE", "value": filter_value},
        })
    for group in groups:
        patches.append({
            "applyTo": "HTTP_ROUTE",
            "match": {
                "context": "GATEWAY",
                "routeConfiguration": {
                    "portNumber": GATEWAY_PORT,
                    "portName": naming.gateway_port_name(group.route_stem),
                    "gateway": _gateway_ref(cfg),
                    # A gateway names its virtual hosts "<host>:<server port>".
                    "vhost": {
                        "name": f"{group.host}:{GATEWAY_PORT}",
                        "route": {"name": naming.route_name(group.route_stem)},
                    },
                },
            },
            "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {FILTER_NAME: ext_proc_per_route()}}},
        })
    for group in groups:
        hosts = [group.host, f"{group.host}:{group.mesh_port}"]
        patches.append({
            "applyTo": "NETWORK_FILTER",
            "match": {"context": "GATEWAY", "listener": {"filterChain": {"sni": group.host, "filter": {"name": HCM}}}},
            "patch": {
                "operation": "MERGE",
                "value": {"typed_config": {"@type": HCM_TYPE, "local_reply_config": local_reply_config(hosts)}},
            },
        })
    return {
        "apiVersion": NETWORKING_V1ALPHA3,
        "kind": "EnvoyFilter",
        "metadata": _meta(cfg, naming.remote_name(cfg.namespace, cfg.name), gw.namespace),
        "spec": {"workloadSelector": {"labels": dict(sorted(gw.selector.items()))}, "configPatches": patches},
    }


def _sources(cfg: HolySheepConfig, opts: RenderOptions) -> tuple[list[dict[str, Any]], str | None]:
    """AuthorizationPolicy sources for the config's callers, and why they are wider, if they are.

    ``spec.serviceAccounts`` uses Istio's own match forms (protos/scope.py), so they map as is:
    in the config's namespace N, ``sa`` and ``pre*`` are principals ``cluster.local/ns/N/sa/…``,
    ``*suf`` is principal ``*suf`` together with namespace N (a principal ends with its service
    account), ``*`` is namespace N. In the root namespace (any namespace) ``sa`` is ``*/sa/sa`` and
    ``*suf`` is ``*suf``; ``pre*`` would need a wildcard in the middle, which Istio does not match,
    so the policy admits every mesh identity and the ext_proc enforces the prefix (it checks the
    same scope on every request: extproc/authz.py).
    """
    if _gateway_mode(cfg):
        gw = cfg.egress.gateway
        return [{"principals": [naming.principal(gw.namespace, gw.service_account)]}], None
    patterns = list(cfg.service_accounts) or ["*"]
    if cfg.namespace == opts.root_namespace:
        widened = [p for p in patterns if p != "*" and p.endswith("*")]
        if "*" in patterns or widened:
            note = None
            if widened and "*" not in patterns:
                note = (f"spec.serviceAccounts {', '.join(widened)}: a prefix in any namespace is not an Istio match; "
                        "this policy admits every mesh identity and the ext_proc enforces the prefix")
            return [{"principals": ["*"]}], note
        return [{"principals": [p if p.startswith("*") else f"*/sa/{p}" for p in patterns]}], None
    if "*" in patterns:
        return [{"namespaces": [cfg.namespace]}], None
    exact_or_prefix = [naming.principal(cfg.namespace, p) for p in patterns if not p.startswith("*")]
    suffixes = [p for p in patterns if p.startswith("*")]
    sources: list[dict[str, Any]] = []
    if exact_or_prefix:
        sources.append({"principals": exact_or_prefix})
    if suffixes:
        sources.append({"namespaces": [cfg.namespace], "principals": suffixes})
    return sources, None


def authorization_policy(cfg: HolySheepConfig, opts: RenderOptions) -> dict[str, Any]:
    """ALLOW the config's callers on the ext_proc's gRPC port, in the ext_proc's namespace.

    ALLOW policies add up: a caller gets in when any config's policy (or the install's baseline
    for the admin port, mesh/base/authorization.yaml) admits it, and with that baseline in place
    a port no policy names is closed, also when no config exists."""
    sources, note = _sources(cfg, opts)
    meta = _meta(cfg, naming.remote_name(cfg.namespace, cfg.name), opts.extproc_namespace)
    if note:
        meta["annotations"] = {naming.WIDENED_ANNOTATION: note}
    return {
        "apiVersion": SECURITY_V1,
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": dict(opts.extproc_selector)},
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": s} for s in sources],
                "to": [{"operation": {"ports": [str(opts.extproc_port)]}}],
            }],
        },
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
    if _gateway_mode(cfg):
        objects += [gateway(cfg, groups), egress_gateway_rule(cfg, groups, opts)]
    objects.append(envoy_filter(cfg, groups, opts))
    objects.append(authorization_policy(cfg, opts))
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
