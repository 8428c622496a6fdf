"""Issue 11, the data plane end to end: only an authenticated caller in a config's scope ever gets
that config's credential, cache or accounting.

Real processes, real TLS: the ext_proc (``holysheep-mesh extproc --tls-cert/--tls-key/--client-ca``
or ``--identity-from xfcc``), real Envoys (the stack's egress Envoy presenting a workload
certificate over mTLS; an Istio-like inbound sidecar in front of the ext_proc for the in-mesh
mode), certificates from throwaway CAs (extproc.dev.certs). Hostile callers open raw ext_proc
gRPC streams with the ext_proc protos, as any pod that can reach port 9002 could, and send the
request headers and body for gpt-4o-mini; every answer they get is searched for the keys.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.dev.certs import CertificateAuthority, Issued, spiffe_id, write_atomic
from extproc.dev.envoy_bootstrap import EXTPROC_CLUSTER
from extproc.dev.mock_provider import MockProvider
from extproc.dev.mtls import EXTPROC_ID
from extproc.dev.processes import Envoy, ExtProc, free_port, http_get, wait_until
from tests.harness import Stack, running
from tests.test_mtls_identity import istio_like_inbound

pytestmark = pytest.mark.e2e

SHOP_KEY = "sk-shop-zero-trust-1111"
BILLING_KEY = "sk-billing-zero-trust-2222"
KEYS = (SHOP_KEY, BILLING_KEY)
ENV = {"ZT_SHOP_KEY": SHOP_KEY, "ZT_BILLING_KEY": BILLING_KEY}
# Two configs serving the same model: shop's (first, so a caller it does not serve would meet it
# first) narrowed to two service account forms, and billing's for its whole namespace.
TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: ai, namespace: shop}
spec:
  serviceAccounts: [checkout, "cart-*"]
  providers: [{name: shop-llm, baseUrl: "{shop}", auth: {env: ZT_SHOP_KEY}}]
  routes: [{models: ["gpt-4o*"], backends: [{provider: shop-llm}]}]
  cache: {mode: Always}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: ledger, namespace: billing}
spec:
  providers: [{name: billing-llm, baseUrl: "{billing}", auth: {env: ZT_BILLING_KEY}}]
  routes: [{models: ["gpt-4o*"], backends: [{provider: billing-llm}]}]
  cache: {mode: "Off"}
"""
VICTIM = ("shop", "checkout")  # the stack's Envoy


def _mocks() -> dict[str, MockProvider]:
    return {"shop": MockProvider("shop", expect_key=SHOP_KEY),
            "billing": MockProvider("billing", expect_key=BILLING_KEY)}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running(Stack(TEMPLATE, _mocks(), env=ENV, workload="/".join(VICTIM))) as s:
        yield s


# --- a pod talking to the ext_proc port directly ---------------------------------------------------

def _headers(pairs: dict[str, str], end_of_stream: bool) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    header_map = base_pb2.HeaderMap(headers=values)
    return pb.HttpHeaders(headers=header_map, end_of_stream=end_of_stream)


def request(content: str, *, attrs: dict[str, str] | None = None, headers: dict[str, str] | None = None,
            authority: str = "api.openai.com") -> list[pb.ProcessingRequest]:
    """What Envoy sends for POST /v1/chat/completions (gpt-4o-mini): headers, then the body;
    ``attrs`` are request attributes as the filter sends node metadata."""
    pairs = {":method": "POST", ":path": "/v1/chat/completions", ":authority": authority,
             "content-type": "application/json", **(headers or {})}
    first = pb.ProcessingRequest(request_headers=_headers(pairs, end_of_stream=False))
    if attrs:
        first.attributes["envoy.filters.http.ext_proc"].CopyFrom(struct_pb2.Struct(fields={
            k: struct_pb2.Value(string_value=v) for k, v in attrs.items()}))
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).encode()
    return [first, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]


def answered(body: bytes) -> list[pb.ProcessingRequest]:
    """What Envoy sends once the provider answered 200 with ``body``: response headers, the body."""
    head = pb.ProcessingRequest(response_headers=_headers({":status": "200", "content-type": "application/json"},
                                                          end_of_stream=False))
    return [head, pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True))]


