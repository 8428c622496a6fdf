"""Direct calls from the data plane to a provider: failover attempts and health checks.

The first attempt of every request goes through Envoy. Envoy's ext_proc cannot re-send a
request to another cluster, so when that attempt fails the processor calls the next backend
itself from here and answers Envoy with an ImmediateResponse.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

MAX_RESPONSE_BYTES = 32 << 20

# Hop-by-hop and length headers are recomputed by Envoy for an immediate response.
_DROP_RESPONSE_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}
)


def is_failure(status: int) -> bool:
    """Whether a provider's answer counts against it: the circuit breaker counts it, and the
    request moves on to the next backend. A 4xx other than 429 is the client's to see."""
    return status >= 500 or status == 429


@dataclass
class UpstreamResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    latency: float
    error: str | None = None  # set when no HTTP answer arrived (refused, timeout, reset)

    @property
    def failed(self) -> bool:
        return self.error is not None or is_failure(self.status)

    @property
    def content_type(self) -> str:
        for k, v in self.headers:
            if k == "content-type":
                return v
        return "application/json"


class UpstreamClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=30),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float
    ) -> UpstreamResult:
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                async with self._client().request(
                    method, url, headers=headers, data=body, allow_redirects=False
                ) as resp:
                    parts: list[bytes] = []
                    size = 0
                    async for chunk in resp.content.iter_any():
                        parts.append(chunk)
                        size += len(chunk)
                        if size > MAX_RESPONSE_BYTES:
                            return UpstreamResult(502, [], b"", time.monotonic() - start, error="response too large")
                    data = b"".join(parts)
                    kept = [(k.lower(), v) for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS]
                    return UpstreamResult(resp.status, kept, data, time.monotonic() - start)
        except TimeoutError:
            return UpstreamResult(504, [], b"", time.monotonic() - start, error="timeout")
        except aiohttp.ClientConnectorError:
            return UpstreamResult(503, [], b"", time.monotonic() - start, error="connect failure")
        except (aiohttp.ClientError, OSError) as exc:
            return UpstreamResult(502, [], b"", time.monotonic() - start, error=type(exc).__name__)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
