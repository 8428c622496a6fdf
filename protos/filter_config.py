"""The ext_proc HTTP filter config, in Envoy's JSON form.

One definition serves the dev stack's bootstrap and the controller's EnvoyFilter, so the
sidecar and the local Envoy ask our server for exactly the same phases.
"""

from __future__ import annotations

from typing import Any

from extproc.durations import format_duration

FILTER_NAME = "envoy.filters.http.ext_proc"
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"

# Request headers are skipped: the buffered body carries everything we need (path and host come
# as attributes), so a request costs one gRPC round trip. Response phases are switched on per
# request with mode_override only when failover, usage or the cache need them.
BODY_MODE: dict[str, str] = {
    "request_header_mode": "SKIP",
    "request_body_mode": "BUFFERED",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SEND",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}
# Requests without a body (GET /models) never produce a body message, so routes that carry them
# ask for the request headers instead.
HEADERS_MODE: dict[str, str] = {**BODY_MODE, "request_header_mode": "SEND", "request_body_mode": "NONE"}

# Attributes the processor reads; Envoy evaluates them and sends them with the first message.
REQUEST_ATTRIBUTES = ("request.path", "request.host", "request.method", "xds.node")


def ext_proc_filter(cluster_name: str, message_timeout: float, *, disabled: bool = True) -> dict[str, Any]:
    """The HttpFilter entry. Disabled by default: only provider routes turn it on per route."""
    config: dict[str, Any] = {
        "@type": EXT_PROC_TYPE,
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}, "timeout": "5s"},
        # Fail closed: with no processor there is no credential, so a request must not go out.
        "failure_mode_allow": False,
        "message_timeout": format_duration(message_timeout),
        "max_message_timeout": format_duration(max(message_timeout, 1.0)),
        "allow_mode_override": True,
        "processing_mode": dict(BODY_MODE),
        "request_attributes": list(REQUEST_ATTRIBUTES),
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": False},
    }
    entry: dict[str, Any] = {"name": FILTER_NAME, "typed_config": config}
    if disabled:
        entry["disabled"] = True
    return entry


def ext_proc_per_route(mode: dict[str, str]) -> dict[str, Any]:
    """typed_per_filter_config value that enables the filter with a given processing mode."""
    return {"@type": PER_ROUTE_TYPE, "overrides": {"processing_mode": dict(mode)}}


def message_timeout_for(request_timeout: float, max_retries: int) -> float:
    """Failover fetches happen inside one ext_proc message, so allow every attempt plus slack."""
    return request_timeout * (max_retries + 1) + 5.0
