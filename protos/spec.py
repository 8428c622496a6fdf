"""The HolySheepConfig spec: the models, written once, and the parser both planes use.

Each CR field is one line in a model below: its name, Python type, wire type with its bounds,
pattern or enum, default and description (protos/schema.py explains the notation). The parser,
the CRD's OpenAPI schema (`holysheep-mesh crd`), the API server's defaults (`apply_defaults`)
and the dataclass defaults every other module sees are all derived from these lines.

Adding a CR field: add its line to the model (a nested object is a new @model class and
``field(Obj(ThatClass))``; a list of them ``field(Arr(Obj(ThatClass), key="name", noun=...))``),
run ``holysheep-mesh crd > mesh/crd/holysheepconfig.yaml``, and add tests (tests/test_crd.py
checks the parser and the CRD schema agree on your good and bad examples). Nothing else changes
unless a plane reads the new field.

The parser is strict (unknown fields are errors, as under the API server's strict field
validation) and every error names the document and the field path, so an operator can fix a
CR from the message alone. Nothing here holds a secret: credentials are referenced by Secret
name and key, or by environment variable name, and are read elsewhere at request time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import field as dataclasses_field
from typing import Any
from urllib.parse import urlsplit

import yaml

from protos.schema import (
    Arr,
    Bool,
    ConfigError,
    Dur,
    Enum,
    Int,
    Map,
    Num,
    Obj,
    Reader,
    Rule,
    Str,
    field,
    fields_of,
    fill_defaults,
    model,
    openapi,
    read_model,
)
from protos.scope import SERVICE_ACCOUNT_PATTERN, service_account_pattern_problem

__all__ = [
    "API_VERSION", "AUTH_TYPES", "BUDGET_PER", "CACHE_MODES", "KIND", "SEED_ENV", "SEED_PROVIDER_NAME",
    "SEED_SECRET_KEY", "SEED_SECRET_NAME", "SPEC_FIELDS", "AuthSpec", "BackendSpec", "BudgetSpec", "CacheSpec",
    "CircuitBreakerSpec", "ConfigError", "HealthCheckSpec", "HolySheepConfig", "PricingSpec", "ProviderSpec",
    "RouteSpec", "WorkloadSelectorSpec", "apply_defaults", "load_file", "load_text", "parse_document",
    "parse_documents", "spec_schema",
]

API_VERSION = "holysheep.ai/v1"
KIND = "HolySheepConfig"

AUTH_TYPES = ("Bearer", "XApiKey", "ApiKey", "Header")
CACHE_MODES = ("Off", "Fallback", "Always")
EGRESS_MODES = ("Sidecar", "Gateway")
BUDGET_PER = ("ServiceAccount", "Namespace", "Shared")
MAX_BUDGETS = 100  # per config; bounds the CEL rules' cost estimate (protos/schema.py Arr)

# The seed's single-provider shorthand: `baseUrl` alone means this provider, this Secret.
SEED_PROVIDER_NAME = "holysheep"
SEED_SECRET_NAME = "holysheep-credentials"
SEED_SECRET_KEY = "api-key"
SEED_ENV = "HOLYSHEEP_API_KEY"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
HEADER_NAME = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"
# Host with optional port and path; no query, fragment or user info (the API server's form of
# _http_url below, which gives the parser's more precise messages).
URL_PATTERN = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^?#\s]*)?$"
REDIS_URL_PATTERN = r"^(redis|rediss|unix)://[^:@\s]*(:[^@\s]*)?(@.*)?$"
# Shell globs (fnmatch: '*', '?') over namespace and service account names.
NAMESPACE_GLOB = r"^[a-z0-9*?-]{1,63}$"
SERVICE_ACCOUNT_GLOB = r"^[a-z0-9.*?-]{1,253}$"


def _http_url(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[": not repeated, like every URL problem
        return "must be an absolute http(s) URL with a host (it does not parse as a URL)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Not repeated: a URL with a credential in it (or a key pasted here) must not reach a log.
        return f"must be an absolute http(s) URL with a host (got scheme {parts.scheme[:10]!r})"
    if parts.query or parts.fragment or parts.username or parts.password:
        return "must not carry a query, fragment or user info (credentials belong in a Secret)"
    return None


def _redis_url(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "must be a redis://, rediss:// or unix:// URL"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must be a redis://, rediss:// or unix:// URL"
    if parts.password:
        return "must not embed a password; mount it as a Secret instead"
    return None


HTTP_URL = Str(URL_PATTERN, check=_http_url)


@model(rules=(
    Rule(
        "has(self.secretName) || has(self.env)", "needs secretName and key, or env",
        check=lambda f: f["secret_name"] is not None or f["env"] is not None,
        problem="needs a credential source: secretName and key, or env",
    ),
))
class AuthSpec:
    type: str = field(Enum(*AUTH_TYPES), default="Bearer", description=(
        "How the credential is sent: Bearer (Authorization: Bearer), XApiKey (x-api-key), "
        "ApiKey (api-key) or Header (the header named by header)."))
    header: str | None = field(
        Str(HEADER_NAME, "a lower-case HTTP header name"), default=None, when=("type", "Header"),
        description="The header that carries the credential; only with type Header.")
    secret_name: str | None = field(
        Str(DNS_SUBDOMAIN, "a Secret name in the CR's own namespace (cross-namespace references are not allowed)",
            echo=False, max_length=253),
        default=None, together="secret", description="A Secret in the CR's own namespace that holds the credential.")
    key: str | None = field(
        Str(SECRET_KEY, "a Secret data key", echo=False), default=None, together="secret",
        description="The key of the credential in that Secret.")
    env: str | None = field(
        Str(ENV_NAME, "an environment variable name", echo=False), default=None,
        description="An environment variable of the data plane holding the credential (the Secret wins).")

    @property
    def header_name(self) -> str:
        return {"Bearer": "authorization", "XApiKey": "x-api-key", "ApiKey": "api-key"}.get(
            self.type, (self.header or "").lower()
        )


# A provider's API family (issue 16): what a request is translated to when the client speaks another.
API_FAMILIES = ("OpenAI", "Anthropic")


@model(rules=(
    Rule(
        "self.api != 'Anthropic' || self.auth.type != 'Bearer'",
        "an Anthropic provider takes its key in x-api-key: set auth.type XApiKey (or ApiKey, Header)",
        check=lambda f: f["api"] != "Anthropic" or f["auth"].type != "Bearer",
    ),
))
class ProviderSpec:
    name: str = field(Str(DNS_LABEL, "a DNS label such as 'openai'", max_length=63), description=(
        "The provider's name: a DNS label, unique across the data plane (a metric label and the breaker's key)."))
    base_url: str = field(HTTP_URL, description="The provider's base URL, e.g. https://api.openai.com/v1.")
    auth: AuthSpec = field(Obj(AuthSpec), description="The provider's credential: where it comes from, how it is sent.")
    timeout: float | None = field(Dur(), default=None, description="Per-attempt timeout (default: spec.timeout).")
    api: str = field(Enum(*API_FAMILIES), default="OpenAI", description=(
        "The provider's API family: OpenAI (chat completions) or Anthropic (Messages). A client of the other "
        "family is translated to it, unless passThrough lists the client's family."))
    pass_through: tuple[str, ...] = field(Arr(Enum(*API_FAMILIES), 1), default_factory=tuple, description=(
        "API families the provider also serves itself (a relay such as HolySheep serving both /chat/completions "
        "and /messages): their requests go to it unchanged instead of translated to api."))
    anthropic_version: str = field(
        Str(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "a version date such as 2023-06-01"), default="2023-06-01",
        description="The anthropic-version header sent with requests translated for an Anthropic provider.")
    max_tokens: int = field(Int(1), default=4096, description=(
        "max_tokens of a request translated for an Anthropic provider whose client set none (Anthropic requires it)."))

    @property
    def scheme(self) -> str:
        return urlsplit(self.base_url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def authority(self) -> str:
        """Host header value: the port only when it is not the scheme's default."""
        parts = urlsplit(self.base_url)
        return self.host if parts.port is None else f"{self.host}:{parts.port}"

    @property
    def base_path(self) -> str:
        return urlsplit(self.base_url).path.rstrip("/")


