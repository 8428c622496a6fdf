"""The caller's SPIFFE workload identity, from the authenticated transport, never from the stream.

Two trustworthy sources, and only these:

- **Our own TLS** (``--tls-cert/--tls-key/--client-ca``): the client certificate gRPC verified in
  the handshake. gRPC's auth context lists the certificate's URI SANs (``peer_uri``); older
  gRPC releases expose only the PEM (``x509_pem_cert``), which is parsed here instead.
- **The ext_proc pod's own Istio sidecar**: it terminates the caller's mesh mTLS and describes
  the certificate it verified in ``x-forwarded-client-cert`` (XFCC), which reaches us as gRPC
  metadata. Envoy *appends* to a caller's XFCC under Istio's inbound default (APPEND_FORWARD)
  and *replaces* it under SANITIZE_SET, so the header is trusted only when it holds exactly one
  element: anything more means the caller sent its own, and the call is refused rather than
  guessing which element is real. Trust it only behind that sidecar (see README, Security).

Everything about a SPIFFE ID is checked strictly: ``spiffe://<trust-domain>/ns/<namespace>/sa/<sa>``
with Kubernetes name rules, one URI SAN, nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

XFCC_HEADER = "x-forwarded-client-cert"
# Bounds the parsing work for a hostile header; one Istio element is ~250 bytes (~2 KB with Cert=).
XFCC_MAX_LENGTH = 16384

# SPIFFE trust domain: lowercase letters, digits, '.', '-', '_' (SPIFFE-ID spec, section 2.1).
_TRUST_DOMAIN = r"[a-z0-9._-]{1,255}"
# Kubernetes: a namespace is a DNS-1123 label, a service account name a DNS-1123 subdomain.
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
_ISTIO_SPIFFE_ID = re.compile(rf"spiffe://({_TRUST_DOMAIN})/ns/({_LABEL})/sa/({_SUBDOMAIN})")


class IdentityError(ValueError):
    """No acceptable identity. ``reason`` is a short fixed word (a metric label); the message may
    quote a certificate value (never secret) but is bounded in length."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    trust_domain: str
    namespace: str
    service_account: str
    # Every per-caller memo is keyed by the identity (several lookups a request), and a frozen
    # dataclass's generated __hash__ hashes its fields each time: hashed once instead.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.trust_domain, self.namespace, self.service_account)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """Istio's form (AuthorizationPolicy ``principals``, ``source.principal``)."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.spiffe_id


def _quote(value: str) -> str:
    return repr(value if len(value) <= 120 else value[:120] + "...")


def parse_spiffe_id(value: str, trust_domains: Collection[str] | None = None) -> WorkloadIdentity:
    """An Istio workload SPIFFE ID, or IdentityError. ``trust_domains``: accepted ones (None: any)."""
    if len(value) > 2048:  # the SPIFFE spec's bound on a URI
        raise IdentityError("not_spiffe", "SPIFFE ID longer than 2048 bytes")
    m = _ISTIO_SPIFFE_ID.fullmatch(value)
    if m is None or len(m.group(3)) > 253:
        raise IdentityError("not_spiffe", f"not an Istio SPIFFE ID spiffe://<trust-domain>/ns/<ns>/sa/<sa>: "
                                          f"{_quote(value)}")
    trust_domain, namespace, service_account = m.groups()
    if trust_domains is not None and trust_domain not in trust_domains:
        raise IdentityError("trust_domain", f"trust domain {trust_domain!r} is not accepted")
    return WorkloadIdentity(trust_domain, namespace, service_account)


def _one_uri(uris: Sequence[str], trust_domains: Collection[str] | None) -> WorkloadIdentity:
    # An X.509 SVID carries exactly one URI SAN (SPIFFE X509-SVID spec, section 2): with two, which
    # one is "the" identity would be our guess, so none is.
    if len(uris) != 1:
        raise IdentityError("uri_count", f"the certificate has {len(uris)} URI SANs, a SPIFFE SVID has exactly one")
    return parse_spiffe_id(uris[0], trust_domains)


