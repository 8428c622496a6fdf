"""The ext_proc HTTP filter config, in Envoy's JSON form.

One definition serves the dev stack's bootstrap and the controller's EnvoyFilter, so the
sidecar and the local Envoy ask our server for exactly the same phases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protos.durations import proto_duration

FILTER_NAME = "envoy.filters.http.ext_proc"
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
PREVIOUS_HOSTS_TYPE = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# The ext_proc stream's retry conditions (see ext_proc_filter).
RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,reset"

# Envoy 1.40 drops header mutations sent in a body response when the request-headers phase was
# skipped (and ignores mode_override there), so the headers are sent and answered at once with
# no work; the buffered body's response carries the routing and credential mutations. Response
# phases: headers always (failover needs the status), the body switched on per request with
# mode_override from the response-headers answer.
PROCESSING_MODE: dict[str, str] = {
    "request_header_mode": "SEND",
    "request_body_mode": "BUFFERED",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SEND",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}

# Node metadata Istio sets on every sidecar: the calling workload, for metrics and cache scope.
# Whole maps arrive as an unusable "CelMap value" string, so each key is asked for by name.
REQUEST_ATTRIBUTES = (
    "xds.node.metadata.NAMESPACE",
    "xds.node.metadata.WORKLOAD_NAME",
    "xds.node.metadata.NAME",
)
# Gateway mode: the egress gateway's node metadata describes the gateway, not the caller; the
# caller is the downstream peer certificate's URI SAN (the sidecar's mesh mTLS identity), which
# the ext_proc trusts only from the gateway's own authenticated identity (extproc/gateway_identity.py).
PEER_URI_SAN_ATTRIBUTE = "connection.uri_san_peer_certificate"
GATEWAY_REQUEST_ATTRIBUTES = (PEER_URI_SAN_ATTRIBUTE,)


def ext_proc_filter(cluster_name: str, message_timeout: float, *, disabled: bool = True,
                    request_attributes: Sequence[str] = REQUEST_ATTRIBUTES) -> dict[str, Any]:
    """The HttpFilter entry. Disabled by default: only provider routes turn it on per route.
    ``request_attributes``: GATEWAY_REQUEST_ATTRIBUTES for the egress gateway's filter."""
    config: dict[str, Any] = {
        "@type": EXT_PROC_TYPE,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": cluster_name},
            "timeout": "5s",
            # A processor replica that just went away must not cost the request: open the
            # stream on another host instead. Envoy can retry a stream only until its first
            # answer, so these cover exactly what a replica going away does to a stream it never
            # answered: a closed port (connect-failure), a stream past its GOAWAY
            # (refused-stream), a stream opened right at gRPC's stop(), answered CANCELLED, a
            # sidecar in front of a stopped server (UNAVAILABLE), a dropped connection (reset).
            # Envoy ignores unknown words here: tests/test_extproc_retry_policy.py proves each.
            "retry_policy": {
                "num_retries": 2,
                "retry_on": RETRY_ON,
                "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {"@type": PREVIOUS_HOSTS_TYPE},
                }],
                "host_selection_retry_max_attempts": 3,
            },
        },
        # Fail closed: with no processor there is no credential, so a request must not go out.
        "failure_mode_allow": False,
        "message_timeout": proto_duration(message_timeout),
        "max_message_timeout": proto_duration(max(message_timeout, 1.0)),
        "allow_mode_override": True,
        "processing_mode": dict(PROCESSING_MODE),
        "request_attributes": list(request_attributes),
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": False},
    }
    entry: dict[str, Any] = {"name": FILTER_NAME, "typed_config": config}
    if disabled:
        entry["disabled"] = True
    return entry


def ext_proc_per_route() -> dict[str, Any]:
    """typed_per_filter_config value that turns the (default-disabled) filter on for a vhost/route.

    The override repeats the whole mode because Envoy replaces, not merges, processing_mode.
    """
    return {"@type": PER_ROUTE_TYPE, "overrides": {"processing_mode": dict(PROCESSING_MODE)}}


def message_timeout_for(request_timeout: float, max_retries: int) -> float:
    """Failover fetches happen inside one ext_proc message, so allow every attempt plus slack."""
    return request_timeout * (max_retries + 1) + 5.0


CEL_FILTER = "envoy.access_loggers.extension_filters.cel"
CEL_FILTER_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
# Our own answers already are OpenAI-style: every ImmediateResponse's details start with
# "holysheep_", and the dev listener's catch-all 404 is a JSON direct_response.
_OURS = "response.code_details.startsWith('holysheep_') || response.code_details == 'direct_response'"


def local_reply_config(hosts: Sequence[str] = ()) -> dict[str, Any]:
    """HCM local_reply_config that turns Envoy's own text replies into OpenAI-style JSON errors.

    Envoy answers by itself when a provider cannot be reached, resets before its headers, times
    out, or when the ext_proc is gone (fail closed); clients of an OpenAI API should get the
    same error shape then. With `hosts` (the sidecar's shared outbound HCM) only requests to
    those authorities are rewritten, so other egress traffic keeps Envoy's usual replies.
    """
    scope = ""
    if hosts:
        scope = "request.host in [" + ", ".join(f"'{h}'" for h in sorted(set(hosts))) + "] && "

    def mapper(condition: str, error_type: str) -> dict[str, Any]:
        return {
            "filter": {"extension_filter": {
                "name": CEL_FILTER,
                "typed_config": {"@type": CEL_FILTER_TYPE, "expression": f"{scope}{condition}!({_OURS})"},
            }},
            "body_format_override": {"json_format": {"error": {
                "message": "%LOCAL_REPLY_BODY%",
                "type": error_type,
                "param": None,
                "code": "%RESPONSE_CODE_DETAILS%",
            }}},
        }

    return {"mappers": [mapper("response.code >= 500 && ", "server_error"), mapper("", "invalid_request_error")]}
