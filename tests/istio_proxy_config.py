"""What Istio would build for the egress gateway and for an app's sidecar from `render` output in
Gateway mode: the subset of Istio's translation that holysheep's objects use, as static Envoy
bootstraps, so a real Envoy can load (``envoy --mode validate``) or run them (tests/test_e2e_gateway.py).

The gateway: one filter chain per Gateway server, matched by its SNI host, terminating mesh mTLS
(ISTIO_MUTUAL: a client certificate from the mesh CA is required), with Istio's gateway HCM
(``forward_client_cert_details: SANITIZE_SET`` with Subject, Cert, URI and DNS, Istio's gateway
default) and a route configuration named as Istio names a gateway server's
(``https.<port>.<port name>.<gateway>.<namespace>``) holding the VirtualService routes bound to
that Gateway. The EnvoyFilter's patches are then applied the way istiod matches them (context
GATEWAY; a listener patch by its filter chain's SNI, a route patch by route configuration name
parts, virtual host and route name) and each must land exactly once.

The sidecar: a plain-HTTP outbound listener for the apps with the VirtualService routes bound to
``mesh``, whose cluster ``outbound|80|<subset>|<gateway host>`` speaks mesh mTLS with the
subset's SNI and checks the gateway's SPIFFE ID, as Istio's ISTIO_MUTUAL does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS_INSPECTOR = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}

Obj = dict[str, Any]


@dataclass
class Certs:
    """PEM files: this proxy's certificate and key, and the mesh CA it trusts."""

    cert: str
    key: str
    ca: str


@dataclass
class Endpoints:
    """Where the clusters point: (address, port) by cluster name; TLS to the ext_proc optional."""

    by_cluster: dict[str, tuple[str, int]] = field(default_factory=dict)
    extproc_transport_socket: Obj | None = None
    provider_ca: str | None = None  # trusted CA file for TLS origination to providers


def _kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def _one(objects: list[Obj], kind: str) -> Obj:
    (obj,) = _kind(objects, kind)
    return obj


def _cluster(name: str, address: tuple[str, int], **extra: Any) -> Obj:
    host, port = address
    return {
        "name": name, "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        **extra,
    }


def _route(http: Obj, cluster: str) -> Obj:
    route: Obj = {"cluster": cluster}
    if "timeout" in http:
        route["timeout"] = http["timeout"]
    return {"name": http["name"], "match": {"prefix": "/"}, "route": route}


def _tls_context(certs: Certs) -> Obj:
    return {
        "tls_certificates": [{"certificate_chain": {"filename": certs.cert}, "private_key": {"filename": certs.key}}],
        "validation_context": {"trusted_ca": {"filename": certs.ca}},
    }


def _gateway_rds_name(server: Obj, gateway: Obj) -> str:
    meta = gateway["metadata"]
    return f"https.{server['port']['number']}.{server['port']['name']}.{meta['name']}.{meta['namespace']}"


def _parse_rds_name(name: str) -> tuple[int, str, str]:
    """Istio's ParseGatewayRDSRouteName for an HTTPS server's route configuration."""
    _, port, port_name, gateway, namespace = name.split(".", 4)
    return int(port), port_name, f"{namespace}/{gateway}"


def _provider_clusters(objects: list[Obj], endpoints: Endpoints) -> list[Obj]:
    """outbound|<port>||<host> for every route the gateway sends to a provider, with the TLS
    origination of the provider's DestinationRule (port-level SIMPLE)."""
    tls_ports = {
        (dr["spec"]["host"], s["port"]["number"]): s["tls"]
        for dr in _kind(objects, "DestinationRule")
        for s in dr["spec"].get("trafficPolicy", {}).get("portLevelSettings", [])
        if s["tls"]["mode"] == "SIMPLE"
    }
    clusters = []
    for vs in _kind(objects, "VirtualService"):
        for http in vs["spec"]["http"]:
            if "mesh" in http["match"][0]["gateways"]:
                continue
            dest = http["route"][0]["destination"]
            name = f"outbound|{dest['port']['number']}||{dest['host']}"
            extra: Obj = {}
            tls = tls_ports.get((dest["host"], dest["port"]["number"]))
            if tls is not None:
                context: Obj = {"@type": UPSTREAM_TLS, "sni": tls["sni"]}
                if endpoints.provider_ca:
                    context["common_tls_context"] = {"validation_context": {
                        "trusted_ca": {"filename": endpoints.provider_ca}}}
                extra["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": context}
            clusters.append(_cluster(name, endpoints.by_cluster.get(name, ("127.0.0.1", 9)), **extra))
    return clusters


