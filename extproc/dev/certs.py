"""A throwaway CA and SPIFFE certificates, shaped like the ones Istio issues, for the dev stack and tests.

Istio's workload certificates carry no subject and exactly one SAN, a URI
``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`` (critical, since the subject is
empty, RFC 5280 4.2.1.6), are valid for both client and server auth, and live for hours, not
years. These do the same, with ECDSA P-256 keys (fast to make, what Istio uses with
``ECC_SIGNATURE_ALGORITHM``). Nothing here is meant for production: the CA key lives in memory
and in the files it is written to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "cluster.local"
# Clock skew between the machine that makes a certificate and the one that checks it.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM."""

    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate

    def write(self, cert_path: str, key_path: str) -> None:
        """Write both files atomically (a reader never sees half a file); the key is 0600."""
        write_atomic(cert_path, self.cert_pem, 0o644)
        write_atomic(key_path, self.key_pem, 0o600)


def spiffe_id(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """A self-signed root that issues workload (SPIFFE) and server certificates."""

    def __init__(self, name: str = "holysheep dev CA", trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 lifetime: dt.timedelta = dt.timedelta(days=1)) -> None:
        self.trust_domain = trust_domain
        self._key = _new_key()
        now = dt.datetime.now(dt.UTC)
        # Istio's self-signed root names the trust domain as its organization.
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def workload(self, namespace: str, service_account: str, *,
                 lifetime: dt.timedelta = dt.timedelta(hours=1)) -> Issued:
        """A workload certificate as Istio issues it: empty subject, one URI SAN, client+server auth."""
        return self.issue(uris=[spiffe_id(namespace, service_account, self.trust_domain)], lifetime=lifetime)

    def server(self, hosts: Sequence[str] = ("localhost", "127.0.0.1"), *, uris: Sequence[str] = (),
               lifetime: dt.timedelta = dt.timedelta(hours=1)) -> Issued:
        """A server certificate for these DNS names / IP addresses (plus optional URI SANs)."""
        return self.issue(hosts=hosts, uris=uris, lifetime=lifetime)

    def issue(self, *, hosts: Sequence[str] = (), uris: Sequence[str] = (),
              lifetime: dt.timedelta = dt.timedelta(hours=1),
              not_before: dt.datetime | None = None) -> Issued:
        """A leaf with exactly these SANs; tests use it for malformed identities too."""
        key = _new_key()
        start = not_before if not_before is not None else dt.datetime.now(dt.UTC) - _BACKDATE
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + _BACKDATE + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), cert)


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` in one rename, as kubelet's ``..data`` swap does for a Secret volume."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