def bodyless(authority: str) -> list[pb.ProcessingRequest]:
    pairs = {":method": "GET", ":path": "/v1/models", ":authority": authority}
    return [pb.ProcessingRequest(request_headers=_headers(pairs, end_of_stream=True))]


@dataclass
class Outcome:
    responses: list[pb.ProcessingResponse] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""

    def keys(self) -> set[str]:
        """The provider keys anywhere in what the caller received."""
        raw = b"".join(r.SerializeToString() for r in self.responses) + self.details.encode()
        return {k for k in KEYS if k.encode() in raw}

    def set_headers(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for r in self.responses:
            for common in (r.request_headers.response, r.request_body.response):
                out.update((h.header.key, h.header.raw_value) for h in common.header_mutation.set_headers)
        return out

    @property
    def immediate(self) -> pb.ImmediateResponse | None:
        found = [r.immediate_response for r in self.responses if r.HasField("immediate_response")]
        return found[0] if found else None


def channel(target: str, ca: CertificateAuthority | None, client: Issued | None, *,
            server_name: str | None = None) -> grpc.Channel:
    """A channel of its own (a new connection, a new handshake); plaintext without ``ca``."""
    options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if ca is None:
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(ca.cert_pem, client.key_pem if client else None,
                                         client.cert_pem if client else None)
    return grpc.secure_channel(target, creds, options=options)


def exchange(ch: grpc.Channel, messages: Sequence[pb.ProcessingRequest],
             metadata: Sequence[tuple[str, str]] = ()) -> Outcome:
    out = Outcome()
    with ch:
        try:
            for resp in pbg.ExternalProcessorStub(ch).Process(iter(messages), metadata=tuple(metadata), timeout=10):
                out.responses.append(resp)
        except grpc.RpcError as exc:
            out.code, out.details = exc.code(), exc.details() or ""
    return out


def pod(stack: Stack, workload: tuple[str, str] | None, messages: Sequence[pb.ProcessingRequest], *,
        ca: CertificateAuthority | None = None, plaintext: bool = False) -> Outcome:
    """A hostile (or not) pod: a certificate of ``workload`` from ``ca`` (default: the stack's
    own CA), none at all (``workload=None``), or plaintext."""
    assert stack.pki is not None
    target = f"127.0.0.1:{stack.extproc.grpc_port}"
    if plaintext:
        return exchange(channel(target, None, None), messages)
    issuer = ca or stack.pki.ca
    client = issuer.workload(*workload) if workload else None
    return exchange(channel(target, stack.pki.ca, client), messages)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def refusals(stack: Stack, reason: str) -> float:
    return metric(stack.extproc.metrics(), "holysheep_unauthorized_calls_total", reason=reason)


# --- who gets nothing -----------------------------------------------------------------------------

def test_callers_without_an_identity_in_scope_never_receive_a_key(stack: Stack) -> None:
    other_ca = CertificateAuthority("another mesh's CA")
    before = {r: refusals(stack, r) for r in ("namespace", "service_account")}
    # Out of every config's namespace, and forging node metadata and a tenant header that name the
    # victim: attributes authorize nothing.
    forged = request("hi", attrs={"xds.node.metadata.NAMESPACE": "shop", "xds.node.metadata.WORKLOAD_NAME": "checkout"},
                     headers={"x-holysheep-tenant": "id:" + spiffe_id(*VICTIM)})
    outsider = pod(stack, ("elsewhere", "default"), forged)
    assert outsider.code == grpc.StatusCode.PERMISSION_DENIED, outsider
    assert outsider.details == "unauthorized: namespace"
    assert outsider.responses == [] and outsider.keys() == set()
    # In shop's namespace but not one of its service accounts (and not billing's namespace).
    intruder = pod(stack, ("shop", "intruder"), request("hi"))
    assert intruder.code == grpc.StatusCode.PERMISSION_DENIED and intruder.details == "unauthorized: service_account"
    assert intruder.keys() == set()
    # A bodyless call (GET /v1/models, routed by host) to shop's provider from billing's namespace:
    # billing may use its own config, not shop's provider.
    shop_authority = f"127.0.0.1:{stack.mocks['shop'].port}"
    lister = pod(stack, ("billing", "reports"), bodyless(shop_authority))
    assert lister.code == grpc.StatusCode.PERMISSION_DENIED and lister.keys() == set()
    # No certificate, another CA's certificate, plaintext: the handshake fails, nothing is read.
    for label, outcome in (("no certificate", pod(stack, None, request("hi"))),
                           ("another CA", pod(stack, VICTIM, request("hi"), ca=other_ca)),
                           ("plaintext", pod(stack, VICTIM, request("hi"), plaintext=True))):
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, label
        assert outcome.responses == [] and outcome.keys() == set(), label
    assert refusals(stack, "namespace") == before["namespace"] + 2
    assert refusals(stack, "service_account") == before["service_account"] + 1
    logs = stack.logs()
    assert "refused an ext_proc stream from spiffe://cluster.local/ns/elsewhere/sa/default" in logs
    assert "refused an ext_proc stream from spiffe://cluster.local/ns/shop/sa/intruder" in logs
    assert stack.mocks["shop"].count("/chat/completions") == 0  # raw streams never reach a provider


def test_each_caller_gets_only_the_config_in_its_scope(stack: Stack) -> None:
    """The same model in both configs: each caller is routed to its own config's provider (the
    out-of-scope config first in order neither serves nor shadows it)."""
    shop = pod(stack, ("shop", "cart-7"), request("route me"))
    assert shop.code == grpc.StatusCode.OK and shop.keys() == {SHOP_KEY}
    assert shop.set_headers()["authorization"] == f"Bearer {SHOP_KEY}".encode()
    billing = pod(stack, ("billing", "reports"), request("route me"))
    assert billing.code == grpc.StatusCode.OK and billing.keys() == {BILLING_KEY}
    billing_authority = f"127.0.0.1:{stack.mocks['billing'].port}"
    listing = pod(stack, ("billing", "reports"), bodyless(billing_authority))
    assert listing.code == grpc.StatusCode.OK and listing.keys() == {BILLING_KEY}


def test_an_envoy_out_of_scope_fails_closed_and_no_provider_sees_the_request() -> None:
    with running(Stack(TEMPLATE, _mocks(), env=ENV, workload="elsewhere/default")) as s:
        resp = s.chat("gpt-4o-mini")
        assert resp.status_code == 500
        error = resp.json()["error"]
        assert error["type"] == "server_error" and error["code"].startswith("ext_proc_error_gRPC_error_7")
        assert "unauthorized" in error["code"]
        assert s.client.get("/v1/models", headers={"host": f"127.0.0.1:{s.mocks['shop'].port}"}).status_code == 500
        assert all(m.count("") == 0 for m in s.mocks.values())
        assert refusals(s, "namespace") == 2


# --- forged identities change nothing ----------------------------------------------------------

FORGER = ("shop", "cart-1")  # in shop's scope too: it may use the config, never the victim's scope
FORGED_ATTRS = {"xds.node.metadata.NAMESPACE": "shop", "xds.node.metadata.WORKLOAD_NAME": "checkout",
                "xds.node.metadata.NAME": "checkout-7d9f-abcde"}
FORGED_HEADERS = {"x-holysheep-tenant": "id:" + spiffe_id(*VICTIM)}


def _forged_answer(marker: str) -> bytes:
    return json.dumps({"id": marker, "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "FORGED"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def _stores(stack: Stack) -> float:
    return metric(stack.extproc.metrics(), "holysheep_cache_events_total", event="store")


def _answers(stack: Stack, **labels: str) -> float:
    return metric(stack.extproc.metrics(), "holysheep_workload_requests_total", **labels)


VICTIM_SERIES = {"workload_namespace": "shop", "service_account": "checkout"}
FORGER_SERIES = {"workload_namespace": "shop", "service_account": "cart-1", "workload": "checkout"}


def test_forged_attributes_and_tenant_headers_never_reach_the_victims_cache(stack: Stack) -> None:
    victim_answers, forger_answers = _answers(stack, **VICTIM_SERIES), _answers(stack, **FORGER_SERIES)
    # The victim's answer, cached under its scope (Always mode).
    stores = _stores(stack)
    victim = stack.chat("gpt-4o-mini", content="the victim's question")
    assert victim.status_code == 200 and "x-holysheep-cache" not in victim.headers
    wait_until(lambda: _stores(stack) > stores, what="the victim's answer stored")
    assert stack.chat("gpt-4o-mini", content="the victim's question").headers.get("x-holysheep-cache") == "hit"
    # The forger asks the same question naming the victim everywhere it can: not served from cache.
    forger = pod(stack, FORGER, request("the victim's question", attrs=FORGED_ATTRS, headers=FORGED_HEADERS))
    assert forger.code == grpc.StatusCode.OK and forger.immediate is None, "the victim's cached answer was served"
    assert forger.keys() == {SHOP_KEY}  # it is in the config's scope: it gets routed, as itself
    # The forger answers a new question itself (a forged provider response): stored, but under the
    # forger's own scope...
    stores = _stores(stack)
    planted = pod(stack, FORGER, [*request("a new question", attrs=FORGED_ATTRS, headers=FORGED_HEADERS),
                                  *answered(_forged_answer("chatcmpl-forged-0001"))])
    assert planted.code == grpc.StatusCode.OK
    wait_until(lambda: _stores(stack) > stores, what="the forged answer stored")
    again = pod(stack, FORGER, request("a new question"))
    assert again.immediate is not None and b"chatcmpl-forged-0001" in again.immediate.body  # its own scope
    # ...so the victim asking it gets the provider's answer, never the forged one.
    real = stack.chat("gpt-4o-mini", content="a new question")
    assert real.status_code == 200 and "x-holysheep-cache" not in real.headers
    assert real.json()["id"] != "chatcmpl-forged-0001" and "FORGED" not in real.text
    # Per-workload figures: the authenticated namespace and service account; the forged names
    # only label the forger's own series.
    assert _answers(stack, **VICTIM_SERIES) == victim_answers + 2  # its two provider answers
    assert _answers(stack, **FORGER_SERIES) == forger_answers + 1  # the planted one, counted as the forger's
    assert _answers(stack, workload="checkout-7d9f-abcde") == 0  # pod names never become labels


def test_an_in_scope_caller_through_envoy_works_as_before(stack: Stack) -> None:
    shop = stack.mocks["shop"]
    resp = stack.chat("gpt-4o", content="plain request")
    assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] == "shop-llm"
    assert shop.last_request is not None and shop.last_request.credential == SHOP_KEY
    streamed = stack.chat("gpt-4o-mini", content="stream me", stream=True)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    models = stack.client.get("/v1/models", headers={"host": f"127.0.0.1:{shop.port}"})
    assert models.status_code == 200 and models.json()["data"]


# --- in-mesh mode: the identity the ext_proc pod's sidecar verified -------------------------------

@pytest.fixture(scope="module")
def in_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """ext_proc with --identity-from xfcc behind an Istio-like inbound sidecar: one listener with
    Istio's default APPEND_FORWARD, one with SANITIZE_SET (what the install's annotation sets)."""
    work = tmp_path_factory.mktemp("in-mesh")
    ca = CertificateAuthority("mesh CA")
    config = work / "config.yaml"
    config.write_text(TEMPLATE.replace("{shop}", "http://127.0.0.1:9/v1").replace("{billing}", "http://127.0.0.1:9/v1"))
    ep = ExtProc(config, work / "secrets", {**_environ(), **ENV}, log_path=work / "extproc.log",
                 extra_args=["--identity-from", "xfcc"])
    certs = {"cert": str(work / "side.crt"), "key": str(work / "side.key"), "ca": str(work / "ca.crt")}
    ca.issue(hosts=["127.0.0.1"], uris=[EXTPROC_ID]).write(certs["cert"], certs["key"])
    write_atomic(certs["ca"], ca.cert_pem)
    ports = {"APPEND_FORWARD": free_port(), "SANITIZE_SET": free_port()}
    admin = free_port()
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [istio_like_inbound(port, mode.lower(), mode, certs) for mode, port in ports.items()],
            "clusters": [{
                "name": "app", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": ep.grpc_port}}}}]}]},
            }],
        },
    }
    sidecar = Envoy(bootstrap, work, None, admin, name="sidecar")
    ep.start()
    try:
        sidecar.start()
        yield {"ca": ca, "ports": ports, "extproc": ep, "log": work / "extproc.log"}
    finally:
        sidecar.stop()
        ep.stop()
    assert not any(k in (work / "extproc.log").read_text() for k in KEYS)


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "HOLYSHEEP_WORKER")}


