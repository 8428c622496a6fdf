"""`render` output: deterministic, and every object valid for the API server that would get it.

Istio objects are checked against the Istio 1.30.3 CRD schemas with unknown fields rejected
(strict field validation) and every duration-typed field parsed (the CEL rules a JSON-schema
validator skips); the ConfigMap against the Kubernetes OpenAPI schema.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller import naming
from controller.render import RenderOptions, dump_stream, render_all
from extproc import authz
from extproc.spiffe import WorkloadIdentity
from protos.durations import parse_duration
from protos.spec import load_file, load_text

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ISTIO_CRDS = ROOT / "tests" / "schemas" / "istio" / "crds-1.30.3.gen.yaml"  # a copy: see its README.md
EXAMPLES = ["render_seed.yaml", "render_three_providers.yaml", "render_gateway.yaml"]
SIDECAR_KINDS = {"ServiceEntry", "DestinationRule", "VirtualService", "EnvoyFilter", "AuthorizationPolicy"}
API_VERSIONS = {
    "ServiceEntry": "networking.istio.io/v1", "DestinationRule": "networking.istio.io/v1",
    "VirtualService": "networking.istio.io/v1", "Gateway": "networking.istio.io/v1",
    "EnvoyFilter": "networking.istio.io/v1alpha3", "AuthorizationPolicy": "security.istio.io/v1",
}


def rendered(name: str, opts: RenderOptions | None = None) -> list[dict[str, Any]]:
    return render_all(load_file(str(FIXTURES / name)), opts)


@functools.cache
def istio_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for doc in yaml.safe_load_all(ISTIO_CRDS.read_text()):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def strict(schema: Any) -> Any:
    """additionalProperties: false on every object schema that does not preserve unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in schema
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def strict_root(schema: dict[str, Any]) -> dict[str, Any]:
    # The API server supplies apiVersion/kind/metadata; Istio's schemas list only spec and status.
    root: dict[str, Any] = strict(schema)
    root["properties"] = {
        **root["properties"],
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    }
    return root


