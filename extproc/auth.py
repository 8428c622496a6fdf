"""Provider authentication schemes: how a credential becomes request headers."""

from __future__ import annotations

from extproc.credentials import Credential
from extproc.spec import AuthSpec

# Any client-supplied credential is removed before a request leaves the mesh: apps hold no keys,
# and a key an app does hold must never reach a provider it did not mean to call.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")


def auth_headers(auth: AuthSpec, credential: Credential) -> list[tuple[str, bytes]]:
    value = credential.reveal()
    if auth.type == "Bearer":
        return [("authorization", f"Bearer {value}".encode())]
    return [(auth.header_name, value.encode())]


def auth_header_dict(auth: AuthSpec, credential: Credential | None) -> dict[str, str]:
    """The same headers for the data plane's own HTTP calls (failover, health checks)."""
    if credential is None:
        return {}
    return {k: v.decode() for k, v in auth_headers(auth, credential)}


def headers_to_remove(auth: AuthSpec) -> list[str]:
    """Client credential headers to strip; the provider's own header is overwritten instead."""
    return [h for h in CLIENT_CREDENTIAL_HEADERS if h != auth.header_name]