@model
class BackendSpec:
    provider: str = field(Str(ref="provider"), description="A provider of this CR (spec.providers[].name).")
    model: str | None = field(Str(), default=None, description="Model name sent instead of the client's.")
    priority: int = field(Int(0, 1000), default=0, description="Lower priorities are tried first.")
    weight: int = field(Int(1, 1_000_000), default=1, description="Share of traffic within a priority.")


@model
class RouteSpec:
    models: tuple[str, ...] = field(Arr(Str(), 1), description=(
        "Model names or globs; exact names win over globs, globs match in route order."))
    backends: tuple[BackendSpec, ...] = field(Arr(Obj(BackendSpec), 1), description="Where these models go.")


@model
class CircuitBreakerSpec:
    enabled: bool = field(Bool(), default=True, description="Open a provider's circuit after consecutive failures.")
    failure_threshold: int = field(Int(1, 1000), default=5, description=(
        "Consecutive failures (5xx, 429, connect failure, timeout) that open the circuit."))
    reset_timeout: float = field(Dur(), default="60s", description="How long the circuit stays open before a trial.")


@model
class HealthCheckSpec:
    endpoint: str = field(Str("^/", problem="must start with '/'"), default="/models", description=(
        "Path under each provider's baseUrl, fetched with its credential."))
    interval: float = field(Dur(), default="10s", description="Time between active health checks.")


