"""Secrets and isolation: no key in a repr, an error, a log, /metrics or a response; no client
credential reaches a provider; the cache is scoped by tenant and the mesh's identity wins.

The e2e tests here run through a real Envoy with the ext_proc at DEBUG; every Stack is also the
leak guard of tests/harness.py, and ``test_leak_guard_*`` prove that guard can fail.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import socket
import traceback
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controller.render import RenderOptions, render_config
from extproc import errors
from extproc.auth import CLIENT_CREDENTIAL_HEADERS, auth_header_dict, headers_to_remove
from extproc.credentials import Credential, CredentialStore
from extproc.dev.envoy_bootstrap import BootstrapOptions, build_bootstrap
from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import RedisServer, wait_until
from extproc.runtime import Runtime
from protos.logs import JsonFormatter
from protos.spec import AuthSpec, ConfigError, load_text
from tests.harness import LeakError, Stack, key_encodings, running

KEY = "sk-live-Secr3tValue-9f8e7d6c5b4a"

CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: safety, namespace: apps}
spec:
  providers:
    - {name: filed, baseUrl: "https://api.example.com/v1", auth: {secretName: creds, key: api-key}}
    - {name: envd, baseUrl: "https://api.other.com/v1", auth: {type: XApiKey, env: SAFETY_KEY}}
  cache: {mode: Fallback}
"""


def _contains_key(text: str, key: str = KEY) -> list[str]:
    """The encodings of ``key`` found in ``text`` (the leak guard's own needles)."""
    data = text.encode("utf-8", "replace")
    return [name for name, needle in key_encodings(key).items() if needle in data]


# --- repr/str of config, credentials, errors --------------------------------------------------


def test_config_specs_and_credentials_never_print_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "api-key").write_text(KEY + "\n")
    monkeypatch.setenv("SAFETY_KEY", KEY)
    configs = load_text(CONFIG)
    store = CredentialStore(str(tmp_path))
    runtime = Runtime(configs, store)
    creds = [store.get(p.auth) for p in configs[0].providers]
    assert all(c is not None and c.reveal() == KEY for c in creds)  # both sources really hold it
    shown = [
        repr(configs), str(configs), repr(configs[0].raw), repr(configs[0].providers), repr(store),
        repr(vars(store)), repr(creds), str(creds[0]), f"{creds[0]}", f"{creds[0]!r}", format(creds[0], ""),
        repr(runtime.providers), repr(vars(runtime)),
    ]
    for text in shown:
        assert _contains_key(text) == [], text[:300]
    # The one way out is into an auth header, and that is what a provider gets.
    assert auth_header_dict(configs[0].providers[1].auth, creds[1]) == {"x-api-key": KEY}


def test_a_credential_in_a_log_record_is_redacted() -> None:
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "calling %s", (Credential(KEY),), None)
    record.credential = Credential(KEY)
    record.nested = {"auth": [Credential(KEY)]}
    line = JsonFormatter().format(record)
    assert _contains_key(line) == [] and "redacted" in line


def _error_args(cls: type[errors.ClientError]) -> dict[str, Any]:
    samples: dict[str, Any] = {
        "message": "m", "param": "p", "detail": "d", "model": "gpt-4o", "size": 9, "limit": 8,
        "path": "/v1/x", "tried": ["a", "b"], "skipped": ["c"], "field": "logprobs", "api": "Anthropic",
        "reason": "r", "endpoint": "/v1/embeddings", "status": 400, "kind": "invalid_request_error",
        "code": "c", "budget": "team-a-hourly", "unit": "requests", "window": "1h", "retry_after": 60,
        "resets_at": "2026-01-01T00:00:00Z",
    }
    params = inspect.signature(cls.__init__).parameters
    return {n: samples[n] for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}


