"""The controller against a Kubernetes API emulator (kmock + tests/fixtures/controller_kapi.py)
over real HTTP: every assertion reads what the API server holds or what was sent to it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration

from controller import reconcile
from controller.kube import (
    CONFIGMAPS,
    DESTINATIONRULES,
    ENVOYFILTERS,
    EVENTS,
    GENERATED,
    HOLYSHEEPCONFIGS,
    LEASES,
    SECRETS,
    SERVICEENTRIES,
    VIRTUALSERVICES,
    AlreadyExists,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    Kube,
    KubeError,
    NotFound,
    ServerError,
    TooManyRequests,
    Unauthorized,
)
from controller.manager import Manager, ManagerConfig
from controller.render import RenderOptions
from tests.fixtures.controller_kapi import Running

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SELECTOR = "app.kubernetes.io/managed-by=holysheep-mesh,holysheep.ai/config="


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((FIXTURES / name).read_text())
    return doc


def wait_for(check: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except KubeError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture()
def kapi() -> Iterator[Running]:
    with Running() as r:
        yield r


def client(url: str, agent: str) -> Kube:
    return Kube(ApiClient(Configuration(host=url)), user_agent=agent)


@pytest.fixture()
def user(kapi: Running) -> Kube:
    return client(kapi.url, "test-user")


@pytest.fixture()
def managers(kapi: Running) -> Iterator[Callable[[str], Manager]]:
    started: list[Manager] = []

    def start(identity: str) -> Manager:
        cfg = ManagerConfig(
            identity=identity,
            lease_duration=1.5,
            renew_deadline=1.0,
            retry_period=0.1,
            watch_timeout=2,
            resync_seconds=60,
        )
        m = Manager(client(kapi.url, f"holysheep-mesh/{identity}"), RenderOptions(), cfg)
        m.start()
        started.append(m)
        return m

    yield start
    for m in started:
        m.shutdown(release=False)


def secret(kube: Kube, ns: str, name: str) -> None:
    kube.create(
        SECRETS,
        ns,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": ns},
            "data": {"api-key": "c2VjcmV0"},
        },
    )


def cr(kube: Kube, name: str) -> dict[str, Any]:
    doc = fixture(name)
    result: dict[str, Any] = kube.create(HOLYSHEEPCONFIGS, doc["metadata"]["namespace"], doc)
    return result


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def ready(kube: Kube, ns: str, name: str, status: str = "True", generation: int | None = None) -> Any:
    def check() -> Any:
        obj = kube.get(HOLYSHEEPCONFIGS, ns, name)
        c = condition(obj, "Ready")
        gen_ok = generation is None or (obj.get("status") or {}).get("observedGeneration") == generation
        return obj if c.get("status") == status and gen_ok else None

    return wait_for(check, what=f"{ns}/{name} Ready={status}")


def managed(kube: Kube, ns: str, name: str) -> dict[str, set[str]]:
    return {
        r.kind: {o["metadata"]["name"] for o in kube.list(r, ns, SELECTOR + name)["items"]} for r in GENERATED
    }


def test_create_applies_owned_objects_and_reports_ready(kapi: Running, user: Kube, managers: Any) -> None:
    secret(user, "holysheep-system", "holysheep-credentials")
    created = cr(user, "render_seed.yaml")
    managers("a")
    obj = ready(user, "holysheep-system", "production-cluster")

    names = managed(user, "holysheep-system", "production-cluster")
    assert names == {
        "ConfigMap": {"holysheep-extproc-production-cluster"},
        "ServiceEntry": {"holysheep-production-cluster-api-holysheep-ai"},
        "DestinationRule": {"holysheep-production-cluster-api-holysheep-ai"},
        "VirtualService": {"holysheep-production-cluster-api-holysheep-ai"},
        "Gateway": set(),  # Gateway mode only
        # The ext_proc's namespace is this CR's own here (see test_controller_authz for the others).
        "AuthorizationPolicy": {"holysheep-holysheep-system.production-cluster"},
        "EnvoyFilter": {"holysheep-production-cluster"},
    }
    for res in GENERATED:
        for o in user.list(res, "holysheep-system", SELECTOR + "production-cluster")["items"]:
            assert o["metadata"]["ownerReferences"] == [
                {
                    "apiVersion": "holysheep.ai/v1",
                    "kind": "HolySheepConfig",
                    "name": "production-cluster",
                    "uid": created["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
    status = obj["status"]
    assert status["observedGeneration"] == 1
    assert status["providerNames"] == "holysheep"
    assert status["providers"] == [
        {
            "name": "holysheep",
            "host": "api.holysheep.ai",
            "secretName": "holysheep-credentials",
            "secretFound": True,
        }
    ]
    for type_, value, reason in (
        ("Ready", "True", "Reconciled"),
        ("Invalid", "False", "Valid"),
        ("SecretsVerified", "True", "Found"),
    ):
        c = condition(obj, type_)
        assert (c["status"], c["reason"], c["observedGeneration"]) == (value, reason, 1)
        assert c["message"] and c["lastTransitionTime"]

    api = kapi.api
    assert api is not None
    applies = [
        r for r in api.writes("holysheep-mesh/a") if r.method.value == "PATCH" and r.subresource is None
    ]
    assert len(applies) == 6
    for r in applies:
        assert r.headers["Content-Type"] == "application/apply-patch+yaml"
        assert r.params["fieldManager"] == "holysheep-mesh" and r.params["force"] == "true"
    secret_reads = [
        r
        for r in list(api._requests)
        if r.resource
        and r.resource.plural == "secrets"
        and r.headers.get("User-Agent", "").startswith("holysheep-mesh/")
    ]
    assert secret_reads and all("as=PartialObjectMetadata" in r.headers["Accept"] for r in secret_reads)
    assert all(r.name for r in secret_reads)  # GET by name, never a list


def test_spec_edit_updates_and_prunes(user: Kube, managers: Any) -> None:
    for s in ("openai-credentials", "anthropic-credentials"):
        secret(user, "apps", s)
    cr(user, "render_three_providers.yaml")
    managers("a")
    ready(user, "apps", "multi")
    assert len(managed(user, "apps", "multi")["VirtualService"]) == 3

    live = user.get(HOLYSHEEPCONFIGS, "apps", "multi")
    live["spec"] = {
        "timeout": "45s",
        "providers": [live["spec"]["providers"][0]],  # openai only; routes default to it
    }
    user.replace(HOLYSHEEPCONFIGS, "apps", "multi", live)
    ready(user, "apps", "multi", generation=2)

    names = managed(user, "apps", "multi")
    assert (
        names["ServiceEntry"]
        == names["DestinationRule"]
        == names["VirtualService"]
        == {"holysheep-multi-api-openai-com"}
    )
    vs = user.get(VIRTUALSERVICES, "apps", "holysheep-multi-api-openai-com")
    assert vs["spec"]["http"][0]["retries"]["perTryTimeout"] == "45s"
    ef = user.get(ENVOYFILTERS, "apps", "holysheep-multi")
    assert "workloadSelector" not in ef["spec"]
    assert [p["applyTo"] for p in ef["spec"]["configPatches"]] == ["HTTP_FILTER", "HTTP_ROUTE", "NETWORK_FILTER"]
    cm = user.get(CONFIGMAPS, "apps", "holysheep-extproc-multi")
    served = yaml.safe_load(cm["data"]["config.yaml"])
    assert [p["name"] for p in served["spec"]["providers"]] == ["openai"] and "45s" in cm["data"]["config.yaml"]


def test_invalid_spec_sets_condition_emits_event_and_keeps_objects(
    kapi: Running, user: Kube, managers: Any
) -> None:
    secret(user, "holysheep-system", "holysheep-credentials")
    cr(user, "render_seed.yaml")
    managers("a")
    ready(user, "holysheep-system", "production-cluster")
    before = {
        r.kind: user.list(r, "holysheep-system", SELECTOR + "production-cluster")["items"] for r in GENERATED
    }
    api = kapi.api
    assert api is not None
    writes_before = len(api.writes("holysheep-mesh/a"))

    user.request(
        "PATCH",
        HOLYSHEEPCONFIGS.path("holysheep-system", "production-cluster"),
        body={"spec": {"maxRetries": 99}},
        content_type="application/merge-patch+json",
    )
    obj = ready(user, "holysheep-system", "production-cluster", status="False", generation=2)
    invalid = condition(obj, "Invalid")
    assert (invalid["status"], invalid["reason"], invalid["observedGeneration"]) == ("True", "InvalidSpec", 2)
    assert "spec.maxRetries" in invalid["message"]
    kept = condition(obj, "SecretsVerified")  # it describes the last good spec, still in force
    assert (kept["status"], kept["reason"], kept["observedGeneration"]) == ("True", "Found", 1)

    events = wait_for(
        lambda: [
            e
            for e in user.list(EVENTS, "holysheep-system")["items"]
            if e["involvedObject"]["name"] == "production-cluster"
        ],
        what="event",
    )
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "InvalidSpec")]
    assert "spec.maxRetries" in events[0]["message"]
    after = {
        r.kind: user.list(r, "holysheep-system", SELECTOR + "production-cluster")["items"] for r in GENERATED
    }
    assert after == before  # same objects, same resourceVersions: nothing applied, nothing pruned
    new_writes = api.writes("holysheep-mesh/a")[writes_before:]
    assert {(r.resource.plural if r.resource else "", r.subresource) for r in new_writes} <= {
        ("holysheepconfigs", "status"),
        ("events", None),
    }


def test_a_budget_change_reaches_the_configmap_and_an_invalid_budget_keeps_it(
    kapi: Running, user: Kube, managers: Any
) -> None:
    """spec.budgets goes into the data plane's ConfigMap (with the CRD's defaults); a negative
    limit sets Invalid naming the field, and the ConfigMap keeps the last good budgets."""
    secret(user, "holysheep-system", "holysheep-credentials")
    cr(user, "render_seed.yaml")
    managers("a")
    ready(user, "holysheep-system", "production-cluster")
    good = {"name": "team-a-hourly", "namespaces": ["team-a"], "window": "1h", "requests": 5}
    user.request("PATCH", HOLYSHEEPCONFIGS.path("holysheep-system", "production-cluster"),
                 body={"spec": {"budgets": [good]}}, content_type="application/merge-patch+json")
    ready(user, "holysheep-system", "production-cluster", generation=2)

    def budgets() -> Any:
        cm = user.get(CONFIGMAPS, "holysheep-system", "holysheep-extproc-production-cluster")
        return yaml.safe_load(cm["data"]["config.yaml"])["spec"].get("budgets")

    assert wait_for(budgets, what="budgets in the ConfigMap") == [
        {**good, "serviceAccounts": ["*"], "per": "ServiceAccount"}]

    bad = {**good, "requests": -1}
    user.request("PATCH", HOLYSHEEPCONFIGS.path("holysheep-system", "production-cluster"),
                 body={"spec": {"budgets": [bad]}}, content_type="application/merge-patch+json")
    obj = ready(user, "holysheep-system", "production-cluster", status="False", generation=3)
    invalid = condition(obj, "Invalid")
    assert (invalid["status"], invalid["reason"]) == ("True", "InvalidSpec")
    assert "spec.budgets[0].requests: must be >= 0, got -1" in invalid["message"]
    assert budgets() == [{**good, "serviceAccounts": ["*"], "per": "ServiceAccount"}]  # the last good one


def test_missing_secret_reports_secret_not_found_then_recovers(
    user: Kube, managers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "SECRET_RETRY_SECONDS", 0.3)
    cr(user, "render_seed.yaml")
    managers("a")
    obj = ready(user, "holysheep-system", "production-cluster", status="False")
    c = condition(obj, "Ready")
    assert c["reason"] == "SecretNotFound" and "holysheep-credentials" in c["message"]
    assert obj["status"]["providers"][0]["secretFound"] is False
    assert condition(obj, "Invalid")["status"] == "False"
    secret(user, "holysheep-system", "holysheep-credentials")
    ready(user, "holysheep-system", "production-cluster", status="True")  # picked up by the requeue


@pytest.mark.parametrize("exists", [True, False], ids=["secret-exists", "secret-absent"])
def test_a_secret_the_controller_may_not_read_is_reported_unknown(
    kapi: Running, user: Kube, managers: Any, exists: bool
) -> None:
    """The shipped RBAC grants no access to Secrets: the API answers 403 to the metadata GET.
    Status must then say "unknown", and be the same whether or not the Secret exists."""
    api = kapi.api
    assert api is not None
    api.refuse("GET", "secrets", 403, "Forbidden")
    if exists:
        secret(user, "holysheep-system", "holysheep-credentials")
    cr(user, "render_seed.yaml")
    managers("a")
    obj = ready(user, "holysheep-system", "production-cluster")

    assert obj["status"]["providers"] == [
        {"name": "holysheep", "host": "api.holysheep.ai", "secretName": "holysheep-credentials"}
    ]  # no secretFound: the controller did not see it
    verified = condition(obj, "SecretsVerified")
    assert (verified["status"], verified["reason"], verified["observedGeneration"]) == ("Unknown", "Forbidden", 1)
    assert "holysheep-credentials" in verified["message"] and "api-key" in verified["message"]
    assert "holysheep-system" in verified["message"]
    ready_c = condition(obj, "Ready")
    assert (ready_c["status"], ready_c["reason"]) == ("True", "ReconciledSecretsUnverified")
    assert "not known" in ready_c["message"] and "found" not in ready_c["message"]
    assert "c2VjcmV0" not in str(obj)  # never a value
    assert managed(user, "holysheep-system", "production-cluster")["EnvoyFilter"] == {
        "holysheep-production-cluster"
    }  # the mesh objects are applied all the same
    reads = [
        r
        for r in list(api._requests)
        if r.resource and r.resource.plural == "secrets" and r.headers.get("User-Agent", "").startswith("holysheep")
    ]
    assert reads and all(r.method.value == "GET" and r.name == "holysheep-credentials" for r in reads)


def test_the_seed_converges_in_one_reconcile_with_info_logging(
    kapi: Running, user: Kube, managers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With the product's INFO logging every log call runs; one that raises would fail the
    reconcile after its first write and retry with back-off. The API server's request log is the
    oracle: the reconcile that made the CR Ready is the first one, and it applied every object."""
    api = kapi.api
    assert api is not None
    secret(user, "holysheep-system", "holysheep-credentials")
    cr(user, "render_seed.yaml")
    with caplog.at_level(logging.INFO):
        assert logging.getLogger("controller.reconcile").isEnabledFor(logging.INFO)
        managers("a")
        ready(user, "holysheep-system", "production-cluster")
    sent = [r for r in list(api._requests) if r.headers.get("User-Agent", "").startswith("holysheep-mesh/a")]
    first_status = next(i for i, r in enumerate(sent) if r.subresource == "status")
    reconciles = [
        r
        for r in sent[:first_status]
        if r.method.value == "GET" and r.name and r.resource and r.resource.plural == "holysheepconfigs"
    ]
    applies = [r for r in sent[:first_status] if r.method.value == "PATCH"]
    assert len(reconciles) == 1, f"{len(reconciles)} reconciles before the CR was Ready"
    assert len(applies) == 6
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    applied = {(r.__dict__["kind"], r.__dict__["object"]) for r in caplog.records if r.getMessage() == "applied"}
    live = managed(user, "holysheep-system", "production-cluster")
    assert applied == {(kind, name) for kind, names in live.items() for name in names}


