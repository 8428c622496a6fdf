"""Gateway mode: the workload behind the egress gateway, believed only from the gateway itself.

In Gateway mode (``spec.egress.mode``) an app's sidecar sends the provider hosts over mesh mTLS
to Istio's egress gateway, and only the gateway calls the ext_proc. The gateway's ext_proc
filter asks Envoy for ``connection.uri_san_peer_certificate`` (protos/filter_config.py): the
SPIFFE ID in the client certificate the gateway verified, i.e. the calling sidecar's workload.

That attribute is written by whoever opens the stream, so it is believed only when the
stream's own authenticated identity (extproc/identity.py: our mTLS or our sidecar's XFCC) is the
service account of an egress gateway that a served config names (``spec.egress.gateway``), and
only for a workload of the gateway's trust domain. From any other caller it ends the stream:
naming a workload other than oneself is an attempt to borrow its scope. Without the attribute
the caller is itself.

A config in Gateway mode serves only the workloads its own gateway relays (``egress_denial``):
a workload calling the ext_proc directly would get the provider's key in the answer, which is
exactly what Gateway mode keeps out of app pods, so it is refused even inside the config's scope.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import struct_pb2

from extproc.attributes import text
from extproc.spiffe import IdentityError, WorkloadIdentity, parse_spiffe_id
from protos.filter_config import PEER_URI_SAN_ATTRIBUTE
from protos.spec import HolySheepConfig

# holysheep_unauthorized_calls_total{reason}: the attribute from a caller that is no gateway, and
# a Gateway-mode config asked for by a caller its gateway did not relay.
UNTRUSTED_RELAY = "untrusted_relay"
NOT_VIA_GATEWAY = "not_via_gateway"


@dataclass(frozen=True, slots=True)
class RelayedIdentity(WorkloadIdentity):
    """A workload's identity as the egress gateway ``via`` saw it verified (its scope, cache and
    metrics are the workload's; ``via`` is what the ext_proc itself authenticated)."""

    via: WorkloadIdentity

    def __str__(self) -> str:
        return f"{self.spiffe_id} (via {self.via.spiffe_id})"


def gateways(configs: Iterable[HolySheepConfig]) -> set[tuple[str, str]]:
    """(namespace, service account) of every egress gateway a Gateway-mode config names."""
    return {(c.egress.gateway.namespace, c.egress.gateway.service_account)
            for c in configs if c.egress.mode == "Gateway"}


def calling_workload(identity: WorkloadIdentity, attrs: struct_pb2.Struct | None,
                     configs: Iterable[HolySheepConfig]) -> WorkloadIdentity:
    """The caller to authorize: ``identity`` itself, or the workload a trusted gateway relays.
    Raises IdentityError when a caller that is no configured gateway names a workload, or a
    gateway names something that is not a workload of its own trust domain."""
    claimed = text(attrs, PEER_URI_SAN_ATTRIBUTE)
    if not claimed:
        return identity  # the hot path of Sidecar mode: nothing to look up
    if (identity.namespace, identity.service_account) not in gateways(configs):
        raise IdentityError(UNTRUSTED_RELAY, f"{identity} sent {PEER_URI_SAN_ATTRIBUTE}; only the egress gateway of a "
                                             "Gateway-mode HolySheepConfig may name the workload it relays")
    workload = parse_spiffe_id(claimed, (identity.trust_domain,))
    return RelayedIdentity(workload.trust_domain, workload.namespace, workload.service_account, via=identity)


def egress_denial(identity: WorkloadIdentity, config: HolySheepConfig) -> str | None:
    """None when ``config`` may serve this caller as far as the egress path goes: a Gateway-mode
    config only a workload its own gateway relayed (NOT_VIA_GATEWAY otherwise), a Sidecar-mode
    config only a caller that is itself (UNTRUSTED_RELAY for a relayed one).

    A relayed identity is believed only for the configs whose gateway relayed it: any config may
    name a gateway (``spec.egress.gateway``), so a tenant could name its own service account as
    one, and its relayed claims must not reach another config's credentials, cache or budgets."""
    via = identity.via if isinstance(identity, RelayedIdentity) else None
    if config.egress.mode != "Gateway":
        return UNTRUSTED_RELAY if via is not None else None
    gw = config.egress.gateway
    if via is None or (via.namespace, via.service_account) != (gw.namespace, gw.service_account):
        return NOT_VIA_GATEWAY
    return None
