"""The dev stack's and the tests' mTLS between Envoy and the ext_proc, as files on disk.

One throwaway CA (extproc.dev.certs) issues the ext_proc's server certificate (the install's
SPIFFE ID ``spiffe://cluster.local/ns/holysheep-system/sa/holysheep-extproc`` plus
``localhost``/``127.0.0.1``, so a plain gRPC client can check it by address) and the workload
certificate Envoy presents, ``spiffe://cluster.local/ns/<namespace>/sa/<service-account>``:
the identity the ext_proc authorizes per config.

Envoy reads its certificate and its trusted CAs through file-based SDS, as istio-agent hands
them to a sidecar: each is an SDS file naming PEM files, and every change is written as new
PEM files followed by an atomic replace of the SDS file, which Envoy watches, so a rotation is
picked up without a restart and Envoy never sees half of one. The ext_proc's three files are
replaced atomically one by one; its poller skips a set whose key does not match its certificate
(extproc/tls.py) and takes the complete one a moment later.
"""

from __future__ import annotations

import json
from pathlib import Path

from extproc.dev.certs import DEFAULT_TRUST_DOMAIN, CertificateAuthority, Issued, spiffe_id, write_atomic
from extproc.dev.envoy_bootstrap import CA_SECRET, WORKLOAD_SECRET, UpstreamTLS
from extproc.spiffe import IdentityError, parse_spiffe_id
from extproc.tls import TLSFiles

__all__ = ["DEFAULT_WORKLOAD", "EXTPROC_ID", "DevPKI", "parse_workload"]

EXTPROC_ID = spiffe_id("holysheep-system", "holysheep-extproc")
DEFAULT_WORKLOAD = ("default", "default")
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def parse_workload(text: str) -> tuple[str, str]:
    """``NAMESPACE/SERVICE_ACCOUNT`` (Kubernetes name rules), or ValueError."""
    namespace, sep, service_account = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not NAMESPACE/SERVICE_ACCOUNT")
    try:
        parse_spiffe_id(spiffe_id(namespace, service_account))
    except IdentityError:
        raise ValueError(f"{text!r} is not NAMESPACE/SERVICE_ACCOUNT with Kubernetes names") from None
    return namespace, service_account


class DevPKI:
    """A CA, the ext_proc's server files and Envoy's SDS files, in ``directory``."""

    def __init__(self, directory: Path, workload: tuple[str, str] = DEFAULT_WORKLOAD,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority("holysheep dev CA", trust_domain)
        self.server_files = TLSFiles(str(self.dir / "extproc.crt"), str(self.dir / "extproc.key"),
                                     str(self.dir / "extproc-client-ca.crt"))
        self.certificate_sds = self.dir / "envoy-certificate.json"
        self.validation_sds = self.dir / "envoy-validation.json"
        self._generation = 0
        self.workload = workload
        self.trusted: tuple[CertificateAuthority, ...] = ()
        self.trust(self.ca)
        self.server = self.issue_server()
        self.envoy_cert = self.issue_workload()

    @property
    def workload_id(self) -> str:
        return spiffe_id(*self.workload, self.ca.trust_domain)

    def extproc_args(self) -> list[str]:
        """``holysheep-mesh extproc`` flags that serve mTLS with these files."""
        f = self.server_files
        return ["--tls-cert", f.cert, "--tls-key", f.key, "--client-ca", f.client_ca]

    def upstream_tls(self) -> UpstreamTLS:
        """What Envoy's ext_proc cluster needs (extproc.dev.envoy_bootstrap)."""
        return UpstreamTLS(str(self.certificate_sds), str(self.validation_sds), EXTPROC_ID)

    def _next(self, stem: str) -> Path:
        self._generation += 1
        return self.dir / f"{stem}-{self._generation}"

    def issue_server(self, ca: CertificateAuthority | None = None) -> Issued:
        """A new server certificate for the ext_proc (default: from the current CA)."""
        issued = (ca or self.ca).server(("localhost", "127.0.0.1"), uris=[EXTPROC_ID])
        issued.write(self.server_files.cert, self.server_files.key)
        self.server = issued
        return issued

    def issue_workload(self, ca: CertificateAuthority | None = None,
                       workload: tuple[str, str] | None = None) -> Issued:
        """A new certificate for Envoy to present (default: the current CA and workload)."""
        if workload is not None:
            self.workload = workload
        issued = (ca or self.ca).workload(*self.workload)
        base = self._next("envoy")
        cert, key = base.with_suffix(".crt"), base.with_suffix(".key")
        issued.write(str(cert), str(key))
        self._write_sds(self.certificate_sds, {"name": WORKLOAD_SECRET, "tls_certificate": {
            "certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}})
        self.envoy_cert = issued
        return issued

    def trust(self, *cas: CertificateAuthority) -> None:
        """Both sides trust exactly these CAs: the ext_proc for client certificates, Envoy for the
        ext_proc's (rotate a CA by trusting old and new, moving the certificates, dropping the old)."""
        bundle = b"".join(ca.cert_pem for ca in cas)
        write_atomic(self.server_files.client_ca, bundle)
        path = self._next("envoy-ca").with_suffix(".crt")
        write_atomic(str(path), bundle)
        self._write_sds(self.validation_sds, {"name": CA_SECRET, "validation_context": {
            "trusted_ca": {"filename": str(path)}}})
        self.trusted = cas

    @staticmethod
    def _write_sds(path: Path, secret: dict[str, object]) -> None:
        write_atomic(str(path), json.dumps({"resources": [{"@type": _SECRET_TYPE, **secret}]}).encode())