@model
class CacheSpec:
    redis_url: str | None = field(Str(REDIS_URL_PATTERN, check=_redis_url), default=None, description=(
        "Redis shared by the replicas (no password here: mount it as a Secret); absent: memory only."))
    mode: str = field(Enum(*CACHE_MODES), default="Fallback", description=(
        "Off, Fallback (answer from the cache when every provider fails) or Always (answer hits at once). "
        "Quote \"Off\": YAML 1.1 reads it as false."))
    ttl: float = field(Dur(), default="24h", description="How long an answer stays cached.")
    max_entry_bytes: int = field(Int(1), default=1 << 20, description="Largest answer the cache keeps.")
    max_entries: int = field(Int(1), default=10_000, description="Entries in the memory tier.")
    tenant_header: str = field(Str(HEADER_NAME, "a header name"), default="x-holysheep-tenant", description=(
        "Header naming the cache scope when the sidecar's workload identity is absent."))


@model
class PricingSpec:
    model: str = field(Str(), description="A model name or glob.")
    input_per_million: float = field(Num(), default=0, description="USD per million input tokens.")
    output_per_million: float = field(Num(), default=0, description="USD per million output tokens.")


@model
class WorkloadSelectorSpec:
    match_labels: Mapping[str, str] = field(Map(Str()), default_factory=dict, description=(
        "Labels of the workloads whose sidecars get the filter."))


@model(rules=(
    Rule("!has(self.selector) || size(self.selector) > 0", "selector needs at least one label",
         check=lambda f: bool(f["selector"])),
))
class EgressGatewaySpec:
    """The Istio egress gateway of Gateway mode; the defaults are Istio's own gateway's."""

    namespace: str = field(Str(DNS_LABEL, "a namespace name", max_length=63), default="istio-system", description=(
        "The egress gateway's namespace (its EnvoyFilter goes there)."))
    service: str = field(Str(DNS_LABEL, "a Service name", max_length=63), default="istio-egressgateway", description=(
        "The egress gateway's Service, in that namespace: sidecars send the providers' hosts to its port 80."))
    selector: Mapping[str, str] = field(Map(Str()), default={"istio": "egressgateway"}, description=(
        "Labels of the egress gateway's pods (the Gateway's selector and the EnvoyFilter's workloadSelector)."))
    service_account: str = field(
        Str(DNS_SUBDOMAIN, "a service account name", max_length=253), default="istio-egressgateway-service-account",
        description="The egress gateway's service account: the only caller the ext_proc admits in Gateway mode.")


