"""The CRD: the file is `holysheep-mesh crd`'s output, and its schema agrees with the parser.

Both come from the models in protos/spec.py (protos/schema.py derives them); these tests hold
the derivation to what the API server and the parser each do with good and bad documents.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controller import crd
from protos.schema import Arr, Dur, Enum, Int, Map, Obj, Reader, Str, field, fill_defaults, model, openapi, read_model
from protos.spec import DNS_LABEL, ConfigError, parse_document, parse_documents

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


def test_file_is_the_crd_command_output() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "crd"], cwd=ROOT, capture_output=True, timeout=60, check=True
    )
    assert result.stdout.decode() == CRD_FILE.read_text(), (
        "mesh/crd/holysheepconfig.yaml is stale: run `holysheep-mesh crd > mesh/crd/holysheepconfig.yaml`"
    )
    assert yaml.safe_load(result.stdout) == crd.crd()


def _structural(node: Any, path: str) -> list[str]:
    """Kubernetes' structural-schema rule: every node says its type (no preserve-unknown here)."""
    if not isinstance(node, dict):
        return []
    found = [] if "type" in node else [path]
    for key, sub in node.get("properties", {}).items():
        found += _structural(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _structural(node[key], f"{path}.{key}")
    return found


def test_schema_is_structural_and_every_spec_field_is_described() -> None:
    assert _structural(schema(), "") == []
    spec = schema()["properties"]["spec"]
    undescribed: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub:
                undescribed.append(f"{path}.{key}")
            walk(sub.get("items", sub), f"{path}.{key}")

    walk(spec, "spec")
    assert undescribed == []


def test_cel_rules_between_fields() -> None:
    """jsonschema skips x-kubernetes-validations; the API server's rules are pinned here."""
    spec = schema()["properties"]["spec"]
    auth = spec["properties"]["providers"]["items"]["properties"]["auth"]
    assert auth["x-kubernetes-validations"] == [
        {"rule": "self.type == 'Header' ? has(self.header) : !has(self.header)",
         "message": "header is required with type Header and only allowed with it"},
        {"rule": "has(self.secretName) == has(self.key)", "message": "secretName and key go together"},
        {"rule": "has(self.secretName) || has(self.env)", "message": "needs secretName and key, or env"},
    ]
    assert [v["message"] for v in spec["x-kubernetes-validations"]] == [
        "needs spec.baseUrl or at least one entry in spec.providers",
        "the provider name 'holysheep' is taken by spec.baseUrl",
    ]
    providers = spec["properties"]["providers"]
    assert (providers["x-kubernetes-list-type"], providers["x-kubernetes-list-map-keys"]) == ("map", ["name"])


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


@pytest.mark.parametrize("name", ["render_seed.yaml", "render_three_providers.yaml", "render_gateway.yaml"])
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


# Exact messages (captured from the parser before the schema became declarative): the document,
# the field path and the problem, so an operator can fix a CR from the message alone.
ERRORS = [
    ("spec.providers.0.auth", _DELETE, "spec.providers[0].auth: is required"),
    ("spec.providers.0.name", _DELETE, "spec.providers[0].name: must be a non-empty string, got null"),
    ("spec.providers.0.auth.type", "Basic",
     "spec.providers[0].auth.type: must be one of Bearer, XApiKey, ApiKey, Header, got 'Basic'"),
    ("spec.providers.2.auth.header", _DELETE, "spec.providers[2].auth.header: must be a non-empty string, got null"),
    ("spec.providers.0.auth.header", "x-h", "spec.providers[0].auth.header: only allowed with type Header"),
    ("spec.providers.0.auth.key", _DELETE, "spec.providers[0].auth.key: must be a non-empty string, got null"),
    ("spec.providers.0.auth.secretName", _DELETE,
     "spec.providers[0].auth.secretName: must be a non-empty string, got null"),
    ("spec.providers.2.auth.env", _DELETE,
     "spec.providers[2].auth: needs a credential source: secretName and key, or env"),
    ("spec.providers.1.name", "openai", "spec.providers[1].name: duplicate provider name 'openai'"),
    ("spec.routes.1.backends.0.provider", "nope",
     "spec.routes[1].backends[0].provider: no provider named 'nope' (have: openai, anthropic, gateway)"),
    ("spec.routes.0.backends.0.priority", 1001,
     "spec.routes[0].backends[0].priority: must be between 0 and 1000, got 1001"),
    ("spec.routes.0.models", [], "spec.routes[0].models: must have at least 1 item(s)"),
    ("spec.routes.0.backends", _DELETE, "spec.routes[0].backends: must be a list, got null"),
    ("spec.healthCheck.endpoint", "models", "spec.healthCheck.endpoint: must start with '/'"),
    ("spec.circuitBreaker.resetTimeout", "0s", "spec.circuitBreaker.resetTimeout: must be at least 1ms"),
    ("spec.cache.mode", "Sometimes", "spec.cache.mode: must be one of Off, Fallback, Always, got 'Sometimes'"),
    ("spec.cache.redisUrl", "redis://:pw@h",
     "spec.cache.redisUrl: must not embed a password; mount it as a Secret instead"),
    ("spec.pricing.0.inputPerMillion", -1, "spec.pricing[0].inputPerMillion: must be a number >= 0, got -1"),
    ("spec.workloadSelector.matchLabels", {"app": 3},
     "spec.workloadSelector.matchLabels.app: must be a non-empty string, got integer"),
    ("spec.cache.bogus", 1,
     "spec.cache.bogus: unknown field (allowed: maxEntries, maxEntryBytes, mode, redisUrl, tenantHeader, ttl)"),
    ("spec.maxRetries", True, "spec.maxRetries: must be an integer, got boolean"),
    ("spec.providers", [], "spec: needs spec.baseUrl or at least one entry in spec.providers"),
    ("spec.providers.0.auth.env", "sk-secret-value",
     "spec.providers[0].auth.env: the value (15 characters, not shown) is not valid: an environment variable name"),
    # Was a bare ValueError out of urlsplit (no document, no path); now a ConfigError like the rest.
    ("spec.providers.0.baseUrl", "http://[",
     "spec.providers[0].baseUrl: must be an absolute http(s) URL with a host (it does not parse as a URL)"),
    ("spec.cache.redisUrl", "redis://[", "spec.cache.redisUrl: must be a redis://, rediss:// or unix:// URL"),
]


@pytest.mark.parametrize(("path", "value", "message"), ERRORS, ids=[f"{p}={v!r}" for p, v, _ in ERRORS])
def test_parser_errors_name_document_and_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_document(_mutate(path, value))
    assert str(exc.value) == f"document 0 (apps/multi): {message}"


# spec.budgets as issue 13 writes them, plus a Shared cost budget with every default.
BUDGETS = [
    {"name": "team-a-hourly", "namespaces": ["team-a"], "serviceAccounts": ["*"], "per": "ServiceAccount",
     "window": "1h", "requests": 1000, "tokens": 200000, "costUsd": 5},
    {"name": "batch-daily", "window": "24h", "per": "Shared", "costUsd": 20},
]


def _with_budgets(budgets: list[dict[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((FIXTURES / "render_three_providers.yaml").read_text())
    doc["spec"]["budgets"] = copy.deepcopy(budgets)
    return doc


def test_budgets_are_accepted_and_defaulted_alike() -> None:
    doc = _with_budgets(BUDGETS)
    jsonschema.validate(doc, schema())
    cfg = parse_document(copy.deepcopy(doc))
    assert [(b.name, b.namespaces, b.service_accounts, b.per, b.window, b.requests, b.tokens, b.cost_usd)
            for b in cfg.budgets] == [
        ("team-a-hourly", ("team-a",), ("*",), "ServiceAccount", 3600.0, 1000, 200000, 5.0),
        ("batch-daily", (), ("*",), "Shared", 86400.0, None, None, 20.0),  # (): the config's scope
    ]
    filled = {**doc, "spec": crd.apply_defaults(copy.deepcopy(doc["spec"]))}
    assert filled["spec"]["budgets"][1] == {**BUDGETS[1], "serviceAccounts": ["*"]}
    jsonschema.validate(filled, schema())
    assert parse_document(filled) == cfg


def _budget(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "b", "window": "1h", "requests": 5}
    return {k: v for k, v in {**base, **fields}.items() if v is not _DELETE}


# (budget, the parser's message, whether jsonschema rejects it too: the rest are CEL rules or
# list-map keys, which only the API server checks)
BUDGET_ERRORS = [
    (_budget(requests=-1), "spec.budgets[0].requests: must be >= 0, got -1", True),
    (_budget(tokens=-5), "spec.budgets[0].tokens: must be >= 0, got -5", True),
    (_budget(costUsd=-0.01), "spec.budgets[0].costUsd: must be a number >= 0, got -0.01", True),
    (_budget(tokens=1.5), "spec.budgets[0].tokens: must be an integer, got number", True),
    (_budget(per="Pod"), "spec.budgets[0].per: must be one of ServiceAccount, Namespace, Shared, got 'Pod'", True),
    (_budget(window="30s"), "spec.budgets[0].window: must be at least 1m", False),
    (_budget(window="1d"), "spec.budgets[0].window: '1d' is not a duration like '30s', '1m' or '24h'", True),
    (_budget(window="90500ms"), "spec.budgets[0]: window must be a whole number of seconds", False),
    (_budget(requests=_DELETE), "spec.budgets[0]: needs a limit: requests, tokens or costUsd", False),
    (_budget(name="Team_A"), "spec.budgets[0].name: 'Team_A' is not valid: a DNS label such as 'team-a-hourly'",
     True),
    (_budget(namespaces=["team/a"]),
     "spec.budgets[0].namespaces[0]: 'team/a' is not valid: a namespace name or glob such as 'team-*'", True),
    (_budget(namespaces=[]), "spec.budgets[0].namespaces: must have at least 1 item(s)", True),
    (_budget(serviceAccounts=["App"]),
     "spec.budgets[0].serviceAccounts[0]: 'App' is not valid: a service account name or glob such as 'batch-*'",
     True),
    (_budget(limit=5), "spec.budgets[0].limit: unknown field (allowed: costUsd, name, namespaces, per, requests, "
                       "serviceAccounts, tokens, window)", True),
]


@pytest.mark.parametrize(("budget", "message", "schema_rejects"), BUDGET_ERRORS,
                         ids=[m.split(": ", 1)[1][:40] for _, m, _ in BUDGET_ERRORS])
def test_invalid_budgets_name_the_field(budget: dict[str, Any], message: str, schema_rejects: bool) -> None:
    doc = _with_budgets([budget])
    with pytest.raises(ConfigError) as exc:
        parse_document(copy.deepcopy(doc))
    assert str(exc.value) == f"document 0 (apps/multi): {message}"
    if schema_rejects:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema())


def test_budget_rules_for_the_api_server() -> None:
    """The rules jsonschema cannot run, pinned (CEL: cel-go's getMilliseconds() is the whole
    duration); the list is bounded, which keeps the rules' cost estimate under the API server's."""
    budgets = schema()["properties"]["spec"]["properties"]["budgets"]
    assert (budgets["x-kubernetes-list-type"], budgets["x-kubernetes-list-map-keys"]) == ("map", ["name"])
    assert budgets["maxItems"] == 100
    assert budgets["items"]["x-kubernetes-validations"] == [
        {"rule": "has(self.requests) || has(self.tokens) || has(self.costUsd)",
         "message": "needs a limit: requests, tokens or costUsd"},
        {"rule": "!has(self.window) || duration(self.window).getMilliseconds() % 1000 == 0",
         "message": "window must be a whole number of seconds"},
    ]
    assert budgets["items"]["properties"]["window"]["x-kubernetes-validations"] == [
        {"rule": "duration(self) >= duration('1m')", "message": "must be at least 1m"}]
    assert budgets["items"]["required"] == ["name", "window"]
    with pytest.raises(ConfigError, match=r"spec\.budgets: must have at most 100 item\(s\)"):
        parse_document(_with_budgets([_budget(name=f"b{i}") for i in range(101)]))
    with pytest.raises(ConfigError, match=r"spec\.budgets\[1\]\.name: duplicate budget name 'b'"):
        parse_document(_with_budgets([_budget(), _budget()]))


def test_budget_names_are_unique_across_documents() -> None:
    """They are metric labels, like provider names."""
    a = _with_budgets([_budget(name="hourly")])
    b = yaml.safe_load(SEED)
    b["spec"]["budgets"] = [_budget(name="hourly")]
    with pytest.raises(ConfigError) as exc:
        parse_documents([a, b])
    assert str(exc.value) == ("document 1 (holysheep-system/production-cluster): spec.budgets[0].name: "
                              "budget 'hourly' is already defined by apps/multi")


def test_the_seed_name_is_taken_by_base_url() -> None:
    doc = yaml.safe_load(SEED)
    doc["spec"]["providers"] = [{"name": "holysheep", "baseUrl": "https://x.example/v1", "auth": {"env": "E"}}]
    with pytest.raises(ConfigError) as exc:
        parse_document(doc)
    assert str(exc.value) == (
        "document 0 (holysheep-system/production-cluster): spec.providers[0].name: "
        "duplicate provider name 'holysheep' (the name 'holysheep' is taken by spec.baseUrl)"
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "spec": {**doc["spec"], "providers": [{"name": "x"}]}}, schema())


def test_every_object_defaulted_parses_like_the_bare_document() -> None:
    """The CRD's defaults and the parser's are one: a stored, defaulted CR means the same."""
    doc = yaml.safe_load((FIXTURES / "render_three_providers.yaml").read_text())
    spec = doc["spec"]
    for key in ("timeout", "maxRetries"):
        del spec[key]
    spec["circuitBreaker"] = {}
    spec["healthCheck"] = {}
    spec["cache"] = {}
    spec["pricing"] = [{"model": "m"}]
    del spec["providers"][0]["auth"]["type"]
    filled = {**doc, "spec": crd.apply_defaults(copy.deepcopy(spec))}
    assert filled["spec"]["circuitBreaker"] == {"enabled": True, "failureThreshold": 5, "resetTimeout": "60s"}
    assert filled["spec"]["cache"]["mode"] == "Fallback" and filled["spec"]["cache"]["ttl"] == "24h"
    assert filled["spec"]["routes"][0]["backends"][0] == {"provider": "openai", "priority": 0, "weight": 1}
    jsonschema.validate(filled, schema())
    assert parse_document(filled) == parse_document(doc)


def test_defaults_fill_like_the_api_server_and_stay_parser_valid() -> None:
    doc = yaml.safe_load(SEED)
    doc["spec"] = crd.apply_defaults(doc["spec"])
    assert doc["spec"]["circuitBreaker"] == {"enabled": True, "failureThreshold": 5, "resetTimeout": "60s"}
    assert "cache" not in doc["spec"]  # absent objects are not invented
    jsonschema.validate(doc, schema())
    assert parse_document(doc) == parse_document(yaml.safe_load(SEED))


# --- the notation itself: a throwaway spec with the shapes upcoming fields need (a nested
# object required by an enum, a keyed list of objects, globs, a map, a duration floor) ---------


@functools.cache
def _notation_spec() -> type[Any]:
    """Made on first use, not at import: tests/test_mesh_manifests.py loads this module outside
    sys.modules, where no dataclass can be made."""

    @model
    class Gateway:
        namespace: str = field(Str(DNS_LABEL, "a namespace name"), description="n")
        selector: Mapping[str, str] = field(Map(Str()), default_factory=dict, description="s")

    @model
    class Egress:
        mode: str = field(Enum("Sidecar", "Gateway"), default="Sidecar", description="m")
        gateway: Gateway | None = field(Obj(Gateway), default=None, when=("mode", "Gateway"), description="g")

    @model
    class Budget:
        name: str = field(Str(DNS_LABEL, "a DNS label"), description="n")
        namespaces: tuple[str, ...] = field(Arr(Str(r"^[a-z0-9*?-]+$", "a namespace glob")), default_factory=tuple)
        window: float = field(Dur(minimum="1m"), default="1h", description="w")
        requests: int | None = field(Int(1), default=None, description="r")

    @model
    class Spec:
        egress: Egress = field(Obj(Egress), default_factory=Egress)
        budgets: tuple[Budget, ...] = field(Arr(Obj(Budget), key="name", noun="budget"), default_factory=tuple)

    return Spec


def _read(spec: Any) -> Any:
    return read_model(Reader("doc"), _notation_spec(), spec, "spec")


def test_one_declaration_gives_parser_schema_and_defaults() -> None:
    good = {"egress": {"mode": "Gateway", "gateway": {"namespace": "gw", "selector": {"app": "egress"}}},
            "budgets": [{"name": "team-a", "namespaces": ["team-*"], "requests": 5}, {"name": "b", "window": "2m"}]}
    parsed = _read(good)
    assert parsed.egress.gateway is not None and parsed.egress.gateway.selector == {"app": "egress"}
    assert [(b.name, b.namespaces, b.window, b.requests) for b in parsed.budgets] == [
        ("team-a", ("team-*",), 3600.0, 5), ("b", (), 120.0, None)]
    empty = _read({})
    assert (empty.egress.mode, empty.egress.gateway, empty.budgets) == ("Sidecar", None, ())

    s = openapi(_notation_spec())
    jsonschema.validate(good, s)
    budgets = s["properties"]["budgets"]
    assert budgets["x-kubernetes-list-map-keys"] == ["name"] and budgets["items"]["required"] == ["name"]
    assert budgets["items"]["properties"]["window"]["x-kubernetes-validations"] == [
        {"rule": "duration(self) >= duration('1m')", "message": "must be at least 1m"}]
    assert s["properties"]["egress"]["x-kubernetes-validations"] == [
        {"rule": "self.mode == 'Gateway' ? has(self.gateway) : !has(self.gateway)",
         "message": "gateway is required with mode Gateway and only allowed with it"}]
    assert fill_defaults({"egress": {}, "budgets": [{"name": "x"}]}, s) == {
        "egress": {"mode": "Sidecar"}, "budgets": [{"name": "x", "window": "1h"}]}


@pytest.mark.parametrize(("spec", "message", "schema_rejects"), [
    ({"budgets": [{"name": "a", "window": "30s"}]}, "spec.budgets[0].window: must be at least 1m", False),
    ({"budgets": [{"name": "a"}, {"name": "a"}]}, "spec.budgets[1].name: duplicate budget name 'a'", False),
    ({"budgets": [{"name": "a", "namespaces": ["Team_A"]}]},
     "spec.budgets[0].namespaces[0]: 'Team_A' is not valid: a namespace glob", True),
    ({"budgets": [{"name": "a", "requests": 0}]}, "spec.budgets[0].requests: must be >= 1, got 0", True),
    ({"egress": {"mode": "Gateway"}}, "spec.egress.gateway: is required", False),
    ({"egress": {"gateway": {"namespace": "gw"}}}, "spec.egress.gateway: only allowed with mode Gateway", False),
    ({"egress": {"mode": "Gateway", "gateway": {"namespace": "gw", "selector": {"a": ""}}}},
     "spec.egress.gateway.selector.a: must be a non-empty string, got string", True),
    ({"egress": {"mode": "Both"}}, "spec.egress.mode: must be one of Sidecar, Gateway, got 'Both'", True),
])
def test_one_declaration_gives_errors_with_paths(spec: dict[str, Any], message: str, schema_rejects: bool) -> None:
    with pytest.raises(ConfigError) as exc:
        _read(spec)
    assert str(exc.value) == f"doc: {message}"
    if schema_rejects:  # the rest are CEL rules or list-map keys, which only the API server checks
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(spec, openapi(_notation_spec()))


# --- a provider's API family (issue 16) --------------------------------------------------------


def _with_provider(**fields: Any) -> dict[str, Any]:
    """The three-provider example with the anthropic provider's fields changed (_DELETE removes one)."""
    doc: dict[str, Any] = yaml.safe_load((FIXTURES / "render_three_providers.yaml").read_text())
    provider = doc["spec"]["providers"][1]
    for key, value in fields.items():
        if value is _DELETE:
            provider.pop(key, None)
        else:
            provider[key] = value
    return doc


def test_provider_api_fields_are_accepted_and_defaulted_alike() -> None:
    doc = _with_provider(api="Anthropic", anthropicVersion="2023-01-01", maxTokens=1024)
    doc["spec"]["providers"][2]["passThrough"] = ["Anthropic"]
    jsonschema.validate(doc, schema())
    cfg = parse_document(copy.deepcopy(doc))
    assert [(p.name, p.api, p.pass_through, p.anthropic_version, p.max_tokens) for p in cfg.providers] == [
        ("openai", "OpenAI", (), "2023-06-01", 4096),
        ("anthropic", "Anthropic", (), "2023-01-01", 1024),
        ("gateway", "OpenAI", ("Anthropic",), "2023-06-01", 4096),
    ]
    filled = {**doc, "spec": crd.apply_defaults(copy.deepcopy(doc["spec"]))}
    assert {k: filled["spec"]["providers"][0][k] for k in ("api", "anthropicVersion", "maxTokens")} == {
        "api": "OpenAI", "anthropicVersion": "2023-06-01", "maxTokens": 4096}
    assert "passThrough" not in filled["spec"]["providers"][0]  # absent: the provider serves its api only
    jsonschema.validate(filled, schema())
    assert parse_document(filled) == cfg


def test_the_seed_provider_passes_anthropic_clients_through() -> None:
    # The HolySheep relay serves /v1/messages itself: its Anthropic clients stay untranslated.
    (seed,) = parse_document(yaml.safe_load(SEED)).providers
    assert (seed.api, seed.pass_through) == ("OpenAI", ("Anthropic",))


# (fields of providers[1], the parser's message, whether jsonschema rejects it too: the rest is a CEL rule)
PROVIDER_API_ERRORS = [
    ({"api": "Gemini"}, "spec.providers[1].api: must be one of OpenAI, Anthropic, got 'Gemini'", True),
    ({"passThrough": []}, "spec.providers[1].passThrough: must have at least 1 item(s)", True),
    ({"passThrough": ["Bedrock"]},
     "spec.providers[1].passThrough[0]: must be one of OpenAI, Anthropic, got 'Bedrock'", True),
    ({"anthropicVersion": "latest"},
     "spec.providers[1].anthropicVersion: 'latest' is not valid: a version date such as 2023-06-01", True),
    ({"maxTokens": 0}, "spec.providers[1].maxTokens: must be >= 1, got 0", True),
    ({"api": "Anthropic", "auth": {"type": "Bearer", "env": "ANTHROPIC_KEY"}},
     "spec.providers[1]: an Anthropic provider takes its key in x-api-key: set auth.type XApiKey (or ApiKey, "
     "Header)", False),
    ({"api": "Anthropic", "auth": {"env": "ANTHROPIC_KEY"}},  # the default type is Bearer
     "spec.providers[1]: an Anthropic provider takes its key in x-api-key: set auth.type XApiKey (or ApiKey, "
     "Header)", False),
]


@pytest.mark.parametrize(("fields", "message", "schema_rejects"), PROVIDER_API_ERRORS,
                         ids=[m.split(": ", 1)[1][:40] for _, m, _ in PROVIDER_API_ERRORS])
def test_invalid_provider_api_fields_name_the_field(fields: dict[str, Any], message: str,
                                                    schema_rejects: bool) -> None:
    doc = _with_provider(**fields)
    with pytest.raises(ConfigError) as exc:
        parse_document(copy.deepcopy(doc))
    assert str(exc.value) == f"document 0 (apps/multi): {message}"
    if schema_rejects:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema())
    else:
        jsonschema.validate(doc, schema())  # the API server's CEL rule, pinned below, refuses it


def test_provider_api_rule_for_the_api_server() -> None:
    providers = schema()["properties"]["spec"]["properties"]["providers"]["items"]
    assert providers["x-kubernetes-validations"] == [
        {"rule": "self.api != 'Anthropic' || self.auth.type != 'Bearer'",
         "message": "an Anthropic provider takes its key in x-api-key: set auth.type XApiKey (or ApiKey, Header)"},
    ]
    assert [k for k in providers["properties"] if k in ("api", "passThrough", "anthropicVersion", "maxTokens")] == [
        "api", "passThrough", "anthropicVersion", "maxTokens"]


# --- spec.egress (Gateway mode) ------------------------------------------------------------------


def _with_egress(egress: Any) -> dict[str, Any]:
    doc = yaml.safe_load((FIXTURES / "render_three_providers.yaml").read_text())
    doc["spec"]["egress"] = egress
    return doc


def test_egress_is_accepted_and_defaulted_alike() -> None:
    """Istio's own egress gateway by default, filled in the same by the parser and the API server."""
    gateway = {"namespace": "istio-system", "service": "istio-egressgateway", "selector": {"istio": "egressgateway"},
               "serviceAccount": "istio-egressgateway-service-account"}
    doc = _with_egress({"mode": "Gateway", "gateway": {}})
    jsonschema.validate(doc, schema())
    cfg = parse_document(copy.deepcopy(doc))
    assert cfg.egress.mode == "Gateway"
    assert (cfg.egress.gateway.namespace, cfg.egress.gateway.service, dict(cfg.egress.gateway.selector),
            cfg.egress.gateway.service_account) == tuple(gateway.values())
    assert crd.apply_defaults(doc["spec"])["egress"] == {"mode": "Gateway", "gateway": gateway}
    bare = yaml.safe_load((FIXTURES / "render_three_providers.yaml").read_text())
    assert parse_document(bare).egress.mode == "Sidecar"  # the default
    assert "egress" not in crd.apply_defaults(bare["spec"])  # absent stays absent
    custom = _with_egress({"mode": "Gateway", "gateway": {"namespace": "egress", "selector": {"app": "gw"}}})
    jsonschema.validate(custom, schema())
    assert parse_document(custom).egress.gateway.selector == {"app": "gw"}  # replaces, never merges


EGRESS_ERRORS = [
    ({"mode": "Egress"}, "spec.egress.mode: must be one of Sidecar, Gateway, got 'Egress'", True),
    ({"mode": "Gateway", "gateway": {"namespace": "Istio_System"}},
     "spec.egress.gateway.namespace: 'Istio_System' is not valid: a namespace name", True),
    ({"mode": "Gateway", "gateway": {"serviceAccount": "gw/sa"}},
     "spec.egress.gateway.serviceAccount: 'gw/sa' is not valid: a service account name", True),
    ({"mode": "Gateway", "gateway": {"selector": {"istio": ""}}},
     "spec.egress.gateway.selector.istio: must be a non-empty string, got string", True),
    ({"mode": "Gateway", "gateway": {"port": 80}},
     "spec.egress.gateway.port: unknown field (allowed: namespace, selector, service, serviceAccount)", True),
    # An empty selector would select no gateway (or, for some tools, every workload): the CEL rule.
    ({"mode": "Gateway", "gateway": {"selector": {}}}, "spec.egress.gateway: selector needs at least one label", False),
]


@pytest.mark.parametrize(("egress", "message", "schema_rejects"), EGRESS_ERRORS,
                         ids=[m.split(": ", 1)[0] for _, m, _ in EGRESS_ERRORS])
def test_invalid_egress_names_the_field(egress: dict[str, Any], message: str, schema_rejects: bool) -> None:
    doc = _with_egress(egress)
    with pytest.raises(ConfigError) as exc:
        parse_document(copy.deepcopy(doc))
    assert str(exc.value) == f"document 0 (apps/multi): {message}"
    if schema_rejects:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema())
    else:
        jsonschema.validate(doc, schema())  # the API server's CEL rule, pinned below, refuses it


def test_egress_rule_for_the_api_server() -> None:
    gateway = schema()["properties"]["spec"]["properties"]["egress"]["properties"]["gateway"]
    assert gateway["x-kubernetes-validations"] == [
        {"rule": "!has(self.selector) || size(self.selector) > 0", "message": "selector needs at least one label"}]
