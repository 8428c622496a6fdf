"""Coverage-guided fuzzing (atheris/libFuzzer) of the ext_proc request-body path, in-process.

What runs: every input is decoded with ``atheris.FuzzedDataProvider`` into one HTTP request --
a ``:path`` (real endpoints with prefixes, queries and trailing slashes, unknown ones, or fuzzed
text), an ``:authority``, a content-type, client credential and tenant headers, optional Istio
node-metadata attributes, and a body built by one of five strategies: raw bytes; a JSON object
with a known/unknown/ill-typed ``model`` and random extra fields, then mutated (truncated,
spliced, BOM- or UTF-16-prefixed, wrapped, deeply nested, lone-surrogate escapes...); a
whitespace/key-order variant of the one cached request; a bodyless request; or (rarely) a body
just over the 8 MiB limit. The request is turned into real Envoy ``ProcessingRequest`` protobufs
(``request_headers``, then ``request_body`` with ``end_of_stream``) and driven through a
``RequestProcessor`` exactly as ``extproc/service.py`` does: ``request_headers``, then
``request_body``, whose answer is awaited when it is an awaitable. Continue answers are
optionally followed by a 200 ``response_headers`` and fuzzed ``response_body`` chunks through
``after_response_body`` (usage accounting of whatever a provider sends back).

The config is realistic: one HolySheepConfig, two providers (``primary``: Bearer from a Secret
file; ``secondary``: XApiKey from an environment variable), exact, glob and rewriting routes,
no ``"*"`` route (so unknown models get a 404), and a memory-only ``Fallback`` cache. It is
compiled into two runtimes: ``up`` (circuits closed) and ``down`` (both circuits forced open,
one answer pre-stored in the fallback cache); a fuzzed bit picks one per input.

No network I/O, and nothing stubbed on the request path: with a memory-only Fallback cache the
processor answers the body phase synchronously whenever a backend is available (the first
attempt is Envoy's to send), and the awaitable answer -- returned only when every circuit is
open -- awaits nothing but the in-memory cache. So it is driven by hand with
``coroutine.send(None)``: if it ever suspends, it would have done real I/O, and that is reported
as a failure. The ``UpstreamClient`` given to the processor raises if called, and the providers'
base URLs use the reserved ``.invalid`` TLD, so nothing could leave the process anyway.

Invariants, checked against an independent oracle for every input (any violation or any
exception is a crash: libFuzzer writes the input to ``crash-*`` and exits non-zero):

* ``up``: answered at once (a ``ProcessingResponse``, never an awaitable), either a
  ``request_body`` continue response routed to the right provider (per the
  route table: ``:authority``, ``:path`` = base path + endpoint suffix with the client's query,
  the provider's own credential header, client credential headers removed, a rewritten body
  with a matching ``content-length`` only when the route rewrites the model), or an
  ``ImmediateResponse`` whose status and OpenAI error ``code`` are the expected ones: 413
  ``request_too_large``, 404 ``unknown_endpoint``, 400 ``invalid_json``, 400
  ``model_required``, 404 ``model_not_found``. Never a 5xx.
* ``down``: the cached answer (200, ``x-holysheep-cache: fallback``) when the input is the
  cached request, else 503 ``no_provider_available``; the same 4xx as ``up`` for bad input.
* Every error body is a JSON object ``{"error": {message, type, param, code}}`` with
  ``content-type: application/json``; no provider key appears in any error, and the other
  provider's key never appears in any answer.
* A bodyless request: a POST to an AI endpoint is 400 ``model_required`` at once (no body phase
  follows); anything else is routed by ``:authority`` with the provider's credential, or left
  untouched when the host is not a provider's.
* A ``model`` that is not valid Unicode (a lone surrogate escape) is 400 ``invalid_json``: it
  would become a metric label.
* ``/messages`` to ``secondary`` (an OpenAI provider) is translated (issue 16): routed to its
  ``/chat/completions`` with a chat body for the backend's model; a translation that refuses
  moves the request to the route's next backend, or is the 400 naming the field when none is
  left; the response phase feeds whatever bytes a provider sends through the translator.
* The response phase never raises, on a 200 asks for the streamed body with the
  ``x-holysheep-provider`` header set, and ``/metrics`` still renders afterwards.

Run (from the repo root, with the test venv):

    python -m tests.fuzz.fuzz_request_body -atheris_runs=1000
    python -m tests.fuzz.fuzz_request_body -runs=120000 -print_final_stats=1
    python -m tests.fuzz.fuzz_request_body -max_total_time=600 -print_final_stats=1
    python -m tests.fuzz.fuzz_request_body -runs=1 crash-<sha1>      # replay one crash

Any libFuzzer flag works (``-max_len``, ``-jobs``, ``-artifact_prefix=DIR/``, corpus
directories as positional arguments). At exit it prints ``fuzz_request_body: N cases run``
plus an outcome breakdown; ``tests/test_fuzz.py`` runs a bounded form in CI.
"""

