"""`render` output: deterministic, and every object valid for the API server that would get it.

Istio objects are checked against the Istio 1.30.3 CRD schemas with unknown fields rejected
(strict field validation) and every duration-typed field parsed (the CEL rules a JSON-schema
validator skips); the ConfigMap against the Kubernetes OpenAPI schema.
"""

from __future__ import annotations

import copy
import functools
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
from protos.durations import parse_duration
from protos.spec import load_file, load_text

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ISTIO_CRDS = ROOT / "tests" / "schemas" / "istio" / "crds-1.30.3.gen.yaml"  # a copy: see its README.md
EXAMPLES = ["render_seed.yaml", "render_three_providers.yaml"]


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
    objects = [o for o in rendered(example) if o["apiVersion"].startswith("networking.istio.io/")]
    assert {o["kind"] for o in objects} == {
        "ServiceEntry",
        "DestinationRule",
        "VirtualService",
        "EnvoyFilter",
    }
    checked_durations = 0
    for obj in objects:
        if obj["kind"] == "EnvoyFilter":
            assert obj["apiVersion"] == "networking.istio.io/v1alpha3"
        else:
            assert obj["apiVersion"] == "networking.istio.io/v1"
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