def test_every_client_error_is_built_from_request_metadata_only() -> None:
    """Every error class in extproc/errors.py, found by introspection so a new one is covered."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ClientError)]
    assert len(classes) >= 9
    for cls in classes:
        err = cls(**_error_args(cls))
        for text in (str(err), repr(err), err.body.decode(), repr(err.args)):
            assert _contains_key(text) == [], (cls.__name__, text)
        body = json.loads(err.body)["error"]
        assert set(body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("where", "document"), [
    ("auth.env holds the key", CONFIG.replace("env: SAFETY_KEY", f"env: {KEY}")),
    ("secretName holds the key", CONFIG.replace("secretName: creds", f"secretName: {KEY}")),
    ("key holds the key", CONFIG.replace("key: api-key", f"key: '{KEY}!'")),
    ("baseUrl carries it as user info", CONFIG.replace("https://api.example.com/v1", f"https://u:{KEY}@h/v1")),
    ("baseUrl carries it in the query", CONFIG.replace("https://api.example.com/v1", f"https://h/v1?key={KEY}")),
    ("baseUrl is the key", CONFIG.replace("https://api.example.com/v1", KEY)),
    ("baseUrl with a bad scheme", CONFIG.replace("https://api.example.com/v1", f"htps://u:{KEY}@h/v1")),
    ("an unknown apiKey field", CONFIG.replace("auth: {type: XApiKey,", f"auth: {{apiKey: {KEY}, type: XApiKey,")),
    ("YAML broken on the key's line", CONFIG + f"    - {{name: x, apiKey: [{KEY}\n"),
    ("YAML tab on the key's line", CONFIG + f"\tapiKey: {KEY}\n"),
])
def test_config_errors_never_repeat_a_pasted_key(where: str, document: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(document)
    message = str(exc.value)
    assert "document" in message or "config" in message, message  # still says where
    for text in (message, repr(exc.value), repr(exc.value.args), exc.value.problem):
        assert _contains_key(text) == [], (where, text)
    # A logged traceback shows no chained exception (YAML's own quotes the offending line).
    traceback_text = "".join(traceback.format_exception(exc.value))
    assert _contains_key(traceback_text) == [], traceback_text


@pytest.mark.parametrize(("content", "problem"), [
    (KEY.encode() + b"\xff\xfe", "not UTF-8"),
    (b"\xc3" + KEY.encode(), "not UTF-8"),
    ((KEY + "\n" + KEY + "-second-line").encode(), "control character"),
    (KEY.encode() + b"\x00", "control character"),
])
def test_a_bad_secret_file_is_ignored_without_its_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, problem: str
) -> None:
    # Why this matters: the exception a plain read raises carries the whole file in its repr.
    with pytest.raises(UnicodeDecodeError) as plain:
        (KEY.encode() + b"\xff").decode("utf-8")
    assert KEY in repr(plain.value)

    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "api-key").write_bytes(content)
    store = CredentialStore(str(tmp_path))
    auth = AuthSpec(secret_name="creds", key="api-key")
    with caplog.at_level(logging.DEBUG):
        store.track([auth])  # must not raise
        store.track([auth])  # reported once, not on every poll
    assert store.get(auth) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and problem in warnings[0].__dict__["problem"]
    assert warnings[0].__dict__["secret_file"].endswith("creds/api-key")
    formatted = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert _contains_key(formatted) == []
    # Fixed in place: the next read loads it.
    (tmp_path / "creds" / "api-key").write_text(KEY)
    store.track([auth])
    assert store.get(auth) is not None and store.get(auth).reveal() == KEY  # type: ignore[union-attr]


def test_an_unreadable_secret_path_is_reported_by_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "creds" / "api-key").mkdir(parents=True)  # a directory where the file should be
    store = CredentialStore(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        store.track([AuthSpec(secret_name="creds", key="api-key")])
    assert "unreadable" in caplog.records[0].__dict__["problem"]


# --- client credentials never reach a provider ------------------------------------------------


def test_every_client_credential_header_is_removed_for_every_auth_type() -> None:
    for auth in (AuthSpec(type="Bearer", env="E"), AuthSpec(type="XApiKey", env="E"),
                 AuthSpec(type="ApiKey", env="E"), AuthSpec(type="Header", header="x-custom-auth", env="E")):
        removed = headers_to_remove(auth)
        assert set(CLIENT_CREDENTIAL_HEADERS) <= set(removed)
        assert auth.header_name in removed  # a client value of the provider's own header goes too


SAFETY_KEYS = {
    "bearer": "sk-bearer-safety-7001", "xkey": "xk-xkey-safety-7002", "apikey": "ak-apikey-safety-7003",
    "goog": "gk-goog-safety-7004", "custom": "ck-custom-safety-7005",
}
E2E_TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: safety, namespace: default}
spec:
  timeout: 3s
  maxRetries: 0
  circuitBreaker: {enabled: false}
  providers:
    - {name: bearer, baseUrl: "{bearer}", auth: {type: Bearer, secretName: bearer-creds, key: api-key}}
    - {name: xkey, baseUrl: "{xkey}", auth: {type: XApiKey, env: SAFETY_XKEY}}
    - {name: apikey, baseUrl: "{apikey}", auth: {type: ApiKey, env: SAFETY_APIKEY}}
    - {name: goog, baseUrl: "{goog}", auth: {type: Header, header: x-goog-api-key, env: SAFETY_GOOG}}
    - {name: custom, baseUrl: "{custom}", auth: {type: Header, header: x-custom-auth, env: SAFETY_CUSTOM}}
    - {name: nokey, baseUrl: "{nokey}", auth: {type: Bearer, secretName: absent-creds, key: api-key}}
  routes:
    - {models: [m-bearer], backends: [{provider: bearer}]}
    - {models: [m-xkey], backends: [{provider: xkey}]}
    - {models: [m-apikey], backends: [{provider: apikey}]}
    - {models: [m-goog], backends: [{provider: goog}]}
    - {models: [m-custom], backends: [{provider: custom}]}
    - {models: [m-nokey], backends: [{provider: nokey}]}
  cache: {mode: "Off"}
"""
MOCK_AUTH = {"bearer": ("Bearer", None), "xkey": ("XApiKey", None), "apikey": ("ApiKey", None),
             "goog": ("Header", "x-goog-api-key"), "custom": ("Header", "x-custom-auth")}