from __future__ import annotations

import atexit
import ctypes
import fnmatch
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import atheris
import orjson

with atheris.instrument_imports(include=["extproc", "protos"]):
    from extproc.api import ENDPOINTS
    from extproc.cache import CachedResponse, cache_key
    from extproc.credentials import CredentialStore
    from extproc.processor import CACHE_HEADER, MAX_REQUEST_BYTES, PROVIDER_HEADER, Answer, RequestProcessor
    from extproc.runtime import Runtime
    from extproc.upstream import UpstreamClient, UpstreamResult
    from protos.spec import load_text

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from prometheus_client import REGISTRY, generate_latest

PRIMARY_KEY = "sk-fuzz-primary-5d1c0a9e77"
SECONDARY_KEY = "xk-fuzz-secondary-b41f63e2"
SECONDARY_ENV = "HOLYSHEEP_FUZZ_SECONDARY_KEY"
KEYS = (PRIMARY_KEY, SECONDARY_KEY)

CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: fuzz, namespace: default}
spec:
  timeout: 5s
  maxRetries: 2
  circuitBreaker: {enabled: true, failureThreshold: 3, resetTimeout: 3600s}
  providers:
    - {name: primary, baseUrl: "https://api.primary.invalid/v1", passThrough: [Anthropic],
       auth: {type: Bearer, secretName: primary-creds, key: api-key}}
    - {name: secondary, baseUrl: "http://secondary.invalid:8443/alt/v1",
       auth: {type: XApiKey, env: HOLYSHEEP_FUZZ_SECONDARY_KEY}}
  routes:
    - models: [gpt-4o-mini, gpt-4o]
      backends: [{provider: primary}, {provider: secondary, model: deepseek-v3.2, priority: 1}]
    - {models: [embed-small], backends: [{provider: secondary}]}
    - models: ["claude-*", "local-?", "[ab]-model"]
      backends: [{provider: secondary, model: claude-via-secondary}, {provider: primary, priority: 1}]
  cache: {mode: Fallback, maxEntries: 64}
  pricing:
    - {model: gpt-4o-mini, inputPerMillion: 0.15, outputPerMillion: 0.6}
