"""Envoy bootstrap for the local stack, built from the same HolySheepConfig the mesh uses.

It mirrors what Istio gives a sidecar: one virtual host and cluster per provider host, the
ext_proc filter disabled by default and switched on only on provider routes, and an entry
virtual host for apps that call the local listener directly. With ``extproc_tls`` Envoy calls
the ext_proc over mTLS as a sidecar calls a mesh service: it presents a workload certificate
(its SPIFFE ID is the identity the ext_proc authorizes) and checks the ext_proc's certificate
against a CA and the ext_proc's SPIFFE ID, both from SDS files it watches (rotation without a
restart).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from protos.durations import proto_duration
from protos.filter_config import (
    HCM_TYPE,
    ext_proc_filter,
    ext_proc_per_route,
    local_reply_config,
    message_timeout_for,
)
from protos.spec import HolySheepConfig, ProviderSpec

EXTPROC_CLUSTER = "holysheep-extproc"
BUFFER_LIMIT = 16 << 20  # above the processor's own 8 MiB limit, so it answers 413 in OpenAI form
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAX_STREAMS = 1024  # Envoy's default max_requests per cluster, stated: the ext_proc cluster's retry cap too

_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

NO_ROUTE_BODY = json.dumps({"error": {
    "message": "No AI provider matches this request; call an OpenAI-compatible endpoint with a JSON body",
    "type": "invalid_request_error", "param": None, "code": "unknown_endpoint",
}})


@dataclass
class Passthrough:
    """A non-AI upstream reachable through the same listener, untouched by ext_proc."""

    domain: str
    address: str
    port: int


WORKLOAD_SECRET = "holysheep-workload"  # the SDS secret names, as the SDS files spell them
CA_SECRET = "holysheep-trusted-ca"


@dataclass(frozen=True)
class UpstreamTLS:
    """mTLS from Envoy to the ext_proc: SDS files (``{"resources": [Secret]}``) with Envoy's
    certificate (secret WORKLOAD_SECRET) and the CAs it trusts (secret CA_SECRET), and the
    URI SAN the ext_proc's certificate must carry."""

    certificate_sds: str
    validation_sds: str
    server_uri_san: str
    sni: str = "localhost"


def _sds(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"path_config_source": {"path": path}, "resource_api_version": "V3"}}


def extproc_transport_socket(tls: UpstreamTLS) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS,
            "sni": tls.sni,
            "common_tls_context": {
                "alpn_protocols": ["h2"],  # gRPC
                "tls_certificate_sds_secret_configs": [_sds(WORKLOAD_SECRET, tls.certificate_sds)],
                "combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": tls.server_uri_san}}]},
                    "validation_context_sds_secret_config": _sds(CA_SECRET, tls.validation_sds),
                },
            },
        },
    }


@dataclass
class BootstrapOptions:
    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 9901
    extproc_addresses: Sequence[tuple[str, int]] = (("127.0.0.1", 9002),)
    passthrough: Sequence[Passthrough] = field(default_factory=list)
    # What Istio puts on a sidecar's node (NAMESPACE, WORKLOAD_NAME): lets the local stack act
    # as a given workload, for per-workload metrics and cache scope.
    node_metadata: dict[str, str] = field(default_factory=dict)
    # mTLS to the ext_proc (None: plaintext, for an ext_proc run with --insecure-no-identity).
    extproc_tls: UpstreamTLS | None = None


def _cluster_name(provider: ProviderSpec) -> str:
    return f"provider-{provider.name}"


def _endpoint(address: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _provider_cluster(provider: ProviderSpec, connect_timeout: float) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": _cluster_name(provider),
        "type": "STATIC" if _is_ip(provider.host) else "STRICT_DNS",
        "connect_timeout": proto_duration(min(connect_timeout, 5.0)),
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
        "load_assignment": {
            "cluster_name": _cluster_name(provider),
            "endpoints": [{"lb_endpoints": [_endpoint(provider.host, provider.port)]}],
        },
    }
    if provider.scheme == "https":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TLS,
                "sni": provider.host,
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": CA_BUNDLE}}},
            },
        }
    return cluster


def build_bootstrap(configs: Sequence[HolySheepConfig], options: BootstrapOptions) -> dict[str, Any]:
    per_route = {"envoy.filters.http.ext_proc": ext_proc_per_route()}
    vhosts: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    longest = 1.0
    for cfg in configs:
        longest = max(longest, message_timeout_for(max(cfg.timeout_for(p) for p in cfg.providers), cfg.max_retries))
        for provider in cfg.providers:
            timeout = cfg.timeout_for(provider)
            clusters.append(_provider_cluster(provider, timeout))
            vhosts.append({
                "name": _cluster_name(provider),
                "domains": sorted({provider.authority, f"{provider.host}:{provider.port}"}),
                "typed_per_filter_config": per_route,
                "routes": [{
                    "match": {"prefix": "/"},
                    "route": {"cluster": _cluster_name(provider), "timeout": proto_duration(timeout)},
                }],
            })
    for i, extra in enumerate(options.passthrough):
        name = f"passthrough-{i}"
        clusters.append({
            "name": name, "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [_endpoint(extra.address, extra.port)]}],
            },
        })
        vhosts.append({"name": name, "domains": [extra.domain],
                       "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}]})
    # Apps that call the listener itself: ext_proc picks the provider; without a pick, a 404.
    vhosts.append({
        "name": "holysheep-entry",
        "domains": ["*"],
        "typed_per_filter_config": per_route,
        "routes": [{
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": NO_ROUTE_BODY}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        }],
    })
    clusters.append({
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        # The active health check alone decides who gets streams: a replica that stops turns
        # NOT_SERVING at SIGTERM (and keeps serving for its --drain-delay-seconds), so it leaves
        # the rotation within a second, and a restarted one rejoins at its first SERVING answer.
        # No outlier detection: ejecting on errors would also eject a healthy replica for the
        # errors of the requests it serves, and keep a restarted one out for its ejection time.
        "health_checks": [{
            "timeout": "0.5s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
            "no_traffic_interval": "1s", "grpc_health_check": {},
        }],
        # Envoy holds back a health change that comes within update_merge_window (default 1 s)
        # of the previous one: in a rolling restart the worker threads would go on picking the
        # replica that just went NOT_SERVING, and not the one that just came back, for up to
        # a second. A handful of replicas gains nothing from merging.
        "common_lb_config": {"update_merge_window": "0s"},
        # While a replica goes away every stream in flight may be a retry (the filter's
        # retry_policy): Envoy's default cap of 3 concurrent retries per cluster would fail the
        # rest outright (upstream_rq_retry_overflow). As many retries as requests may be pending.
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_requests": MAX_STREAMS,
                                             "max_retries": MAX_STREAMS}]},
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [{"lb_endpoints": [_endpoint(a, p) for a, p in options.extproc_addresses]}],
        },
    })
    if options.extproc_tls is not None:
        clusters[-1]["transport_socket"] = extproc_transport_socket(options.extproc_tls)
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "egress",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "local_reply_config": local_reply_config(),
        "route_config": {"name": "egress", "virtual_hosts": vhosts},
        "http_filters": [
            ext_proc_filter(EXTPROC_CLUSTER, longest),
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": options.admin_port}}},
        "node": {"id": "holysheep-dev", "cluster": "holysheep-dev", "metadata": dict(options.node_metadata)},
        "static_resources": {
            "listeners": [{
                "name": "egress",
                "address": {"socket_address": {"address": options.listen_address, "port_value": options.listen_port}},
                "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
                "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm},
                ]}],
            }],
            "clusters": clusters,
        },
    }
