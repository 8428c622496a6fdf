"""A relayed identity reaches only the configs whose own egress gateway relayed it.

Any HolySheepConfig may name an egress gateway (spec.egress.gateway), so a tenant can name its
own service account as one. Its relayed claims must then be worth nothing outside its own
Gateway-mode config: not another namespace's Sidecar-mode config (credential, cache, budgets),
not a root-namespace config whose gateway is the real one. Checked on the parsed configs with
the same functions the processor calls (extproc/identity.py, extproc/authz.py)."""

from __future__ import annotations

from google.protobuf import struct_pb2

from extproc import authz
from extproc.gateway_identity import NOT_VIA_GATEWAY, UNTRUSTED_RELAY, calling_workload
from extproc.spiffe import WorkloadIdentity
from protos.filter_config import PEER_URI_SAN_ATTRIBUTE
from protos.spec import load_text

CONFIGS = load_text("""
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: victim, namespace: apps}
spec: {baseUrl: "https://api.example.com/v1"}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  egress: {mode: Gateway}
  providers:
  - {name: meshwide, baseUrl: "https://api.other.example/v1", auth: {secretName: k, key: k}}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: own, namespace: evil}
spec:
  egress: {mode: Gateway, gateway: {namespace: evil, serviceAccount: attacker}}
  providers:
  - {name: evilprov, baseUrl: "https://api.evil.example/v1", auth: {secretName: k, key: k}}
""")
VICTIM, MESH, OWN = CONFIGS


def relayed(via: WorkloadIdentity, claimed: str) -> WorkloadIdentity:
    attrs = struct_pb2.Struct()
    attrs.update({PEER_URI_SAN_ATTRIBUTE: claimed})
    return calling_workload(via, attrs, CONFIGS)


def test_a_tenant_declared_gateway_cannot_speak_for_another_namespace() -> None:
    attacker = WorkloadIdentity("cluster.local", "evil", "attacker")
    victim = relayed(attacker, "spiffe://cluster.local/ns/apps/sa/default")  # believed as a relay...
    assert authz.config_denial(victim, VICTIM) == UNTRUSTED_RELAY  # ...but not by a Sidecar-mode config
    assert authz.config_denial(victim, MESH) == NOT_VIA_GATEWAY  # nor by the real gateway's config
    assert authz.config_denial(victim, OWN) == authz.OUT_OF_NAMESPACE  # nor by its own, out of scope
    assert authz.scope_denial(victim, CONFIGS) is not None


def test_the_real_gateway_relays_for_its_config_only() -> None:
    gateway = WorkloadIdentity("cluster.local", "istio-system", "istio-egressgateway-service-account")
    workload = relayed(gateway, "spiffe://cluster.local/ns/apps/sa/default")
    assert authz.config_denial(workload, MESH) is None
    assert authz.config_denial(workload, VICTIM) == UNTRUSTED_RELAY
    # The same workload calling for itself is served by its Sidecar-mode config, as before.
    assert authz.config_denial(WorkloadIdentity("cluster.local", "apps", "default"), VICTIM) is None
