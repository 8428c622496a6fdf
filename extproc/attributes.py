"""What Envoy tells us about a request besides its body: path, host, method, calling workload."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import struct_pb2

from protos.messages import ProcessingRequest, headers_to_dict

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


@dataclass(frozen=True)
class RequestInfo:
    path: str = "/"
    host: str = ""
    method: str = "POST"
    workload_namespace: str = ""
    workload: str = ""
    claimed_tenant: str = ""  # from a client header: trusted only when the mesh gives no identity

    @property
    def tenant(self) -> str:
        """Cache scope. The mesh's workload identity wins over anything a client claims."""
        if self.workload:
            return f"workload:{self.workload_namespace}/{self.workload}"
        return f"header:{self.claimed_tenant}" if self.claimed_tenant else ""


def _text(fields: struct_pb2.Struct, name: str) -> str:
    value = fields.fields.get(name)
    if value is None or value.WhichOneof("kind") != "string_value":
        return ""
    return value.string_value


def request_info(req: ProcessingRequest, tenant_header: str) -> RequestInfo:
    """From the request-headers message: Envoy sends the attributes with the first message."""
    headers = headers_to_dict(req.request_headers)
    attrs = req.attributes.get(ATTRIBUTES_KEY)
    namespace = workload = ""
    if attrs is not None:
        namespace = _text(attrs, "xds.node.metadata.NAMESPACE")
        workload = _text(attrs, "xds.node.metadata.WORKLOAD_NAME") or _text(attrs, "xds.node.metadata.NAME")
    return RequestInfo(
        path=headers.get(":path", "/"),
        host=headers.get(":authority", ""),
        method=headers.get(":method", "POST"),
        workload_namespace=namespace,
        workload=workload,
        claimed_tenant=headers.get(tenant_header, "")[:256],
    )