def _extproc_cluster(filter_value: Obj, endpoints: Endpoints) -> Obj:
    name = filter_value["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    extra: Obj = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}}
    if endpoints.extproc_transport_socket is not None:
        extra["transport_socket"] = endpoints.extproc_transport_socket
    return _cluster(name, endpoints.by_cluster.get(name, ("127.0.0.1", 9002)), **extra)


def _apply_once(patch: Obj, targets: list[Any], what: str) -> Any:
    assert len(targets) == 1, f"{what}: the patch {patch['match']} matches {len(targets)} targets, not one"
    return targets[0]


def gateway_bootstrap(objects: list[Obj], certs: Certs, endpoints: Endpoints, *, listen_port: int = 8080,
                      admin_port: int = 15000) -> Obj:
    """The egress gateway's configuration: Istio's translation of the Gateway and the
    VirtualServices bound to it, then the gateway EnvoyFilter's patches."""
    gateway = _one(objects, "Gateway")
    ref = f"{gateway['metadata']['namespace']}/{gateway['metadata']['name']}"
    chains: list[Obj] = []
    for server in gateway["spec"]["servers"]:
        assert server["tls"] == {"mode": "ISTIO_MUTUAL"} and server["port"]["protocol"] == "HTTPS", server
        hosts = [h.split("/", 1)[-1] for h in server["hosts"]]
        routes = [
            _route(http, f"outbound|{http['route'][0]['destination']['port']['number']}||"
                         f"{http['route'][0]['destination']['host']}")
            for vs in _kind(objects, "VirtualService") if set(vs["spec"]["hosts"]) & set(hosts)
            for http in vs["spec"]["http"]
            if ref in http["match"][0]["gateways"] and http["match"][0].get("port") == server["port"]["number"]
        ]
        port = server["port"]["number"]
        hcm: Obj = {
            "@type": HCM_TYPE,
            "stat_prefix": f"outbound_0.0.0.0_{listen_port}",
            # Istio's gateway HCM: the client certificate described to the upstream (its default).
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"subject": True, "cert": True, "uri": True, "dns": True},
            "route_config": {
                "name": _gateway_rds_name(server, gateway),
                "ignore_port_in_host_matching": True,  # as Istio sets it for gateways
                "virtual_hosts": [{"name": naming_vhost(h, port), "domains": [h], "routes": routes} for h in hosts],
            },
            "http_filters": [copy.deepcopy(ROUTER)],
        }
        chains.append({
            "filter_chain_match": {"server_names": hosts},
            "filters": [{"name": HCM, "typed_config": hcm}],
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": DOWNSTREAM_TLS, "require_client_certificate": True,
                "common_tls_context": _tls_context(certs)}},
        })

    ef = _one(objects, "EnvoyFilter")
    assert ef["metadata"]["namespace"] == gateway_namespace(objects)
    assert ef["spec"]["workloadSelector"]["labels"] == gateway["spec"]["selector"]
    extproc_filter: Obj | None = None
    for patch in ef["spec"]["configPatches"]:
        match, op = patch["match"], patch["patch"]
        assert match["context"] == "GATEWAY", match
        if patch["applyTo"] in ("HTTP_FILTER", "NETWORK_FILTER"):
            fc = match["listener"]["filterChain"]
            assert set(match["listener"]) == {"filterChain"}  # no port: a gateway listens on its target port
            chain = _apply_once(patch, [c for c in chains if fc["sni"] in c["filter_chain_match"]["server_names"]],
                                "listener")
            hcm = chain["filters"][0]["typed_config"]
            assert fc["filter"]["name"] == HCM
            if patch["applyTo"] == "HTTP_FILTER":
                assert op["operation"] == "INSERT_BEFORE" and fc["filter"]["subFilter"]["name"] == ROUTER["name"]
                hcm["http_filters"].insert(len(hcm["http_filters"]) - 1, copy.deepcopy(op["value"]))
                extproc_filter = op["value"]
            else:
                assert op["operation"] == "MERGE"
                hcm.update(copy.deepcopy({k: v for k, v in op["value"]["typed_config"].items() if k != "@type"}))
        elif patch["applyTo"] == "HTTP_ROUTE":
            rc = match["routeConfiguration"]
            found = []
            for chain in chains:
                config = chain["filters"][0]["typed_config"]["route_config"]
                number, port_name, gw = _parse_rds_name(config["name"])
                if (number, port_name, gw) != (rc["portNumber"], rc["portName"], rc["gateway"]):
                    continue
                for vhost in config["virtual_hosts"]:
                    if vhost["name"] == rc["vhost"]["name"]:
                        found += [r for r in vhost["routes"] if r["name"] == rc["vhost"]["route"]["name"]]
            route = _apply_once(patch, found, "route")
            assert op["operation"] == "MERGE"
            route.update(copy.deepcopy(op["value"]))
        else:
            raise AssertionError(f"unexpected patch {patch['applyTo']}")
    assert extproc_filter is not None
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "node": {"id": "istio-egressgateway", "cluster": "istio-egressgateway"},
        "static_resources": {
            "listeners": [{
                "name": f"0.0.0.0_{listen_port}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "listener_filters": [TLS_INSPECTOR],
                "filter_chains": chains,
            }],
            "clusters": [_extproc_cluster(extproc_filter, endpoints), *_provider_clusters(objects, endpoints)],
        },
    }


