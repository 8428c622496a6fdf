"""Issue 11, the building blocks: mTLS server credentials that follow their files, the caller's
SPIFFE identity from the authenticated transport (our TLS, or the sidecar's XFCC), scope matching.

Real TLS handshakes over loopback gRPC, with certificates made here from throwaway CAs
(extproc.dev.certs). The servicer is a one-method echo of the caller's identity, as the ext_proc
service will derive it per stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from extproc import authz, spiffe
from extproc.dev.certs import CertificateAuthority, Issued, spiffe_id, write_atomic
from extproc.dev.devstack import envoy_binary
from extproc.dev.processes import free_port
from extproc.spiffe import IdentityError, WorkloadIdentity
from extproc.tls import ReloadingServerCredentials, TLSConfigError, TLSFiles

METHOD = "/holysheep.test.WhoAmI/Get"
EXTPROC_ID = spiffe_id("holysheep-system", "holysheep-extproc")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# --- a server that answers with the caller's identity --------------------------------------------

Resolver = Callable[[Any], WorkloadIdentity]


def from_tls(context: Any) -> WorkloadIdentity:
    ident = spiffe.from_servicer_context(context)
    # The PEM fallback (gRPC builds without ``peer_uri``) must agree with gRPC's own URI list.
    auth = {k: v for k, v in context.auth_context().items() if k != "peer_uri"}
    assert spiffe.from_auth_context(auth) == ident
    return ident


def from_sidecar(context: Any) -> WorkloadIdentity:
    return spiffe.from_metadata(context.invocation_metadata(), expected_by=EXTPROC_ID)


class WhoAmI:
    def __init__(self, resolve: Resolver) -> None:
        self.resolve = resolve
        self.calls = 0

    async def get(self, _request: bytes, context: Any) -> bytes:
        self.calls += 1
        try:
            ident = self.resolve(context)
        except IdentityError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.reason)
        return ident.spiffe_id.encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "holysheep.test.WhoAmI", {"Get": grpc.unary_unary_rpc_method_handler(self.get)})


class Served:
    """The TLS files in a directory, the reloading credentials and a grpc.aio server using them."""

    def __init__(self, directory: Path, ca: CertificateAuthority, poll_interval: float = 3600.0) -> None:
        self.files = TLSFiles(str(directory / "tls.crt"), str(directory / "tls.key"), str(directory / "ca.crt"))
        self.server_cert = ca.server()
        self.install(self.server_cert, ca.cert_pem)
        self.creds = ReloadingServerCredentials(self.files, poll_interval=poll_interval)
        self.whoami = WhoAmI(from_tls)
        self.port = 0

    def install(self, server_cert: Issued, client_ca: bytes) -> None:
        server_cert.write(self.files.cert, self.files.key)
        write_atomic(self.files.client_ca, client_ca)
        self.server_cert = server_cert

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Served]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self.whoami.handler(),))
        self.port = server.add_secure_port("127.0.0.1:0", self.creds.server_credentials())
        await server.start()
        try:
            yield self
        finally:
            await self.creds.stop()
            await server.stop(None)


def channel(port: int, *, root: bytes | None = None, client: Issued | None = None) -> grpc.aio.Channel:
    """A channel of its own (no subchannel shared with another test channel): a new handshake."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    if root is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    creds = grpc.ssl_channel_credentials(root, client.key_pem if client else None, client.cert_pem if client else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)


