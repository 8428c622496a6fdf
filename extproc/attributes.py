"""What Envoy tells us about a request besides its body: path, host, method, headers, attributes."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import struct_pb2

from protos.messages import ProcessingRequest, headers_to_dict

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    path: str = "/"
    host: str = ""
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names, latin-1 text


def request_info(req: ProcessingRequest) -> RequestInfo:
    """From the request-headers message."""
    headers = headers_to_dict(req.request_headers)
    return RequestInfo(
        path=headers.get(":path", "/"),
        host=headers.get(":authority", ""),
        method=headers.get(":method", "POST"),
        headers=headers,
    )


def attributes(req: ProcessingRequest) -> struct_pb2.Struct | None:
    """The attributes Envoy sends with the first message (``protos.filter_config``'s
    ``request_attributes``), if any."""
    return req.attributes.get(ATTRIBUTES_KEY)


def text(attrs: struct_pb2.Struct | None, name: str) -> str:
    """One string attribute, or "" when it is absent or not a string."""
    value = attrs.fields.get(name) if attrs is not None else None
    if value is None or value.WhichOneof("kind") != "string_value":
        return ""
    return value.string_value