def naming_vhost(host: str, port: int) -> str:
    """Istio names a gateway's (and a sidecar's) virtual hosts "<host>:<port>"."""
    return f"{host}:{port}"


def gateway_namespace(objects: list[Obj]) -> str:
    rule = next(o for o in _kind(objects, "DestinationRule") if "subsets" in o["spec"])
    host: str = rule["spec"]["host"]
    return host.split(".")[1]


def sidecar_bootstrap(objects: list[Obj], certs: Certs, gateway_address: tuple[str, int], gateway_id: str, *,
                      listen_port: int, admin_port: int) -> Obj:
    """An app's sidecar in Gateway mode: the mesh routes to the egress gateway, mTLS per subset."""
    rule = next(o for o in _kind(objects, "DestinationRule") if "subsets" in o["spec"])
    gateway_host = rule["spec"]["host"]
    subsets = {s["name"]: s["trafficPolicy"]["portLevelSettings"][0] for s in rule["spec"]["subsets"]}
    vhosts, clusters = [], []
    for vs in _kind(objects, "VirtualService"):
        for http in vs["spec"]["http"]:
            m = http["match"][0]
            if "mesh" not in m["gateways"]:
                continue
            dest = http["route"][0]["destination"]
            assert dest["host"] == gateway_host
            cluster = f"outbound|{dest['port']['number']}|{dest['subset']}|{gateway_host}"
            setting = subsets[dest["subset"]]
            assert setting["port"]["number"] == dest["port"]["number"] and setting["tls"]["mode"] == "ISTIO_MUTUAL"
            for host in vs["spec"]["hosts"]:
                vhosts.append({"name": naming_vhost(host, m["port"]), "domains": [host, f"{host}:{m['port']}"],
                               "routes": [_route(http, cluster)]})
            context = {"@type": UPSTREAM_TLS, "sni": setting["tls"]["sni"], "common_tls_context": _tls_context(certs)}
            # Istio checks the gateway's identity, not a DNS name.
            context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] = [
                {"san_type": "URI", "matcher": {"exact": gateway_id}}]
            clusters.append(_cluster(cluster, gateway_address, transport_socket={
                "name": "envoy.transport_sockets.tls", "typed_config": context}))
    hcm = {"@type": HCM_TYPE, "stat_prefix": "outbound_0.0.0.0_80",
           "route_config": {"name": "80", "virtual_hosts": vhosts}, "http_filters": [copy.deepcopy(ROUTER)]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "node": {"id": "sidecar", "cluster": "sidecar"},
        "static_resources": {
            "listeners": [{
                "name": "0.0.0.0_80",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }
