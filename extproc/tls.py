"""gRPC server credentials for ``extproc --tls-cert FILE --tls-key FILE --client-ca FILE``.

TLS that *requires* a client certificate signed by the client CA (no certificate, or one from
another CA: the handshake fails, before any ext_proc message is read). The three files are
re-read when they change, without a restart:

- a poller reads them every ``poll_interval`` seconds off the event loop (``asyncio.to_thread``),
  validates them (PEM, the key matches the certificate) and stages a new gRPC certificate
  configuration; a bad or half-written set is logged and skipped, the last good one stays;
- gRPC calls our fetcher before every new handshake, on one of its own threads, not the event
  loop (checked: it runs off the loop thread); the fetcher does no I/O, it hands over what was
  staged, or None for "no change". Connections already open keep the certificate they
  were made with; every new one uses the new files.

Rotate a CA without failed requests by overlapping: put old and new CA in ``--client-ca`` (a
PEM bundle), move clients to the new one, then drop the old.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import threading
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from extproc.polling import Poller

log = logging.getLogger(__name__)


class TLSConfigError(Exception):
    """The TLS files are unusable. The message names the file, never its content."""


@dataclass(frozen=True)
class TLSFiles:
    cert: str       # PEM chain, leaf first
    key: str        # PEM private key of the leaf, unencrypted
    client_ca: str  # PEM bundle: client certificates must chain to one of these


@dataclass(frozen=True)
class TLSMaterial:
    """A validated set, as gRPC takes it, plus what the logs say about it."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes
    serial: int
    not_after: dt.datetime
    ca_count: int

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.private_key, self.cert_chain)], self.client_ca)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TLSConfigError(f"{path}: {exc.strerror}") from None


def validate(files: TLSFiles, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> TLSMaterial:
    """Parse and cross-check the three files' bytes; TLSConfigError says which one is wrong."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSConfigError(f"{files.cert}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # never chain the error: it may quote the key's bytes
        raise TLSConfigError(f"{files.key}: not an unencrypted PEM private key") from None
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise TLSConfigError(f"{files.client_ca}: not a PEM certificate bundle") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        # Also what a rotation caught between writing the certificate and the key looks like.
        raise TLSConfigError(f"{files.key} is not the key of {files.cert}")
    return TLSMaterial(cert_pem, key_pem, ca_pem, chain[0].serial_number, chain[0].not_valid_after_utc, len(cas))


def load(files: TLSFiles) -> TLSMaterial:
    return validate(files, _read(files.cert), _read(files.key), _read(files.client_ca))


class ReloadingServerCredentials:
    """Server credentials that follow the files. Construct (loads synchronously, raises
    TLSConfigError), pass ``server_credentials()`` to ``add_secure_port``, then ``start()``."""

    def __init__(self, files: TLSFiles, poll_interval: float = 1.0) -> None:
        self.files = files
        self._digest = b""
        self._problem = ""  # the last reload error, logged once
        self._lock = threading.Lock()  # the fetcher runs on a gRPC thread
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._poller = Poller(self.refresh, poll_interval, log, "TLS reload failed")
        material = self._load_changed()
        if material is None:  # pragma: no cover - the first load always changes the digest
            raise TLSConfigError("no TLS material")
        self._initial = material.configuration()
        self.generation = 1  # how many sets have been loaded; tests and logs follow it
        self._log(material, "loaded")

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch, require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: no I/O, no exceptions."""
        with self._lock:
            staged, self._pending = self._pending, None
        return staged

    def _load_changed(self) -> TLSMaterial | None:
        cert, key, ca = _read(self.files.cert), _read(self.files.key), _read(self.files.client_ca)
        digest = hashlib.sha256(b"\0".join((cert, key, ca))).digest()
        if digest == self._digest:
            return None
        self._digest = digest  # a bad set is reported once, not every poll
        return validate(self.files, cert, key, ca)

    def refresh_sync(self) -> bool:
        """Re-read the files; True when a new set was staged for the next handshake."""
        try:
            material = self._load_changed()
        except TLSConfigError as exc:
            if str(exc) != self._problem:
                log.warning("TLS files not reloaded, keeping the last good ones: %s", exc)
            self._problem = str(exc)
            return False
        if material is None:
            return False
        self._problem = ""
        configuration = material.configuration()
        with self._lock:
            self._pending = configuration
            self.generation += 1
        self._log(material, "reloaded")
        return True

    async def refresh(self) -> bool:
        return await asyncio.to_thread(self.refresh_sync)

    def _log(self, material: TLSMaterial, what: str) -> None:
        log.info("TLS %s: server certificate serial %x valid until %s, %d client CA certificate(s)",
                 what, material.serial, material.not_after.isoformat(), material.ca_count)
        if material.not_after <= dt.datetime.now(dt.UTC):
            log.warning("TLS server certificate %s has expired: clients will refuse it", self.files.cert)

    def start(self) -> None:
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()