def test_the_client_raises_typed_errors(kapi: Running, user: Kube) -> None:
    """Each refusal of the API server (status code and Status reason) as its own type."""
    api = kapi.api
    assert api is not None
    with pytest.raises(NotFound) as nf:
        user.get(CONFIGMAPS, "apps", "nope")
    assert nf.value.reason == "NotFound"
    secret(user, "apps", "s")
    with pytest.raises(AlreadyExists) as ae:
        secret(user, "apps", "s")
    assert isinstance(ae.value, Conflict) and ae.value.status == 409
    held = user.get(SECRETS, "apps", "s")
    user.replace(SECRETS, "apps", "s", {**held, "data": {"api-key": "b3RoZXI="}})
    with pytest.raises(Conflict) as stale:
        user.replace(SECRETS, "apps", "s", held)  # the resourceVersion we hold is now stale
    assert not isinstance(stale.value, AlreadyExists) and stale.value.reason == "Conflict"
    with pytest.raises(BadRequest):  # server-side apply without a fieldManager
        user.request("PATCH", CONFIGMAPS.path("apps", "x"), body={}, content_type="application/apply-patch+yaml")
    rv = user.list(CONFIGMAPS, "apps")["metadata"]["resourceVersion"]
    api.compact()
    with pytest.raises(Gone) as gone:  # an ERROR event in the watch stream, typed by the client
        list(user.watch(CONFIGMAPS, "apps", rv, timeout_seconds=2))
    assert gone.value.reason == "Expired"
    for code, reason, error in (
        (401, "Unauthorized", Unauthorized),
        (403, "Forbidden", Forbidden),
        (422, "Invalid", Invalid),
        (429, "TooManyRequests", TooManyRequests),
        (500, "InternalError", ServerError),
        (503, "ServiceUnavailable", ServerError),
    ):
        api.refuse("GET", "configmaps", code, reason)
        with pytest.raises(error) as exc:
            user.list(CONFIGMAPS, "apps")
        assert (exc.value.status, exc.value.reason) == (code, reason)
        assert isinstance(exc.value, KubeError)


