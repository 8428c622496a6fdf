"""Gateway mode end to end, with real processes and real mTLS from one throwaway mesh CA:

    app -> "sidecar" Envoy (apps/chat) --mesh mTLS, SNI = the provider host--> "gateway" Envoy
        (istio-system/istio-egressgateway-service-account) --mTLS with the gateway's certificate--> ext_proc
        gateway --> mock provider

Both Envoys run what Istio would build from `render` output for the Gateway-mode config
(tests/istio_proxy_config.py), the gateway with Istio's gateway default for the client
certificate header (SANITIZE_SET with the certificate). The ext_proc serves its own mTLS
(``--tls-cert/--tls-key/--client-ca``), so the only caller it authenticates is the gateway; the
workload arrives as the gateway's ``connection.uri_san_peer_certificate`` attribute.

Shown here: the workload identity is the one the ext_proc accounts and scopes (per-workload
metrics under apps/chat, not the gateway's), a workload outside spec.serviceAccounts is refused
through the same gateway, the provider sees the key but no client certificate header, and a direct
caller that is not the gateway (valid certificate, another service account) is refused with
PERMISSION_DENIED, whether it names a workload in the attribute or not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from controller.render import render_all
from extproc.dev.certs import CertificateAuthority, Issued, spiffe_id
from extproc.dev.envoy_bootstrap import extproc_transport_socket
from extproc.dev.mtls import EXTPROC_ID, DevPKI
from extproc.dev.processes import Envoy, ExtProc, MockProviderProcess, free_port, wait_until
from protos.filter_config import PEER_URI_SAN_ATTRIBUTE
from protos.spec import load_text
from tests.istio_proxy_config import Certs, Endpoints, gateway_bootstrap, sidecar_bootstrap
from tests.metrics_text import samples, value

pytestmark = pytest.mark.e2e

KEY = "sk-gateway-mode-e2e-0001"
HOST = "llm.mock.test"  # never resolved: every cluster has a static endpoint
GATEWAY = ("istio-system", "istio-egressgateway-service-account")
CONFIG = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: egress, namespace: apps}}
spec:
  serviceAccounts: [chat]
  egress: {{mode: Gateway}}
  providers:
    - {{name: inhouse, baseUrl: "http://{host}:{port}/v1", auth: {{env: GATEWAY_E2E_KEY}}}}
  routes:
    - {{models: ["*"], backends: [{{provider: inhouse}}]}}
  cache: {{mode: "Off"}}
"""
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _files(issued: Issued, directory: Path, stem: str, ca: Path) -> Certs:
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    issued.write(str(cert), str(key))
    return Certs(str(cert), str(key), str(ca))


@dataclass
class Mesh:
    mock: MockProviderProcess
    extproc: ExtProc
    gateway: Envoy
    sidecars: dict[str, Envoy]
    ca: CertificateAuthority
    authority: str

    def chat(self, sidecar: str) -> httpx.Response:
        port = self.sidecars[sidecar].listen_port
        with httpx.Client(timeout=20) as client:
            return client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY,
                               headers={"host": self.authority})

    def metrics(self) -> str:
        return self.extproc.metrics()

    def provider_requests(self) -> list[dict[str, object]]:
        requests: list[dict[str, object]] = self.mock.stats()["requests"]
        return requests


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("gateway-mode")
    # The gateway's identity toward the ext_proc: DevPKI's Envoy certificate (SDS files).
    pki = DevPKI(work / "pki", workload=GATEWAY)
    ca_file = work / "mesh-ca.crt"
    ca_file.write_bytes(pki.ca.cert_pem)
    started: list[MockProviderProcess | ExtProc | Envoy] = []
    try:
        mock = MockProviderProcess("inhouse", work / "mock.log", ["--expect-key", KEY])
        mock.start()
        started.append(mock)
        config = work / "config.yaml"
        config.write_text(CONFIG.format(host=HOST, port=mock.port))
        secrets = work / "secrets"
        secrets.mkdir()
        extproc = ExtProc(config, secrets, env={**os.environ, "GATEWAY_E2E_KEY": KEY},
                          log_path=work / "extproc.log", log_level="INFO", extra_args=pki.extproc_args())
        extproc.start()
        started.append(extproc)

        objects = render_all(load_text(config.read_text()))
        (ef,) = [o for o in objects if o["kind"] == "EnvoyFilter"]
        extproc_cluster = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["grpc_service"][
            "envoy_grpc"]["cluster_name"]
        gateway_port = free_port()
        gateway_admin = free_port()
        gateway = Envoy(
            gateway_bootstrap(
                objects, _files(pki.ca.workload(*GATEWAY), work, "gateway", ca_file),
                Endpoints(by_cluster={extproc_cluster: ("127.0.0.1", extproc.grpc_port),
                                      f"outbound|{mock.port}||{HOST}": ("127.0.0.1", mock.port)},
                          extproc_transport_socket=extproc_transport_socket(pki.upstream_tls())),
                listen_port=gateway_port, admin_port=gateway_admin),
            work, gateway_port, gateway_admin, name="gateway")
        gateway.start()
        started.append(gateway)

        sidecars: dict[str, Envoy] = {}
        for name, service_account in (("chat", "chat"), ("batch", "batch")):
            port, admin = free_port(), free_port()
            envoy = Envoy(
                sidecar_bootstrap(objects, _files(pki.ca.workload("apps", service_account), work, name, ca_file),
                                  ("127.0.0.1", gateway_port), spiffe_id(*GATEWAY), listen_port=port,
                                  admin_port=admin),
                work, port, admin, name=f"sidecar-{name}")
            envoy.start()
            started.append(envoy)
            sidecars[name] = envoy
        yield Mesh(mock, extproc, gateway, sidecars, pki.ca, f"{HOST}:{mock.port}")
    finally:
        for process in reversed(started):
            process.stop()


