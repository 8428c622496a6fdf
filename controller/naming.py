"""Names and labels of the generated objects: one place, so render, apply and prune agree."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

FIELD_MANAGER = "holysheep-mesh"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "holysheep-mesh"
CONFIG_LABEL = "holysheep.ai/config"
# Only on objects outside their config's namespace (an AuthorizationPolicy in the ext_proc's
# namespace, a gateway's EnvoyFilter): ownerReferences cannot cross namespaces, so these labels
# are what finds them for pruning.
CONFIG_NAMESPACE_LABEL = "holysheep.ai/config-namespace"
# On an AuthorizationPolicy that admits more than the config's scope (why; the ext_proc enforces the rest).
WIDENED_ANNOTATION = "holysheep.ai/policy-widened"

DEFAULT_EXTPROC_SERVICE = "holysheep-extproc"
DEFAULT_EXTPROC_NAMESPACE = "holysheep-system"
DEFAULT_EXTPROC_PORT = 9002
DEFAULT_ROOT_NAMESPACE = "istio-system"
# The ext_proc pods' labels (mesh/base/extproc.yaml): the AuthorizationPolicies' selector.
DEFAULT_EXTPROC_SELECTOR = (("app", "holysheep-proxy"),)
# Istio's "cluster.local" in a policy principal stands for the mesh's trust domain and its aliases.
POLICY_TRUST_DOMAIN = "cluster.local"
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


MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"


def selector_labels(config_name: str) -> dict[str, str]:
    """Labels that identify every object generated for one CR (and select them for pruning)."""
    return {MANAGED_BY_LABEL: MANAGED_BY_VALUE, CONFIG_LABEL: label_value(config_name)}


def remote_labels(config_name: str, config_namespace: str) -> dict[str, str]:
    """Labels of an object outside its config's namespace."""
    return {**selector_labels(config_name), CONFIG_NAMESPACE_LABEL: config_namespace}


def label_selector(config_name: str, config_namespace: str | None = None) -> str:
    labels = selector_labels(config_name) if config_namespace is None else remote_labels(config_name, config_namespace)
    return ",".join(f"{k}={v}" for k, v in labels.items())


def config_namespace_of(obj: Mapping[str, Any]) -> str:
    """The namespace of the config an object was generated for."""
    meta = obj.get("metadata") or {}
    return str((meta.get("labels") or {}).get(CONFIG_NAMESPACE_LABEL) or meta.get("namespace", ""))


def host_object_name(config_name: str, host: str) -> str:
    """ServiceEntry/DestinationRule/VirtualService name for one provider host of one CR."""
    slug = _NOT_DNS.sub("-", host.lower().replace(".", "-")).strip("-")
    return _shorten(f"holysheep-{config_name}-{slug}", 253)


def envoyfilter_name(config_name: str) -> str:
    return _shorten(f"holysheep-{config_name}", 253)


def configmap_name(config_name: str) -> str:
    return _shorten(f"holysheep-extproc-{config_name}", 253)


def remote_name(config_namespace: str, config_name: str) -> str:
    """An object in another namespace: both names, the dot keeping (a-b, c) apart from (a, b-c)
    (a namespace has no dots)."""
    return _shorten(f"holysheep-{config_namespace}.{config_name}", 253)


def gateway_name(config_name: str) -> str:
    return _shorten(f"holysheep-{config_name}", 253)


def egress_gateway_rule_name(config_name: str) -> str:
    """The DestinationRule for the egress gateway's Service; '--' is never a host's slug."""
    return _shorten(f"holysheep-{config_name}--egress-gateway", 253)


def gateway_port_name(provider: str) -> str:
    """The Gateway server of one provider host (unique within the Gateway, as Istio requires)."""
    return f"https-{provider}"


def subset_name(provider: str) -> str:
    """The egress gateway DestinationRule's subset for one provider host (a DNS label)."""
    return _shorten(f"holysheep-{provider}", 63)


def service_host(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def principal(namespace: str, service_account: str) -> str:
    return f"{POLICY_TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def route_name(provider: str) -> str:
    """Envoy route name: Istio uses the VirtualService http[].name as is when the match is unnamed."""
    return f"holysheep-{provider}"


def extproc_cluster(service: str, namespace: str, port: int) -> str:
    return f"outbound|{port}||{service}.{namespace}.svc.cluster.local"
