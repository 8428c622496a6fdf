"""The HolySheepConfig CRD, built from the parser's own constants so the two cannot drift.

`mesh/crd/holysheepconfig.yaml` is generated from `crd()` (`python -m controller.crd`); a test
checks the file is current. `apply_defaults` fills the schema's defaults the way the API server
does, so `render` on a file and the controller on a defaulted CR produce the same ConfigMap.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from protos import spec as hs
from protos.durations import DURATION_PATTERN

GROUP = "holysheep.ai"
VERSION = "v1"
PLURAL = "holysheepconfigs"

# Host with optional port and path; no query, fragment or user info, as the parser demands.
URL_PATTERN = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^?#\s]*)?$"
REDIS_URL_PATTERN = r"^(redis|rediss|unix)://[^:@\s]*(:[^@\s]*)?(@.*)?$"


def _dur(default: str | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string", "pattern": DURATION_PATTERN}
    if default is not None:
        s["default"] = default
    return s


def _obj(
    properties: dict[str, Any],
    required: list[str] | None = None,
    validations: list[dict[str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        s["required"] = required
    s.update(extra)
    if validations:
        s["x-kubernetes-validations"] = validations
    return s


def _str(pattern: str | None = None, **extra: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern:
        s["pattern"] = pattern
    s.update(extra)
    return s


def _cel(rule: str, message: str) -> dict[str, str]:
    return {"rule": rule, "message": message}


AUTH = _obj(
    {
        "type": {"type": "string", "enum": list(hs.AUTH_TYPES), "default": "Bearer"},
        "header": _str(hs._HEADER_NAME.pattern),
        "secretName": _str(hs._DNS_SUBDOMAIN.pattern, maxLength=253),
        "key": _str(hs._SECRET_KEY.pattern),
        "env": _str(hs._ENV_NAME.pattern),
    },
    validations=[
        _cel(
            "self.type == 'Header' ? has(self.header) : !has(self.header)",
            "header is required with type Header and only allowed with it",
        ),
        _cel("has(self.secretName) == has(self.key)", "secretName and key go together"),
        _cel("has(self.secretName) || has(self.env)", "needs secretName and key, or env"),
    ],
)

PROVIDER = _obj(
    {
        "name": _str(hs._DNS_LABEL.pattern, maxLength=63),
        "baseUrl": _str(URL_PATTERN),
        "auth": AUTH,
        "timeout": _dur(),
    },
    ["name", "baseUrl", "auth"],
)

BACKEND = _obj(
    {
        "provider": _str(),
        "model": _str(),
        "priority": {"type": "integer", "minimum": 0, "maximum": 1000, "default": 0},
        "weight": {"type": "integer", "minimum": 1, "maximum": 1_000_000, "default": 1},
    },
    ["provider"],
)

ROUTE = _obj(
    {
        "models": {"type": "array", "minItems": 1, "items": _str()},
        "backends": {"type": "array", "minItems": 1, "items": BACKEND},
    },
    ["models", "backends"],
)

_cache_defaults = hs.CacheSpec()
CACHE = _obj(
    {
        "mode": {"type": "string", "enum": list(hs.CACHE_MODES), "default": _cache_defaults.mode},
        "ttl": _dur("24h"),
        "redisUrl": _str(REDIS_URL_PATTERN),
        "maxEntryBytes": {"type": "integer", "minimum": 1, "default": _cache_defaults.max_entry_bytes},
        "maxEntries": {"type": "integer", "minimum": 1, "default": _cache_defaults.max_entries},
        "tenantHeader": _str(hs._HEADER_NAME.pattern, default=_cache_defaults.tenant_header),
    }
)

PRICING = _obj(
    {
        "model": _str(),
        "inputPerMillion": {"type": "number", "minimum": 0, "default": 0},
        "outputPerMillion": {"type": "number", "minimum": 0, "default": 0},
    },
    ["model"],
)

SPEC = _obj(
    {
        "baseUrl": _str(URL_PATTERN),
        "timeout": _dur("30s"),
        "maxRetries": {"type": "integer", "minimum": 0, "maximum": 10, "default": hs.DEFAULT_MAX_RETRIES},
        "circuitBreaker": _obj(
            {
                "enabled": {"type": "boolean", "default": True},
                "failureThreshold": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5},
                "resetTimeout": _dur("60s"),
            }
        ),
        "healthCheck": _obj(
            {
                "interval": _dur("10s"),
                "endpoint": _str("^/", default="/models"),
            }
        ),
        "providers": {
            "type": "array",
            "items": PROVIDER,
            # Provider names are metric labels and breaker keys: the API server enforces uniqueness.
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
        "routes": {"type": "array", "minItems": 1, "items": ROUTE},
        "cache": CACHE,
        "pricing": {"type": "array", "items": PRICING},
        "workloadSelector": _obj(
            {
                "matchLabels": {"type": "object", "additionalProperties": {"type": "string", "minLength": 1}},
            }
        ),
    },
    validations=[
        _cel(
            "has(self.baseUrl) || (has(self.providers) && size(self.providers) > 0)",
            "needs spec.baseUrl or at least one entry in spec.providers",
        ),
        _cel(
            "!has(self.baseUrl) || !has(self.providers) || self.providers.all(p, p.name != 'holysheep')",
            "the provider name 'holysheep' is taken by spec.baseUrl",
        ),
    ],
)

CONDITION = _obj(
    {
        "type": {"type": "string"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "observedGeneration": {"type": "integer", "minimum": 0},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
    },
    ["type", "status"],
)

STATUS = _obj(
    {
        "observedGeneration": {"type": "integer", "minimum": 0},
        "conditions": {
            "type": "array",
            "items": CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        "providerNames": {"type": "string"},
        "providers": {
            "type": "array",
            "items": _obj(
                {
                    "name": {"type": "string"},
                    "host": {"type": "string"},
                    "secretName": {"type": "string"},
                    "secretFound": {"type": "boolean"},
                },
                ["name", "host"],
            ),
        },
    }
)

SCHEMA = _obj(
    {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": SPEC,
        "status": STATUS,
    },
    ["spec"],
)


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": hs.KIND,
                "listKind": f"{hs.KIND}List",
                "plural": PLURAL,
                "singular": "holysheepconfig",
                "shortNames": ["hsc"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Providers", "type": "string", "jsonPath": ".status.providerNames"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": copy.deepcopy(SCHEMA)},
                }
            ],
        },
    }


def json_schema() -> dict[str, Any]:
    """The structural schema as plain JSON Schema (the `x-` keys are ignored by validators)."""
    return copy.deepcopy(SCHEMA)


def _default(value: Any, schema: dict[str, Any]) -> Any:
    # Same order as the API server: defaults apply to absent fields of objects that are present.
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        out = dict(value)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return {k: _default(v, props[k]) if k in props else v for k, v in out.items()}
    if isinstance(value, list) and schema.get("type") == "array":
        return [_default(v, schema.get("items", {})) for v in value]
    return value


def apply_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = _default(spec, SPEC)
    return result


def main() -> None:
    sys.stdout.write("# Generated by `python -m controller.crd`; do not edit.\n")
    sys.stdout.write(yaml.safe_dump(crd(), sort_keys=False, default_flow_style=False))


if __name__ == "__main__":
    main()