"""
assert SECONDARY_ENV in CONFIG

# Oracle: the route table above, restated so the harness does not trust extproc's own matcher.
# (models, [(provider, rewrite, priority)])
ROUTES: list[tuple[tuple[str, ...], list[tuple[str, str | None, int]]]] = [
    (("gpt-4o-mini", "gpt-4o"), [("primary", None, 0), ("secondary", "deepseek-v3.2", 1)]),
    (("embed-small",), [("secondary", None, 0)]),
    (("claude-*", "local-?", "[ab]-model"), [("secondary", "claude-via-secondary", 0), ("primary", None, 1)]),
]
# /messages requests to secondary (api OpenAI, no passThrough) are translated to chat completions
# (issue 16); primary passes them through. A translation may refuse (a 400 naming the field): the
# route's next backend takes the request, or, when none is left, the client gets that 400.
TRANSLATED_BY = {"secondary"}
TRANSLATION_REFUSALS = ("unsupported_parameter", "unsupported_endpoint", "bad_request")
PROVIDERS = {  # name: (authority, base path, auth header, header value)
    "primary": ("api.primary.invalid", "/v1", "authorization", f"Bearer {PRIMARY_KEY}"),
    "secondary": ("secondary.invalid:8443", "/alt/v1", "x-api-key", SECONDARY_KEY),
}
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
SUFFIXES = tuple(s for s, _ in ENDPOINTS)
assert SUFFIXES == ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")
TENANT_HEADER = "x-holysheep-tenant"
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"

CACHED_PAYLOAD: dict[str, Any] = {
    "model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "cached question"}],
}
CACHED_BODY = b'{"id":"chatcmpl-cached","choices":[{"message":{"content":"cached answer"}}]}'

MODELS = ["gpt-4o-mini", "gpt-4o", "embed-small", "claude-3-opus", "claude-", "local-1", "a-model",
          "b-model", "c-model", "local-12", "GPT-4O-MINI", "gpt-4o-mini ", "no-such-model", "*", "", "\u00e9\u6a21",
          "local-\ud800", "claude-\udfff\ud800"]
NON_STRING_MODELS: list[Any] = [None, 42, 4.2, True, [], {}, ["gpt-4o"], {"name": "gpt-4o"}]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
         "/chat/completions", "/v1/chat/completions/", "/v1/chat/completions?api-version=2024-10-21",
         "/openai/deployments/x/chat/completions?a=1&b=%20", "/v1/models", "/", "", "/v1/chat",
         "/v1/chat/completions#frag", "/v1/chat/completions?", "//v1//completions//", "/v1/messages?beta=true"]
AUTHORITIES = ["api.primary.invalid", "secondary.invalid:8443", "secondary.invalid", "127.0.0.1:10000",
               "unknown.example", ""]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]
ATTRIBUTE_VALUES = ["team-a", "billing", ""]  # few values: workload names become metric labels
JSON_SCALARS: list[Any] = [None, True, False, 0, -1, 1.5, 1e308, "", "x", "\u2603", "\ud800", [], {}]
MAX_STRUCTURED = 4096


class NoNetwork(UpstreamClient):
    """Failover and health checks are not on the request-body path; reaching them is a bug here."""

    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                      timeout: float) -> UpstreamResult:
        raise AssertionError(f"the request-body path tried network I/O: {method} {url}")


def _build_runtimes() -> tuple[Runtime, Runtime]:
    secrets = tempfile.mkdtemp(prefix="holysheep-fuzz-")
    os.makedirs(os.path.join(secrets, "primary-creds"))
    with open(os.path.join(secrets, "primary-creds", "api-key"), "w", encoding="utf-8") as fh:
        fh.write(PRIMARY_KEY + "\n")
    os.environ[SECONDARY_ENV] = SECONDARY_KEY
    configs = load_text(CONFIG)
    up = Runtime(configs, CredentialStore(secrets))
    down = Runtime(configs, CredentialStore(secrets))
    for provider in down.providers.values():
        for _ in range(provider.config.circuit_breaker.failure_threshold):
            provider.breaker.record_failure()
        assert not provider.breaker.available()
    cache = down.cache_for(configs[0])
    _run_sync(cache.put(cache_key("", "/chat/completions", CACHED_PAYLOAD),
                        CachedResponse(200, "application/json", CACHED_BODY)))
    return up, down


def _run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that must not suspend: suspending means it waits for real I/O."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("coroutine suspended: it would have done network I/O")


def _resolved(answer: Answer) -> pb.ProcessingResponse:
    """A phase's answer as service.py gets it: ready, or (here: without I/O) awaited."""
    if isinstance(answer, pb.ProcessingResponse):
        return answer
    assert isinstance(answer, Coroutine), f"an answer must be a response or a coroutine: {answer!r}"
    resp = _run_sync(answer)
    assert isinstance(resp, pb.ProcessingResponse), resp
    return resp


