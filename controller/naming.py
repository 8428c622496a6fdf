"""Names and labels of the generated objects: one place, so render, apply and prune agree."""

from __future__ import annotations

import hashlib
import re

FIELD_MANAGER = "holysheep-mesh"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "holysheep-mesh"
CONFIG_LABEL = "holysheep.ai/config"

DEFAULT_EXTPROC_SERVICE = "holysheep-extproc"
DEFAULT_EXTPROC_NAMESPACE = "holysheep-system"
DEFAULT_EXTPROC_PORT = 9002
DEFAULT_ROOT_NAMESPACE = "istio-system"
CONFIGMAP_KEY = "config.yaml"

_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def _shorten(value: str, limit: int) -> str:
    """Keep names readable but within limits; the hash keeps two long names apart."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[: limit - 9].rstrip('-.')}-{digest}"


def label_value(value: str) -> str:
    return _shorten(value, 63)


def selector_labels(config_name: str) -> dict[str, str]:
    """Labels that identify every object generated for one CR (and select them for pruning)."""
    return {MANAGED_BY_LABEL: MANAGED_BY_VALUE, CONFIG_LABEL: label_value(config_name)}


def label_selector(config_name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(config_name).items())


def host_object_name(config_name: str, host: str) -> str:
    """ServiceEntry/DestinationRule/VirtualService name for one provider host of one CR."""
    slug = _NOT_DNS.sub("-", host.lower().replace(".", "-")).strip("-")
    return _shorten(f"holysheep-{config_name}-{slug}", 253)


def envoyfilter_name(config_name: str) -> str:
    return _shorten(f"holysheep-{config_name}", 253)


def configmap_name(config_name: str) -> str:
    return _shorten(f"holysheep-extproc-{config_name}", 253)


def route_name(provider: str) -> str:
    """Envoy route name: Istio uses the VirtualService http[].name as is when the match is unnamed."""
    return f"holysheep-{provider}"


def extproc_cluster(service: str, namespace: str, port: int) -> str:
    return f"outbound|{port}||{service}.{namespace}.svc.cluster.local"
