"""Who is calling: the identity that scopes the cache and labels the workload metrics.

Today it is the calling workload from the sidecar's node metadata (Envoy sends it as request
attributes), and only without it the tenant a client names in a header. The derivation is one
``Identify`` function handed to each processor (service.py), so a stronger source (the gRPC
peer's mTLS certificate, known per stream) replaces it in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from extproc.attributes import RequestInfo, attributes, text
from protos.messages import ProcessingRequest

MAX_TENANT_CHARS = 256


@dataclass(frozen=True, slots=True)
class Caller:
    namespace: str = ""
    workload: str = ""
    claimed_tenant: str = ""  # from a client header: trusted only when the mesh gives no identity

    @property
    def tenant(self) -> str:
        """Cache scope. The mesh's workload identity wins over anything a client claims."""
        if self.workload:
            return f"workload:{self.namespace}/{self.workload}"
        return f"header:{self.claimed_tenant}" if self.claimed_tenant else ""


ANONYMOUS = Caller()

# (the request-headers message, what it carries, the config's tenant header name) -> the caller
Identify = Callable[[ProcessingRequest, RequestInfo, str], Caller]


def caller_from_node_metadata(req: ProcessingRequest, info: RequestInfo, tenant_header: str) -> Caller:
    """Envoy sends its node metadata with the first message of a stream."""
    attrs = attributes(req)
    return Caller(
        namespace=text(attrs, "xds.node.metadata.NAMESPACE"),
        workload=text(attrs, "xds.node.metadata.WORKLOAD_NAME") or text(attrs, "xds.node.metadata.NAME"),
        claimed_tenant=info.headers.get(tenant_header, "")[:MAX_TENANT_CHARS],
    )
