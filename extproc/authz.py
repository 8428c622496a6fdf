"""Which configs a caller may use: scope matching between a workload identity and a HolySheepConfig.

A caller gets a config (its credentials, routes, cache and per-workload accounting) only when
its namespace is the config's namespace, or for any namespace when the config lives in Istio's
root namespace, and, when the config lists ``spec.serviceAccounts``, its service account
matches one entry. The entries' match forms are Istio's AuthorizationPolicy ones
(protos/scope.py), so the policy the controller generates for the ext_proc port and this check
never disagree.

Pure functions over (identity, config namespace, patterns, root namespace), plus ``Denied``,
the exception that ends a stream with PERMISSION_DENIED (extproc/service.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from extproc.gateway_identity import egress_denial
from extproc.spiffe import WorkloadIdentity
from protos.scope import service_account_matches, service_account_pattern_problem
from protos.spec import HolySheepConfig

__all__ = [
    "DEFAULT_ROOT_NAMESPACE", "OUT_OF_NAMESPACE", "SERVICE_ACCOUNT_NOT_LISTED", "Denied", "config_denial", "denial",
    "first_in_scope", "in_scope", "scope_denial", "service_account_matches", "service_account_pattern_problem",
]

DEFAULT_ROOT_NAMESPACE = "istio-system"


class _HasConfig(Protocol):
    @property
    def config(self) -> HolySheepConfig: ...


# A route match or a provider: anything served under one config, whose scope decides the caller.
_Scoped = TypeVar("_Scoped", bound=_HasConfig)

# Denial reasons: the values of holysheep_unauthorized_calls_total{reason} for scope misses.
OUT_OF_NAMESPACE = "namespace"
SERVICE_ACCOUNT_NOT_LISTED = "service_account"


class Denied(Exception):
    """The caller may not use what it asked for. ``reason``: a fixed word (a metric label);
    the message names the identity and the config, never a credential."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def denial(identity: WorkloadIdentity, config_namespace: str, service_accounts: Sequence[str] = (),
           root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> str | None:
    """None when ``identity`` is in the config's scope, else the reason it is not."""
    if config_namespace != root_namespace and identity.namespace != config_namespace:
        return OUT_OF_NAMESPACE
    if service_accounts and not any(service_account_matches(p, identity.service_account) for p in service_accounts):
        return SERVICE_ACCOUNT_NOT_LISTED
    return None


def in_scope(identity: WorkloadIdentity, config_namespace: str, service_accounts: Sequence[str] = (),
             root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> bool:
    return denial(identity, config_namespace, service_accounts, root_namespace) is None


def config_denial(identity: WorkloadIdentity, config: HolySheepConfig,
                  root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> str | None:
    """``denial`` for a parsed config (its ``metadata.namespace`` and ``spec.serviceAccounts``),
    and in Gateway mode only for a caller its egress gateway relayed (extproc/gateway_identity.py)."""
    scope = denial(identity, config.namespace, config.service_accounts, root_namespace)
    return scope or egress_denial(identity, config)


def scope_denial(identity: WorkloadIdentity, configs: Iterable[HolySheepConfig],
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> str | None:
    """None when at least one of ``configs`` is in the caller's scope, else why none is: a
    service account miss when some config is in its namespace, a namespace miss otherwise
    (also for no config at all)."""
    reason = OUT_OF_NAMESPACE
    for config in configs:
        found = config_denial(identity, config, root_namespace)
        if found is None:
            return None
        if found != OUT_OF_NAMESPACE:  # the more specific reason (service_account, not_via_gateway)
            reason = found
    return reason


def first_in_scope(identity: WorkloadIdentity, candidates: Sequence[_Scoped], asked: str,
                   root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> _Scoped | None:
    """The first candidate (a route match or a provider) whose config the caller may use; None
    when there is none at all; ``Denied`` when there are candidates but every one is out of the
    caller's scope (a config it may not use neither serves nor shadows another's)."""
    for candidate in candidates:
        if config_denial(identity, candidate.config, root_namespace) is None:
            return candidate
    if not candidates:
        return None
    reason = scope_denial(identity, (c.config for c in candidates), root_namespace)
    raise Denied(reason or OUT_OF_NAMESPACE, f"{identity} {asked} only {describe(candidates[0].config)} serves")


def describe(config: HolySheepConfig) -> str:
    """How a log line names a config's scope."""
    accounts = f", service accounts {', '.join(config.service_accounts)}" if config.service_accounts else ""
    return f"HolySheepConfig {config.namespace}/{config.name} (namespace {config.namespace}{accounts})"