@model
class EgressSpec:
    mode: str = field(Enum(*EGRESS_MODES), default="Sidecar", description=(
        "Sidecar: each app's sidecar calls the ext_proc and the provider. Gateway: sidecars send the providers' "
        "hosts over mesh mTLS to the egress gateway, which alone calls the ext_proc and holds the credentials."))
    gateway: EgressGatewaySpec = field(Obj(EgressGatewaySpec), default_factory=EgressGatewaySpec, description=(
        "The egress gateway (Gateway mode)."))


@model(rules=(
    Rule(
        "has(self.requests) || has(self.tokens) || has(self.costUsd)", "needs a limit: requests, tokens or costUsd",
        check=lambda f: any(f[k] is not None for k in ("requests", "tokens", "cost_usd")),
    ),
    Rule(
        # cel-go's getMilliseconds() is the whole duration in milliseconds
        "!has(self.window) || duration(self.window).getMilliseconds() % 1000 == 0",
        "window must be a whole number of seconds",
        check=lambda f: float(f["window"]).is_integer(),
    ),
))
class BudgetSpec:
    """One budget: what the callers it matches may spend per fixed window (extproc/budgets.py)."""

    name: str = field(Str(DNS_LABEL, "a DNS label such as 'team-a-hourly'", max_length=63), description=(
        "The budget's name: a DNS label, unique across the data plane (the metric label budget)."))
    window: float = field(Dur(minimum="1m"), description=(
        "The window: fixed, aligned to the Unix epoch (1h runs from one full hour to the next), at least 1m."))
    namespaces: tuple[str, ...] = field(
        Arr(Str(NAMESPACE_GLOB, "a namespace name or glob such as 'team-*'"), 1), default_factory=tuple,
        description="Caller namespaces (globs); absent: every namespace in the config's scope.")
    service_accounts: tuple[str, ...] = field(
        Arr(Str(SERVICE_ACCOUNT_GLOB, "a service account name or glob such as 'batch-*'"), 1), default=["*"],
        description="Caller service accounts (globs).")
    per: str = field(Enum(*BUDGET_PER), default="ServiceAccount", description=(
        "Whose counter: ServiceAccount (one per caller identity), Namespace (one per namespace) or Shared "
        "(one for every caller it matches)."))
    requests: int | None = field(Int(0), default=None, description="Requests per window (counted when admitted).")
    tokens: int | None = field(Int(0), default=None, description=(
        "Tokens (input + output, from the answers' usage) per window; the request that crosses it completes."))
    cost_usd: float | None = field(Num(), default=None, description=(
        "US dollars per window, priced with spec.pricing; the request that crosses it completes."))


# The seed's `baseUrl` shorthand, in parser hooks (the CRD says the same with the two CEL rules
# on HolySheepConfig): the name 'holysheep' is taken first, then the provider is listed first.
def _seed_name_taken(r: Reader, base_url: str | None, parsed: Mapping[str, Any]) -> str | None:
    if base_url is not None:
        r.names.setdefault("provider", {})[SEED_PROVIDER_NAME] = "spec.baseUrl"
    return base_url


def _seed_provider_first(
    r: Reader, providers: tuple[ProviderSpec, ...], parsed: Mapping[str, Any]
) -> tuple[ProviderSpec, ...]:
    if parsed["base_url"] is not None:
        seed = ProviderSpec(
            name=SEED_PROVIDER_NAME,
            base_url=parsed["base_url"],
            auth=AuthSpec(type="Bearer", secret_name=SEED_SECRET_NAME, key=SEED_SECRET_KEY, env=SEED_ENV),
            pass_through=("Anthropic",),  # the HolySheep relay serves /messages too: passed through, as before
        )
        providers = (seed, *providers)
    if not providers:
        raise r.fail("spec", "needs spec.baseUrl or at least one entry in spec.providers")
    return providers


