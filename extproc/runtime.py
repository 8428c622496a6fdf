"""The compiled, swappable state a config produces: providers, breakers, routes, caches, prices.

A reload builds a new ``Runtime`` and swaps one reference; requests in flight keep the one they
started with. Breakers and caches carry over for providers and cache specs that did not change,
so a reload neither forgets an outage nor empties the fallback cache. Budget engines are rebuilt
over stores that carry over (one per Redis URL, or the replica's memory table): their counts are
keyed by config, budget name and window, so a reload keeps the counts of budgets that still exist.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc import authz
from extproc.adapter import ProviderAdapter
from extproc.auth import headers_to_remove
from extproc.breaker import CircuitBreaker
from extproc.budget_store import BudgetStore, MemoryBudgetStore, RedisBudgetStore
from extproc.budgets import BudgetEngine, export_budget_metrics
from extproc.cache import ResponseCache
from extproc.credentials import CredentialStore
from extproc.identity import Identify, authenticated_caller
from extproc.routing import RouteMatch, RouteTable
from extproc.shared_state import breaker_slot
from extproc.spiffe import XFCC_HEADER, WorkloadIdentity
from extproc.translated import adapter_for
from protos.spec import CacheSpec, HolySheepConfig, PricingSpec, ProviderSpec

# Bound on each per-caller memo of a runtime (callers x models); past it, computed each time.
MAX_REMEMBERED = 8192


@dataclass
class Provider:
    spec: ProviderSpec
    config: HolySheepConfig
    breaker: CircuitBreaker
    timeout: float
    adapter: ProviderAdapter  # how requests to it are addressed, authenticated (and translated)
    remove_headers: list[str] = field(default_factory=list)
    name: str = field(init=False)  # spec.name, read several times per request

    def __post_init__(self) -> None:
        self.name = self.spec.name


class Pricing:
    def __init__(self, specs: Sequence[PricingSpec]) -> None:
        self._specs = specs
        self._memo: dict[str, PricingSpec | None] = {}

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        if model not in self._memo:
            exact = next((p for p in self._specs if p.model == model), None)
            self._memo[model] = exact or next((p for p in self._specs if fnmatch.fnmatchcase(model, p.model)), None)
        spec = self._memo[model]
        if spec is None:
            return 0.0
        return (input_tokens * spec.input_per_million + output_tokens * spec.output_per_million) / 1e6


class Served:
    """What a request under one config uses: its cache, its prices, its budgets (None: none)."""

    __slots__ = ("budgets", "cache", "key", "pricing")

    def __init__(self, cache: ResponseCache, pricing: Pricing, budgets: BudgetEngine | None, key: str) -> None:
        self.cache = cache
        self.pricing = pricing
        self.budgets = budgets
        self.key = key  # namespace/name


class Runtime:
    def __init__(
        self,
        configs: Sequence[HolySheepConfig],
        credentials: CredentialStore,
        previous: Runtime | None = None,
    ) -> None:
        self.configs = tuple(configs)
        self.credentials = credentials
        self.routes = RouteTable(self.configs)
        self.providers: dict[str, Provider] = {}
        self.caches: dict[str, ResponseCache] = {}
        self.pricing: dict[str, Pricing] = {}
        self.by_authority: dict[str, Provider] = {}
        self._by_authority_all: dict[str, list[Provider]] = {}
        old_caches: dict[CacheSpec, ResponseCache] = {c.spec: c for c in previous.caches.values()} if previous else {}
        self.budgets: dict[str, BudgetEngine] = {}
        self.budget_stores: dict[str | None, BudgetStore] = {}  # by cache.redisUrl (None: memory)
        old_stores = dict(previous.budget_stores) if previous else {}
        # Every header any configured provider takes a credential in: a client's value of one is
        # stripped before a request goes to any provider, not only to the provider that uses it.
        credential_headers = sorted({p.auth.header_name for cfg in self.configs for p in cfg.providers})
        for cfg in self.configs:
            key = self.served_key(cfg)
            self.caches[key] = old_caches.pop(cfg.cache) if cfg.cache in old_caches else ResponseCache(cfg.cache)
            self.pricing[key] = Pricing(cfg.pricing)
            if cfg.budgets:
                url = cfg.cache.redis_url
                store = self.budget_stores.get(url) or old_stores.pop(url, None) or _budget_store(url)
                self.budget_stores[url] = store
                self.budgets[key] = BudgetEngine(key, cfg.budgets, store)
            for spec in cfg.providers:
                timeout = cfg.timeout_for(spec)
                old = previous.providers.get(spec.name) if previous else None
                if old is not None and old.breaker.spec == cfg.circuit_breaker:
                    breaker = old.breaker
                    breaker.trial_timeout = timeout
                else:
                    breaker = CircuitBreaker(spec.name, cfg.circuit_breaker, timeout, breaker_slot(spec.name))
                adapter = adapter_for(spec, credentials)  # translating when spec.api is not every client's
                # An egress gateway describes the app's certificate in x-forwarded-client-cert
                # (Istio's gateway default, SANITIZE_SET): internal, never for a provider.
                remove = [*headers_to_remove(spec.auth, credential_headers), XFCC_HEADER]
                provider = Provider(spec, cfg, breaker, timeout, adapter, remove)
                self.providers[spec.name] = provider
                self.by_authority.setdefault(spec.authority, provider)
                self._by_authority_all.setdefault(spec.authority, []).append(provider)
        self.retired_caches = list(old_caches.values())
        self.retired_budget_stores = list(old_stores.values())  # the server closes them
        # Tenant scope is needed before the model (and so the config) is known.
        self.tenant_header = self.configs[0].cache.tenant_header if self.configs else "x-holysheep-tenant"
        credentials.track(p.spec.auth for p in self.providers.values())
        # Per config, what a request under it uses, found by the config object itself (hashing a
        # parsed config, or formatting its key, per request costs more than the lookup).
        self._served = {id(cfg): Served(self.caches[key], self.pricing[key], self.budgets.get(key), key)
                        for cfg in self.configs for key in (self.served_key(cfg),)}
        # Scope answers per caller, for this runtime's configs: authz's functions are pure over
        # (identity, configs, root namespace), and a runtime's configs never change.
        self._scope_memo: dict[tuple[WorkloadIdentity, str], str | None] = {}
        self._identify_memo: dict[WorkloadIdentity, Identify] = {}
        self._route_memo: dict[tuple[WorkloadIdentity, str, str], RouteMatch | tuple[str, str] | None] = {}

    @staticmethod
    def served_key(cfg: HolySheepConfig) -> str:
        return f"{cfg.namespace}/{cfg.name}"

    def identify_for(self, identity: WorkloadIdentity) -> Identify:
        """``identity.authenticated_caller`` over this runtime's configs, one per caller."""
        found = self._identify_memo.get(identity)
        if found is None:
            found = authenticated_caller(identity, self.configs)
            if len(self._identify_memo) < MAX_REMEMBERED:
                self._identify_memo[identity] = found
        return found

    def scope_denial(self, identity: WorkloadIdentity, root_namespace: str) -> str | None:
        """``authz.scope_denial`` over this runtime's configs, remembered per caller."""
        key = (identity, root_namespace)
        try:
            return self._scope_memo[key]
        except KeyError:
            pass
        reason = authz.scope_denial(identity, self.configs, root_namespace)
        if len(self._scope_memo) < MAX_REMEMBERED:
            self._scope_memo[key] = reason
        return reason

    def route_in_scope(self, identity: WorkloadIdentity, model: str, root_namespace: str) -> RouteMatch | None:
        """The first route for ``model`` among the configs in the caller's scope
        (``authz.first_in_scope``), remembered per caller and model; raises ``authz.Denied``."""
        key = (identity, model, root_namespace)
        try:
            found = self._route_memo[key]
        except KeyError:
            try:
                found = authz.first_in_scope(identity, self.routes.matches(model),
                                             f"asked for model {model[:100]!r}, which", root_namespace)
            except authz.Denied as exc:
                found = (exc.reason, str(exc))
            if len(self._route_memo) < MAX_REMEMBERED:
                self._route_memo[key] = found
        if isinstance(found, tuple):
            raise authz.Denied(*found)
        return found

    def provider_for_host(self, host: str) -> Provider | None:
        """The provider a bodyless call (GET /v1/models) goes to: the one its host names, with or
        without the port; with a single provider, that one."""
        provider = self.by_authority.get(host) or self.by_authority.get(host.partition(":")[0])
        if provider is None and len(self.providers) == 1:
            provider = next(iter(self.providers.values()))
        return provider

    def providers_for_host(self, host: str) -> list[Provider]:
        """Every provider a bodyless call to ``host`` may go to, in config order (the data plane
        takes the first in the caller's scope); with a single provider, that one."""
        found = self._by_authority_all.get(host) or self._by_authority_all.get(host.partition(":")[0])
        if not found and len(self.providers) == 1:
            return list(self.providers.values())
        return list(found or ())

    def served(self, cfg: HolySheepConfig) -> Served:
        """What a request under ``cfg`` (one of this runtime's configs) uses."""
        # By identity: a config this runtime holds is alive, so no other object shares its id.
        found = self._served.get(id(cfg))
        if found is None:  # an equal config parsed elsewhere (a test's): by its key
            key = self.served_key(cfg)
            return Served(self.caches[key], self.pricing[key], self.budgets.get(key), key)
        return found

    def export_budget_metrics(self) -> None:
        """The budget gauges, from the counters (called by /metrics, off the event loop)."""
        export_budget_metrics(self.budgets.values())

    def cache_for(self, cfg: HolySheepConfig) -> ResponseCache:
        return self.served(cfg).cache



def _budget_store(redis_url: str | None) -> BudgetStore:
    """Exact across the replica's workers (memory), or across replicas too (Redis)."""
    return MemoryBudgetStore() if redis_url is None else RedisBudgetStore(redis_url)