def _xfcc_naming(namespace: str, service_account: str) -> tuple[str, str]:
    """An XFCC element as a sidecar would write it, naming a workload of the forger's choice."""
    return ("x-forwarded-client-cert",
            f'By={EXTPROC_ID};Hash={"ab" * 32};Subject="";URI={spiffe_id(namespace, service_account)}')


def _through_sidecar(mesh: dict[str, Any], mode: str, workload: tuple[str, str],
                     metadata: Sequence[tuple[str, str]] = ()) -> Outcome:
    ca: CertificateAuthority = mesh["ca"]
    ch = channel(f"127.0.0.1:{mesh['ports'][mode]}", ca, ca.workload(*workload))
    return exchange(ch, request("in mesh"), metadata)


def test_in_mesh_a_forged_xfcc_never_names_the_caller(in_mesh: dict[str, Any]) -> None:
    ep: ExtProc = in_mesh["extproc"]
    # Istio's default (APPEND_FORWARD) keeps the caller's header and appends the real element:
    # two elements, refused, whoever the real caller is.
    appended = _through_sidecar(in_mesh, "APPEND_FORWARD", ("elsewhere", "default"), [_xfcc_naming(*VICTIM)])
    assert appended.code == grpc.StatusCode.PERMISSION_DENIED and appended.details == "unauthorized: xfcc_forwarded"
    assert appended.keys() == set()
    assert _through_sidecar(in_mesh, "APPEND_FORWARD", VICTIM).keys() == {SHOP_KEY}  # no forgery: one element
    # SANITIZE_SET (the install's annotation) replaces the forgery with the verified certificate.
    replaced = _through_sidecar(in_mesh, "SANITIZE_SET", ("elsewhere", "default"), [_xfcc_naming(*VICTIM)])
    assert replaced.code == grpc.StatusCode.PERMISSION_DENIED and replaced.details == "unauthorized: namespace"
    assert replaced.keys() == set()
    honest = _through_sidecar(in_mesh, "SANITIZE_SET", VICTIM, [_xfcc_naming("billing", "reports")])
    assert honest.code == grpc.StatusCode.OK and honest.keys() == {SHOP_KEY}  # its own config, not billing's
    # Around the sidecar (only possible where the port is not captured): no XFCC, no identity.
    direct = exchange(channel(f"127.0.0.1:{ep.grpc_port}", None, None), request("around the sidecar"))
    assert direct.code == grpc.StatusCode.PERMISSION_DENIED and direct.details == "unauthorized: xfcc_missing"
    text = ep.metrics()
    for reason, count in (("xfcc_forwarded", 1), ("namespace", 1), ("xfcc_missing", 1)):
        assert metric(text, "holysheep_unauthorized_calls_total", reason=reason) == count, reason