UP, DOWN = _build_runtimes()
NO_NETWORK = NoNetwork()
SPAWNED: list[Coroutine[Any, Any, None]] = []
STATS: Counter[str] = Counter()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    # Cache stores are fire-and-forget in the server; here they are dropped so that the cache
    # the ``down`` runtime answers from stays exactly as built (reproducible crashes).
    SPAWNED.append(coro)


# --- input decoding ---------------------------------------------------------------------------

def _text(fdp: atheris.FuzzedDataProvider, limit: int) -> str:
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit)))


def _json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 3 else 4)
    if kind == 0:
        return fdp.PickValueInList(JSON_SCALARS)
    if kind == 1:
        return fdp.ConsumeInt(8)
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return _text(fdp, 24)
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return [_json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {_text(fdp, 8): _json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}


def _mutate(fdp: atheris.FuzzedDataProvider, body: bytes) -> bytes:
    op = fdp.ConsumeIntInRange(0, 11)
    at = fdp.ConsumeIntInRange(0, len(body))
    if op == 1:
        return body[:at]  # truncated: a client that hung up, or a proxy that cut the body
    if op == 2:
        return body[:at] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8)) + body[at:]
    if op == 3 and body:
        return body[:at] + bytes([fdp.ConsumeIntInRange(0, 255)]) + body[at + 1:]
    if op == 4:
        return b"\xef\xbb\xbf" + body  # UTF-8 BOM
    if op == 5:
        return body.decode("utf-8", "replace").encode(fdp.PickValueInList(["utf-16", "utf-16-le", "utf-32", "latin-1"]),
                                    "replace")
    if op == 6:
        return b"[" + body + b"]"
    if op == 7:
        depth = fdp.ConsumeIntInRange(1, 3000)
        return body[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"
    if op == 8:
        return body[:-1] + b',"model":' + json.dumps(_json_value(fdp)).encode() + b"}"  # duplicate key
    if op == 9:
        return body[:-1] + b',"s":"\\ud800\\udfff\\udc00' + fdp.ConsumeBytes(4) + b'"}'
    if op == 10:
        return body[:-1] + b',"n":' + fdp.PickValueInList([b"NaN", b"-Infinity", b"1" * 5000, b"1e99999"]) + b"}"
    if op == 11:
        return b" \t\r\n" * fdp.ConsumeIntInRange(0, 3) + body + b"\n" * fdp.ConsumeIntInRange(0, 3)
    return body


def _structured_body(fdp: atheris.FuzzedDataProvider) -> bytes:
    payload: dict[str, Any] = {}
    shape = fdp.ConsumeIntInRange(0, 3)
    if shape == 0:
        payload["model"] = fdp.PickValueInList(MODELS)
    elif shape == 1:
        payload["model"] = fdp.PickValueInList(NON_STRING_MODELS)
    elif shape == 2:
        payload["model"] = _text(fdp, 16)
    if fdp.ConsumeBool():
        payload["messages"] = [{"role": "user", "content": _json_value(fdp)}]
    if fdp.ConsumeBool():
        payload["stream"] = fdp.PickValueInList([True, False, "true", 1, None])
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        payload[_text(fdp, 12)] = _json_value(fdp)
    body = json.dumps(payload, ensure_ascii=fdp.ConsumeBool(), separators=(",", ":")).encode("utf-8", "surrogatepass")
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        body = _mutate(fdp, body)
    return body


def _cached_variant(fdp: atheris.FuzzedDataProvider) -> bytes:
    items = list(CACHED_PAYLOAD.items())
    order = fdp.ConsumeIntInRange(0, 5)
    items = items[order % 3:] + items[:order % 3]
    if order >= 3:
        items.reverse()
    sep = fdp.PickValueInList([(",", ":"), (", ", ": "), (",\n  ", " : ")])
    return json.dumps(dict(items), separators=sep, ensure_ascii=fdp.ConsumeBool()).encode()


class Case:
    __slots__ = ("attrs", "body", "bodyless", "fdp", "headers", "runtime_down", "strategy")

    def __init__(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        self.runtime_down = fdp.ConsumeIntInRange(0, 7) == 0
        self.headers: list[tuple[str, bytes]] = [(":method", fdp.PickValueInList([b"POST", b"GET", b"PUT"]))]
        path_kind = fdp.ConsumeIntInRange(0, 7)
        if path_kind == 0:
            path = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        elif path_kind == 1:
            path = fdp.PickValueInList(PATHS).encode() + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
        else:
            path = fdp.PickValueInList(PATHS).encode()
        if fdp.ConsumeIntInRange(0, 15):  # sometimes no :path at all
            self.headers.append((":path", path))
        self.headers.append((":authority", fdp.PickValueInList(AUTHORITIES).encode()))
        self.headers.append(("content-type", fdp.PickValueInList(CONTENT_TYPES).encode()))
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            name = fdp.PickValueInList([*CLIENT_CREDENTIAL_HEADERS, TENANT_HEADER, "X-HolySheep-Tenant",
                                        "content-length", ":path", "x-request-id"])
            self.headers.append((name, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))))
        self.attrs: dict[str, Any] = {}
        if fdp.ConsumeIntInRange(0, 3) == 0:
            for key in ("xds.node.metadata.NAMESPACE", "xds.node.metadata.WORKLOAD_NAME", "xds.node.metadata.NAME"):
                if fdp.ConsumeBool():
                    self.attrs[key] = fdp.PickValueInList([*ATTRIBUTE_VALUES, 7.0, True])
        # One value in 256 for the oversized body, in the middle of the range: exhausted
        # inputs yield the range's ends, and each oversized case costs a few 8 MiB copies.
        self.strategy = fdp.ConsumeIntInRange(0, 255)
        self.bodyless = False
        if self.strategy < 96:
            self.body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, MAX_STRUCTURED))
        elif self.strategy < 232 and self.strategy != 137:
            self.body = _structured_body(fdp)
        elif self.strategy < 248 and self.strategy != 137:
            self.body = _cached_variant(fdp)
        elif self.strategy != 137:
            self.body, self.bodyless = b"", True
        else:
            head = b'{"model":"gpt-4o-mini","pad":"'
            self.body = head + b"x" * (MAX_REQUEST_BYTES + 1 - len(head) + fdp.ConsumeIntInRange(0, 64)) + b'"}'
        self.fdp = fdp  # what is left of the input feeds the response phase

    def header_map(self) -> dict[str, bytes]:
        """The headers as the data plane reads them: the last of repeated ones wins, as in a map;
        but :path, :authority and :method come from the leading pseudo-headers when those hold
        all three (Envoy sends them first and never repeats one after a regular header, which
        this harness does on purpose: a repeat there is not read, extproc/attributes.py)."""
        read = {k.lower(): v for k, v in self.headers}
        lead: dict[str, bytes] = {}
        for k, v in self.headers:
            if not k.startswith(":"):
                break
            lead[k] = v
        if all(name in lead for name in (":path", ":authority", ":method")):
            read.update(lead)
        return read


