"""Property tests for the parsers the data plane trusts with client and operator input."""

from __future__ import annotations

import fnmatch
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc import jsoncodec
from extproc.api import parse_body
from extproc.errors import ClientError
from extproc.routing import RouteTable
from extproc.sse import SSEAssembler, events_with
from protos.spec import ConfigError, load_text, parse_document

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=2048))
def test_body_parser_never_raises_anything_but_client_errors(body: bytes) -> None:
    try:
        parsed = parse_body(body)
    except ClientError as err:
        assert 400 <= err.status < 500
        assert json.loads(err.body)["error"]["message"]
    else:
        assert isinstance(parsed.model, str) and parsed.model


@FAST
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5), st.text(min_size=1, max_size=40))
def test_body_parser_finds_the_model_of_any_object(payload: dict[str, Any], model: str) -> None:
    payload["model"] = model
    parsed = parse_body(json.dumps(payload).encode())
    assert parsed.model == model
    assert parsed.stream is (payload.get("stream") is True)


events = st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
                          max_size=30), min_size=1, max_size=8)


@FAST
@given(events, st.lists(st.integers(min_value=0, max_value=400), max_size=10), st.booleans())
def test_sse_assembly_is_independent_of_chunk_splits(payloads: list[str], cuts: list[int], crlf: bool) -> None:
    sep = "\r\n" if crlf else "\n"
    stream = "".join(f"data: {p}{sep}{sep}" for p in payloads).encode()
    whole = SSEAssembler()
    whole.feed(stream)
    split = SSEAssembler()
    points = sorted({min(c, len(stream)) for c in cuts})
    prev = 0
    for point in [*points, len(stream)]:
        split.feed(stream[prev:point])
        prev = point
    assert split.events == whole.events == [p.encode() for p in payloads]
    assert split.complete and whole.complete


@FAST
@given(events, st.integers(min_value=1, max_value=20))
def test_sse_cut_mid_event_is_incomplete(payloads: list[str], cut: int) -> None:
    stream = "".join(f"data: {p}\n\n" for p in payloads).encode() + b"data: {\"partial"
    sse = SSEAssembler()
    sse.feed(stream[: len(stream) - min(cut, 5)])
    assert not sse.complete


def _doc(spec: Any) -> dict[str, Any]:
    return {"apiVersion": "holysheep.ai/v1", "kind": "HolySheepConfig",
            "metadata": {"name": "p", "namespace": "ns"}, "spec": spec}


@FAST
@given(st.dictionaries(
    st.sampled_from(["baseUrl", "timeout", "maxRetries", "circuitBreaker", "healthCheck", "providers",
                     "routes", "cache", "pricing", "workloadSelector", "bogus"]),
    json_values, max_size=5))
def test_config_parser_rejects_with_a_field_path_never_a_trace(spec: dict[str, Any]) -> None:
    try:
        parse_document(_doc(spec))
    except ConfigError as err:
        assert str(err).startswith("document 0")
        assert err.path == "" or err.path.startswith(("spec", "metadata", "apiVersion", "kind"))


model_names = st.text(alphabet="abcdefgh-.0123456789", min_size=1, max_size=12)


@FAST
@given(st.lists(st.lists(model_names | model_names.map(lambda s: s[:3] + "*"), min_size=1, max_size=3),
                min_size=1, max_size=5), model_names)
def test_route_matching_prefers_exact_then_first_glob(route_models: list[list[str]], model: str) -> None:
    spec = {"baseUrl": "https://api.example.com/v1",
            "routes": [{"models": ms, "backends": [{"provider": "holysheep"}]} for ms in route_models]}
    cfg = parse_document(_doc(spec))
    found = RouteTable([cfg]).match(model)
    exact = [r for r in cfg.routes if model in r.models]
    globs = [r for r in cfg.routes if any("*" in p and fnmatch.fnmatchcase(model, p) for p in r.models)]
    expected = exact[0] if exact else (globs[0] if globs else None)
    assert (found.route if found else None) == expected


# --- extensions: arbitrary bytes for the SSE assembler, mutated real documents for the parser ----

@FAST
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_sse_any_bytes_any_split_gives_the_same_result(stream: bytes, cuts: list[int]) -> None:
    """Not only well-formed streams: whatever a provider sends, the split must not matter."""
    stream = stream.replace(b"x", b"\n").replace(b"y", b"\r").replace(b"z", b"data:")  # dense in separators
    whole = SSEAssembler()
    whole.feed(stream)
    split = SSEAssembler()
    prev = 0
    for point in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        split.feed(stream[prev:point])
        prev = point
    assert split.events == whole.events
    assert split.complete == whole.complete


