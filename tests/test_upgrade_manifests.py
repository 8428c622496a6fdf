"""What the install ships for upgrades that lose nothing (README "Upgrade"), checked as applied.

The ext_proc Deployment's termination budget covers both phases of the process's own drain
(not ready but serving for ``--drain-delay-seconds``, then ``--drain-seconds`` for the streams in
flight), the sidecar outlives them, and the delay covers the readiness probe; the DestinationRule
every sidecar applies to the ext_proc Service is valid against Istio 1.30's schema with unknown
fields rejected, lifts the retry cap and ejects nothing. The defaults of the flags are the
Deployment's values, so a pod spec without them behaves the same.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import jsonschema
import pytest

from controller import naming
from controller.render import render_all
from extproc.cli import _add_extproc
from extproc.server import ServerOptions
from protos.durations import parse_duration
from protos.spec import load_file
from tests.test_mesh_manifests import ROOT, build, container, flags, one
from tests.test_mesh_manifests import extproc as extproc_deployment
from tests.test_render import istio_schemas, strict_root

Obj = dict[str, Any]


def _fqdn(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def destination_rule() -> Obj:
    return one("DestinationRule", naming.DEFAULT_EXTPROC_SERVICE)


def _strict_dr_schema() -> Obj:
    dr = destination_rule()
    return strict_root(istio_schemas()[(dr["apiVersion"], dr["kind"])])


def test_destination_rule_validates_against_istio_1_30_strictly() -> None:
    dr = destination_rule()
    assert dr["apiVersion"] == "networking.istio.io/v1"
    jsonschema.validate(dr, _strict_dr_schema())
    # The check can fail: a misspelt field (Istio would reject it, or worse, ignore it).
    bad = copy.deepcopy(dr)
    bad["spec"]["trafficPolicy"]["connectionPool"]["http"]["maxRetry"] = 10
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _strict_dr_schema())


def test_destination_rule_is_for_the_cluster_the_filter_names() -> None:
    dr = destination_rule()
    svc = one("Service", naming.DEFAULT_EXTPROC_SERVICE)
    host = _fqdn(svc["metadata"]["name"], svc["metadata"]["namespace"])
    assert dr["spec"]["host"] == host
    assert dr["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert dr["spec"]["exportTo"] == ["*"]  # every client namespace's sidecars see it
    # The cluster the rendered EnvoyFilter's ext_proc filter opens its streams on is Istio's
    # outbound cluster of that host: the one this DestinationRule configures.
    objects = render_all(load_file(str(ROOT / "mesh" / "samples" / "production-cluster.yaml")))
    (ef,) = [o for o in objects if o["kind"] == "EnvoyFilter"]
    (value, *_) = [p["patch"]["value"] for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    cluster = value["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert cluster == f"outbound|{naming.DEFAULT_EXTPROC_PORT}||{host}"
    assert any(p["port"] == naming.DEFAULT_EXTPROC_PORT for p in svc["spec"]["ports"])


def test_destination_rule_lifts_the_retry_cap_and_ejects_nothing() -> None:
    policy = destination_rule()["spec"]["trafficPolicy"]
    # Envoy's default is 3 concurrent retries per cluster; a retry budget would cap them too.
    assert policy["connectionPool"]["http"]["maxRetries"] >= 2**31 - 1
    assert "retryBudget" not in policy
    # outlierDetection is stated (so no mesh default replaces it) with every error count at 0:
    # Istio turns a 0 into "enforcing 0%", i.e. never eject; no local-origin ejection either.
    outlier = policy["outlierDetection"]
    assert outlier == {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 0}
    # Istio's automatic mTLS stays in force (a tls block would replace it).
    assert "tls" not in policy and "portLevelSettings" not in policy


def _cli_defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _add_extproc(parser.add_subparsers())
    return parser.parse_args(["extproc", "--config", "x"])


def test_termination_budget_covers_both_drain_phases() -> None:
    d = extproc_deployment()
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    f = flags(c)
    delay, drain = float(f["drain-delay-seconds"]), float(f["drain-seconds"])
    # The delay covers the readiness probe's path to "not ready" (a container restarted in
    # place stays in the endpoints until then), with room for the endpoint change to propagate.
    probe = c["readinessProbe"]
    assert probe["httpGet"]["path"] == "/ready"
    assert delay >= probe["periodSeconds"] * probe["failureThreshold"] + 5
    # The sidecar carries the streams through both phases; the pod's grace period outlasts it.
    proxy_config = json.loads(d["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    sidecar = parse_duration(proxy_config["terminationDrainDuration"])
    assert sidecar >= delay + drain + 1
    assert pod["terminationGracePeriodSeconds"] >= max(sidecar, delay + drain) + 5
    assert "EXIT_ON_ZERO_ACTIVE_CONNECTIONS" not in json.dumps(proxy_config)  # could end the sidecar early
    # The defaults are the Deployment's values: the flags only state them.
    cli = _cli_defaults()
    options = ServerOptions(config_path="x")
    assert (cli.drain_delay_seconds, cli.drain_seconds) == (delay, drain)
    assert (options.drain_delay_seconds, options.drain_seconds) == (delay, drain)


def test_no_other_destination_rule_targets_the_ext_proc() -> None:
    rules = [o for o in build() if o["kind"] == "DestinationRule"]
    assert [r["metadata"]["name"] for r in rules] == [naming.DEFAULT_EXTPROC_SERVICE]
    # And render never generates one for it (it writes DestinationRules for provider hosts).
    host = _fqdn(naming.DEFAULT_EXTPROC_SERVICE, naming.DEFAULT_EXTPROC_NAMESPACE)
    for fixture in ("render_seed.yaml", "render_three_providers.yaml"):
        objects = render_all(load_file(str(ROOT / "tests" / "fixtures" / fixture)))
        assert all(o["spec"].get("host") != host for o in objects if o["kind"] == "DestinationRule")
