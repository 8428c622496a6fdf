"""What Envoy tells us about a request besides its body: path, host, method, headers, attributes."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from protos.messages import HttpHeaders, ProcessingRequest

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


class RequestInfo:
    """What the request-headers message says about the request, read when first asked for: the
    pseudo-headers from the front of the list (``_read_pseudo_headers``), any other header only
    on demand (only the insecure dev mode reads one: the tenant header). Reading a header out of
    the message costs a Python object per field, so no header map is built. Names match
    case-insensitively and the last of repeated headers wins, as a map built from the message
    would have it; except when the list starts with all three pseudo-headers in lower case, as
    Envoy's always does: then only that leading block is read, so a repeat after it, or one in
    another case (neither of which Envoy sends), is not."""

    __slots__ = ("_headers", "_host", "_method", "_path")

    def __init__(self, path: str | None = None, host: str = "", method: str = "POST", headers: Any = ()) -> None:
        self._path = path  # None: the pseudo-headers are not read yet
        self._host = host
        self._method = method
        self._headers = headers  # the message's HeaderValue list

    @property
    def path(self) -> str:
        if self._path is None:
            self._read_pseudo_headers()
        return self._path  # type: ignore[return-value]

    @property
    def host(self) -> str:
        if self._path is None:
            self._read_pseudo_headers()
        return self._host

    @property
    def method(self) -> str:
        if self._path is None:
            self._read_pseudo_headers()
        return self._method

    def _read_pseudo_headers(self) -> None:
        # Envoy sends the pseudo-headers first, in lower case (HTTP/2 requires both, and Envoy's
        # header map keeps them in front): read them up to the first regular header, since each
        # header read costs Python objects. A list not shaped so (none Envoy sends) lacks one of
        # the three up front and is read whole, case-insensitively, as before.
        path = host = method = None
        for h in self._headers:
            key = h.key
            if key[:1] != ":":
                break
            if key == ":path":
                path = _text(h)
            elif key == ":authority":
                host = _text(h)
            elif key == ":method":
                method = _text(h)
        if path is None or host is None or method is None:
            path, host, method = _pseudo_headers_of_any_list(self._headers)
        self._path = path if path is not None else "/"
        if host is not None:
            self._host = host
        if method is not None:
            self._method = method

    def header(self, name: str) -> str:
        """A header's value as latin-1 text ("" when absent); ``name`` in lower case."""
        value = ""
        for h in self._headers:
            if h.key.lower() == name:
                value = _text(h)
        return value


def _pseudo_headers_of_any_list(headers: Any) -> list[str | None]:
    """[:path, :authority, :method] (None: absent) of any header list, read as a case-insensitive
    map of it would be: the last repeat wins."""
    by_name = {h.key.lower(): h for h in headers}
    return [_text(h) if (h := by_name.get(name)) is not None else None for name in (":path", ":authority", ":method")]


def _text(h: Any) -> str:
    """A header's value: Envoy sends it in raw_value (bytes, read as latin-1)."""
    raw = h.raw_value
    return raw.decode("latin-1") if raw else h.value


def request_info(headers: HttpHeaders) -> RequestInfo:
    """From the request-headers message's ``request_headers`` (read when first asked for)."""
    return RequestInfo(headers=headers.headers.headers)


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