async def whoami(ch: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    reply: bytes = await ch.unary_unary(METHOD)(b"", metadata=metadata, timeout=10)
    return reply.decode()


async def call(port: int, *, root: bytes | None = None, client: Issued | None = None) -> str:
    async with channel(port, root=root, client=client) as ch:
        return await whoami(ch)


async def refused(port: int, **kw: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(port, **kw)
    return info.value.code()


def served_serial(port: int, root: bytes, client: Issued, directory: Path) -> int:
    """The serial of the certificate the server presents to a new TLS connection."""
    cert, key = directory / "probe.crt", directory / "probe.key"
    client.write(str(cert), str(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=root.decode())
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("test CA A")


# --- authentication -------------------------------------------------------------------------------

def test_a_client_with_a_mesh_certificate_is_identified_and_scoped(tmp_path: Path, ca: CertificateAuthority) -> None:
    async def scenario() -> None:
        async with Served(tmp_path, ca).running() as s:
            answer = await call(s.port, root=ca.cert_pem, client=ca.workload("shop", "checkout"))
            assert answer == "spiffe://cluster.local/ns/shop/sa/checkout"
            ident = spiffe.parse_spiffe_id(answer)
            assert ident == WorkloadIdentity("cluster.local", "shop", "checkout")
            assert ident.principal == "cluster.local/ns/shop/sa/checkout"
            assert authz.in_scope(ident, "shop")
            assert authz.denial(ident, "billing") == authz.OUT_OF_NAMESPACE

    run(scenario())


def test_no_certificate_another_ca_and_plaintext_fail_the_handshake(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority("not the mesh CA")

    async def scenario() -> None:
        async with Served(tmp_path, ca).running() as s:
            assert await refused(s.port, root=ca.cert_pem) == grpc.StatusCode.UNAVAILABLE
            assert await refused(s.port, root=ca.cert_pem, client=other.workload("shop", "checkout")) \
                == grpc.StatusCode.UNAVAILABLE
            assert await refused(s.port) == grpc.StatusCode.UNAVAILABLE  # plaintext
            assert s.whoami.calls == 0  # no call ever reached the servicer
            # and the same server still serves a good client
            assert await call(s.port, root=ca.cert_pem, client=ca.workload("shop", "checkout"))
            assert s.whoami.calls == 1

    run(scenario())


@pytest.mark.parametrize(("label", "uris", "hosts"), [
    ("two URI SANs", [spiffe_id("shop", "checkout"), spiffe_id("victim", "admin")], []),
    ("not SPIFFE", ["https://shop.example/checkout"], []),
    ("not an Istio workload ID", ["spiffe://cluster.local/workload/checkout"], []),
    ("a path past the service account", ["spiffe://cluster.local/ns/shop/sa/checkout/extra"], []),
    ("no URI SAN", [], ["checkout.shop.svc"]),
])
def test_a_certificate_without_exactly_one_istio_spiffe_id_is_refused(
        tmp_path: Path, ca: CertificateAuthority, label: str, uris: list[str], hosts: list[str]) -> None:
    async def scenario() -> None:
        async with Served(tmp_path, ca).running() as s:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(s.port, root=ca.cert_pem, client=ca.issue(uris=uris, hosts=hosts))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, label
            assert info.value.details() in ("uri_count", "not_spiffe")

    run(scenario())


class CountingContext:
    """The real servicer context, counting the reads of its full auth context."""

    def __init__(self, context: Any, counts: list[int]) -> None:
        self._context = context
        self._counts = counts

    def auth_context(self) -> Any:
        self._counts[0] += 1
        return self._context.auth_context()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def test_each_connection_is_verified_once_and_its_streams_keep_their_own_identity(
        tmp_path: Path, ca: CertificateAuthority) -> None:
    """spiffe.ServicerContextIdentity remembers a connection's identity by its peer address and
    certificate identities: one full read per connection, never another connection's answer,
    not even for a certificate whose DNS SAN spells a remembered SPIFFE ID."""
    resolver = spiffe.ServicerContextIdentity()
    full_reads = [0]

    async def scenario() -> None:
        served = Served(tmp_path, ca)
        served.whoami = WhoAmI(lambda context: resolver(CountingContext(context, full_reads)))
        async with served.running() as s:
            checkout, reports = ca.workload("shop", "checkout"), ca.workload("billing", "reports")
            async with channel(s.port, root=ca.cert_pem, client=checkout) as a, \
                    channel(s.port, root=ca.cert_pem, client=reports) as b:
                for _ in range(3):  # interleaved streams of two live connections
                    assert await whoami(a) == spiffe_id("shop", "checkout")
                    assert await whoami(b) == spiffe_id("billing", "reports")
                assert full_reads[0] == 2, "one full read per connection"
                # A new connection, whose only name is a DNS SAN equal to a remembered SPIFFE ID:
                # verified in full, and refused (a SPIFFE SVID's identity is its URI SAN).
                impostor = ca.issue(uris=[], hosts=[spiffe_id("shop", "checkout")])
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(s.port, root=ca.cert_pem, client=impostor)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert full_reads[0] == 3
                # The first connection still has its own identity.
                assert await whoami(a) == spiffe_id("shop", "checkout")
                assert full_reads[0] == 3

    run(scenario())


# --- rotation ------------------------------------------------------------------------------------

def test_server_certificate_and_ca_rotate_without_restart(tmp_path: Path, ca: CertificateAuthority) -> None:
    client_a = ca.workload("shop", "checkout")
    ca_b = CertificateAuthority("test CA B")
    client_b = ca_b.workload("shop", "checkout")

    async def scenario() -> None:
        s = Served(tmp_path, ca)
        async with s.running():
            first = s.server_cert
            keep = channel(s.port, root=ca.cert_pem, client=client_a)  # a connection made before rotation
            assert await whoami(keep) == spiffe_id("shop", "checkout")
            assert await asyncio.to_thread(served_serial, s.port, ca.cert_pem, client_a, tmp_path) \
                == first.cert.serial_number

            # 1. a new server certificate from the same CA
            s.install(ca.server(), ca.cert_pem)
            assert await s.creds.refresh()
            assert not await s.creds.refresh()  # unchanged files: nothing staged
            assert await asyncio.to_thread(served_serial, s.port, ca.cert_pem, client_a, tmp_path) \
                == s.server_cert.cert.serial_number != first.cert.serial_number
            assert await call(s.port, root=ca.cert_pem, client=client_a)

            # 2. a new CA for both sides: server certificate from B, only B's clients accepted
            s.install(ca_b.server(), ca_b.cert_pem)
            assert await s.creds.refresh()
            assert await call(s.port, root=ca_b.cert_pem, client=client_b) == spiffe_id("shop", "checkout")
            # the server now rejects A's client certificate even when the client trusts B
            assert await refused(s.port, root=ca_b.cert_pem, client=client_a) == grpc.StatusCode.UNAVAILABLE
            # and a client that only trusts A no longer trusts the server
            assert await refused(s.port, root=ca.cert_pem, client=client_a) == grpc.StatusCode.UNAVAILABLE
            # the connection made before the rotation keeps working: no request in flight fails
            assert await whoami(keep) == spiffe_id("shop", "checkout")
            await keep.close()

            # 3. the overlap that makes a CA rotation seamless: a bundle of both CAs
            s.install(s.server_cert, ca.cert_pem + ca_b.cert_pem)
            assert await s.creds.refresh()
            assert await call(s.port, root=ca_b.cert_pem, client=client_a)
            assert await call(s.port, root=ca_b.cert_pem, client=client_b)
            assert s.creds.generation == 4

    run(scenario())


def test_the_poller_picks_up_rotated_files(tmp_path: Path, ca: CertificateAuthority) -> None:
    ca_b = CertificateAuthority("test CA B")

    async def scenario() -> None:
        s = Served(tmp_path, ca, poll_interval=0.05)
        async with s.running():
            s.creds.start()
            s.install(ca_b.server(), ca_b.cert_pem)
            deadline = time.monotonic() + 10
            while s.creds.generation == 1:
                assert time.monotonic() < deadline, "the poller never reloaded the files"
                await asyncio.sleep(0.02)
            assert await call(s.port, root=ca_b.cert_pem, client=ca_b.workload("shop", "checkout"))

    run(scenario())


def test_a_bad_or_half_rotated_set_keeps_the_last_good_one(
        tmp_path: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture) -> None:
    client = ca.workload("shop", "checkout")

    async def scenario() -> None:
        s = Served(tmp_path, ca)
        async with s.running():
            good = s.server_cert
            Path(s.files.key).write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot-a-key-SECRETBYTES\n")
            assert not await s.creds.refresh()
            # a new certificate written before its key: the pair does not match
            fresh = ca.server()
            write_atomic(s.files.cert, fresh.cert_pem)
            write_atomic(s.files.key, good.key_pem)
            assert not await s.creds.refresh()
            assert s.creds.generation == 1
            assert await call(s.port, root=ca.cert_pem, client=client)  # still served, old set
            assert await asyncio.to_thread(served_serial, s.port, ca.cert_pem, client, tmp_path) \
                == good.cert.serial_number
            # the key arrives: the next poll takes the new pair
            write_atomic(s.files.key, fresh.key_pem)
            assert await s.creds.refresh()
            assert await asyncio.to_thread(served_serial, s.port, ca.cert_pem, client, tmp_path) \
                == fresh.cert.serial_number

    run(scenario())
    assert "not an unencrypted PEM private key" in caplog.text
    assert "is not the key of" in caplog.text
    assert "SECRETBYTES" not in caplog.text


def test_unusable_files_at_startup_are_named_not_quoted(tmp_path: Path, ca: CertificateAuthority) -> None:
    files = TLSFiles(str(tmp_path / "c"), str(tmp_path / "k"), str(tmp_path / "ca"))
    with pytest.raises(TLSConfigError, match="No such file"):
        ReloadingServerCredentials(files)
    server = ca.server()
    server.write(files.cert, files.key)
    Path(files.client_ca).write_bytes(b"junk")
    with pytest.raises(TLSConfigError, match="not a PEM certificate bundle"):
        ReloadingServerCredentials(files)
    write_atomic(files.client_ca, ca.cert_pem)
    Path(files.key).write_bytes(b"-----BEGIN EC PRIVATE KEY-----\nSECRETBYTES\n-----END EC PRIVATE KEY-----\n")
    with pytest.raises(TLSConfigError) as info:
        ReloadingServerCredentials(files)
    assert files.key in str(info.value) and "SECRETBYTES" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- SPIFFE IDs ----------------------------------------------------------------------------------

def test_spiffe_ids_are_parsed_strictly() -> None:
    ok = spiffe.parse_spiffe_id("spiffe://cluster.local/ns/shop/sa/checkout.v2-a")
    assert (ok.trust_domain, ok.namespace, ok.service_account) == ("cluster.local", "shop", "checkout.v2-a")
    assert spiffe.parse_spiffe_id("spiffe://td_1.example/ns/a/sa/b", trust_domains={"td_1.example"})
    with pytest.raises(IdentityError) as info:
        spiffe.parse_spiffe_id("spiffe://evil.example/ns/shop/sa/checkout", trust_domains={"cluster.local"})
    assert info.value.reason == "trust_domain"
    for bad in [
        "spiffe://cluster.local/ns/shop/sa/checkout\n",      # a trailing newline
        "SPIFFE://cluster.local/ns/shop/sa/checkout",
        "spiffe://Cluster.local/ns/shop/sa/checkout",
        "spiffe://cluster.local/ns/Shop/sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/",
        "spiffe://cluster.local/ns//sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/checkout?x=1",
        "spiffe://cluster.local/ns/shop/sa/checkout#f",
        "spiffe://cluster.local:443/ns/shop/sa/checkout",
        "spiffe://user@cluster.local/ns/shop/sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/check%2Fout",
        "spiffe://cluster.local/ns/sh.op/sa/checkout",      # a namespace is a DNS label
        "spiffe://cluster.local/ns/-shop/sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/..",
        "spiffe://cluster.local/ns/" + "a" * 64 + "/sa/checkout",
        "spiffe:///ns/shop/sa/checkout",
        "spiffe://cluster.local/sa/checkout/ns/shop",
        "spiffe://cluster.local/ns/shop/sa/checkout,By=spiffe://x",
        "",
    ]:
        with pytest.raises(IdentityError) as info:
            spiffe.parse_spiffe_id(bad)
        assert info.value.reason == "not_spiffe", bad


def test_an_auth_context_without_tls_or_certificate_has_no_identity() -> None:
    for auth in ({}, {"transport_security_type": [b"insecure"]}, {"transport_security_type": [b"ssl"]}):
        with pytest.raises(IdentityError) as info:
            spiffe.from_auth_context(auth)
        assert info.value.reason == "no_peer_certificate"


# --- x-forwarded-client-cert ---------------------------------------------------------------------

HASH = "5ee99bacdc31ad1a63dca046396f87288784c22a2abd83d996982d5449714345"
# What Envoy 1.40 writes with Istio's inbound settings (Subject, URI, DNS), for a mesh client.
REAL = f'By={EXTPROC_ID};Hash={HASH};Subject="";URI=spiffe://cluster.local/ns/shop/sa/checkout'
FORGED = f"By={EXTPROC_ID};Hash=00;URI=spiffe://cluster.local/ns/victim/sa/admin"


def xfcc_reason(*values: str, expected_by: str | None = EXTPROC_ID) -> str:
    with pytest.raises(IdentityError) as info:
        spiffe.from_xfcc(list(values), expected_by=expected_by)
    return info.value.reason


def test_xfcc_from_the_sidecar_names_the_caller() -> None:
    assert spiffe.from_xfcc([REAL], expected_by=EXTPROC_ID) == WorkloadIdentity("cluster.local", "shop", "checkout")
    assert spiffe.from_metadata([("x-forwarded-client-cert", REAL), ("x-request-id", "1")]).namespace == "shop"
    # keys are case-insensitive, values may be quoted, quotes inside escaped
    odd = (f'by={EXTPROC_ID};HASH={HASH};Subject="CN=a, O=\\"b\\";c=d";DNS=x.svc;'
           'uri="spiffe://cluster.local/ns/shop/sa/checkout"')
    assert spiffe.from_xfcc([odd], expected_by=EXTPROC_ID).service_account == "checkout"
    [element] = spiffe.parse_xfcc(odd)
    assert element.values("subject") == ['CN=a, O="b";c=d']


def test_a_forged_xfcc_never_names_the_caller() -> None:
    # Istio's default APPEND_FORWARD: the caller's own header comes first, the sidecar appends.
    assert xfcc_reason(f"{FORGED},{REAL}") == "xfcc_forwarded"
    assert xfcc_reason(FORGED, REAL) == "xfcc_forwarded"  # two metadata entries
    assert xfcc_reason("a=1,b=2," + REAL) == "xfcc_forwarded"
    # an odd quote in the forged part swallows the separator: never a valid single element
    assert xfcc_reason('URI=spiffe://cluster.local/ns/victim/sa/v;Subject=",' + REAL) == "xfcc_malformed"
    assert xfcc_reason('URI=spiffe://cluster.local/ns/victim/sa/v;Subject="\\",' + REAL) == "xfcc_malformed"
    # alone (a sidecar misconfigured to FORWARD_ONLY would pass it): not set by our sidecar
    assert xfcc_reason("By=spiffe://cluster.local/ns/shop/sa/attacker;Hash=00;URI=" + spiffe_id("victim", "a")) \
        == "xfcc_by_mismatch"
    assert xfcc_reason() == "xfcc_missing"
    assert spiffe.xfcc_values([("X-Forwarded-Client-Cert", b"x"), ("other", "y")]) == ["x"]


def test_malformed_xfcc_elements_are_refused() -> None:
    uri = "URI=spiffe://cluster.local/ns/shop/sa/checkout"
    assert xfcc_reason(f"By={EXTPROC_ID};Hash={HASH};{uri};{uri}") == "uri_count"
    assert xfcc_reason(f"By={EXTPROC_ID};Hash={HASH};URI=") == "uri_count"
    assert xfcc_reason(f"By={EXTPROC_ID};{uri}") == "xfcc_malformed"  # no Hash
    assert xfcc_reason(f"By={EXTPROC_ID};Hash={HASH};URI=https://shop.example") == "not_spiffe"
    for bad in ["By", "=x", f"{REAL};", f"{REAL},", f'{REAL};X="a"b', f'{REAL};X=a"b', f" {REAL}",
                f"{REAL};Subject=\"unterminated", "By=" + "a" * spiffe.XFCC_MAX_LENGTH]:
        assert xfcc_reason(bad) == "xfcc_malformed", bad


# --- the sidecar's XFCC, from a real Envoy ---------------------------------------------------------

def istio_like_inbound(port: int, name: str, mode: str, certs: dict[str, str]) -> dict[str, Any]:
    """An inbound listener as Istio builds it for a sidecar (mTLS with a required client
    certificate; HCM forward_client_cert_details + Subject/URI/DNS), in front of a gRPC app."""
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{"certificate_chain": {"filename": certs["cert"]},
                                          "private_key": {"filename": certs["key"]}}],
                    "validation_context": {"trusted_ca": {"filename": certs["ca"]}}}}},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                         ".HttpConnectionManager",
                "stat_prefix": name,
                "forward_client_cert_details": mode,
                "set_current_client_cert_details": {"subject": True, "uri": True, "dns": True},
                "route_config": {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "10s"}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}],
        }],
    }