PROVIDER_HEADER = {"bearer": "authorization", "xkey": "x-api-key", "apikey": "api-key",
                   "goog": "x-goog-api-key", "custom": "x-custom-auth"}

# What an application might send: every credential header, in every casing, some repeated.
CLIENT_HEADERS = [
    ("Authorization", "Bearer client-cred-01"), ("authorization", "Bearer client-cred-02"),
    ("AUTHORIZATION", "Basic " + base64.b64encode(b"user:client-cred-03").decode()),
    ("X-Api-Key", "client-cred-04"), ("x-api-key", "client-cred-05"), ("X-API-KEY", "client-cred-06"),
    ("Api-Key", "client-cred-07"), ("API-KEY", "client-cred-08"), ("api-key", "client-cred-09"),
    ("X-Goog-Api-Key", "client-cred-10"), ("x-goog-api-key", "client-cred-11"),
    ("Proxy-Authorization", "Basic client-cred-12"), ("PROXY-AUTHORIZATION", "Bearer client-cred-13"),
    ("X-Custom-Auth", "client-cred-14"), ("x-CUSTOM-auth", "client-cred-15"),
]


@pytest.fixture(scope="module")
def safety() -> Iterator[Stack]:
    mocks = {name: MockProvider(name, expect_key=key, auth_type=MOCK_AUTH[name][0], auth_header=MOCK_AUTH[name][1])
             for name, key in SAFETY_KEYS.items()}
    mocks["nokey"] = MockProvider("nokey")  # its Secret does not exist: the request goes out bare
    env = {f"SAFETY_{n.upper()}": k for n, k in SAFETY_KEYS.items() if n != "bearer"}
    stack = Stack(E2E_TEMPLATE, mocks, env=env, secrets={("bearer-creds", "api-key"): SAFETY_KEYS["bearer"]})
    with running(stack) as s:
        yield s


