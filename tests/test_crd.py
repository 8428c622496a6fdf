"""The CRD: current with its generator, and its schema agrees with the parser on examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controller import crd
from protos.spec import ConfigError, parse_document

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "mesh" / "crd" / "holysheepconfig.yaml"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

SEED = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata:
  name: production-cluster
  namespace: holysheep-system
spec:
  baseUrl: "https://api.holysheep.ai/v1"
  timeout: 30s
  maxRetries: 3
  circuitBreaker:
    enabled: true
    failureThreshold: 5
    resetTimeout: 60s
  healthCheck:
    interval: 10s
    endpoint: "/models"
"""


def schema() -> dict[str, Any]:
    doc = yaml.safe_load(CRD_FILE.read_text())
    (version,) = doc["spec"]["versions"]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


def test_file_is_generated_from_the_code() -> None:
    assert yaml.safe_load(CRD_FILE.read_text()) == crd.crd()


def test_crd_shape() -> None:
    doc = yaml.safe_load(CRD_FILE.read_text())
    assert doc["spec"]["scope"] == "Namespaced"
    assert doc["spec"]["names"]["shortNames"] == ["hsc"]
    (version,) = doc["spec"]["versions"]
    assert version["name"] == "v1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Ready", "Providers", "Age"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(spec)


def test_seed_example_exactly_as_written_is_accepted() -> None:
    doc = yaml.safe_load(SEED)
    jsonschema.validate(doc, schema())
    parse_document(doc)


@pytest.mark.parametrize("name", ["render_seed.yaml", "render_three_providers.yaml"])
def test_examples_are_accepted(name: str) -> None:
    doc = yaml.safe_load((FIXTURES / name).read_text())
    jsonschema.validate(doc, schema())


def _mutate(path: str, value: Any) -> dict[str, Any]:
    doc = yaml.safe_load((FIXTURES / "render_three_providers.yaml").read_text())
    target = doc
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


_DELETE = object()
BAD = [
    ("spec.timeout", "30"),
    ("spec.timeout", "thirty seconds"),
    ("spec.maxRetries", -1),
    ("spec.maxRetries", 11),
    ("spec.circuitBreaker.failureThreshold", 0),
    ("spec.circuitBreaker.resetTimeout", "1d"),
    ("spec.circuitBreaker.surprise", True),
    ("spec.unknownField", 1),
    ("spec.healthCheck.endpoint", "models"),
    ("spec.providers.0.name", "Open_AI"),
    ("spec.providers.0.baseUrl", "ftp://api.openai.com"),
    ("spec.providers.0.baseUrl", "https://user:pw@api.openai.com"),
    ("spec.providers.0.baseUrl", "https://api.openai.com/v1?key=1"),
    ("spec.providers.0.auth.type", "Basic"),
    ("spec.providers.0.auth.secretName", "other-ns/openai"),
    ("spec.providers.0.auth.key", "api key"),
    ("spec.providers.0.baseUrl", _DELETE),
    ("spec.routes.0.models", []),
    ("spec.routes.0.backends.0.priority", 1001),
    ("spec.routes.0.backends.0.weight", 0),
    ("spec.cache.mode", "Sometimes"),
    ("spec.cache.redisUrl", "http://redis:6379"),
    ("spec.cache.maxEntries", 0),
    ("spec.pricing.0.inputPerMillion", -1),
    ("spec.workloadSelector.matchLabels", {"app": 3}),
    ("spec.workloadSelector.podSelector", {}),
    ("spec.routes", []),
]


@pytest.mark.parametrize(("path", "value"), BAD, ids=[f"{p}={v!r}" for p, v in BAD])
def test_invalid_by_the_parser_is_rejected_by_the_schema(path: str, value: Any) -> None:
    doc = _mutate(path, value)
    with pytest.raises(ConfigError):
        parse_document(copy.deepcopy(doc))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema())


def test_defaults_fill_like_the_api_server_and_stay_parser_valid() -> None:
    doc = yaml.safe_load(SEED)
    doc["spec"] = crd.apply_defaults(doc["spec"])
    assert doc["spec"]["circuitBreaker"] == {"enabled": True, "failureThreshold": 5, "resetTimeout": "60s"}
    assert "cache" not in doc["spec"]  # absent objects are not invented
    jsonschema.validate(doc, schema())
    assert parse_document(doc) == parse_document(yaml.safe_load(SEED))