def duration_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[tuple[str, str]]:
    """(path, value) of every string whose schema carries Istio's duration CEL rule."""
    found: list[tuple[str, str]] = []
    rules = " ".join(r.get("rule", "") for r in schema.get("x-kubernetes-validations", []))
    if isinstance(value, str) and "duration(self)" in rules:
        found.append((path, value))
    if isinstance(value, dict):
        for k, v in value.items():
            sub = schema.get("properties", {}).get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                found += duration_fields(v, sub, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            found += duration_fields(v, schema["items"], f"{path}[{i}]")
    return found


def test_strict_validation_rejects_unknown_fields() -> None:
    # The check below is only worth something if it can fail.
    se = next(o for o in rendered("render_seed.yaml") if o["kind"] == "ServiceEntry")
    bad = copy.deepcopy(se)
    bad["spec"]["ports"][0]["tragetPort"] = 443
    schema = strict_root(istio_schemas()[("networking.istio.io/v1", "ServiceEntry")])
    jsonschema.validate(se, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("example", EXAMPLES)
def test_istio_objects_validate_against_istio_1_30(example: str) -> None:
    objects = [o for o in rendered(example) if ".istio.io/" in o["apiVersion"]]
    gateway_mode = example == "render_gateway.yaml"
    assert {o["kind"] for o in objects} == SIDECAR_KINDS | ({"Gateway"} if gateway_mode else set())
    assert len(objects) == len(rendered(example)) - 1  # everything but the ConfigMap
    checked_durations = 0
    for obj in objects:
        assert obj["apiVersion"] == API_VERSIONS[obj["kind"]]
        schema = istio_schemas()[(obj["apiVersion"], obj["kind"])]
        jsonschema.validate(obj, strict_root(schema))
        for path, text in duration_fields(obj, schema):
            assert parse_duration(text) >= 0.001, path
            checked_durations += 1
    assert checked_durations >= 4  # connectTimeout, interval, baseEjectionTime, timeout, perTryTimeout...


@pytest.mark.parametrize("example", EXAMPLES)
def test_configmap_is_valid_and_holds_the_data_plane_document(example: str) -> None:
    (cm,) = [o for o in rendered(example) if o["kind"] == "ConfigMap"]
    kubernetes_validate.validate(cm, "1.30", strict=True)
    text = cm["data"][naming.CONFIGMAP_KEY]
    (reparsed,) = load_text(text)
    (original,) = load_file(str(FIXTURES / example))
    assert reparsed == original  # same config, as the data plane will read it
    assert yaml.safe_load(text)["metadata"] == {"name": original.name, "namespace": original.namespace}


def test_configmap_never_holds_a_secret_value() -> None:
    (cm,) = [o for o in rendered("render_three_providers.yaml") if o["kind"] == "ConfigMap"]
    doc = yaml.safe_load(cm["data"][naming.CONFIGMAP_KEY])
    auths = [p["auth"] for p in doc["spec"]["providers"]]
    assert all(set(a) <= {"type", "header", "secretName", "key", "env"} for a in auths)


def test_seed_mapping() -> None:
    objs = {o["kind"]: o for o in rendered("render_seed.yaml")}
    se, dr, vs, ef = (
        objs["ServiceEntry"],
        objs["DestinationRule"],
        objs["VirtualService"],
        objs["EnvoyFilter"],
    )
    assert se["spec"]["hosts"] == ["api.holysheep.ai"]
    assert se["spec"]["ports"] == [
        {"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443},
        {"number": 443, "name": "https", "protocol": "HTTPS"},
    ]
    assert (se["spec"]["location"], se["spec"]["resolution"]) == ("MESH_EXTERNAL", "DNS")
    tp = dr["spec"]["trafficPolicy"]
    assert tp["outlierDetection"] == {
        "consecutive5xxErrors": 5,
        "interval": "10s",
        "baseEjectionTime": "60s",
        "maxEjectionPercent": 100,
    }
    assert tp["portLevelSettings"] == [
        {"port": {"number": 80}, "tls": {"mode": "SIMPLE", "sni": "api.holysheep.ai"}}
    ]
    route = vs["spec"]["http"][0]
    assert route["retries"]["attempts"] == 3
    assert route["retries"]["perTryTimeout"] == "30s"
    assert {"5xx", "reset", "connect-failure", "retriable-status-codes", "429"} <= set(
        route["retries"]["retryOn"].split(",")
    )
    assert [r["name"] for r in vs["spec"]["http"]] == ["holysheep-holysheep"]
    assert "match" not in vs["spec"]["http"][0]
    assert "workloadSelector" not in ef["spec"]
    f = ef["spec"]["configPatches"][0]
    assert f["applyTo"] == "HTTP_FILTER" and f["patch"]["operation"] == "INSERT_BEFORE"
    assert f["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    cfg = f["patch"]["value"]["typed_config"]
    assert f["patch"]["value"]["disabled"] is True
    assert cfg["failure_mode_allow"] is False
    assert cfg["message_timeout"] == "125s"  # 30s * (3 + 1) + 5s
    assert cfg["grpc_service"]["envoy_grpc"]["cluster_name"] == (
        "outbound|9002||holysheep-extproc.holysheep-system.svc.cluster.local"
    )
    patches = ef["spec"]["configPatches"]
    routes = [p["match"]["routeConfiguration"]["vhost"] for p in patches if p["applyTo"] == "HTTP_ROUTE"]
    assert routes == [{"name": "api.holysheep.ai:80", "route": {"name": "holysheep-holysheep"}}]
    # Envoy's own replies (provider unreachable, ext_proc gone) become OpenAI-style errors, for
    # this config's hosts only: the sidecar's outbound HCM is shared with all other egress.
    (hcm_patch,) = [p for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    assert hcm_patch["patch"]["operation"] == "MERGE"
    assert hcm_patch["match"]["listener"]["portNumber"] == 80
    mappers = hcm_patch["patch"]["value"]["typed_config"]["local_reply_config"]["mappers"]
    for mapper in mappers:
        expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
        assert expression.startswith("request.host in ['api.holysheep.ai', 'api.holysheep.ai:80'] && ")
        assert "startsWith('holysheep_')" in expression


def test_three_providers_selector_and_per_host_objects() -> None:
    objs = rendered("render_three_providers.yaml")
    ef = next(o for o in objs if o["kind"] == "EnvoyFilter")
    assert ef["spec"]["workloadSelector"] == {"labels": {"app": "chat-frontend"}}
    hosts = sorted(o["spec"]["hosts"][0] for o in objs if o["kind"] == "ServiceEntry")
    assert hosts == ["api.anthropic.com", "api.openai.com", "llm-gw.example.com"]
    gw = next(o for o in objs if o["kind"] == "ServiceEntry" and o["spec"]["hosts"] == ["llm-gw.example.com"])
    assert gw["spec"]["ports"][0]["targetPort"] == 8443
    anthropic_vs = next(
        o for o in objs if o["kind"] == "VirtualService" and "anthropic" in o["metadata"]["name"]
    )
    assert anthropic_vs["spec"]["http"][0]["retries"]["perTryTimeout"] == "90s"  # provider timeout wins
    assert all(
        o["spec"].get("exportTo", ["."]) == ["."]
        for o in objs
        if o["kind"] != "ConfigMap" and o["kind"] != "EnvoyFilter"
    )
    for o in objs:
        if o["kind"] == "AuthorizationPolicy":  # the ext_proc's namespace: see the policy tests
            continue
        assert o["metadata"]["namespace"] == "apps"
        assert o["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "holysheep-mesh",
            "holysheep.ai/config": "multi",
        }


def test_circuit_breaker_disabled_leaves_out_outlier_detection() -> None:
    text = (FIXTURES / "render_seed.yaml").read_text().replace("enabled: true", "enabled: false")
    dr = next(o for o in render_all(load_text(text)) if o["kind"] == "DestinationRule")
    assert "outlierDetection" not in dr["spec"]["trafficPolicy"]
    assert dr["spec"]["trafficPolicy"]["connectionPool"] == {"tcp": {"connectTimeout": "10s"}}


def test_root_namespace_exports_mesh_wide_and_flags_change_cluster() -> None:
    opts = RenderOptions(
        extproc_service="x", extproc_namespace="y", extproc_port=7000, root_namespace="holysheep-system"
    )
    objs = rendered("render_seed.yaml", opts)
    assert all(
        o["spec"]["exportTo"] == ["*"] for o in objs if o["kind"] in ("ServiceEntry", "VirtualService")
    )
    ef = next(o for o in objs if o["kind"] == "EnvoyFilter")
    cfg = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
    assert cfg["grpc_service"]["envoy_grpc"]["cluster_name"] == "outbound|7000||x.y.svc.cluster.local"


def test_cli_render_is_deterministic_and_matches_the_library() -> None:
    path = str(FIXTURES / "render_three_providers.yaml")
    cmd = [sys.executable, "-m", "controller.cli", "render", "-f", path]
    first = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    second = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert first == second
    assert first == dump_stream(render_all(load_file(path)))
    assert list(yaml.safe_load_all(first)) == render_all(load_file(path))


def test_cli_render_reports_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((FIXTURES / "render_seed.yaml").read_text().replace("maxRetries: 3", "maxRetries: -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "render", "-f", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert "spec.maxRetries" in proc.stderr and proc.stdout == ""


# --- the ext_proc's AuthorizationPolicy -------------------------------------------------------


def istio_match(pattern: str, value: str) -> bool:
    """Istio's string match in AuthorizationPolicy: exact, prefix "x*", suffix "*x", presence "*"."""
    if pattern == "*":
        return bool(value)
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def policy_admits(policy: dict[str, Any], namespace: str, service_account: str, port: int = 9002) -> bool:
    """Whether Istio would let a peer with this mesh identity through an ALLOW policy's rules
    (source.principal is "<trust domain>/ns/<ns>/sa/<sa>"; "cluster.local" is the mesh's own)."""
    principal = f"cluster.local/ns/{namespace}/sa/{service_account}"
    for rule in policy["spec"]["rules"]:
        ports = {p for to in rule["to"] for p in to["operation"]["ports"]}
        if str(port) not in ports:
            continue
        for entry in rule["from"]:
            source = entry["source"]
            assert set(source) <= {"principals", "namespaces"}, source
            if all(any(istio_match(p, value) for p in source[key])
                   for key, value in (("principals", principal), ("namespaces", namespace)) if key in source):
                return True
    return False


def one_config(namespace: str, service_accounts: list[str] | None = None, extra: str = "") -> Any:
    accounts = f"  serviceAccounts: {json.dumps(service_accounts)}\n" if service_accounts is not None else ""
    (cfg,) = load_text(
        "apiVersion: holysheep.ai/v1\nkind: HolySheepConfig\n"
        f"metadata: {{name: scoped, namespace: {namespace}}}\n"
        f"spec:\n  baseUrl: https://api.openai.com/v1\n{accounts}{extra}"
    )
    return cfg


def policy_of(cfg: Any, opts: RenderOptions | None = None) -> dict[str, Any]:
    (policy,) = [o for o in render_all([cfg], opts) if o["kind"] == "AuthorizationPolicy"]
    return policy


NAMESPACES = ["apps", "apps-2", "other", "istio-system"]
SERVICE_ACCOUNTS = ["chat", "chat-2", "batch-a", "batchb", "nightly-worker", "worker", "default", "x"]
PATTERN_SETS = [None, ["chat"], ["batch-*"], ["*-worker"], ["*"], ["chat", "batch-*", "*-worker"], ["*worker", "x"]]


@pytest.mark.parametrize("accounts", PATTERN_SETS)
@pytest.mark.parametrize("namespace", ["apps", "istio-system"])
def test_policy_admits_exactly_the_data_planes_scope(namespace: str, accounts: list[str] | None) -> None:
    """Every identity the data plane would serve gets through the policy, and (unless the policy
    says it is widened) no other: the policy is the same scope, enforced by the ext_proc's sidecar."""
    cfg = one_config(namespace, accounts)
    policy = policy_of(cfg)
    jsonschema.validate(policy, strict_root(istio_schemas()[("security.istio.io/v1", "AuthorizationPolicy")]))
    widened = naming.WIDENED_ANNOTATION in policy["metadata"].get("annotations", {})
    # Only a prefix in the root namespace ("any namespace, batch-*") has no Istio form.
    assert widened == (namespace == "istio-system" and any(p.endswith("*") and p != "*" for p in accounts or ())
                       and "*" not in (accounts or ()))
    for ns in NAMESPACES:
        for sa in SERVICE_ACCOUNTS:
            served = authz.in_scope(WorkloadIdentity("cluster.local", ns, sa), cfg.namespace, cfg.service_accounts)
            admitted = policy_admits(policy, ns, sa)
            assert admitted >= served if widened else admitted == served, (ns, sa, policy["spec"]["rules"])
            assert not policy_admits(policy, ns, sa, port=8080)  # only the gRPC port


def test_a_prefix_in_the_root_namespace_widens_and_says_so() -> None:
    """Istio cannot match "any namespace, service account batch-*": the policy admits every mesh
    identity, says why in an annotation, and the ext_proc still refuses the others."""
    cfg = one_config("istio-system", ["batch-*", "chat"])
    policy = policy_of(cfg)
    assert policy["spec"]["rules"][0]["from"] == [{"source": {"principals": ["*"]}}]
    note = policy["metadata"]["annotations"][naming.WIDENED_ANNOTATION]
    assert "batch-*" in note and "ext_proc enforces" in note
    for ns in NAMESPACES:
        for sa in SERVICE_ACCOUNTS:
            if authz.in_scope(WorkloadIdentity("cluster.local", ns, sa), cfg.namespace, cfg.service_accounts):
                assert policy_admits(policy, ns, sa)
    assert policy_admits(policy, "other", "default")  # widened ...
    assert not authz.in_scope(WorkloadIdentity("cluster.local", "other", "default"), cfg.namespace,
                              cfg.service_accounts)  # ... and refused by the data plane


def test_policy_lives_with_the_ext_proc_and_is_labelled_for_pruning() -> None:
    cfg = one_config("apps", ["chat"])
    policy = policy_of(cfg)
    assert policy["metadata"] == {
        "name": "holysheep-apps.scoped",
        "namespace": "holysheep-system",
        "labels": {
            "app.kubernetes.io/managed-by": "holysheep-mesh",
            "holysheep.ai/config": "scoped",
            "holysheep.ai/config-namespace": "apps",
        },
    }
    assert policy["spec"]["selector"] == {"matchLabels": {"app": "holysheep-proxy"}}
    assert policy["spec"]["action"] == "ALLOW"
    assert policy["spec"]["rules"][0]["from"] == [{"source": {"principals": ["cluster.local/ns/apps/sa/chat"]}}]
    opts = RenderOptions(extproc_namespace="ai", extproc_port=7000, extproc_selector=(("app", "proc"),))
    moved = policy_of(cfg, opts)
    assert (moved["metadata"]["namespace"], moved["spec"]["selector"]) == ("ai", {"matchLabels": {"app": "proc"}})
    assert moved["spec"]["rules"][0]["to"] == [{"operation": {"ports": ["7000"]}}]
    # In the ext_proc's own namespace a config's policy is an ordinary owned object.
    local = policy_of(one_config("holysheep-system"))
    assert "holysheep.ai/config-namespace" not in local["metadata"]["labels"]
    assert local["spec"]["rules"][0]["from"] == [{"source": {"namespaces": ["holysheep-system"]}}]


def test_gateway_mode_policy_admits_only_the_gateway() -> None:
    cfg = one_config("apps", ["chat"], extra="  egress:\n    mode: Gateway\n    gateway:\n"
                                             "      namespace: egress\n      serviceAccount: gw\n")
    policy = policy_of(cfg)
    assert policy["spec"]["rules"][0]["from"] == [{"source": {"principals": ["cluster.local/ns/egress/sa/gw"]}}]
    assert policy_admits(policy, "egress", "gw")
    assert not policy_admits(policy, "apps", "chat")  # the workload itself never calls the ext_proc