def test_delete_removes_generated_objects(user: Kube, managers: Any) -> None:
    secret(user, "holysheep-system", "holysheep-credentials")
    cr(user, "render_seed.yaml")
    managers("a")
    ready(user, "holysheep-system", "production-cluster")
    user.delete(HOLYSHEEPCONFIGS, "holysheep-system", "production-cluster")
    wait_for(
        lambda: not any(managed(user, "holysheep-system", "production-cluster").values()), what="cleanup"
    )
    for res in (SERVICEENTRIES, DESTINATIONRULES):
        with pytest.raises(NotFound):
            user.get(res, "holysheep-system", "holysheep-production-cluster-api-holysheep-ai")


def test_watch_410_gone_lists_again(kapi: Running, user: Kube, managers: Any) -> None:
    secret(user, "holysheep-system", "holysheep-credentials")
    cr(user, "render_seed.yaml")
    m = managers("a")
    ready(user, "holysheep-system", "production-cluster")
    assert m.informer.lists == 1
    api = kapi.api
    assert api is not None
    api.compact()  # ends the watch; re-watching from the old version now gets 410 Gone
    wait_for(lambda: m.informer.lists == 2, what="relist after 410")
    watches = [
        r
        for r in list(api._requests)
        if r.params.get("watch") == "true" and r.resource and r.resource.plural == "holysheepconfigs"
    ]
    assert len(watches) >= 3  # first watch, the 410 one, the one after the relist
    # The new watch delivers events: a spec change is reconciled.
    user.request(
        "PATCH",
        HOLYSHEEPCONFIGS.path("holysheep-system", "production-cluster"),
        body={"spec": {"timeout": "20s"}},
        content_type="application/merge-patch+json",
    )
    ready(user, "holysheep-system", "production-cluster", generation=2)