# --- the oracle -------------------------------------------------------------------------------

def expected_suffix(path: str) -> str | None:
    bare, _, query = path.partition("?")
    bare = bare.rstrip("/")
    for suffix in SUFFIXES:
        if bare.endswith(suffix):
            return suffix + ("?" + query if query else "")
    return None


def expected_route(model: str) -> list[tuple[str, str | None, int]] | None:
    for models, backends in ROUTES:
        if model in models:
            return backends
    for models, backends in ROUTES:
        if any(any(c in p for c in "*?[") and fnmatch.fnmatchcase(model, p) for p in models):
            return backends
    return None


def expected(case: Case) -> tuple[int, str] | dict[str, Any]:
    """(status, code) for an error, or the payload and route for a continue."""
    body = case.body
    if len(body) > MAX_REQUEST_BYTES:
        return (413, "request_too_large")
    path = case.header_map().get(":path", b"/").decode("latin-1")
    suffix = expected_suffix(path)
    if suffix is None:
        return (404, "unknown_endpoint")
    if not body:
        return (400, "model_required")
    try:
        payload = json.loads(body)
    except ValueError:
        return (400, "invalid_json")
    except RecursionError:
        # Deeper than json.loads goes from this frame. The data plane parses with orjson first,
        # which reads up to 1024 levels without recursing: what it reads is valid, and then
        # json.loads agrees given the stack it needs.
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            return (400, "invalid_json")
        payload = _with_stack(json.loads, body)
    if not isinstance(payload, dict):
        return (400, "invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return (400, "model_required")
    try:
        model.encode()
    except UnicodeEncodeError:  # a lone surrogate escape: unusable as a metric label
        return (400, "invalid_json")
    route = expected_route(model)
    if route is None:
        return (404, "model_not_found")
    return {"payload": payload, "model": model, "route": route, "suffix": suffix}


def _with_stack(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with room for a value nested as deep as orjson reads (1024)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2000)
    try:
        return fn(*args, **kwargs)
    finally:
        sys.setrecursionlimit(limit)


def _canonical(payload: dict[str, Any]) -> str:
    # Equality as the cache key sees it: 0 == 0.0 == False in Python, not in JSON.
    return _with_stack(json.dumps, payload, sort_keys=True, separators=(",", ":"))


def expected_tenant(case: Case) -> str:
    for key in ("xds.node.metadata.WORKLOAD_NAME", "xds.node.metadata.NAME"):
        value = case.attrs.get(key)
        if isinstance(value, str) and value:
            return "workload"
    return case.header_map().get(TENANT_HEADER, b"").decode("latin-1")[:256]


# --- protobufs --------------------------------------------------------------------------------

def headers_request(case: Case) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v) for k, v in case.headers]),
        end_of_stream=case.bodyless,
    ))
    if case.attrs:
        attrs = struct_pb2.Struct()
        attrs.update(case.attrs)
        req.attributes[ATTRIBUTES_KEY].CopyFrom(attrs)
    return req