VALID_SPEC: dict[str, Any] = {
    "timeout": "30s", "maxRetries": 2,
    "circuitBreaker": {"enabled": True, "failureThreshold": 5, "resetTimeout": "60s"},
    "healthCheck": {"interval": "10s", "endpoint": "/models"},
    "providers": [
        {"name": "a", "baseUrl": "https://a.example.com/v1",
         "auth": {"type": "Bearer", "secretName": "a-creds", "key": "api-key"}, "timeout": "5s"},
        {"name": "b", "baseUrl": "https://b.example.com/v1",
         "auth": {"type": "Header", "header": "x-b-key", "env": "B_KEY"}},
    ],
    "routes": [{"models": ["gpt-*", "exact"], "backends": [
        {"provider": "a", "priority": 0, "weight": 2}, {"provider": "b", "model": "other", "priority": 1}]}],
    "cache": {"mode": "Fallback", "ttl": "24h", "maxEntryBytes": 1024, "maxEntries": 10,
              "tenantHeader": "x-tenant"},
    "pricing": [{"model": "gpt-*", "inputPerMillion": 0.15, "outputPerMillion": 0.6}],
    "workloadSelector": {"matchLabels": {"app": "x"}},
}


def _paths(node: Any, path: str = "") -> list[str]:
    out = [path] if path else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, f"{path}[{i}]")
    return out


SPEC_PATHS = _paths(VALID_SPEC)


def _set(doc: Any, path: str, value: Any, delete: bool = False) -> None:
    import re

    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    for part in parts[:-1]:
        doc = doc[part]
    if delete and isinstance(doc, dict):
        del doc[parts[-1]]
    else:
        doc[parts[-1]] = value


def test_the_base_document_is_valid() -> None:
    parse_document(_doc(VALID_SPEC))


@FAST
@given(st.sampled_from(SPEC_PATHS), st.sampled_from(["replace", "delete", "unknown-key"]), json_values,
       st.text(alphabet="abcdefghijklmnopqrstuvwxyzXYZ", min_size=1, max_size=10))
def test_config_parser_mutated_document_fails_with_its_field_path(
        path: str, how: str, value: Any, unknown: str) -> None:
    """Any one change to a valid document: it still parses, or a ConfigError names a field path
    that is the changed field, an ancestor or a descendant of it, or a field that refers to it."""
    spec = json.loads(json.dumps(VALID_SPEC))
    if how == "unknown-key":
        parent = spec
        for part in path.replace("]", "").replace("[", ".").split("."):
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        if not isinstance(parent, dict) or path.endswith("matchLabels"):
            return
        parent[unknown] = value
        if unknown in VALID_SPEC or any(p.endswith("." + unknown) for p in SPEC_PATHS):
            return  # a real field name, not an unknown one
    else:
        _set(spec, path, value, delete=how == "delete")
    try:
        parse_document(_doc(spec))
    except ConfigError as err:
        assert str(err).startswith("document 0 (ns/p): spec"), str(err)
        assert err.path.startswith("spec"), err.path
        changed = "spec." + path
        related = (err.path.startswith(changed) or changed.startswith(err.path)
                   or ".provider" in err.path or "providers[" in err.path)  # references between fields
        assert related, f"changed {changed} ({how}), error names {err.path}: {err}"
        if how == "unknown-key":
            assert unknown in str(err), str(err)


@FAST
@given(st.text(max_size=300))
def test_config_loader_any_text_is_valid_or_a_config_error(text: str) -> None:
    try:
        load_text(text)
    except ConfigError as err:
        assert str(err).startswith(("config", "document")), str(err)


sse_events = st.lists(st.tuples(
    st.sampled_from([b'{"usage":{"prompt_tokens":1}}', b'{"\\u0075sage":{"prompt_tokens":2}}', b'{"x":"usage"}',
                     b'{"choices":[]}', b"[DONE]", b"not json", b'{"message":{"usage":{}}}']),
    st.sampled_from([b"", b": usage comment\n", b"event: x\n"]),
), max_size=6)


@FAST
@given(sse_events, st.binary(max_size=120), st.booleans(),
       st.lists(st.integers(min_value=0, max_value=600), max_size=12),
       st.sampled_from([b"usage", b"u", b"data"]))
def test_events_with_a_key_are_what_the_assembler_decodes(events: list[tuple[bytes, bytes]], tail: bytes, crlf: bool,
                                                          cuts: list[int], key: bytes) -> None:
    """The whole-answer scan (usage accounting) finds every decodable event that holds the key,
    in order, and the same completeness, as the assembler fed the answer in any chunks."""
    stream = b"".join(extra + b"data: " + payload + b"\n\n" for payload, extra in events)
    stream += tail.replace(b"x", b"\n").replace(b"y", b"\r").replace(b"z", b"data:")  # whatever else comes
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    sse = SSEAssembler()
    prev = 0
    for point in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        sse.feed(stream[prev:point])
        prev = point
    found, complete = events_with(stream, key)
    decoded: list[tuple[bytes, Any]] = []
    for payload in sse.events:
        if payload != b"[DONE]":
            try:
                decoded.append((payload, _typed(json.loads(payload))))
            except ValueError:
                pass
    with_key = [event for payload, event in decoded if key in payload or b"\\u" in payload]
    assert complete == sse.complete
    # Every event whose data has the key, in order; beyond them only other events of the stream
    # (a key in a comment line lets its event through), never one that is not there.
    assert _subsequence(with_key, [_typed(e) for e in found])
    assert _subsequence([_typed(e) for e in found], [event for _, event in decoded])