def test_the_workload_behind_the_gateway_is_the_caller(mesh: Mesh) -> None:
    before = len(mesh.provider_requests())
    resp = mesh.chat("chat")
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]
    metrics = mesh.metrics()
    # Accounted to the workload the gateway relayed, never to the gateway itself.
    assert value(metrics, "holysheep_workload_requests_total", workload_namespace="apps",
                 service_account="chat") >= 1
    assert not [labels for labels, _ in samples(metrics, "holysheep_workload_requests_total")
                if labels.get("workload_namespace") == "istio-system"]
    (sent,) = mesh.provider_requests()[before:]
    headers = sent["headers"]
    assert isinstance(headers, dict)
    assert headers["authorization"] == f"Bearer {KEY}"  # injected at the gateway
    # The gateway described the app's certificate (SANITIZE_SET); the ext_proc removed it.
    assert "x-forwarded-client-cert" not in headers


def test_a_workload_outside_the_scope_is_refused_through_the_same_gateway(mesh: Mesh) -> None:
    before_calls = len(mesh.provider_requests())
    before = value(mesh.metrics(), "holysheep_unauthorized_calls_total", reason="service_account")
    resp = mesh.chat("batch")  # apps/batch: in the namespace, not in spec.serviceAccounts
    assert resp.status_code >= 500
    assert KEY not in resp.text
    wait_until(lambda: value(mesh.metrics(), "holysheep_unauthorized_calls_total",
                             reason="service_account") == before + 1, timeout=10, what="the refusal counted")
    assert len(mesh.provider_requests()) == before_calls  # no provider saw it
    assert "spiffe://cluster.local/ns/apps/sa/batch" in (mesh.extproc.log_path or Path()).read_text()


def _direct(mesh: Mesh, namespace: str, service_account: str, attribute: str | None) -> grpc.RpcError:
    """A stream straight to the ext_proc with a valid mesh certificate: headers (with the
    attribute, if given), then a body; returns the error it ends with."""
    cert = mesh.ca.workload(namespace, service_account)
    creds = grpc.ssl_channel_credentials(mesh.ca.cert_pem, cert.key_pem, cert.cert_pem)
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in {
        ":method": "POST", ":path": "/v1/chat/completions", ":authority": mesh.authority,
        "content-type": "application/json"}.items()])
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers))
    if attribute is not None:
        first.attributes["envoy.filters.http.ext_proc"].update({PEER_URI_SAN_ATTRIBUTE: attribute})
    body = pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(BODY).encode(), end_of_stream=True))
    with grpc.secure_channel(f"127.0.0.1:{mesh.extproc.grpc_port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        stub = pbg.ExternalProcessorStub(channel)
        answers = []
        try:
            for answer in stub.Process(iter([first, body]), timeout=10):
                answers.append(answer)
        except grpc.RpcError as exc:
            assert all(KEY.encode() not in a.SerializeToString() for a in answers)
            return exc
    raise AssertionError(f"the stream was not refused: {answers}")


@pytest.mark.parametrize(("caller", "attribute", "reason"), [
    # A valid certificate of another service account naming a workload: not the gateway's to name.
    (("istio-system", "istio-ingressgateway-service-account"), "spiffe://cluster.local/ns/apps/sa/chat",
     "untrusted_relay"),
    # The workload itself, naming itself: same.
    (("apps", "chat"), "spiffe://cluster.local/ns/apps/sa/chat", "untrusted_relay"),
    # The workload itself, in scope, without the attribute: Gateway mode never hands a key to an app.
    (("apps", "chat"), None, "not_via_gateway"),
    # Even the gateway names only workloads of its own trust domain, and only SPIFFE IDs.
    (GATEWAY, "spiffe://evil.example/ns/apps/sa/chat", "trust_domain"),
    (GATEWAY, "chat", "not_spiffe"),
])
def test_a_direct_caller_that_is_not_the_gateway_is_refused_and_the_gateway_names_only_workloads(
    mesh: Mesh, caller: tuple[str, str], attribute: str | None, reason: str
) -> None:
    before = value(mesh.metrics(), "holysheep_unauthorized_calls_total", reason=reason)
    error = _direct(mesh, *caller, attribute)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
    assert value(mesh.metrics(), "holysheep_unauthorized_calls_total", reason=reason) == before + 1


def test_the_gateway_identity_is_what_the_ext_proc_authenticated(mesh: Mesh) -> None:
    """The gateway presents the gateway's certificate to the ext_proc (and the ext_proc's server
    identity is checked by the gateway): a relay by a caller with the gateway's service account
    works straight over gRPC too, so what decides is the authenticated identity, nothing else."""
    assert EXTPROC_ID.endswith("/ns/holysheep-system/sa/holysheep-extproc")
    cert = mesh.ca.workload(*GATEWAY)
    creds = grpc.ssl_channel_credentials(mesh.ca.cert_pem, cert.key_pem, cert.cert_pem)
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in {
        ":method": "POST", ":path": "/v1/chat/completions", ":authority": mesh.authority}.items()])
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers))
    first.attributes["envoy.filters.http.ext_proc"].update(
        {PEER_URI_SAN_ATTRIBUTE: "spiffe://cluster.local/ns/apps/sa/chat"})
    body = pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(BODY).encode(), end_of_stream=True))
    with grpc.secure_channel(f"127.0.0.1:{mesh.extproc.grpc_port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        answers = list(pbg.ExternalProcessorStub(channel).Process(iter([first, body]), timeout=10))
    mutation = answers[1].request_body.response.header_mutation
    assert any(h.header.key == "authorization" for h in mutation.set_headers)
    assert "x-forwarded-client-cert" in mutation.remove_headers