def _raw_http11(stack: Stack, model: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte, so header casing and repeats are exactly ours."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{stack.port}",
            "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers]
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    status_line, _, rest = raw.partition(b"\r\n")
    head_bytes, _, payload = rest.partition(b"\r\n\r\n")
    parsed = httpx.Headers([(name, value) for name, _, value in
                            (line.decode("latin-1").partition(": ") for line in head_bytes.split(b"\r\n"))
                            if value])
    stack.guard.record_response("raw HTTP/1.1 response", parsed, payload)
    return int(status_line.split()[1]), payload


def _assert_only_the_injected_key(stack: Stack, name: str) -> None:
    seen = stack.mocks[name].last_request
    assert seen is not None
    everything = json.dumps(seen.headers)
    assert "client-cred" not in everything and "dXNlcjpjbGllbnQtY3JlZC0w" not in everything, seen.headers
    carried = {h for h in (*CLIENT_CREDENTIAL_HEADERS, "x-custom-auth") if h in seen.headers}
    if name == "nokey":
        assert carried == set() and seen.credential is None
        return
    assert carried == {PROVIDER_HEADER[name]}, seen.headers
    expected = f"Bearer {SAFETY_KEYS[name]}" if name == "bearer" else SAFETY_KEYS[name]
    assert seen.headers[PROVIDER_HEADER[name]] == expected  # exactly one value: no client value joined in
    assert seen.credential == SAFETY_KEYS[name]


@pytest.mark.e2e
@pytest.mark.parametrize("name", [*SAFETY_KEYS, "nokey"])
def test_no_client_credential_reaches_a_provider_http11_any_casing(safety: Stack, name: str) -> None:
    safety.mocks[name].reset()
    status, payload = _raw_http11(safety, f"m-{name}", CLIENT_HEADERS)
    assert status == 200, payload[:300]
    _assert_only_the_injected_key(safety, name)


@pytest.mark.e2e
@pytest.mark.parametrize("name", [*SAFETY_KEYS, "nokey"])
def test_no_client_credential_reaches_a_provider_http2(safety: Stack, name: str) -> None:
    safety.mocks[name].reset()
    with safety.recording_client("h2c client", http2=True) as client:
        # HTTP/2 names are lower-case on the wire; repeats still arrive as separate fields.
        resp = client.post("/v1/chat/completions", headers=[(k.lower(), v) for k, v in CLIENT_HEADERS],
                           json={"model": f"m-{name}", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.http_version == "HTTP/2"
    assert resp.status_code == 200, resp.text
    _assert_only_the_injected_key(safety, name)


@pytest.mark.e2e
def test_bodyless_call_gets_the_same_stripping(safety: Stack) -> None:
    mock = safety.mocks["xkey"]
    mock.reset()
    host = f"127.0.0.1:{mock.port}"  # a GET to the provider's own authority is routed in the headers phase
    resp = safety.client.get("/v1/models", headers=[("host", host), *CLIENT_HEADERS])
    assert resp.status_code == 200, resp.text
    _assert_only_the_injected_key(safety, "xkey")


# --- the leak guard can fail ------------------------------------------------------------------


@pytest.mark.e2e
def test_leak_guard_catches_a_key_in_any_log_in_any_encoding(safety: Stack) -> None:
    safety.check_leaks()  # clean so far
    key = SAFETY_KEYS["xkey"]
    odd_key = "sk-odd+key/needs=url-encoding"  # a key URL-encoding changes, given to the guard
    safety.guard.add_keys([odd_key])
    extproc_log = safety.extproc.log_path
    assert extproc_log is not None
    plants = {
        "raw": (extproc_log, f'{{"msg": "debug dump", "headers": {{"x-api-key": "{key}"}}}}\n'),
        "base64": (safety.workdir / "worker-9.log", "auth=Basic " + base64.b64encode(f"u:{key}".encode()).decode()),
        "url": (safety.workdir / "sub" / "access.log", "GET /?k=" + urllib.parse.quote(odd_key, safe="")),
    }
    for encoding, (path, line) in plants.items():
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line)
        safety.guard.planted += 1
        with pytest.raises(LeakError) as exc:
            safety.check_leaks()
        assert str(path) in str(exc.value) and encoding in str(exc.value)
        assert key not in str(exc.value) and odd_key not in str(exc.value)  # named by a hint only
        safety.check_leaks()  # reported once, by the check that saw it first


@pytest.mark.e2e
def test_leak_guard_catches_a_key_in_a_response(safety: Stack) -> None:
    safety.check_leaks()
    mock = safety.mocks["apikey"]
    mock.reply = "your key is " + SAFETY_KEYS["apikey"]  # a provider echoing the credential
    try:
        assert safety.chat("m-apikey").status_code == 200
        safety.guard.planted += 1
        with pytest.raises(LeakError, match=r"stack\.client response to POST /v1/chat/completions"):
            safety.check_leaks()
    finally:
        mock.reply = None


@pytest.mark.e2e
def test_leak_guard_stop_runs_a_final_check() -> None:
    mock = MockProvider("solo", expect_key="sk-solo-final-0042")
    stack = Stack('apiVersion: holysheep.ai/v1\nkind: HolySheepConfig\nmetadata: {name: s}\n'
                  'spec: {providers: [{name: solo, baseUrl: "{solo}", auth: {env: SOLO_KEY}}]}\n',
                  {"solo": mock}, env={"SOLO_KEY": "sk-solo-final-0042"})
    stack.start()
    assert stack in Stack.live and "sk-solo-final-0042" in stack.guard.keys
    assert stack.chat("anything").status_code == 200
    (stack.workdir / "late.log").write_text("shutting down with sk-solo-final-0042\n")
    stack.guard.planted += 1
    with pytest.raises(LeakError, match=r"late\.log"):
        stack.stop()
    assert stack not in Stack.live


# --- tenant isolation of the cache ------------------------------------------------------------

TENANT_TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: tenants, namespace: default}
spec:
  providers: [{name: tp, baseUrl: "{tp}", auth: {env: TENANT_KEY}}]
  cache: {mode: Always, redisUrl: "REDIS"}
"""


def _tenant_stack(redis: RedisServer, workload: str | None, node_metadata: dict[str, str] | None = None) -> Stack:
    """A stack whose Envoy presents ``workload``'s certificate (NAMESPACE/SERVICE_ACCOUNT); None:
    the ext_proc's --insecure-no-identity dev mode, where no caller is authenticated."""
    stack = Stack(TENANT_TEMPLATE.replace("REDIS", redis.url), {"tp": MockProvider("tp", expect_key="sk-tenant-5150")},
                  env={"TENANT_KEY": "sk-tenant-5150"}, node_metadata=node_metadata,
                  workload=workload or "", insecure=workload is None)
    return stack


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()


def _ask(stack: Stack, question: str, tenant: str | None = None) -> httpx.Response:
    resp = stack.chat("m", content=question, headers={"x-holysheep-tenant": tenant} if tenant else None)
    assert resp.status_code == 200, resp.text
    return resp


def _stored(stack: Stack, n: int) -> None:
    wait_until(lambda: f'holysheep_cache_events_total{{event="store"}} {float(n)}' in stack.extproc.metrics(),
               what=f"{n} cache stores")


@pytest.mark.e2e
def test_tenant_header_scopes_the_cache_without_mesh_identity(redis: RedisServer) -> None:
    """Only the insecure dev mode (no identity) lets the header scope the cache."""
    with running(_tenant_stack(redis, None)) as s:
        a = _ask(s, "shared question", "team-a")
        _stored(s, 1)
        assert _ask(s, "shared question", "team-a").headers.get("x-holysheep-cache") == "hit"
        for other in ("team-b", "TEAM-A", "team-a2", None):  # another tenant, or none at all
            b = _ask(s, "shared question", other)
            assert "x-holysheep-cache" not in b.headers, other
            assert b.json()["id"] != a.json()["id"], "tenant A's answer was served to another tenant"
        assert s.mocks["tp"].count("/chat/completions") == 5


@pytest.mark.e2e
def test_workload_identity_scopes_a_shared_cache_and_no_header_can_cross_it(redis: RedisServer) -> None:
    """Extends test_mesh_identity_scopes_cache_and_a_client_tenant_header_is_ignored (one workload)
    to three callers sharing one Redis: two workloads with mesh identity (their certificates, each
    naming the other in its node metadata) and one without (an insecure dev-mode ext_proc)."""
    checkout = _tenant_stack(redis, "default/checkout", {"NAMESPACE": "default", "WORKLOAD_NAME": "billing"})
    billing = _tenant_stack(redis, "default/billing", {"NAMESPACE": "default", "WORKLOAD_NAME": "checkout"})
    anonymous = _tenant_stack(redis, None)
    with running(checkout) as a, running(billing) as b, running(anonymous) as c:
        first = _ask(a, "identity question", "team-x")
        _stored(a, 1)
        # The same workload finds it whatever tenant it claims (the existing test's point, via Redis).
        assert _ask(a, "identity question", "anything").headers.get("x-holysheep-cache") == "hit"
        # Another workload, even claiming the first one's scope, never gets it.
        own = _ask(b, "identity question")
        assert "x-holysheep-cache" not in own.headers and own.json()["id"] != first.json()["id"]
        _stored(b, 1)
        for claim in ("team-x", "default/checkout", "id:spiffe://cluster.local/ns/default/sa/checkout"):
            other = _ask(b, "identity question", claim)  # its own answer, never the first workload's
            assert other.headers.get("x-holysheep-cache") == "hit", claim
            assert other.json()["id"] == own.json()["id"] != first.json()["id"]
        # A caller without mesh identity cannot name a workload's scope with the header either.
        for claim in ("default/checkout", "id:spiffe://cluster.local/ns/default/sa/checkout", "checkout"):
            spoof = _ask(c, "identity question", claim)
            assert "x-holysheep-cache" not in spoof.headers, claim
            assert spoof.json()["id"] != first.json()["id"]


# --- fail closed ------------------------------------------------------------------------------


def _ext_proc_filters(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if str(node.get("@type", "")).endswith("ext_proc.v3.ExternalProcessor"):
            yield node
        for value in node.values():
            yield from _ext_proc_filters(value)
    elif isinstance(node, list):
        for value in node:
            yield from _ext_proc_filters(value)


def test_every_generated_ext_proc_filter_fails_closed() -> None:
    configs = load_text(CONFIG)
    objects = render_config(configs[0], RenderOptions())
    bootstrap = build_bootstrap(configs, BootstrapOptions(listen_port=1, admin_port=2,
                                                          extproc_addresses=[("127.0.0.1", 3)]))
    found = [*_ext_proc_filters(yaml.safe_load(yaml.safe_dump(objects))), *_ext_proc_filters(bootstrap)]
    assert len(found) >= 2
    for flt in found:
        assert flt["failure_mode_allow"] is False
