"""Which configs a caller may use: scope matching between a workload identity and a HolySheepConfig.

A caller gets a config (its credentials, routes, cache and per-workload accounting) only when
its namespace is the config's namespace, or for any namespace when the config lives in Istio's
root namespace, and, when the config lists ``spec.serviceAccounts``, its service account
matches one entry.

Entries use exactly the match forms of Istio's AuthorizationPolicy (exact ``name``, prefix
``name*``, suffix ``*name``, presence ``*``), so the AuthorizationPolicy the controller
generates for port 9002 can express the same scope and the two checks never disagree.

Pure functions over (identity, config namespace, patterns, root namespace). The pattern rules
are meant for the contract too (protos/spec.py validates spec.serviceAccounts with
``service_account_pattern_problem``; the controller maps the same forms to principals).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from extproc.spiffe import WorkloadIdentity

DEFAULT_ROOT_NAMESPACE = "istio-system"

# Denial reasons: the values of holysheep_unauthorized_calls_total{reason} for scope misses.
OUT_OF_NAMESPACE = "namespace"
SERVICE_ACCOUNT_NOT_LISTED = "service_account"

# What a pattern may contain around its one optional '*': a service account name (DNS-1123
# subdomain characters); the name rules themselves apply to what is matched, not to a fragment.
_FRAGMENT = re.compile(r"[a-z0-9.-]{1,253}")


def service_account_pattern_problem(pattern: str) -> str | None:
    """Why a ``spec.serviceAccounts`` entry is unusable, or None. For the config parser."""
    if pattern == "*":
        return None
    core = pattern[1:] if pattern.startswith("*") else pattern[:-1] if pattern.endswith("*") else pattern
    if "*" in core:
        return "'*' only as the whole entry, its first or its last character (as in Istio's AuthorizationPolicy)"
    if not _FRAGMENT.fullmatch(core):
        return "a service account name: lowercase letters, digits, '-' and '.'"
    return None


def service_account_matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return bool(name)
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return name.endswith(pattern[1:])
    return name == pattern


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