@pytest.fixture
def sidecar(tmp_path: Path, ca: CertificateAuthority) -> Iterator[dict[str, int]]:
    """An Envoy playing the ext_proc pod's sidecar: one listener per XFCC mode, one app cluster."""
    app_port = free_port()
    own = ca.issue(hosts=["127.0.0.1"], uris=[EXTPROC_ID])  # the sidecar's workload certificate
    certs = {"cert": str(tmp_path / "side.crt"), "key": str(tmp_path / "side.key"), "ca": str(tmp_path / "ca.crt")}
    own.write(certs["cert"], certs["key"])
    write_atomic(certs["ca"], ca.cert_pem)
    ports = {"APPEND_FORWARD": free_port(), "SANITIZE_SET": free_port(), "app": app_port}
    listeners = [istio_like_inbound(ports[m], m.lower(), m, certs) for m in ("APPEND_FORWARD", "SANITIZE_SET")]
    admin = free_port()
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": [{
            "name": "app", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}}}]}]},
        }]},
    }
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(bootstrap))
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning"],
                                stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail("envoy did not start: " + log.read().decode(errors="replace")[-2000:])
                time.sleep(0.05)
            yield ports
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.mark.e2e
def test_behind_a_real_sidecar_the_caller_cannot_choose_its_identity(
        sidecar: dict[str, int], ca: CertificateAuthority) -> None:
    """Envoy's XFCC handling as Istio configures it: APPEND_FORWARD (Istio's sidecar default)
    keeps a forged header and appends the real element, so the call is refused; SANITIZE_SET
    (what the install sets on the ext_proc pod) replaces it, so the caller is who its
    certificate says, whatever it sent. Without a client certificate nothing gets through."""
    client = ca.workload("shop", "checkout")
    forged = (("x-forwarded-client-cert", FORGED),)

    async def scenario() -> None:
        whoami_app = WhoAmI(from_sidecar)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((whoami_app.handler(),))
        server.add_insecure_port(f"127.0.0.1:{sidecar['app']}")
        await server.start()
        try:
            for mode in ("APPEND_FORWARD", "SANITIZE_SET"):
                async with channel(sidecar[mode], root=ca.cert_pem, client=client) as ch:
                    assert await whoami(ch) == spiffe_id("shop", "checkout"), mode
                    if mode == "SANITIZE_SET":
                        assert await whoami(ch, forged) == spiffe_id("shop", "checkout")
                    else:
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await whoami(ch, forged)
                        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                        assert info.value.details() == "xfcc_forwarded"
                assert await refused(sidecar[mode], root=ca.cert_pem) == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    run(scenario())