def uris_from_pem(pem: bytes) -> list[str]:
    """The URI SANs of a PEM certificate (for gRPC builds whose auth context lacks ``peer_uri``)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise IdentityError("no_peer_certificate", "the peer certificate is not readable PEM") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def from_auth_context(auth: Mapping[str, Sequence[bytes]],
                      trust_domains: Collection[str] | None = None) -> WorkloadIdentity:
    """The identity in a gRPC auth context (``ServicerContext.auth_context()``) of a TLS connection
    whose client certificate gRPC verified (``require_client_auth``)."""
    if list(auth.get("transport_security_type", ())) != [b"ssl"]:
        raise IdentityError("no_peer_certificate", "the connection is not TLS")
    raw = auth.get("peer_uri")
    if raw is not None:
        uris = [u.decode("utf-8", "replace") for u in raw]
    else:
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise IdentityError("no_peer_certificate", "the client presented no certificate")
        uris = uris_from_pem(pems[0])
    return _one_uri(uris, trust_domains)


def from_servicer_context(context: Any, trust_domains: Collection[str] | None = None) -> WorkloadIdentity:
    """From a ``grpc.aio.ServicerContext`` served over our own mTLS."""
    return from_auth_context(context.auth_context(), trust_domains)


class ServicerContextIdentity:
    """``from_servicer_context`` for one server's trust domains, remembering the identity of each
    TCP connection it has verified.

    Every stream of a connection carries that connection's certificate, and reading it is the
    costly part: ``auth_context()`` copies every property, the client's PEM included (9 µs a
    stream live, the largest item of a stream's setup). So the identity read from a
    connection's first stream is remembered under what gRPC says of the connection on every
    stream for a fraction of that: the peer's address and port, and the verified certificate's
    identities (``peer_identities()``: its SANs, whatever their type, or its common name when it
    has none). A later stream with both equal is taken to be on the same connection, since two
    live TCP connections to this listener cannot share an address and port. The remembered
    answer is a pure function of what gRPC verified, so nothing a caller sends on a stream
    reaches it.

    What the key cannot tell apart, and why that is accepted (README, Security): a new connection
    from the same address and port, after the first one closed, whose certificate from the same
    trusted CA lists the remembered SPIFFE ID as another kind of name (a DNS SAN or a common
    name). Istio's CA signs only the caller's own SPIFFE ID, as a URI SAN, so such a certificate
    names only its holder. A peer that is not an IP address and port (a Unix socket's is the
    same for every connection) is never remembered."""

    MAX_REMEMBERED = 4096  # connections; when full, forgotten at once (closed ones pile up)

    __slots__ = ("_known", "_trust_domains")

    def __init__(self, trust_domains: Collection[str] | None = None) -> None:
        self._trust_domains = trust_domains
        self._known: dict[tuple[str, tuple[bytes, ...]], WorkloadIdentity] = {}

    def __call__(self, context: Any) -> WorkloadIdentity:
        peer = context.peer()
        key = None
        if peer.startswith(("ipv4:", "ipv6:")):
            key = (peer, tuple(context.peer_identities() or ()))
            identity = self._known.get(key)
            if identity is not None:
                return identity
        identity = from_auth_context(context.auth_context(), self._trust_domains)  # raises: never kept
        if key is not None and key[1]:
            if len(self._known) >= self.MAX_REMEMBERED:
                self._known.clear()
            self._known[key] = identity
        return identity


# --- x-forwarded-client-cert -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class XfccElement:
    """One proxy's description of the client certificate it verified. Keys are lower-case
    (Envoy: keys are case-insensitive, values case-sensitive); a key may repeat (URI, DNS)."""

    pairs: tuple[tuple[str, str], ...]

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key]


_KEY = re.compile(r"[A-Za-z]+")


def parse_xfcc(value: str) -> list[XfccElement]:
    """Envoy's XFCC grammar: elements split by ',', pairs by ';', ``key=value``; a value with
    ',', ';' or '=' is double-quoted, with ``\\"`` for a quote inside. Strict: anything else
    (an unterminated quote, a pair without '=', stray characters) is IdentityError."""
    if len(value) > XFCC_MAX_LENGTH:
        raise IdentityError("xfcc_malformed", f"x-forwarded-client-cert longer than {XFCC_MAX_LENGTH} bytes")
    elements: list[XfccElement] = []
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while True:
        eq = value.find("=", i)
        key = value[i:eq] if eq >= 0 else ""
        if eq < 0 or not _KEY.fullmatch(key):
            raise IdentityError("xfcc_malformed", f"x-forwarded-client-cert: bad key at offset {i}")
        i = eq + 1
        if i < n and value[i] == '"':
            chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise IdentityError("xfcc_malformed", "x-forwarded-client-cert: unterminated quote")
                c = value[i]
                if c == "\\" and i + 1 < n:
                    chars.append(value[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    chars.append(c)
                    i += 1
            text = "".join(chars)
        else:
            start = i
            while i < n and value[i] not in ',;="':
                i += 1
            text = value[start:i]
        pairs.append((key.lower(), text))
        if i >= n:
            elements.append(XfccElement(tuple(pairs)))
            return elements
        sep = value[i]
        if sep == ",":
            elements.append(XfccElement(tuple(pairs)))
            pairs = []
        elif sep != ";":
            raise IdentityError("xfcc_malformed", f"x-forwarded-client-cert: unexpected {sep!r} at offset {i}")
        i += 1


def xfcc_values(metadata: Iterable[tuple[str, str | bytes]]) -> list[str]:
    """Every ``x-forwarded-client-cert`` entry of a call's metadata, in order."""
    out: list[str] = []
    for key, val in metadata:
        if key.lower() == XFCC_HEADER:
            out.append(val.decode("latin-1") if isinstance(val, bytes) else val)
    return out