def _subsequence(part: list[Any], whole: list[Any]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


json_texts = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=16,
).map(json.dumps)


@FAST
@given(json_texts, st.sampled_from(["", " ", "\n"]), st.booleans())
def test_jsoncodec_gives_json_loads_answer(text: str, pad: str, surrogate: bool) -> None:
    """orjson where it agrees, json.loads for the rest (NaN, big integers, lone surrogates): the
    value is json.loads' own, equal type for type; and the canonical text (the cache key's) is
    the same for equal values whichever library read them."""
    if surrogate:
        text = f'{{"s": "\\ud800", "v": {text}}}'
    data = (pad + text + pad).encode()
    value, strict = jsoncodec.loads_strict(data)
    expected = json.loads(data)
    assert _typed(value) == _typed(expected)
    if strict:
        assert jsoncodec.dumps(value, strict) and json.loads(jsoncodec.dumps(value, strict)) == value
    assert jsoncodec.canonical(value, strict) == jsoncodec.canonical(expected)  # whichever library read it


def _typed(value: Any) -> Any:
    """A value with each number's type and NaN made comparable."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, float):
        return ("float", "nan" if value != value else value)
    return (type(value).__name__, value)


def test_jsoncodec_encodes_what_orjson_cannot_write() -> None:
    """orjson reads 1024 levels but writes 254: a body nested deeper still re-encodes (a backend
    that rewrites the model) and still has a cache key, both by the standard library."""
    body = b'{"model": "m", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    value, strict = jsoncodec.loads_strict(body)
    assert strict and json.loads(jsoncodec.dumps(value, strict)) == json.loads(body)
    assert jsoncodec.canonical(value, strict) == jsoncodec.canonical(json.loads(body))


# Header names: the three pseudo-headers RequestInfo reads (in either case), others, regular ones.
header_names = st.sampled_from([":path", ":authority", ":method", ":PATH", ":Authority", ":scheme", ":status",
                                "content-type", "x-request-id", "Host", ""])
header_lists = st.lists(st.tuples(header_names, st.binary(max_size=12)), max_size=10)


def _headers_message(pairs: list[tuple[str, bytes]]) -> Any:
    from envoy.config.core.v3 import base_pb2

    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in pairs]).headers


def _as_a_map_reads_it(pairs: list[tuple[str, bytes]]) -> tuple[str, str, str]:
    """What a case-insensitive map built from the whole list (the last repeat wins) says."""
    seen = {k.lower(): v.decode("latin-1") for k, v in pairs}
    return seen.get(":path", "/"), seen.get(":authority", ""), seen.get(":method", "POST")


@FAST
@given(st.permutations([(":authority", b"api.example"), (":path", b"/v1/chat/completions"), (":method", b"POST"),
                        (":scheme", b"https")]),
       st.lists(st.tuples(st.sampled_from(["content-type", "x-request-id", "Host", ":path", ":authority"]),
                          st.binary(max_size=12)), max_size=6))
def test_request_info_reads_envoys_pseudo_headers_up_front(pseudo: list[tuple[str, bytes]],
                                                             regular: list[tuple[str, bytes]]) -> None:
    """Envoy's lists: the pseudo-headers first (any order). Only they are read, whatever follows."""
    from extproc.attributes import RequestInfo

    # Repeats of a pseudo-header after a regular one (Envoy never sends them) are not read.
    plain = [(k, v) for k, v in regular if not k.startswith(":")]
    regular = plain + [(k, v) for k, v in regular if k.startswith(":")] if plain else []
    info = RequestInfo(headers=_headers_message(pseudo + regular))
    assert (info.path, info.host, info.method) == _as_a_map_reads_it(pseudo)


@FAST
@given(header_lists)
def test_request_info_reads_any_list_lacking_them_up_front_as_a_map_does(pairs: list[tuple[str, bytes]]) -> None:
    """A list that does not start with all three lower-case pseudo-headers (none Envoy sends) is
    read whole: case-insensitively, the last repeat winning."""
    from extproc.attributes import RequestInfo

    lead = []
    for k, _ in pairs:
        if not k.startswith(":"):
            break
        lead.append(k)
    if {":path", ":authority", ":method"} <= set(lead):
        return  # the up-front case: the test above
    info = RequestInfo(headers=_headers_message(pairs))
    assert (info.path, info.host, info.method) == _as_a_map_reads_it(pairs)