# --- scope ---------------------------------------------------------------------------------------

CHECKOUT = WorkloadIdentity("cluster.local", "shop", "checkout")


def test_scope_is_the_config_namespace_or_any_for_the_root_namespace() -> None:
    assert authz.denial(CHECKOUT, "shop") is None
    assert authz.denial(CHECKOUT, "billing") == authz.OUT_OF_NAMESPACE
    assert authz.denial(CHECKOUT, "istio-system") is None  # Istio's default root namespace
    assert authz.denial(CHECKOUT, "istio-system", root_namespace="mesh-root") == authz.OUT_OF_NAMESPACE
    assert authz.denial(CHECKOUT, "mesh-root", root_namespace="mesh-root") is None
    # the trust domain does not widen or narrow the scope (parse_spiffe_id restricts it)
    assert authz.in_scope(WorkloadIdentity("other.td", "shop", "checkout"), "shop")


@pytest.mark.parametrize(("patterns", "allowed"), [
    ((), True),
    (("checkout",), True),
    (("check*",), True),
    (("*out",), True),
    (("*",), True),
    (("cart", "pay*", "checkout"), True),
    (("cart", "pay*"), False),
    (("checkou",), False),
    (("checkout-v2",), False),
    (("*in",), False),
    (("shop/checkout",), False),
])
def test_service_account_patterns_narrow_the_scope(patterns: tuple[str, ...], allowed: bool) -> None:
    for ns in ("shop", "istio-system"):
        expected = None if allowed else authz.SERVICE_ACCOUNT_NOT_LISTED
        assert authz.denial(CHECKOUT, ns, patterns) == expected, (ns, patterns)
    # a namespace miss is reported as such, whatever the patterns
    assert authz.denial(CHECKOUT, "billing", patterns) == authz.OUT_OF_NAMESPACE


