"""Gateway mode's objects (spec.egress.mode: Gateway), as `render` prints them: Istio's "egress
TLS origination via an egress gateway" pattern with the ext_proc filter on the gateway only; and
the optional egress gateway overlay in mesh/egress-gateway/, which must agree with the spec's
defaults. (Istio schema validation: tests/test_render.py; Envoy validation:
tests/test_render_envoy.py; end to end: tests/test_e2e_gateway.py; the controller:
tests/test_controller_authz.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from controller.render import RenderOptions, render_all
from protos.spec import EgressGatewaySpec, load_file, load_text

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OVERLAY = ROOT / "mesh" / "egress-gateway"
GATEWAY_HOST = "istio-egressgateway.istio-system.svc.cluster.local"
Obj = dict[str, Any]


def objects(text: str | None = None, opts: RenderOptions | None = None) -> list[Obj]:
    configs = load_text(text) if text is not None else load_file(str(FIXTURES / "render_gateway.yaml"))
    return render_all(configs, opts)


def by(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_sidecars_send_the_provider_hosts_to_the_gateway_over_mesh_mtls() -> None:
    objs = objects()
    vs = by(objs, "VirtualService")["holysheep-egress-api-openai-com"]
    assert vs["spec"]["gateways"] == ["mesh", "apps/holysheep-egress"]
    to_gateway, to_provider = vs["spec"]["http"]
    assert to_gateway["match"] == [{"gateways": ["mesh"], "port": 80, "sourceLabels": {"app": "chat-frontend"}}]
    assert to_gateway["route"] == [{"destination": {"host": GATEWAY_HOST, "subset": "holysheep-openai",
                                                    "port": {"number": 80}}}]
    # The sidecar retries only what never reached the gateway; failover is the gateway's.
    assert to_gateway["retries"] == {"attempts": 2, "retryOn": "connect-failure,refused-stream"}
    assert to_provider["match"] == [{"gateways": ["apps/holysheep-egress"], "port": 80}]
    assert to_provider["route"] == [{"destination": {"host": "api.openai.com", "port": {"number": 443}}}]
    assert to_provider["retries"]["attempts"] == 1  # spec.maxRetries, at the gateway
    rule = by(objs, "DestinationRule")["holysheep-egress--egress-gateway"]
    assert rule["spec"]["host"] == GATEWAY_HOST
    subsets = {s["name"]: s["trafficPolicy"]["portLevelSettings"] for s in rule["spec"]["subsets"]}
    assert subsets["holysheep-openai"] == [{"port": {"number": 80}, "tls": {"mode": "ISTIO_MUTUAL",
                                                                               "sni": "api.openai.com"}}]
    assert len(subsets) == 3


def test_the_gateway_originates_tls_and_only_it_sees_that_rule() -> None:
    rules = by(objects(), "DestinationRule")
    openai = rules["holysheep-egress-api-openai-com"]
    assert openai["spec"]["exportTo"] == ["istio-system"]  # an app calling :443 itself stays pass-through
    assert openai["spec"]["trafficPolicy"]["portLevelSettings"] == [
        {"port": {"number": 443}, "tls": {"mode": "SIMPLE", "sni": "api.openai.com"}}]
    assert "outlierDetection" in openai["spec"]["trafficPolicy"]  # the gateway's circuit to the provider
    inhouse = rules["holysheep-egress-llm-internal-example"]  # plain HTTP: no TLS anywhere outside the mesh
    assert "portLevelSettings" not in inhouse["spec"]["trafficPolicy"]
    for se in by(objects(), "ServiceEntry").values():
        assert se["spec"]["exportTo"] == [".", "istio-system"]  # sidecars in scope and the gateway


def test_one_gateway_server_per_host_so_each_filter_lands_once() -> None:
    objs = objects()
    (gateway,) = by(objs, "Gateway").values()
    assert gateway["metadata"]["namespace"] == "apps"
    assert gateway["spec"]["selector"] == {"istio": "egressgateway"}
    servers = gateway["spec"]["servers"]
    assert [s["hosts"] for s in servers] == [["./api.anthropic.com"], ["./api.openai.com"],
                                             ["./llm.internal.example"]]
    assert {s["tls"]["mode"] for s in servers} == {"ISTIO_MUTUAL"}
    assert len({s["port"]["name"] for s in servers}) == len(servers)  # Istio wants them unique
    (ef,) = by(objs, "EnvoyFilter").values()
    assert (ef["metadata"]["namespace"], ef["metadata"]["name"]) == ("istio-system", "holysheep-apps.egress")
    assert ef["spec"]["workloadSelector"] == {"labels": {"istio": "egressgateway"}}
    patches = ef["spec"]["configPatches"]
    assert {p["match"]["context"] for p in patches} == {"GATEWAY"}
    filters = [p for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert sorted(p["match"]["listener"]["filterChain"]["sni"] for p in filters) == [
        "api.anthropic.com", "api.openai.com", "llm.internal.example"]
    attrs = {json.dumps(p["patch"]["value"]["typed_config"]["request_attributes"]) for p in filters}
    assert attrs == {'["connection.uri_san_peer_certificate"]'}  # the caller; no gateway node metadata
    routes = [p["match"]["routeConfiguration"] for p in patches if p["applyTo"] == "HTTP_ROUTE"]
    assert routes[1] == {"portNumber": 80, "portName": "https-openai", "gateway": "apps/holysheep-egress",
                         "vhost": {"name": "api.openai.com:80", "route": {"name": "holysheep-openai"}}}


def test_no_sidecar_gets_the_filter_in_gateway_mode() -> None:
    efs = [o for o in objects() if o["kind"] == "EnvoyFilter"]
    assert all(p["match"]["context"] != "SIDECAR_OUTBOUND" for ef in efs for p in ef["spec"]["configPatches"])


def test_a_root_namespace_config_reaches_every_sidecar_and_a_custom_gateway() -> None:
    text = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: shared, namespace: istio-system}
spec:
  baseUrl: https://api.holysheep.ai/v1
  egress:
    mode: Gateway
    gateway: {namespace: egress, service: llm-egress, selector: {app: llm-egress}, serviceAccount: llm-egress}
"""
    objs = objects(text)
    vs = next(iter(by(objs, "VirtualService").values()))
    assert vs["spec"]["exportTo"] == ["*"]
    assert vs["spec"]["http"][0]["route"][0]["destination"]["host"] == "llm-egress.egress.svc.cluster.local"
    assert "sourceLabels" not in vs["spec"]["http"][0]["match"][0]
    (ef,) = by(objs, "EnvoyFilter").values()
    assert ef["metadata"]["namespace"] == "egress"
    assert ef["spec"]["workloadSelector"] == {"labels": {"app": "llm-egress"}}
    (gateway,) = by(objs, "Gateway").values()
    assert gateway["spec"]["selector"] == {"app": "llm-egress"}
    assert by(objs, "DestinationRule")["holysheep-shared-api-holysheep-ai"]["spec"]["exportTo"] == ["egress"]
    (policy,) = by(objs, "AuthorizationPolicy").values()
    assert policy["spec"]["rules"][0]["from"] == [{"source": {"principals": ["cluster.local/ns/egress/sa/llm-egress"]}}]