# --- rotation without a restart and without a failed request --------------------------------------

def _recycle_extproc_connections(boot: dict[str, Any]) -> dict[str, Any]:
    """A new Envoy -> ext_proc connection (a new handshake) every few streams, so the steady load
    keeps testing the certificates of the moment, not a connection made before the rotation."""
    for cluster in boot["static_resources"]["clusters"]:
        if cluster["name"] == EXTPROC_CLUSTER:
            protocol = cluster["typed_extension_protocol_options"]
            options = protocol["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            options["common_http_protocol_options"] = {"max_requests_per_connection": 5}
    return boot


def _served_serial(port: int, trusted: Sequence[CertificateAuthority], client: Issued, work: Path) -> int:
    """The serial of the certificate the ext_proc presents to a new connection."""
    cert, key = work / "probe.crt", work / "probe.key"
    client.write(str(cert), str(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata="".join(ca.cert_pem.decode() for ca in trusted))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _accepted(port: int, trusted: CertificateAuthority, client: Issued) -> bool:
    """Whether the ext_proc accepts ``client``'s certificate now (a health check on a new connection)."""
    with channel(f"127.0.0.1:{port}", trusted, client) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
            return True
        except grpc.RpcError:
            return False


def _envoy_certs(stack: Stack) -> tuple[list[int], list[int]]:
    """(trusted CA serials, presented certificate serials) of Envoy's ext_proc cluster, from /certs."""
    assert stack.envoy is not None
    _, text = http_get(stack.envoy.admin + "/certs")
    cas, chain = [], []
    for entry in json.loads(text)["certificates"]:
        cas += [int(c["serial_number"], 16) for c in entry.get("ca_cert", [])]
        chain += [int(c["serial_number"], 16) for c in entry.get("cert_chain", [])]
    return cas, chain


def _envoy_stat(stack: Stack, name: str) -> int:
    assert stack.envoy is not None
    _, text = http_get(f"{stack.envoy.admin}/stats?filter=^{name}$")
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def test_server_certificate_and_ca_rotate_without_restart_or_failed_request(tmp_path: Path) -> None:
    s = Stack(TEMPLATE, _mocks(), env=ENV, workload="/".join(VICTIM), bootstrap_hook=_recycle_extproc_connections)
    with running(s):
        pki, port = s.pki, s.extproc.grpc_port
        assert pki is not None
        pid = s.extproc.proc.pid if s.extproc.proc else 0
        failures: list[str] = []
        done = 0
        stop = threading.Event()

        def load() -> None:
            nonlocal done
            with s.new_client("rotation load") as client:
                i = 0
                while not stop.is_set() and i < 5000:
                    i += 1
                    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]}
                    resp = client.post("/v1/chat/completions", json=body)
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code} {resp.text[:200]}")
                    done += 1

        def progress(n: int = 25) -> None:
            mark = done
            wait_until(lambda: done >= mark + n, timeout=30, what=f"{n} more requests")

        worker = threading.Thread(target=load)
        worker.start()
        try:
            progress()
            old_ca = pki.ca
            # 1. A new server certificate from the same CA.
            new = pki.issue_server()
            wait_until(lambda: _served_serial(port, pki.trusted, pki.envoy_cert, tmp_path) == new.cert.serial_number,
                       what="the ext_proc serving its new certificate")
            progress()
            # 2. A new CA: both sides trust old and new, ...
            new_ca = CertificateAuthority("the next mesh CA")
            pki.trust(old_ca, new_ca)
            wait_until(lambda: _accepted(port, old_ca, new_ca.workload(*VICTIM)), what="the new CA trusted")
            wait_until(lambda: len(_envoy_certs(s)[0]) == 2, what="Envoy trusting both CAs")
            progress()
            # ... the certificates move to the new CA, ...
            server = pki.issue_server(new_ca)
            workload = pki.issue_workload(new_ca)
            wait_until(lambda: _served_serial(port, pki.trusted, workload, tmp_path) == server.cert.serial_number,
                       what="the ext_proc serving the new CA's certificate")
            wait_until(lambda: _envoy_certs(s)[1] == [workload.cert.serial_number], what="Envoy presenting its new one")
            progress()
            # ... and the old CA is dropped.
            pki.trust(new_ca)
            wait_until(lambda: not _accepted(port, new_ca, old_ca.workload(*VICTIM)), what="the old CA dropped")
            wait_until(lambda: _envoy_certs(s)[0] == [new_ca.cert.serial_number], what="Envoy trusting the new CA only")
            handshakes = _envoy_stat(s, f"cluster.{EXTPROC_CLUSTER}.ssl.handshake")
            progress(50)
            # New connections were made with nothing but the new CA on either side.
            assert _envoy_stat(s, f"cluster.{EXTPROC_CLUSTER}.ssl.handshake") > handshakes
            assert _accepted(port, new_ca, new_ca.workload(*VICTIM))
        finally:
            stop.set()
            worker.join(30)
        assert failures == [], failures[:5]
        assert done > 150
        assert s.extproc.proc is not None and s.extproc.proc.pid == pid and s.extproc.proc.poll() is None
