"""Who is calling: the identity that scopes the cache, labels the workload metrics and is
authorized per config (extproc/authz.py).

Two steps, so nothing a caller writes into a stream decides who it is:

- **Per stream, from the transport** (``Authenticate``, built once by ``authenticator()`` from
  the server's identity mode): the SPIFFE ID of the client certificate our own mTLS verified
  (``tls``), or the one the ext_proc pod's own Istio sidecar verified and put in
  ``x-forwarded-client-cert`` (``xfcc``). Failing that, an ``IdentityError`` ends the stream.
  Without any identity source the stream is refused too (fail closed); only the explicit
  ``--insecure-no-identity`` dev mode serves callers it cannot name.
- **Per request** (``Identify``, applied to the request-headers message): the ``Caller`` of an
  authenticated stream is its identity; Envoy's node metadata (request attributes) may only
  name the workload label inside that identity's namespace, never choose a scope, and the
  tenant header is ignored. Only in the insecure mode do node metadata and the tenant header
  scope the cache (``caller_from_node_metadata``), as a dev convenience with no security value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from extproc import spiffe
from extproc.attributes import RequestInfo, attributes, text
from extproc.gateway_identity import calling_workload
from extproc.spiffe import IdentityError, WorkloadIdentity
from protos.messages import ProcessingRequest
from protos.spec import HolySheepConfig

MAX_TENANT_CHARS = 256
# The workload label is a Deployment-like name a caller may choose inside its own namespace:
# bounded per process so a caller cannot grow the series count (later names fall back to the
# service account, which the certificate fixes).
MAX_WORKLOAD_LABELS = 1000
_WORKLOAD_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?")
_workload_labels: set[tuple[str, str, str]] = set()


@dataclass(frozen=True, slots=True)
class Caller:
    namespace: str = ""
    workload: str = ""  # the metrics' workload label
    claimed_tenant: str = ""  # from a client header: used only by the insecure dev mode
    service_account: str = ""
    identity: WorkloadIdentity | None = None  # None only under --insecure-no-identity
    # Cache scope. An authenticated identity is the scope, whatever the caller claims.
    tenant: str = field(init=False, compare=False)
    # (workload_namespace, service_account, workload): the workload metrics' labels.
    labels: tuple[str, str, str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: a Caller is immutable, and the same one serves many requests (_caller).
        if self.identity is not None:
            tenant = f"id:{self.identity.spiffe_id}"
        elif self.workload:
            tenant = f"workload:{self.namespace}/{self.workload}"
        else:
            tenant = f"header:{self.claimed_tenant}" if self.claimed_tenant else ""
        object.__setattr__(self, "tenant", tenant)
        object.__setattr__(self, "labels", (self.namespace, self.service_account, self.workload))


ANONYMOUS = Caller()

# (the request-headers message, what it carries, the config's tenant header name) -> the caller.
# An Identify of an authenticated stream returns a Caller with its identity, or raises
# IdentityError; only the insecure mode's returns one without.
Identify = Callable[[ProcessingRequest, RequestInfo, str], Caller]


def workload_label(identity: WorkloadIdentity, name: str) -> str:
    """The workload label for a caller whose node metadata names ``name``: that name when it is
    a Kubernetes name and the process has room for it, else the service account."""
    if not name or len(name) > 253 or not _WORKLOAD_NAME.fullmatch(name):
        return identity.service_account
    key = (identity.namespace, identity.service_account, name)
    if key not in _workload_labels:
        if len(_workload_labels) >= MAX_WORKLOAD_LABELS:
            return identity.service_account
        _workload_labels.add(key)
    return name


def authenticated_caller(identity: WorkloadIdentity, configs: Sequence[HolySheepConfig] = ()) -> Identify:
    """The Identify of a stream whose transport named ``identity``; when that is the egress
    gateway of a Gateway-mode config, the caller is the workload it relays (extproc/gateway_identity.py)."""

    def identify(req: ProcessingRequest, info: RequestInfo, tenant_header: str) -> Caller:
        attrs = attributes(req)
        caller = calling_workload(identity, attrs, configs)
        return _caller(caller, text(attrs, "xds.node.metadata.WORKLOAD_NAME"))

    return identify


# (identity, workload name) -> its Caller: the same few per process, and a Caller is immutable.
# Sound because workload_label's answer for a pair never changes once given (names are only
# ever added to _workload_labels). Bounded like the labels.
_callers: dict[tuple[WorkloadIdentity, str], Caller] = {}


def _caller(identity: WorkloadIdentity, name: str) -> Caller:
    caller = _callers.get((identity, name))
    if caller is None:
        caller = Caller(namespace=identity.namespace, workload=workload_label(identity, name),
                        service_account=identity.service_account, identity=identity)
        if len(_callers) < 4 * MAX_WORKLOAD_LABELS:
            _callers[(identity, name)] = caller
    return caller


def caller_from_node_metadata(req: ProcessingRequest, info: RequestInfo, tenant_header: str) -> Caller:
    """Insecure dev mode only (``--insecure-no-identity``): Envoy's node metadata, as the caller
    sends it, and else the tenant header. Nothing here is authenticated."""
    attrs = attributes(req)
    return Caller(
        namespace=text(attrs, "xds.node.metadata.NAMESPACE"),
        workload=text(attrs, "xds.node.metadata.WORKLOAD_NAME") or text(attrs, "xds.node.metadata.NAME"),
        claimed_tenant=info.header(tenant_header.lower())[:MAX_TENANT_CHARS],
    )


# --- per stream: where the identity comes from ---------------------------------------------------

class IdentityFrom(StrEnum):
    """The server's identity mode (``holysheep-mesh extproc``)."""

    TLS = "tls"  # our own mTLS: --tls-cert/--tls-key/--client-ca
    XFCC = "xfcc"  # the ext_proc pod's own Istio sidecar, SANITIZE_SET (README, Security)
    NONE = "none"  # nothing configured: every stream is refused
    INSECURE = "insecure"  # --insecure-no-identity: dev only, nothing is authenticated


NO_IDENTITY_SOURCE = "no_identity_source"

# (the stream's grpc.aio.ServicerContext) -> its caller's identity; None only in insecure mode.
Authenticate = Callable[[Any], WorkloadIdentity | None]


def authenticator(mode: IdentityFrom, trust_domains: Collection[str] | None = None) -> Authenticate:
    """The per-stream identity function of a mode; raises IdentityError when there is none."""
    if mode is IdentityFrom.TLS:
        return spiffe.ServicerContextIdentity(trust_domains)
    if mode is IdentityFrom.XFCC:
        return lambda context: spiffe.from_metadata(context.invocation_metadata() or (), trust_domains=trust_domains)
    if mode is IdentityFrom.INSECURE:
        return lambda context: None

    def refuse(context: Any) -> WorkloadIdentity | None:
        raise IdentityError(NO_IDENTITY_SOURCE, "the ext_proc has no identity source configured (--tls-cert, "
                                                "--tls-key, --client-ca or --identity-from xfcc)")

    return refuse
