"""Builders for ext_proc ProcessingResponse messages (C-accelerated protobuf, hot path).

Header values always go in ``raw_value``: Envoy 1.40 reads that field and ignores ``value``
for mutations. Constant responses are built once and reused, since the servicer only
serialises them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
HttpHeaders = pb.HttpHeaders
ProcessingMode: TypeAlias = processing_mode_pb2.ProcessingMode

HeaderList = Sequence[tuple[str, bytes]]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_mutation(set_headers: HeaderList = (), remove: Iterable[str] = ()) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v), append_action=_OVERWRITE)
            for k, v in set_headers
        ],
        remove_headers=list(remove),
    )


def common(
    set_headers: HeaderList = (),
    remove: Iterable[str] = (),
    body: bytes | None = None,
    clear_route_cache: bool = False,
) -> pb.CommonResponse:
    resp = pb.CommonResponse(clear_route_cache=clear_route_cache)
    if set_headers or remove:
        resp.header_mutation.CopyFrom(header_mutation(set_headers, remove))
    if body is not None:
        resp.body_mutation.body = body
    return resp


def request_body_response(
    set_headers: HeaderList,
    remove: Iterable[str],
    body: bytes | None,
    response_mode: ProcessingMode | None,
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(
        request_body=pb.BodyResponse(response=common(set_headers, remove, body, clear_route_cache=True))
    )
    if response_mode is not None:
        resp.mode_override.CopyFrom(response_mode)
    return resp


# Shared answers: the same header set (the provider header of a passed-on answer) gives the
# same message, so it is built once (upb message construction costs microseconds) and only
# serialised afterwards. Bounded: cleared when full. (A request body's shared answer lives with
# its header set: extproc/adapter.py, Passthrough.)
_SHARED_MAX = 512
_shared: dict[tuple[object, ...], pb.ProcessingResponse] = {}


def _remember(key: tuple[object, ...], resp: pb.ProcessingResponse) -> pb.ProcessingResponse:
    if len(_shared) >= _SHARED_MAX:
        _shared.clear()
    _shared[key] = resp
    return resp


def shared_response_headers_response(
    set_headers: HeaderList, response_mode: ProcessingMode | None = None
) -> pb.ProcessingResponse:
    """``response_headers_response(set_headers, response_mode)``, built once per header set and
    mode. The message is shared: never mutate it."""
    mode = response_mode.SerializeToString() if response_mode is not None else None
    key = ("response_headers", tuple(set_headers), mode)
    resp = _shared.get(key)
    return resp if resp is not None else _remember(key, response_headers_response(set_headers, response_mode))


# Header values that repeat from one answer to the next (a budget's limit, its reset within the
# same second), each built once: a HeaderValueOption costs ~4 us to construct, ~0.3 us to copy.
_OPTIONS_MAX = 1024
_options: dict[tuple[str, bytes], base_pb2.HeaderValueOption] = {}


def _option(key: str, value: bytes) -> base_pb2.HeaderValueOption:
    option = _options.get((key, value))
    if option is None:
        if len(_options) >= _OPTIONS_MAX:
            _options.clear()
        option = _options[(key, value)] = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, raw_value=value), append_action=_OVERWRITE)
    return option


def response_headers_with(
    set_headers: HeaderList, extra: HeaderList, response_mode: ProcessingMode | None = None
) -> pb.ProcessingResponse:
    """``response_headers_response([*set_headers, *extra], response_mode)``, from the shared answer
    for ``set_headers`` plus ``extra`` headers that change per request (OpenAI's
    x-ratelimit-* of a budget): a copy and the extra options, not a new message tree."""
    resp = pb.ProcessingResponse()
    resp.CopyFrom(shared_response_headers_response(set_headers, response_mode))
    resp.response_headers.response.header_mutation.set_headers.extend([_option(k, v) for k, v in extra])
    return resp


def request_headers_response(
    set_headers: HeaderList, remove: Iterable[str], response_mode: ProcessingMode | None
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=common(set_headers, remove, clear_route_cache=True))
    )
    if response_mode is not None:
        resp.mode_override.CopyFrom(response_mode)
    return resp


def response_headers_response(
    set_headers: HeaderList = (), response_mode: ProcessingMode | None = None
) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common(set_headers)))
    if response_mode is not None:
        resp.mode_override.CopyFrom(response_mode)
    return resp


def immediate_response(status: int, headers: HeaderList, body: bytes, details: str) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=header_mutation(headers),
            body=body,
            details=details,
        )
    )


def response_mode(body_mode: int) -> ProcessingMode:
    """A mode override that asks for the response body in the given mode."""
    return ProcessingMode(
        request_header_mode=ProcessingMode.SKIP,
        response_header_mode=ProcessingMode.SEND,
        response_body_mode=body_mode,  # type: ignore[arg-type]
        request_trailer_mode=ProcessingMode.SKIP,
        response_trailer_mode=ProcessingMode.SKIP,
    )


STREAMED_RESPONSE = response_mode(ProcessingMode.STREAMED)
NO_RESPONSE_BODY = response_mode(ProcessingMode.NONE)
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


# --- a translated answer (extproc/translated.py): headers and body in the client's API --------


def response_headers_mutation(
    set_headers: HeaderList, remove: Iterable[str], response_mode: ProcessingMode | None
) -> pb.ProcessingResponse:
    """Response headers with some set and some removed (a translated answer: the client's
    content type, no content-length since the body changes)."""
    resp = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common(set_headers, remove)))
    if response_mode is not None:
        resp.mode_override.CopyFrom(response_mode)
    return resp


_DROP_CHUNK = pb.ProcessingResponse(
    response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(clear_body=True)))
)


def response_body_response(body: bytes) -> pb.ProcessingResponse:
    """A streamed response chunk replaced by ``body``: in STREAMED mode Envoy sends the
    mutation's bytes instead of the chunk's; empty drops the chunk (held back, or nothing yet)."""
    if not body:
        return _DROP_CHUNK
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=body)))
    )