def body_request(body: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def mutations(common: pb.CommonResponse) -> tuple[dict[str, bytes], list[str]]:
    sets: dict[str, bytes] = {}
    for opt in common.header_mutation.set_headers:
        assert opt.header.key not in sets, f"header set twice: {opt.header.key}"
        assert not opt.header.value, "Envoy 1.40 reads raw_value only"
        sets[opt.header.key] = opt.header.raw_value
    return sets, list(common.header_mutation.remove_headers)


# --- checks -----------------------------------------------------------------------------------

def check_error(resp: pb.ProcessingResponse, status: int, code: str) -> None:
    assert resp.WhichOneof("response") == "immediate_response", f"expected {status} {code}, got {resp}"
    imm = resp.immediate_response
    assert imm.status.code == status, f"expected {status} {code}, got {imm.status.code}: {imm.body[:300]!r}"
    headers = {o.header.key: o.header.raw_value for o in imm.headers.set_headers}
    assert headers.get("content-type") == b"application/json", headers
    doc = json.loads(imm.body)
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    err = doc["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] == code, f"expected code {code}, got {err}"
    serialized = resp.SerializeToString()
    for key in KEYS:
        assert key.encode() not in serialized, "a provider key in an error answer"


def check_continue(case: Case, resp: pb.ProcessingResponse, want: dict[str, Any]) -> str:
    assert resp.WhichOneof("response") == "request_body", f"expected a continue, got {resp}"
    common = resp.request_body.response
    assert common.clear_route_cache, "routing headers changed: Envoy must re-pick the route"
    sets, removed = mutations(common)
    route = want["route"]
    first = min(p for _, _, p in route)
    candidates = {name: rewrite for name, rewrite, prio in route if prio == first}
    if translates(want):  # a backend whose translation refuses is skipped for the next one
        candidates = {name: rewrite for name, rewrite, _ in route}
    provider = next((n for n, (auth, *_rest) in PROVIDERS.items() if sets.get(":authority") == auth.encode()), None)
    assert provider in candidates, f"routed to {sets.get(':authority')!r}, expected one of {sorted(candidates)}"
    assert provider is not None
    _authority, base_path, auth_header, auth_value = PROVIDERS[provider]
    rewrite = candidates[provider]
    if translates(want) and provider in TRANSLATED_BY:
        # Translated: the backend's endpoint (the client's query is the client API's, not its), a
        # chat-completions body for the backend's model, uncompressed answers.
        assert sets.get(":path") == base_path.encode() + b"/chat/completions", sets.get(":path")
        new = common.body_mutation.body
        assert sets.get("content-length") == str(len(new)).encode()
        assert sets.get("accept-encoding") == b"identity", sets
        translated = json.loads(new)
        assert translated["model"] == (rewrite or want["model"]) and isinstance(translated["messages"], list)
        other = next(k for k in KEYS if k not in auth_value)
        assert other.encode() not in resp.SerializeToString(), "another provider's key in the answer"
        assert sets.get(auth_header) == auth_value.encode(), "the provider's credential was not injected"
        return provider
    # The path keeps the client's query byte for byte; it arrived as latin-1-decoded text.
    assert sets.get(":path") == base_path.encode() + want["suffix"].encode("latin-1"), (sets.get(":path"), want)
    assert sets.get(auth_header) == auth_value.encode(), "the provider's credential was not injected"
    for header in CLIENT_CREDENTIAL_HEADERS:
        assert header == auth_header or header in removed, f"client {header} not removed"
    if rewrite is None:
        assert not common.HasField("body_mutation"), "body rewritten for a route without a model rewrite"
        assert "content-length" not in sets
    else:
        new = common.body_mutation.body
        assert sets.get("content-length") == str(len(new)).encode()
        # The product reads up to orjson's 1024 levels of nesting; the stdlib parser here needs
        # the headroom the product's own encoder takes (extproc/jsoncodec.py) to read them back.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(limit + 2000)
        try:
            rewritten = json.loads(new)
        finally:
            sys.setrecursionlimit(limit)
        assert rewritten["model"] == rewrite and set(rewritten) == set(want["payload"]) | {"model"}
    other = next(k for k in KEYS if k not in auth_value)
    assert other.encode() not in resp.SerializeToString(), "another provider's key in the answer"
    return provider


def translates(want: dict[str, Any]) -> bool:
    """Whether a backend of the route translates this request (see TRANSLATED_BY)."""
    return want["suffix"].partition("?")[0] == "/messages" and any(n in TRANSLATED_BY for n, _, _ in want["route"])


def check_response_phase(case: Case, proc: RequestProcessor, provider: str, translated: bool) -> None:
    fdp = case.fdp
    status = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=fdp.PickValueInList([b"application/json",
                                                                                 b"text/event-stream"])),
    ])))
    resp = proc.response_headers(status)
    assert isinstance(resp, pb.ProcessingResponse), "a success needs no I/O: answered at once"
    assert resp.WhichOneof("response") == "response_headers", resp
    sets, removed = mutations(resp.response_headers.response)
    if translated:  # the answer comes back in the client's API: its content type, no length
        assert sets.pop("content-type") in (b"application/json", b"text/event-stream"), sets
        assert removed == ["content-length"], removed
    assert sets == {PROVIDER_HEADER: provider.encode()}, sets
    assert resp.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.STREAMED
    proc.after_response_headers()
    chunks = fdp.ConsumeIntInRange(0, 3)
    for i in range(chunks + 1):
        piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)) if i < chunks else fdp.ConsumeBytes(4096)
        chunk = pb.ProcessingRequest(response_body=pb.HttpBody(body=piece, end_of_stream=i == chunks))
        answered = proc.response_body(chunk)  # a translated chunk: whatever a provider sends, translated
        assert answered.WhichOneof("response") == "response_body", answered
        assert translated or answered == pb.ProcessingResponse(response_body=pb.BodyResponse()), answered
        proc.after_response_body(chunk)
    generate_latest(REGISTRY)  # /metrics must still render with whatever labels this case added