def _every_model_to_the_providers(
    r: Reader, routes: tuple[RouteSpec, ...], parsed: Mapping[str, Any]
) -> tuple[RouteSpec, ...]:
    if routes:  # present (a present list has at least one route)
        return routes
    # No routes: every model goes to the providers in the order they are listed.
    backends = tuple(BackendSpec(provider=p.name, priority=i) for i, p in enumerate(parsed["providers"]))
    return (RouteSpec(models=("*",), backends=backends),)


@model(rules=(
    Rule(
        "has(self.baseUrl) || (has(self.providers) && size(self.providers) > 0)",
        "needs spec.baseUrl or at least one entry in spec.providers",
    ),  # parser: _seed_provider_first
    Rule(
        "!has(self.baseUrl) || !has(self.providers) || self.providers.all(p, p.name != 'holysheep')",
        "the provider name 'holysheep' is taken by spec.baseUrl",
    ),  # parser: _seed_name_taken, then the providers list's unique names
))
class HolySheepConfig:
    """One HolySheepConfig: its spec fields (in the order they are read) and its identity."""

    name: str
    namespace: str
    base_url: str | None = field(HTTP_URL, default=None, after=_seed_name_taken, description=(
        "Shorthand for one provider named holysheep serving every model, with a Bearer credential from "
        "Secret holysheep-credentials key api-key, or else env HOLYSHEEP_API_KEY."))
    providers: tuple[ProviderSpec, ...] = field(
        Arr(Obj(ProviderSpec), key="name", noun="provider"), default_factory=tuple, after=_seed_provider_first,
        description="LLM providers; names are unique.")
    routes: tuple[RouteSpec, ...] = field(
        Arr(Obj(RouteSpec), 1), default_factory=tuple, after=_every_model_to_the_providers, description=(
            "Model routes; absent: every model goes to the providers in listed order."))
    service_accounts: tuple[str, ...] = field(
        Arr(Str(SERVICE_ACCOUNT_PATTERN, check=service_account_pattern_problem, max_length=254), 1),
        default_factory=tuple, description=(
            "Service accounts that may use this config, within its scope (its namespace, or every namespace for a "
            "config in Istio's root namespace): names, 'prefix*', '*suffix' or '*', as in an AuthorizationPolicy. "
            "Absent: every service account in scope."))
    circuit_breaker: CircuitBreakerSpec = field(
        Obj(CircuitBreakerSpec), default_factory=CircuitBreakerSpec, description="Per-provider circuit breaker.")
    health_check: HealthCheckSpec | None = field(Obj(HealthCheckSpec), default=None, description=(
        "Active health checks of every provider; absent: none."))
    timeout: float = field(Dur(), default="30s", description="Per-attempt timeout.")
    max_retries: int = field(Int(0, 10), default=2, description="Attempts beyond the first, across backends.")
    cache: CacheSpec = field(Obj(CacheSpec), default_factory=CacheSpec, description="The response cache.")
    pricing: tuple[PricingSpec, ...] = field(Arr(Obj(PricingSpec)), default_factory=tuple, description=(
        "Prices for the cost metrics; the first matching entry wins."))
    workload_selector: WorkloadSelectorSpec | None = field(Obj(WorkloadSelectorSpec), default=None, description=(
        "Workloads the EnvoyFilter applies to (default: every sidecar in reach); ignored by the data plane."))
    egress: EgressSpec = field(Obj(EgressSpec), default_factory=EgressSpec, description=(
        "How requests leave the mesh: from each sidecar (Sidecar) or through an Istio egress gateway (Gateway)."))
    budgets: tuple[BudgetSpec, ...] = field(
        Arr(Obj(BudgetSpec), key="name", noun="budget", max_items=MAX_BUDGETS), default_factory=tuple, description=(
            "Request, token and cost limits per caller identity and fixed window; a request over any is refused "
            "with 429."))
    raw: Mapping[str, Any] = dataclasses_field(default_factory=dict, compare=False, repr=False)

    def provider(self, name: str) -> ProviderSpec:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def timeout_for(self, provider: ProviderSpec) -> float:
        return provider.timeout if provider.timeout is not None else self.timeout


