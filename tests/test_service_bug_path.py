"""A bug in a phase costs its request a clean 500 and loses no count (extproc/service.py).

Driven over real gRPC against the product's servicer in this process, so that a fault can be
planted in the processor: the provider's successful answer is still counted once, and its
breaker still hears of the success, when our own handling of that answer fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from prometheus_client import REGISTRY

from extproc import metrics, processor
from extproc.identity import IdentityFrom
from extproc.server import DataPlane, ServerOptions
from extproc.service import ExternalProcessorService
from tests.extproc_stream import chat_messages, one_provider_config

CONFIG = one_provider_config("bug-path", breaker="{enabled: true, failureThreshold: 2, resetTimeout: 3600s}")
LABELS = {"provider": "bug-path-only", "model": "bug-path-model", "status": "200"}


def _answered() -> float:
    metrics.flush()  # the batched settles and counts first
    return REGISTRY.get_sample_value("holysheep_requests_total", LABELS) or 0.0


async def _exchange(port: int) -> list[pb.ProcessingResponse]:
    """The first three of Envoy's messages for one chat completion, each sent once the one before
    it is answered; then the client side closes (the stream then ends with no response body)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pbg.ExternalProcessorStub(channel).Process(timeout=10)
        answers = []
        for req in chat_messages("bug-path-model"):
            await call.write(req)
            answers.append(await call.read())
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        return answers


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[int, DataPlane]]:
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "api-key").write_text("sk-bug-path-0001")
    (tmp_path / "config.yaml").write_text(CONFIG)
    plane = DataPlane(ServerOptions(config_path=str(tmp_path / "config.yaml"), secrets_dir=str(tmp_path),
                                    identity_from=IdentityFrom.INSECURE))
    assert await plane.reload()
    server = grpc.aio.server()
    pbg.add_ExternalProcessorServicer_to_server(ExternalProcessorService(plane), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, plane
    finally:
        await server.stop(None)


def test_a_failure_handling_a_success_answers_500_and_still_counts_the_success(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_scenario(tmp_path, monkeypatch))


async def _scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with served(tmp_path) as (port, plane):
        assert plane.runtime is not None
        breaker = plane.runtime.providers["bug-path-only"].breaker
        before = _answered()

        # The control: a success passed on, counted once.
        answers = await _exchange(port)
        assert answers[2].HasField("response_headers")
        assert _answered() == before + 1

        # Our handling of the answer fails after the provider's success was taken in.
        class Broken:
            def __init__(self, *_: object) -> None:
                raise RuntimeError("planted bug")

        monkeypatch.setattr(processor, "ResponseCopy", Broken)
        breaker.record_failure()  # one of the two that would open it; a success forgets it
        assert breaker.failures == 1
        answers = await _exchange(port)
        failed = answers[2].immediate_response
        assert failed.status.code == 500
        assert json.loads(failed.body)["error"]["code"] == "internal_error"
        assert _answered() == before + 2, "the provider's success is counted once, whatever we did with it"
        assert breaker.failures == 0, "the breaker heard of the provider's success"
