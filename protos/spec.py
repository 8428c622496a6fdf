"""The HolySheepConfig spec: one model and one parser, shared by the data plane and the controller.

The parser is strict (unknown fields are errors, as under the API server's strict field
validation) and every error names the document and the field path, so an operator can fix a
CR from the message alone. Nothing here holds a secret: credentials are referenced by Secret
name and key, or by environment variable name, and are read elsewhere at request time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from protos.durations import parse_duration

API_VERSION = "holysheep.ai/v1"
KIND = "HolySheepConfig"

AUTH_TYPES = ("Bearer", "XApiKey", "ApiKey", "Header")
CACHE_MODES = ("Off", "Fallback", "Always")

# The seed's single-provider shorthand: `baseUrl` alone means this provider, this Secret.
SEED_PROVIDER_NAME = "holysheep"
SEED_SECRET_NAME = "holysheep-credentials"
SEED_SECRET_KEY = "api-key"
SEED_ENV = "HOLYSHEEP_API_KEY"

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_TENANT_HEADER = "x-holysheep-tenant"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


class ConfigError(ValueError):
    """An invalid HolySheepConfig; the message names the document and the field."""

    def __init__(self, where: str, path: str, problem: str) -> None:
        self.where = where
        self.path = path
        self.problem = problem
        super().__init__(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")


@dataclass(frozen=True)
class AuthSpec:
    type: str = "Bearer"
    header: str | None = None
    secret_name: str | None = None
    key: str | None = None
    env: str | None = None

    @property
    def header_name(self) -> str:
        return {"Bearer": "authorization", "XApiKey": "x-api-key", "ApiKey": "api-key"}.get(
            self.type, (self.header or "").lower()
        )


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    base_url: str
    auth: AuthSpec
    timeout: float | None = None

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


@dataclass(frozen=True)
class BackendSpec:
    provider: str
    model: str | None = None
    priority: int = 0
    weight: int = 1


@dataclass(frozen=True)
class RouteSpec:
    models: tuple[str, ...]
    backends: tuple[BackendSpec, ...]


@dataclass(frozen=True)
class CircuitBreakerSpec:
    enabled: bool = True
    failure_threshold: int = 5
    reset_timeout: float = 60.0


@dataclass(frozen=True)
class HealthCheckSpec:
    interval: float = 10.0
    endpoint: str = "/models"


@dataclass(frozen=True)
class CacheSpec:
    mode: str = "Fallback"
    ttl: float = 24 * 3600.0
    redis_url: str | None = None
    max_entry_bytes: int = 1 << 20
    max_entries: int = 10_000
    tenant_header: str = DEFAULT_TENANT_HEADER


@dataclass(frozen=True)
class PricingSpec:
    model: str
    input_per_million: float
    output_per_million: float


@dataclass(frozen=True)
class HolySheepConfig:
    name: str
    namespace: str
    providers: tuple[ProviderSpec, ...]
    routes: tuple[RouteSpec, ...]
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    circuit_breaker: CircuitBreakerSpec = field(default_factory=CircuitBreakerSpec)
    health_check: HealthCheckSpec | None = None
    cache: CacheSpec = field(default_factory=CacheSpec)
    pricing: tuple[PricingSpec, ...] = ()
    workload_selector: Mapping[str, str] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def provider(self, name: str) -> ProviderSpec:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def timeout_for(self, provider: ProviderSpec) -> float:
        return provider.timeout if provider.timeout is not None else self.timeout


class _Reader:
    """Walks one document, turning every problem into a ConfigError with a field path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.where, path, problem)

    def mapping(self, value: Any, path: str, allowed: Iterable[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {_kind(value)}")
        known = set(allowed)
        for k in value:
            if k not in known:
                where = f"{path}.{k}" if path else str(k)
                raise self.fail(where, f"unknown field (allowed: {', '.join(sorted(known))})")
        return value

    def any_mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {_kind(value)}")
        return value

    def string(
        self, value: Any, path: str, pattern: re.Pattern[str] | None = None, hint: str = "", echo: bool = True
    ) -> str:
        """``echo=False`` for fields where a pasted secret value is a likely mistake (``auth.env``,
        ``secretName``, ``key``): the error then describes the value without repeating it."""
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"must be a non-empty string, got {_kind(value)}")
        if pattern is not None and not pattern.match(value):
            shown = repr(value) if echo else f"the value ({len(value)} characters, not shown)"
            raise self.fail(path, f"{shown} is not valid{': ' + hint if hint else ''}")
        return value

    def integer(self, value: Any, path: str, minimum: int, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {_kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.fail(path, f"must be {bound}, got {value}")
        return value

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.fail(path, f"must be a number >= 0, got {value!r}")
        return float(value)

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {_kind(value)}")
        return value

    def duration(self, value: Any, path: str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None
        if seconds < 0.001:
            raise self.fail(path, "must be at least 1ms")
        return seconds

    def enum(self, value: Any, path: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def seq(self, value: Any, path: str, min_items: int = 0) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, got {_kind(value)}")
        if len(value) < min_items:
            raise self.fail(path, f"must have at least {min_items} item(s)")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _parse_url(r: _Reader, value: Any, path: str) -> str:
    url = r.string(value, path)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Not repeated: a URL with a credential in it (or a key pasted here) must not reach a log.
        raise r.fail(path, f"must be an absolute http(s) URL with a host (got scheme {parts.scheme[:10]!r})")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise r.fail(path, "must not carry a query, fragment or user info (credentials belong in a Secret)")
    return url


def _parse_auth(r: _Reader, value: Any, path: str) -> AuthSpec:
    m = r.mapping(value, path, ("type", "header", "secretName", "key", "env"))
    auth_type = r.enum(m.get("type", "Bearer"), f"{path}.type", AUTH_TYPES)
    header = None
    if auth_type == "Header":
        header = r.string(m.get("header"), f"{path}.header", _HEADER_NAME, "a lower-case HTTP header name")
    elif "header" in m:
        raise r.fail(f"{path}.header", "only allowed with type Header")
    secret_name = key = env = None
    if "secretName" in m or "key" in m:
        secret_name = r.string(
            m.get("secretName"), f"{path}.secretName", _DNS_SUBDOMAIN,
            "a Secret name in the CR's own namespace (cross-namespace references are not allowed)",
            echo=False,
        )
        key = r.string(m.get("key"), f"{path}.key", _SECRET_KEY, "a Secret data key", echo=False)
    if "env" in m:
        env = r.string(m.get("env"), f"{path}.env", _ENV_NAME, "an environment variable name", echo=False)
    if secret_name is None and env is None:
        raise r.fail(path, "needs a credential source: secretName and key, or env")
    return AuthSpec(type=auth_type, header=header, secret_name=secret_name, key=key, env=env)


def _parse_provider(r: _Reader, value: Any, path: str) -> ProviderSpec:
    m = r.mapping(value, path, ("name", "baseUrl", "auth", "timeout"))
    name = r.string(m.get("name"), f"{path}.name", _DNS_LABEL, "a DNS label such as 'openai'")
    base_url = _parse_url(r, m.get("baseUrl"), f"{path}.baseUrl")
    if "auth" not in m:
        raise r.fail(f"{path}.auth", "is required")
    auth = _parse_auth(r, m["auth"], f"{path}.auth")
    timeout = r.duration(m["timeout"], f"{path}.timeout") if "timeout" in m else None
    return ProviderSpec(name=name, base_url=base_url, auth=auth, timeout=timeout)


def _parse_routes(r: _Reader, value: Any, providers: Mapping[str, ProviderSpec]) -> tuple[RouteSpec, ...]:
    routes = []
    for i, item in enumerate(r.seq(value, "spec.routes", 1)):
        path = f"spec.routes[{i}]"
        m = r.mapping(item, path, ("models", "backends"))
        models = tuple(
            r.string(x, f"{path}.models[{j}]") for j, x in enumerate(r.seq(m.get("models"), f"{path}.models", 1))
        )
        backends = []
        for j, b in enumerate(r.seq(m.get("backends"), f"{path}.backends", 1)):
            bpath = f"{path}.backends[{j}]"
            bm = r.mapping(b, bpath, ("provider", "model", "priority", "weight"))
            provider = r.string(bm.get("provider"), f"{bpath}.provider")
            if provider not in providers:
                raise r.fail(f"{bpath}.provider", f"no provider named {provider!r} (have: {', '.join(providers)})")
            backends.append(
                BackendSpec(
                    provider=provider,
                    model=r.string(bm["model"], f"{bpath}.model") if "model" in bm else None,
                    priority=r.integer(bm.get("priority", 0), f"{bpath}.priority", 0, 1000),
                    weight=r.integer(bm.get("weight", 1), f"{bpath}.weight", 1, 1_000_000),
                )
            )
        routes.append(RouteSpec(models=models, backends=tuple(backends)))
    return tuple(routes)


def _parse_cache(r: _Reader, value: Any) -> CacheSpec:
    m = r.mapping(value, "spec.cache", ("mode", "ttl", "redisUrl", "maxEntryBytes", "maxEntries", "tenantHeader"))
    redis_url = None
    if "redisUrl" in m:
        redis_url = r.string(m["redisUrl"], "spec.cache.redisUrl")
        if urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise r.fail("spec.cache.redisUrl", "must be a redis://, rediss:// or unix:// URL")
        if urlsplit(redis_url).password:
            raise r.fail("spec.cache.redisUrl", "must not embed a password; mount it as a Secret instead")
    defaults = CacheSpec()
    return CacheSpec(
        mode=r.enum(_yaml11_off(m.get("mode", defaults.mode)), "spec.cache.mode", CACHE_MODES),
        ttl=r.duration(m["ttl"], "spec.cache.ttl") if "ttl" in m else defaults.ttl,
        redis_url=redis_url,
        max_entry_bytes=r.integer(m.get("maxEntryBytes", defaults.max_entry_bytes), "spec.cache.maxEntryBytes", 1),
        max_entries=r.integer(m.get("maxEntries", defaults.max_entries), "spec.cache.maxEntries", 1),
        tenant_header=r.string(
            m.get("tenantHeader", defaults.tenant_header), "spec.cache.tenantHeader", _HEADER_NAME, "a header name"
        ),
    )


def _yaml11_off(value: Any) -> Any:
    """YAML 1.1 (PyYAML, kubectl) reads an unquoted ``Off`` as false; take it to mean "Off"."""
    return "Off" if value is False else value


def _parse_pricing(r: _Reader, value: Any) -> tuple[PricingSpec, ...]:
    out = []
    for i, item in enumerate(r.seq(value, "spec.pricing")):
        path = f"spec.pricing[{i}]"
        m = r.mapping(item, path, ("model", "inputPerMillion", "outputPerMillion"))
        out.append(
            PricingSpec(
                model=r.string(m.get("model"), f"{path}.model"),
                input_per_million=r.number(m.get("inputPerMillion", 0), f"{path}.inputPerMillion"),
                output_per_million=r.number(m.get("outputPerMillion", 0), f"{path}.outputPerMillion"),
            )
        )
    return tuple(out)


def _parse_workload_selector(r: _Reader, value: Any) -> Mapping[str, str]:
    m = r.mapping(value, "spec.workloadSelector", ("matchLabels",))
    labels = r.any_mapping(m.get("matchLabels", {}), "spec.workloadSelector.matchLabels")
    for k, v in labels.items():
        r.string(v, f"spec.workloadSelector.matchLabels.{k}")
    return dict(labels)


SPEC_FIELDS = (
    "baseUrl", "timeout", "maxRetries", "circuitBreaker", "healthCheck",
    "providers", "routes", "cache", "pricing", "workloadSelector",
)


def parse_document(doc: Any, index: int = 0) -> HolySheepConfig:
    """Parse one HolySheepConfig object (a dict from YAML or from the Kubernetes API)."""
    where = f"document {index}"
    r = _Reader(where)
    top = r.mapping(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = r.any_mapping(top.get("metadata", {}), "metadata")
    name = r.string(meta.get("name"), "metadata.name", _DNS_SUBDOMAIN, "a DNS subdomain name")
    namespace = r.string(meta.get("namespace", "default"), "metadata.namespace", _DNS_LABEL, "a namespace name")
    r.where = f"document {index} ({namespace}/{name})"
    if top.get("apiVersion") != API_VERSION:
        raise r.fail("apiVersion", f"must be {API_VERSION}, got {top.get('apiVersion')!r}")
    if top.get("kind") != KIND:
        raise r.fail("kind", f"must be {KIND}, got {top.get('kind')!r}")
    spec = r.mapping(top.get("spec"), "spec", SPEC_FIELDS)

    providers: dict[str, ProviderSpec] = {}
    if "baseUrl" in spec:
        providers[SEED_PROVIDER_NAME] = ProviderSpec(
            name=SEED_PROVIDER_NAME,
            base_url=_parse_url(r, spec["baseUrl"], "spec.baseUrl"),
            auth=AuthSpec(type="Bearer", secret_name=SEED_SECRET_NAME, key=SEED_SECRET_KEY, env=SEED_ENV),
        )
    for i, item in enumerate(r.seq(spec.get("providers", []), "spec.providers")):
        p = _parse_provider(r, item, f"spec.providers[{i}]")
        if p.name in providers:
            hint = " (the name 'holysheep' is taken by spec.baseUrl)" if p.name == SEED_PROVIDER_NAME else ""
            raise r.fail(f"spec.providers[{i}].name", f"duplicate provider name {p.name!r}{hint}")
        providers[p.name] = p
    if not providers:
        raise r.fail("spec", "needs spec.baseUrl or at least one entry in spec.providers")

    if "routes" in spec:
        routes = _parse_routes(r, spec["routes"], providers)
    else:
        # No routes: every model goes to the providers in the order they are listed.
        routes = (
            RouteSpec(
                models=("*",),
                backends=tuple(BackendSpec(provider=n, priority=i) for i, n in enumerate(providers)),
            ),
        )

    cb = CircuitBreakerSpec()
    if "circuitBreaker" in spec:
        m = r.mapping(spec["circuitBreaker"], "spec.circuitBreaker", ("enabled", "failureThreshold", "resetTimeout"))
        cb = CircuitBreakerSpec(
            enabled=r.boolean(m.get("enabled", True), "spec.circuitBreaker.enabled"),
            failure_threshold=r.integer(
                m.get("failureThreshold", cb.failure_threshold), "spec.circuitBreaker.failureThreshold", 1, 1000
            ),
            reset_timeout=(
                r.duration(m["resetTimeout"], "spec.circuitBreaker.resetTimeout") if "resetTimeout" in m
                else cb.reset_timeout
            ),
        )
    hc = None
    if "healthCheck" in spec:
        m = r.mapping(spec["healthCheck"], "spec.healthCheck", ("interval", "endpoint"))
        endpoint = r.string(m.get("endpoint", "/models"), "spec.healthCheck.endpoint")
        if not endpoint.startswith("/"):
            raise r.fail("spec.healthCheck.endpoint", "must start with '/'")
        hc = HealthCheckSpec(
            interval=(
                r.duration(m["interval"], "spec.healthCheck.interval") if "interval" in m
                else HealthCheckSpec.interval
            ),
            endpoint=endpoint,
        )

    return HolySheepConfig(
        name=name,
        namespace=namespace,
        providers=tuple(providers.values()),
        routes=routes,
        timeout=r.duration(spec["timeout"], "spec.timeout") if "timeout" in spec else DEFAULT_TIMEOUT,
        max_retries=r.integer(spec.get("maxRetries", DEFAULT_MAX_RETRIES), "spec.maxRetries", 0, 10),
        circuit_breaker=cb,
        health_check=hc,
        cache=_parse_cache(r, spec["cache"]) if "cache" in spec else CacheSpec(),
        pricing=_parse_pricing(r, spec["pricing"]) if "pricing" in spec else (),
        workload_selector=_parse_workload_selector(r, spec["workloadSelector"]) if "workloadSelector" in spec else None,
        raw=dict(top),
    )


def parse_documents(docs: Iterable[Any]) -> tuple[HolySheepConfig, ...]:
    """Parse several documents that one data plane serves together.

    Provider names are metric labels and circuit-breaker keys, so they must be unique across
    documents; routes are matched in document order.
    """
    configs: list[HolySheepConfig] = []
    owners: dict[str, str] = {}
    for i, doc in enumerate(d for d in docs if d is not None):
        cfg = parse_document(doc, i)
        for j, p in enumerate(cfg.providers):
            if p.name in owners:
                raise ConfigError(
                    f"document {i} ({cfg.namespace}/{cfg.name})", f"spec.providers[{j}].name",
                    f"provider {p.name!r} is already defined by {owners[p.name]}",
                )
            owners[p.name] = f"{cfg.namespace}/{cfg.name}"
        configs.append(cfg)
    if not configs:
        raise ConfigError("config", "", f"no {KIND} document found")
    return tuple(configs)


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
