"""The controller's objects outside a config's namespace, against the Kubernetes API emulator
(kmock, over real HTTP): the ext_proc's AuthorizationPolicy in holysheep-system and, in Gateway
mode, the egress gateway's EnvoyFilter in the gateway's namespace. No ownerReference can point
across namespaces, so these are found by label and the controller alone prunes them: on a spec
change, on a gateway that moved, and when the config is deleted. The controller runs with the
product's JSON logging at INFO (tests/conftest.py fails a test on any logging error)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import yaml

from controller.kube import (
    AUTHORIZATIONPOLICIES,
    DESTINATIONRULES,
    ENVOYFILTERS,
    GATEWAYS,
    HOLYSHEEPCONFIGS,
    VIRTUALSERVICES,
    Kube,
)
from controller.manager import Manager, ManagerConfig
from controller.render import RenderOptions, render_all
from protos.spec import parse_document
from tests import test_controller_kmock as kmock_suite
from tests.test_controller_kmock import FIXTURES, Running, ready, secret, wait_for

kapi = kmock_suite.kapi
user = kmock_suite.user
managers = kmock_suite.managers

EXTPROC_NS = "holysheep-system"
MANAGED = "app.kubernetes.io/managed-by=holysheep-mesh"


def config(namespace: str, name: str = "chat", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "holysheep.ai/v1",
        "kind": "HolySheepConfig",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"providers": [{"name": f"openai-{namespace}", "baseUrl": "https://api.openai.com/v1",
                                "auth": {"type": "Bearer", "env": "OPENAI_API_KEY"}}], **spec},
    }


def policies(kube: Kube) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in kube.list(AUTHORIZATIONPOLICIES, EXTPROC_NS, MANAGED)["items"]}


def envoyfilters(kube: Kube) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["metadata"]["namespace"], o["metadata"]["name"]): o
            for o in kube.list(ENVOYFILTERS, None, MANAGED)["items"]}


def sources(policy: dict[str, Any]) -> list[dict[str, Any]]:
    return [f["source"] for f in policy["spec"]["rules"][0]["from"]]


def patch_spec(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kube.request("PATCH", HOLYSHEEPCONFIGS.path(namespace, name), body={"spec": spec},
                 content_type="application/merge-patch+json")


def test_policy_follows_the_config_and_is_pruned_with_it(
    kapi: Running, user: Kube, managers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    user.create(HOLYSHEEPCONFIGS, "apps", config("apps", serviceAccounts=["chat"]))
    with caplog.at_level(logging.INFO):
        managers("a")
        ready(user, "apps", "chat")
        policy = wait_for(lambda: policies(user).get("holysheep-apps.chat"), what="the policy")
        assert policy["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "holysheep-mesh",
            "holysheep.ai/config": "chat",
            "holysheep.ai/config-namespace": "apps",
        }
        assert "ownerReferences" not in policy["metadata"]  # not across namespaces
        assert sources(policy) == [{"principals": ["cluster.local/ns/apps/sa/chat"]}]

        patch_spec(user, "apps", "chat", {"serviceAccounts": ["chat", "*-worker"]})
        ready(user, "apps", "chat", generation=2)
        assert sources(policies(user)["holysheep-apps.chat"]) == [
            {"principals": ["cluster.local/ns/apps/sa/chat"]},
            {"namespaces": ["apps"], "principals": ["*-worker"]},
        ]

        user.delete(HOLYSHEEPCONFIGS, "apps", "chat")
        wait_for(lambda: "holysheep-apps.chat" not in policies(user), what="the policy pruned")
    applied = [r for r in caplog.records if r.getMessage() == "applied" and r.__dict__["kind"] == "AuthorizationPolicy"]
    pruned = [r for r in caplog.records if r.getMessage() == "pruned" and r.__dict__["kind"] == "AuthorizationPolicy"]
    assert {(r.__dict__["namespace"], r.__dict__["object"]) for r in applied + pruned} == {
        (EXTPROC_NS, "holysheep-apps.chat")}
    assert [r.__dict__["reason"] for r in pruned] == ["config deleted"]
    # The controller touched AuthorizationPolicies in the ext_proc's namespace only (its Role's).
    api = kapi.api
    assert api is not None
    touched = {r.namespace for r in list(api._requests)
               if r.resource is not None and r.resource.plural == "authorizationpolicies"
               and r.headers.get("User-Agent", "").startswith("holysheep-mesh/")}
    assert touched == {EXTPROC_NS}


def test_same_name_in_two_namespaces_keeps_both_policies(user: Kube, managers: Any) -> None:
    """Both policies carry holysheep.ai/config=chat in holysheep-system; each config's reconcile
    keeps to its own (the config-namespace label), also the one living in holysheep-system."""
    user.create(HOLYSHEEPCONFIGS, "apps", config("apps"))
    user.create(HOLYSHEEPCONFIGS, EXTPROC_NS, config(EXTPROC_NS))
    managers("a")
    ready(user, "apps", "chat")
    ready(user, EXTPROC_NS, "chat")
    names = {"holysheep-apps.chat", "holysheep-holysheep-system.chat"}
    assert wait_for(lambda: set(policies(user)) == names or None, what="both policies")
    user.delete(HOLYSHEEPCONFIGS, EXTPROC_NS, "chat")
    wait_for(lambda: set(policies(user)) == {"holysheep-apps.chat"} or None, what="only the other one left")
    patch_spec(user, "apps", "chat", {"timeout": "45s"})  # another reconcile of the survivor
    ready(user, "apps", "chat", generation=2)
    assert set(policies(user)) == {"holysheep-apps.chat"}


def test_gateway_mode_moves_the_filter_to_the_gateway_and_back(user: Kube, managers: Any) -> None:
    user.create(HOLYSHEEPCONFIGS, "apps", config("apps"))
    managers("a")
    ready(user, "apps", "chat")
    assert set(envoyfilters(user)) == {("apps", "holysheep-chat")}

    patch_spec(user, "apps", "chat", {"egress": {"mode": "Gateway"}})
    ready(user, "apps", "chat", generation=2)
    wait_for(lambda: set(envoyfilters(user)) == {("istio-system", "holysheep-apps.chat")} or None,
             what="the filter on the gateway only")
    ef = envoyfilters(user)[("istio-system", "holysheep-apps.chat")]
    assert ef["spec"]["workloadSelector"] == {"labels": {"istio": "egressgateway"}}
    assert {p["match"]["context"] for p in ef["spec"]["configPatches"]} == {"GATEWAY"}
    gw = user.get(GATEWAYS, "apps", "holysheep-chat")
    assert gw["metadata"]["ownerReferences"][0]["name"] == "chat"
    assert gw["spec"]["servers"][0]["tls"] == {"mode": "ISTIO_MUTUAL"}
    rule = user.get(DESTINATIONRULES, "apps", "holysheep-chat--egress-gateway")
    assert rule["spec"]["host"] == "istio-egressgateway.istio-system.svc.cluster.local"
    vs = user.get(VIRTUALSERVICES, "apps", "holysheep-chat-api-openai-com")
    assert vs["spec"]["gateways"] == ["mesh", "apps/holysheep-chat"]
    assert sources(policies(user)["holysheep-apps.chat"]) == [
        {"principals": ["cluster.local/ns/istio-system/sa/istio-egressgateway-service-account"]}]

    # The gateway moves: its old namespace's filter goes, found across namespaces by label.
    patch_spec(user, "apps", "chat", {"egress": {"mode": "Gateway", "gateway": {
        "namespace": "egress", "serviceAccount": "egress-gw", "selector": {"app": "egress-gw"}}}})
    ready(user, "apps", "chat", generation=3)
    wait_for(lambda: set(envoyfilters(user)) == {("egress", "holysheep-apps.chat")} or None,
             what="the filter in the gateway's new namespace only")
    assert sources(policies(user)["holysheep-apps.chat"]) == [
        {"principals": ["cluster.local/ns/egress/sa/egress-gw"]}]

    patch_spec(user, "apps", "chat", {"egress": {"mode": "Sidecar"}})
    ready(user, "apps", "chat", generation=4)
    wait_for(lambda: set(envoyfilters(user)) == {("apps", "holysheep-chat")} or None, what="back on the sidecars")
    assert user.list(GATEWAYS, "apps", MANAGED)["items"] == []

    patch_spec(user, "apps", "chat", {"egress": {"mode": "Gateway", "gateway": None}})  # Istio's defaults again
    ready(user, "apps", "chat", generation=5)
    wait_for(lambda: ("istio-system", "holysheep-apps.chat") in envoyfilters(user) or None, what="gateway again")
    user.delete(HOLYSHEEPCONFIGS, "apps", "chat")
    wait_for(lambda: (envoyfilters(user) == {} and policies(user) == {}) or None,
             what="the objects in other namespaces pruned with the config")


def test_render_fixture_in_gateway_mode_is_applied_as_rendered(user: Kube, managers: Any) -> None:
    """What `render` prints for the Gateway-mode fixture is what lands in the cluster."""
    doc = yaml.safe_load((FIXTURES / "render_gateway.yaml").read_text())
    for name in ("openai-credentials", "anthropic-credentials"):
        secret(user, "apps", name)
    user.create(HOLYSHEEPCONFIGS, "apps", doc)
    managers("a")
    ready(user, "apps", "egress")
    for obj in render_all([parse_document(doc)]):
        if obj["kind"] == "ConfigMap":
            continue
        res = {"AuthorizationPolicy": AUTHORIZATIONPOLICIES, "EnvoyFilter": ENVOYFILTERS, "Gateway": GATEWAYS,
               "DestinationRule": DESTINATIONRULES, "VirtualService": VIRTUALSERVICES}.get(obj["kind"])
        if res is None:
            continue
        live = user.get(res, obj["metadata"]["namespace"], obj["metadata"]["name"])
        assert live["spec"] == obj["spec"], obj["metadata"]["name"]


def test_a_config_deleted_while_no_controller_ran_is_cleaned_up_at_resync(kapi: Running, user: Kube) -> None:
    """Nothing the garbage collector follows points at the objects in other namespaces, and the
    informer of a controller started later never sees the deleted config: the resync finds them
    by label and reconciles their config, which prunes them."""

    def manager(identity: str, resync: float) -> Manager:
        m = Manager(kmock_suite.client(kapi.url, f"holysheep-mesh/{identity}"), RenderOptions(), ManagerConfig(
            identity=identity, lease_duration=1.5, renew_deadline=1.0, retry_period=0.1, watch_timeout=2,
            resync_seconds=resync))
        m.start()
        return m

    user.create(HOLYSHEEPCONFIGS, "apps", config("apps", egress={"mode": "Gateway"}))
    first = manager("first", 60)
    try:
        ready(user, "apps", "chat")
        wait_for(lambda: ("istio-system", "holysheep-apps.chat") in envoyfilters(user) or None, what="applied")
    finally:
        first.shutdown(release=True)
    user.delete(HOLYSHEEPCONFIGS, "apps", "chat")  # no controller, no garbage collector here
    assert "holysheep-apps.chat" in policies(user)
    second = manager("second", 0.5)
    try:
        wait_for(lambda: (envoyfilters(user) == {} and policies(user) == {}) or None,
                 what="the leftovers pruned by the resync")
    finally:
        second.shutdown(release=True)
