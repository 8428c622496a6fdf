"""A HolySheepConfig cannot make the controller (or the data plane) read a Secret from another
namespace: the CRD schema rejects the reference, and if one reaches the controller anyway (an API
server without the schema, as the emulator is) it sets Invalid, changes no generated object, and
never asks the API server for a Secret outside the CR's namespace."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml

from controller.kube import CONFIGMAPS, GENERATED, HOLYSHEEPCONFIGS, Kube
from protos.spec import ConfigError, parse_document
from tests import test_controller_kmock as kmock_suite
from tests.test_controller_kmock import FIXTURES, SELECTOR, Running, condition, ready, secret
from tests.test_crd import schema

# The kmock suite's fixtures, shared: an API emulator, a user client and controller managers.
kapi = kmock_suite.kapi
user = kmock_suite.user
managers = kmock_suite.managers

NS, NAME = "apps", "scoped"
OTHER_NS = "payments"

CR = f"""\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: {NAME}, namespace: {NS}}}
spec:
  providers:
    - name: openai
      baseUrl: https://api.openai.com/v1
      auth: {{type: Bearer, secretName: openai-credentials, key: api-key}}
"""

# Every way a spec could try to name another namespace's Secret.
CROSS_NAMESPACE: dict[str, dict[str, Any]] = {
    "namespace/name": {"secretName": f"{OTHER_NS}/openai-credentials", "key": "api-key"},
    "secretNamespace": {"secretName": "openai-credentials", "key": "api-key", "secretNamespace": OTHER_NS},
    "namespace field": {"secretName": "openai-credentials", "key": "api-key", "namespace": OTHER_NS},
    "secretRef object": {"secretRef": {"name": "openai-credentials", "namespace": OTHER_NS}, "key": "api-key"},
    "path traversal": {"secretName": f"../{OTHER_NS}/openai-credentials", "key": "api-key"},
    "key with a path": {"secretName": "openai-credentials", "key": f"../../{OTHER_NS}/openai-credentials/api-key"},
}


def _doc(auth: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CR)
    doc["spec"]["providers"][0]["auth"] = {"type": "Bearer", **auth}
    return doc


@pytest.mark.parametrize("how", list(CROSS_NAMESPACE))
def test_schema_and_parser_reject_a_cross_namespace_reference(how: str) -> None:
    doc = _doc(CROSS_NAMESPACE[how])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema())
    with pytest.raises(ConfigError) as exc:
        parse_document(copy.deepcopy(doc))
    assert "spec.providers[0].auth" in str(exc.value)


def _secret_requests(kapi: Running) -> list[tuple[str, str | None, str | None]]:
    api = kapi.api
    assert api is not None
    return [
        (r.method.value, r.namespace, r.name)
        for r in list(api._requests)
        if r.resource and r.resource.plural == "secrets"
        and r.headers.get("User-Agent", "").startswith("holysheep-mesh/")
    ]


def _generated(user: Kube) -> dict[str, list[dict[str, Any]]]:
    return {r.kind: user.list(r, NS, SELECTOR + NAME)["items"] for r in GENERATED}


@pytest.mark.parametrize("how", ["namespace/name", "secretNamespace", "path traversal"])
def test_controller_sets_invalid_keeps_last_good_and_reads_no_foreign_secret(
    kapi: Running, user: Kube, managers: Any, how: str
) -> None:
    secret(user, NS, "openai-credentials")
    secret(user, OTHER_NS, "openai-credentials")  # the target: it exists, so only the rule stops it
    user.create(HOLYSHEEPCONFIGS, NS, yaml.safe_load(CR))
    managers("a")
    ready(user, NS, NAME, generation=1)
    before = _generated(user)
    assert before["ConfigMap"] and before["EnvoyFilter"]
    good_config = user.get(CONFIGMAPS, NS, f"holysheep-extproc-{NAME}")["data"]["config.yaml"]

    live = user.get(HOLYSHEEPCONFIGS, NS, NAME)
    live["spec"]["providers"][0]["auth"] = {"type": "Bearer", **CROSS_NAMESPACE[how]}
    user.replace(HOLYSHEEPCONFIGS, NS, NAME, live)
    obj = ready(user, NS, NAME, status="False", generation=2)

    invalid = condition(obj, "Invalid")
    assert (invalid["status"], invalid["reason"], invalid["observedGeneration"]) == ("True", "InvalidSpec", 2)
    assert "spec.providers[0].auth" in invalid["message"]
    assert condition(obj, "Ready")["reason"] == "InvalidSpec"
    assert _generated(user) == before  # same objects, same resourceVersions
    assert user.get(CONFIGMAPS, NS, f"holysheep-extproc-{NAME}")["data"]["config.yaml"] == good_config
    assert OTHER_NS not in good_config
    reads = _secret_requests(kapi)
    assert reads, "the valid spec's Secret is checked (by name, in the CR's namespace)"
    assert {ns for _, ns, _ in reads} == {NS}, reads
    assert all(method == "GET" and name == "openai-credentials" for method, _, name in reads), reads

    # Fixed: applied again, from the last good objects.
    live = user.get(HOLYSHEEPCONFIGS, NS, NAME)
    live["spec"]["providers"][0]["auth"] = {"type": "Bearer", "secretName": "openai-credentials", "key": "api-key"}
    user.replace(HOLYSHEEPCONFIGS, NS, NAME, live)
    ready(user, NS, NAME, generation=3)
    assert {ns for _, ns, _ in _secret_requests(kapi)} == {NS}


def test_a_cr_reads_secrets_only_in_its_own_namespace_even_when_names_match(
    kapi: Running, user: Kube, managers: Any
) -> None:
    """Two namespaces, one Secret name: a CR in `apps` is Ready only by `apps`' Secret."""
    secret(user, OTHER_NS, "openai-credentials")  # only the foreign one exists
    user.create(HOLYSHEEPCONFIGS, NS, yaml.safe_load(CR))
    managers("a")
    obj = ready(user, NS, NAME, status="False")
    assert condition(obj, "Ready")["reason"] == "SecretNotFound"
    assert obj["status"]["providers"][0]["secretFound"] is False
    assert {ns for _, ns, _ in _secret_requests(kapi)} == {NS}
    assert (FIXTURES / "render_three_providers.yaml").exists()  # the shared fixtures are the kmock suite's