def from_xfcc(values: Sequence[str], *, expected_by: str | None = None,
              trust_domains: Collection[str] | None = None) -> WorkloadIdentity:
    """The identity the ext_proc pod's sidecar verified, from its XFCC header value(s).

    Exactly one element is accepted. Under SANITIZE_SET the sidecar writes exactly one; under
    Istio's default APPEND_FORWARD a caller's own header comes first and the sidecar's element
    is appended, so more than one element means a forgery attempt and is refused.
    ``expected_by``: the sidecar's own SPIFFE ID, checked against the element's ``By``."""
    if not values:
        raise IdentityError("xfcc_missing", "no x-forwarded-client-cert: the call did not come through the sidecar "
                                            "over mesh mTLS")
    elements = parse_xfcc(",".join(values))
    if len(elements) != 1:
        raise IdentityError("xfcc_forwarded", f"x-forwarded-client-cert has {len(elements)} elements: the caller "
                                              "sent its own, only the sidecar's is trusted")
    element = elements[0]
    if expected_by is not None and element.values("by") != [expected_by]:
        raise IdentityError("xfcc_by_mismatch", f"x-forwarded-client-cert was not set by {expected_by}")
    if len(element.values("hash")) != 1:  # Envoy always writes Hash when it sets the element
        raise IdentityError("xfcc_malformed", "x-forwarded-client-cert element without exactly one Hash")
    return _one_uri([u for u in element.values("uri") if u], trust_domains)


def from_metadata(metadata: Iterable[tuple[str, str | bytes]], *, expected_by: str | None = None,
                  trust_domains: Collection[str] | None = None) -> WorkloadIdentity:
    """From a call's invocation metadata (``ServicerContext.invocation_metadata()``)."""
    return from_xfcc(xfcc_values(metadata), expected_by=expected_by, trust_domains=trust_domains)
