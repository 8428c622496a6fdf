"""Provider authentication schemes: how a credential becomes request headers."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from extproc.credentials import Credential
from protos.spec import AuthSpec

log = logging.getLogger(__name__)

# Any client-supplied credential is removed before a request leaves the mesh: apps hold no keys,
# and a key an app does hold must never reach a provider it did not mean to call. Header names
# are matched case-insensitively (Envoy lower-cases them; HTTP/2 requires lower case).
CLIENT_CREDENTIAL_HEADERS = (
    "authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization",
)


def auth_headers(auth: AuthSpec, credential: Credential) -> list[tuple[str, bytes]]:
    value = credential.reveal()
    if log.isEnabledFor(logging.DEBUG):  # names only, never the value
        log.debug("credential injected", extra={"auth_type": auth.type, "auth_header": auth.header_name})
    if auth.type == "Bearer":
        return [("authorization", f"Bearer {value}".encode())]
    return [(auth.header_name, value.encode())]


def auth_header_dict(auth: AuthSpec, credential: Credential | None) -> dict[str, str]:
    """The same headers for the data plane's own HTTP calls (failover, health checks)."""
    if credential is None:
        return {}
    return {k: v.decode() for k, v in auth_headers(auth, credential)}


def headers_to_remove(auth: AuthSpec, also: Iterable[str] = ()) -> list[str]:
    """Client credential headers to strip: the well-known ones, the provider's own and ``also``
    (the custom headers other configured providers use).

    Envoy applies an ext_proc header mutation's removals before its sets, so the injected
    credential survives; and when no credential could be read (a missing Secret) the client's
    own value of the provider's header is removed rather than passed on.
    """
    names = list(CLIENT_CREDENTIAL_HEADERS)
    for name in (auth.header_name, *also):
        if name and name not in names:
            names.append(name)
    return names