def drive(case: Case) -> str:
    runtime = DOWN if case.runtime_down else UP
    proc = RequestProcessor(runtime, NO_NETWORK, _spawn)
    first = proc.request_headers(headers_request(case))
    if case.bodyless:
        headers = case.header_map()
        if headers[":method"] == b"POST" and expected_suffix(headers.get(":path", b"/").decode("latin-1")):
            check_error(first, 400, "model_required")  # no body phase follows: answered now
            return "bodyless-post-400"
        # GET /models and friends: routed by :authority; an unknown host is not ours to touch.
        kind = first.WhichOneof("response")
        assert kind == "request_headers", first
        sets, _ = mutations(first.request_headers.response)
        host = case.header_map().get(":authority", b"").decode("latin-1")
        match = [n for n, (auth, *_r) in PROVIDERS.items() if auth in (host, host.partition(":")[0])]
        if not match:
            assert not sets, f"an unknown host got mutations: {sets}"
            return "bodyless-untouched"
        _, _, auth_header, auth_value = PROVIDERS[match[0]]
        assert sets.get(auth_header) == auth_value.encode(), sets
        return "bodyless-routed"
    assert first == pb.ProcessingResponse(request_headers=pb.HeadersResponse()), first
    answer = proc.request_body(body_request(case.body))
    if not case.runtime_down:
        assert isinstance(answer, pb.ProcessingResponse), "with a backend available the body phase needs no I/O"
    resp = _resolved(answer)
    want = expected(case)
    if isinstance(want, tuple):
        check_error(resp, *want)
        return f"error-{want[0]}-{want[1]}"
    if case.runtime_down:
        cached = (expected_tenant(case) == "" and want["suffix"] == "/chat/completions"
                  and _canonical(want["payload"]) == _canonical(CACHED_PAYLOAD))
        if cached:
            assert resp.WhichOneof("response") == "immediate_response", resp
            imm = resp.immediate_response
            headers = {o.header.key: o.header.raw_value for o in imm.headers.set_headers}
            assert imm.status.code == 200 and imm.body == CACHED_BODY, imm
            assert headers.get(CACHE_HEADER) == b"fallback", headers
            return "down-cache-fallback"
        check_error(resp, 503, "no_provider_available")
        return "down-503"
    if translates(want) and resp.WhichOneof("response") == "immediate_response":
        # Every backend's translation refused the request: the first one's 400, naming the field.
        assert all(n in TRANSLATED_BY for n, _, _ in want["route"]), "refused though a backend passes it through"
        code = json.loads(resp.immediate_response.body)["error"]["code"]
        assert code in TRANSLATION_REFUSALS, code
        check_error(resp, 400, code)
        return f"translate-400-{code}"
    provider = check_continue(case, resp, want)
    if case.fdp.ConsumeBool():
        check_response_phase(case, proc, provider, translates(want) and provider in TRANSLATED_BY)
    return f"continue-{provider}" + ("-translated" if translates(want) and provider in TRANSLATED_BY else "")


def TestOneInput(data: bytes) -> None:  # the name libFuzzer harnesses use
    STATS["cases"] += 1
    try:
        STATS[drive(Case(data))] += 1
    finally:
        for coro in SPAWNED:
            coro.close()
        SPAWNED.clear()


def report() -> None:
    if STATS["reported"]:
        return
    STATS["reported"] = 1
    outcomes = ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()) if k not in ("cases", "reported"))
    print(f"fuzz_request_body: {STATS['cases']} cases run ({outcomes})", flush=True)


# libFuzzer ends -runs and -max_total_time with C exit(), which skips Python's atexit; a C
# atexit hook (kept referenced) prints the report on every path, once.
_C_REPORT = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _arg: report())


def main() -> None:
    atexit.register(report)
    ctypes.CDLL(None).__cxa_atexit(_C_REPORT, None, None)  # glibc's atexit is not exported
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
