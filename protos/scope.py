"""Who a HolySheepConfig is for: the service account match forms of ``spec.serviceAccounts``.

Both planes use these: the parser validates ``spec.serviceAccounts`` with
``service_account_pattern_problem``, the data plane matches a caller's authenticated service
account with ``service_account_matches`` (extproc/authz.py), and the controller maps the same
entries to the ``principals`` of the AuthorizationPolicy it generates for the ext_proc port.

The forms are exactly those of Istio's AuthorizationPolicy string matches (exact ``name``,
prefix ``name*``, suffix ``*name``, presence ``*``), so the policy can express the same scope
and the two checks never disagree.
"""

from __future__ import annotations

import re

# What a pattern may contain around its one optional '*': a service account name (DNS-1123
# subdomain characters); the name rules themselves apply to what is matched, not to a fragment.
_FRAGMENT = re.compile(r"[a-z0-9.-]{1,253}")

# The API server's form of service_account_pattern_problem (the parser's gives the precise message).
SERVICE_ACCOUNT_PATTERN = r"^(\*|\*?[a-z0-9.-]{1,253}|[a-z0-9.-]{1,253}\*)$"


def service_account_pattern_problem(pattern: str) -> str | None:
    """Why a ``spec.serviceAccounts`` entry is unusable, or None."""
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