def test_only_the_leader_writes_and_a_follower_takes_over(kapi: Running, user: Kube, managers: Any) -> None:
    api = kapi.api
    assert api is not None
    secret(user, "holysheep-system", "holysheep-credentials")
    first = managers("first")
    wait_for(first.elector.is_leader, what="first leader")
    second = managers("second")
    cr(user, "render_seed.yaml")
    ready(user, "holysheep-system", "production-cluster")
    # Give the follower every chance to (wrongly) act: it has seen the CR (its watch is up) and
    # tried for the lease three more times since the leader finished.
    seen = len(list(api._requests))

    def follower_tried(times: int) -> bool:
        return sum(1 for r in list(api._requests)[seen:] if r.resource and r.resource.plural == "leases"
                   and r.headers.get("User-Agent", "").startswith("holysheep-mesh/second")) >= times

    wait_for(lambda: follower_tried(3), what="the follower trying for the lease")
    assert api.writes("holysheep-mesh/first")
    assert api.writes("holysheep-mesh/second") == []
    assert not second.elector.is_leader()
    lease = user.get(LEASES, "holysheep-system", "holysheep-mesh-controller")
    assert lease["spec"]["holderIdentity"] == "first"

    first.shutdown(release=False)  # a crash: the lease is left to expire
    stopped_at = len(api.writes("holysheep-mesh/first"))
    user.request(
        "PATCH",
        HOLYSHEEPCONFIGS.path("holysheep-system", "production-cluster"),
        body={"spec": {"timeout": "20s"}},
        content_type="application/merge-patch+json",
    )
    ready(user, "holysheep-system", "production-cluster", generation=2)
    assert api.writes("holysheep-mesh/second")
    assert len(api.writes("holysheep-mesh/first")) == stopped_at
    assert (
        user.get(LEASES, "holysheep-system", "holysheep-mesh-controller")["spec"]["holderIdentity"]
        == "second"
    )