SPEC_FIELDS = tuple(f.wire for f in fields_of(HolySheepConfig))
DEFAULT_TIMEOUT: float = HolySheepConfig.timeout
DEFAULT_MAX_RETRIES: int = HolySheepConfig.max_retries
DEFAULT_TENANT_HEADER: str = CacheSpec.tenant_header
_SPEC_SCHEMA = openapi(HolySheepConfig)


def spec_schema() -> dict[str, Any]:
    """The OpenAPI v3 schema of `spec`, for the CRD."""
    return copy.deepcopy(_SPEC_SCHEMA)


def apply_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec with the CRD's defaults filled in, as the API server stores it."""
    result: dict[str, Any] = fill_defaults(spec, _SPEC_SCHEMA)
    return result


_NAME = Str(DNS_SUBDOMAIN, "a DNS subdomain name")
_NAMESPACE = Str(DNS_LABEL, "a namespace name")


def parse_document(doc: Any, index: int = 0) -> HolySheepConfig:
    """Parse one HolySheepConfig object (a dict from YAML or from the Kubernetes API)."""
    r = Reader(f"document {index}")
    top = r.mapping(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = r.any_mapping(top.get("metadata", {}), "metadata")
    name = _NAME.read(r, meta.get("name"), "metadata.name")
    namespace = _NAMESPACE.read(r, meta.get("namespace", "default"), "metadata.namespace")
    r.where = f"document {index} ({namespace}/{name})"
    if top.get("apiVersion") != API_VERSION:
        raise r.fail("apiVersion", f"must be {API_VERSION}, got {top.get('apiVersion')!r}")
    if top.get("kind") != KIND:
        raise r.fail("kind", f"must be {KIND}, got {top.get('kind')!r}")
    return read_model(r, HolySheepConfig, top.get("spec"), "spec", name=name, namespace=namespace, raw=dict(top))


def parse_documents(docs: Iterable[Any]) -> tuple[HolySheepConfig, ...]:
    """Parse several documents that one data plane serves together.

    Provider names are metric labels and circuit-breaker keys, and budget names metric labels,
    so both must be unique across documents; routes are matched in document order.
    """
    configs: list[HolySheepConfig] = []
    provider_owners: dict[str, str] = {}
    budget_owners: dict[str, str] = {}
    for i, doc in enumerate(d for d in docs if d is not None):
        cfg = parse_document(doc, i)
        _claim_names(provider_owners, [p.name for p in cfg.providers], cfg, i, "spec.providers", "provider")
        _claim_names(budget_owners, [b.name for b in cfg.budgets], cfg, i, "spec.budgets", "budget")
        configs.append(cfg)
    if not configs:
        raise ConfigError("config", "", f"no {KIND} document found")
    return tuple(configs)


def _claim_names(owners: dict[str, str], names: list[str], cfg: HolySheepConfig, index: int, field: str,
                 what: str) -> None:
    """Record document ``index`` as the owner of ``names`` (its ``field[j].name``s); a name some
    document already owns is a ConfigError naming that owner."""
    owner = f"{cfg.namespace}/{cfg.name}"
    for j, name in enumerate(names):
        if name in owners:
            raise ConfigError(
                f"document {index} ({owner})", f"{field}[{j}].name",
                f"{what} {name!r} is already defined by {owners[name]}",
            )
        owners[name] = owner


def load_text(text: str) -> tuple[HolySheepConfig, ...]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        # Position and problem only: str(exc) quotes the offending line, which could hold a key.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError("config", "", f"not valid YAML{at}: {problem}") from None
    return parse_documents(docs)


def load_file(path: str) -> tuple[HolySheepConfig, ...]:
    with open(path, encoding="utf-8") as fh:
        return load_text(fh.read())