def test_the_configmap_tells_the_data_plane_which_gateway_to_trust() -> None:
    (cm,) = by(objects(), "ConfigMap").values()
    spec = yaml.safe_load(cm["data"]["config.yaml"])["spec"]
    assert spec["egress"] == {"mode": "Gateway"}  # the gateway's defaults come from the same schema
    (cfg,) = load_text(cm["data"]["config.yaml"])
    assert (cfg.egress.gateway.namespace, cfg.egress.gateway.service_account) == (
        "istio-system", "istio-egressgateway-service-account")


def test_the_overlays_install_the_gateway_the_defaults_name() -> None:
    defaults = EgressGatewaySpec()
    operator = yaml.safe_load((OVERLAY / "istio-operator.yaml").read_text())
    (gw,) = operator["spec"]["components"]["egressGateways"]
    assert gw["enabled"] is True
    assert (gw["name"], gw["namespace"]) == (defaults.service, defaults.namespace)
    assert defaults.selector.items() <= gw["label"].items()
    # IstioOperator names an egress gateway's service account "<name>-service-account".
    assert f"{gw['name']}-service-account" == defaults.service_account
    assert 80 in {p["port"] for p in gw["k8s"]["service"]["ports"]}
    values = yaml.safe_load((OVERLAY / "gateway-values.yaml").read_text())
    assert values["serviceAccount"] == {"create": True, "name": defaults.service_account}
    assert defaults.selector.items() <= values["labels"].items()
    assert 80 in {p["port"] for p in values["service"]["ports"]}
    for pod_annotations in (gw["k8s"]["podAnnotations"], values["podAnnotations"]):
        proxy = json.loads(pod_annotations["proxy.istio.io/config"])
        assert proxy["gatewayTopology"]["forwardClientCertDetails"] == "SANITIZE"
    # Both say how to install themselves with the release/Service name the defaults expect.
    assert f"helm install {defaults.service} istio/gateway -n {defaults.namespace}" in (
        OVERLAY / "gateway-values.yaml").read_text()
