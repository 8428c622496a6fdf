"""Active health checks: GET {baseUrl}{healthCheck.endpoint} with the provider's credential."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from extproc import wakeups
from extproc.auth import auth_header_dict
from extproc.runtime import Provider, Runtime
from extproc.upstream import UpstreamClient

log = logging.getLogger(__name__)


class HealthChecker:
    def __init__(self, upstream: UpstreamClient) -> None:
        self.upstream = upstream
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, runtime: Runtime) -> None:
        """(Re)start one loop per provider whose config asks for health checks."""
        self.cancel()
        loop = asyncio.get_running_loop()
        for provider in runtime.providers.values():
            if provider.config.health_check is None:
                provider.breaker.set_healthy(True)
                continue
            self._tasks.append(loop.create_task(self._run(runtime, provider)))

    async def check_once(self, runtime: Runtime, provider: Provider) -> bool:
        hc = provider.config.health_check
        assert hc is not None
        headers: dict[str, str] = {"accept": "application/json"}
        headers.update(auth_header_dict(provider.spec.auth, runtime.credentials.get(provider.spec.auth)))
        if provider.spec.api == "Anthropic":  # Anthropic's API answers 400 to a request without it
            headers["anthropic-version"] = provider.spec.anthropic_version
        url = provider.spec.base_url.rstrip("/") + hc.endpoint
        timeout = min(hc.interval, provider.timeout)
        result = await self.upstream.request("GET", url, headers, None, timeout)
        healthy = result.error is None and 200 <= result.status < 300
        if healthy != provider.breaker.healthy:
            log.warning(
                "provider health changed",
                extra={"provider": provider.name, "healthy": healthy, "status": result.status, "error": result.error},
            )
        provider.breaker.set_healthy(healthy)
        return healthy

    async def _run(self, runtime: Runtime, provider: Provider) -> None:
        hc = provider.config.health_check
        assert hc is not None
        while True:
            try:
                await self.check_once(runtime, provider)
            except Exception:
                log.exception("health check failed to run")
            await wakeups.sleep(hc.interval)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
