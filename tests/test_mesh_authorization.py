"""Who reaches the ext_proc pods: the install's baseline AuthorizationPolicy plus the controller's
one per HolySheepConfig, evaluated as Istio evaluates ALLOW policies (once any selects a workload,
a request no ALLOW policy admits is denied): the admin port stays open, the gRPC port is closed
without a config and opens to exactly the callers of the configs that exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import jsonschema

from controller.render import render_all
from protos.spec import load_text


def sibling(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_authz_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_manifests = sibling("test_mesh_manifests")
_render = sibling("test_render")
EXTPROC_LABELS = {"app": "holysheep-proxy"}


def _matches(source: dict[str, Any], namespace: str, service_account: str) -> bool:
    principal = f"cluster.local/ns/{namespace}/sa/{service_account}" if namespace else ""
    values = {"principals": principal, "namespaces": namespace}
    assert set(source) <= set(values), source
    return all(any(_render.istio_match(p, values[k]) for p in source[k]) for k in source)


def allowed(policies: list[dict[str, Any]], namespace: str, service_account: str, port: int) -> bool:
    """Istio's ALLOW evaluation for the ext_proc pods; namespace "" is a plaintext caller."""
    selecting = [p for p in policies
                 if p["spec"]["selector"]["matchLabels"].items() <= EXTPROC_LABELS.items()]
    assert all(p["spec"]["action"] == "ALLOW" for p in selecting)
    if not selecting:
        return True  # no ALLOW policy on a workload: Istio allows everything
    for policy in selecting:
        for rule in policy["spec"]["rules"]:
            to_ok = "to" not in rule or any(str(port) in t["operation"]["ports"] for t in rule["to"])
            from_ok = "from" not in rule or any(_matches(f["source"], namespace, service_account)
                                                for f in rule["from"])
            if to_ok and from_ok:
                return True
    return False


def baseline() -> list[dict[str, Any]]:
    return [o for o in _manifests.build() if o["kind"] == "AuthorizationPolicy"]


def config(namespace: str, extra: str = "") -> dict[str, Any]:
    (policy,) = [o for o in render_all(load_text(
        "apiVersion: holysheep.ai/v1\nkind: HolySheepConfig\n"
        f"metadata: {{name: c, namespace: {namespace}}}\nspec:\n  baseUrl: https://api.openai.com/v1\n{extra}"
    )) if o["kind"] == "AuthorizationPolicy"]
    return policy


def test_the_baseline_opens_the_admin_port_only() -> None:
    (policy,) = baseline()
    jsonschema.validate(policy, _render.strict_root(
        _render.istio_schemas()[("security.istio.io/v1", "AuthorizationPolicy")]))
    assert policy["metadata"]["namespace"] == "holysheep-system"
    deployment = _manifests.extproc()
    assert policy["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert allowed([], "apps", "chat", 9002)  # what the baseline is there to prevent
    for caller in (("apps", "chat"), ("istio-system", "istio-egressgateway-service-account"), ("", "")):
        assert allowed(baseline(), *caller, 8080)  # Prometheus, in or outside the mesh
        assert not allowed(baseline(), *caller, 9002)  # no config: nobody gets a stream


def test_configs_open_the_grpc_port_to_their_callers_only() -> None:
    policies = [*baseline(), config("apps", "  serviceAccounts: [chat]\n"), config("team-b")]
    assert allowed(policies, "apps", "chat", 9002)
    assert not allowed(policies, "apps", "batch", 9002)
    assert allowed(policies, "team-b", "anything", 9002)
    assert not allowed(policies, "other", "chat", 9002)
    assert not allowed(policies, "", "", 9002)
    assert allowed(policies, "other", "chat", 8080)


def test_gateway_mode_opens_the_grpc_port_to_the_gateway_only() -> None:
    policies = [*baseline(), config("apps", "  egress: {mode: Gateway}\n")]
    assert allowed(policies, "istio-system", "istio-egressgateway-service-account", 9002)
    assert not allowed(policies, "apps", "default", 9002)  # the app's own sidecar: never
    assert not allowed(policies, "istio-system", "istio-ingressgateway-service-account", 9002)