def test_service_account_patterns_are_istios_match_forms() -> None:
    for good in ("checkout", "check*", "*out", "*", "a.b-c", "0"):
        assert authz.service_account_pattern_problem(good) is None, good
    for bad in ("a*b", "**", "*a*", "", "Checkout", "shop/checkout", "check out", "a?"):
        assert authz.service_account_pattern_problem(bad), bad


# --- spec.serviceAccounts: one set of match forms for the parser, the CRD and the data plane ------

ROOT = Path(__file__).resolve().parent.parent


def _config_with(accounts: Any) -> dict[str, Any]:
    return {"apiVersion": "holysheep.ai/v1", "kind": "HolySheepConfig", "metadata": {"name": "a", "namespace": "shop"},
            "spec": {"baseUrl": "https://api.example/v1", "serviceAccounts": accounts}}


def _crd_schema() -> dict[str, Any]:
    import yaml

    doc = yaml.safe_load((ROOT / "mesh" / "crd" / "holysheepconfig.yaml").read_text())
    (version,) = doc["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("accounts", [["checkout"], ["check*", "*out", "*"], ["a.b-c", "0"]])
def test_service_accounts_accepted_by_the_parser_and_the_crd(accounts: list[str]) -> None:
    import jsonschema

    from protos.spec import parse_document

    cfg = parse_document(_config_with(accounts))
    assert cfg.service_accounts == tuple(accounts)
    jsonschema.validate(_config_with(accounts), _crd_schema())


@pytest.mark.parametrize("accounts", [[], ["a*b"], ["**"], ["*a*"], ["Checkout"], ["shop/checkout"], [""],
                                      ["check out"], "checkout", [3]])
def test_service_accounts_rejected_by_the_parser_and_the_crd(accounts: Any) -> None:
    import jsonschema

    from protos.spec import ConfigError, parse_document

    with pytest.raises(ConfigError) as info:
        parse_document(_config_with(accounts))
    assert "spec.serviceAccounts" in str(info.value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_config_with(accounts), _crd_schema())


def test_an_absent_service_account_list_is_the_whole_scope() -> None:
    from protos.spec import parse_document

    doc = _config_with([])
    del doc["spec"]["serviceAccounts"]
    cfg = parse_document(doc)
    assert cfg.service_accounts == ()
    assert authz.config_denial(WorkloadIdentity("cluster.local", "shop", "anyone"), cfg) is None
    assert authz.config_denial(WorkloadIdentity("cluster.local", "cart", "anyone"), cfg) == authz.OUT_OF_NAMESPACE


def test_scope_denial_over_several_configs_names_the_closest_miss() -> None:
    from protos.spec import parse_document

    shop = parse_document(_config_with(["checkout"]))
    other = parse_document({**_config_with(["x"]), "metadata": {"name": "b", "namespace": "billing"}})
    assert authz.scope_denial(CHECKOUT, [other, shop]) is None
    assert authz.scope_denial(WorkloadIdentity("cluster.local", "shop", "cart"), [other, shop]) == \
        authz.SERVICE_ACCOUNT_NOT_LISTED
    assert authz.scope_denial(WorkloadIdentity("cluster.local", "ads", "cart"), [other, shop]) == authz.OUT_OF_NAMESPACE
    assert authz.scope_denial(CHECKOUT, []) == authz.OUT_OF_NAMESPACE


# --- the install: what makes the sidecar's XFCC trustworthy ---------------------------------------

def test_the_install_gives_the_ext_proc_a_trustworthy_xfcc() -> None:
    """The three guarantees behind --identity-from xfcc (README, Security): the ext_proc pod's
    sidecar replaces any caller's XFCC (SANITIZE_SET), only mTLS reaches port 9002 (STRICT), and
    the sidecar captures that port (no inbound exclusion)."""
    import yaml

    docs = [d for d in yaml.safe_load_all((ROOT / "mesh" / "base" / "extproc.yaml").read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    proxy_config = json.loads(annotations["proxy.istio.io/config"])
    assert proxy_config["proxyHeaders"]["forwardedClientCert"] == "SANITIZE_SET"
    assert pod["metadata"].get("labels", {}).get("sidecar.istio.io/inject") != "false"
    for key in ("traffic.sidecar.istio.io/excludeInboundPorts", "traffic.sidecar.istio.io/includeInboundPorts"):
        assert key not in annotations  # every inbound port is captured (Istio's default "*")
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "extproc"]
    assert "--identity-from=xfcc" in container["args"]
    assert not any(a.startswith(("--insecure-no-identity", "--tls-")) for a in container["args"])
    (peer,) = [d for d in docs if d["kind"] == "PeerAuthentication"]
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert peer["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert peer["spec"].get("portLevelMtls", {}).get("9002", {"mode": "STRICT"})["mode"] == "STRICT"


# --- the command line: the identity flags' combinations --------------------------------------------

def _extproc(*flags: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    import sys

    config = tmp / "config.yaml"
    config.write_text("apiVersion: holysheep.ai/v1\nkind: HolySheepConfig\nmetadata: {name: a}\n"
                      "spec: {baseUrl: 'https://api.example/v1'}\n")
    return subprocess.run([sys.executable, "-m", "extproc.cli", "extproc", "--config", str(config), "--workers", "1",
                           *flags], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("flags", "message"), [
    (("--tls-cert", "c", "--tls-key", "k"), "--tls-cert, --tls-key and --client-ca go together"),
    (("--client-ca", "ca"), "--tls-cert, --tls-key and --client-ca go together"),
    (("--identity-from", "xfcc", "--insecure-no-identity"), "--identity-from xfcc and --insecure-no-identity exclude"),
    (("--tls-cert", "c", "--tls-key", "k", "--client-ca", "ca", "--identity-from", "xfcc"), "exclude each other"),
    (("--tls-cert", "/nonexistent/tls.crt", "--tls-key", "k", "--client-ca", "ca"), "/nonexistent/tls.crt"),
])
def test_identity_flags_that_cannot_work_stop_the_command(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    done = _extproc(*flags, tmp=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_key_that_is_not_the_certificates_is_named_not_quoted(tmp_path: Path, ca: CertificateAuthority) -> None:
    cert, other = ca.server(), ca.server()
    cert.write(str(tmp_path / "tls.crt"), str(tmp_path / "unused.key"))
    other.write(str(tmp_path / "other.crt"), str(tmp_path / "tls.key"))
    write_atomic(str(tmp_path / "ca.crt"), ca.cert_pem)
    done = _extproc("--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"),
                    "--client-ca", str(tmp_path / "ca.crt"), tmp=tmp_path)
    assert done.returncode == 2
    assert f"{tmp_path / 'tls.key'} is not the key of {tmp_path / 'tls.crt'}" in done.stderr
    assert "PRIVATE KEY" not in done.stderr
