"""extproc/wakeups.py: delays waited for off the event loop.

The unit tests hold it to the loop's own semantics (the delay, the order, the loop's thread,
cancellation, a closed loop). The last test is the reason for the module: a serving data plane
(the real DataPlane.run, over real gRPC) with its file pollers running and a batch of settles
and counts pending has no timer on its loop, so the loop waits without a timeout."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from prometheus_client import REGISTRY

from extproc import metrics, settlements, wakeups
from extproc.identity import IdentityFrom
from extproc.server import DataPlane, ServerOptions
from tests.extproc_stream import chat_messages, one_provider_config


def test_callbacks_run_on_the_loop_thread_after_their_delay_in_deadline_order() -> None:
    async def main() -> list[tuple[str, float, bool]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        ran: list[tuple[str, float, bool]] = []
        done = loop.create_future()

        def record(name: str) -> None:
            ran.append((name, loop.time() - start, threading.current_thread() is threading.main_thread()))
            if len(ran) == 3:
                done.set_result(None)

        wakeups.call_later(0.06, lambda: record("third"))
        wakeups.call_later(0.02, lambda: record("first"))
        wakeups.call_later(0.04, lambda: record("second"))
        await asyncio.wait_for(done, 2)
        return ran

    ran = asyncio.run(main())
    assert [name for name, _, _ in ran] == ["first", "second", "third"]
    for (_, at, on_loop_thread), delay in zip(ran, (0.02, 0.04, 0.06), strict=True):
        assert at >= delay and on_loop_thread


def test_a_cancelled_wakeup_never_runs_even_once_handed_to_the_loop() -> None:
    async def main() -> list[str]:
        ran: list[str] = []
        kept = asyncio.get_running_loop().create_future()
        wakeups.call_later(0.01, lambda: ran.append("cancelled early")).cancel()
        late = wakeups.call_later(0, lambda: ran.append("cancelled late"))
        time.sleep(0.2)  # the loop is busy: the helper thread has handed that one over by now
        late.cancel()
        wakeups.call_later(0.03, lambda: (ran.append("kept"), kept.set_result(None)))
        await asyncio.wait_for(kept, 5)
        return ran

    assert asyncio.run(main()) == ["kept"]


def test_a_delay_past_what_threading_can_wait_leaves_the_thread_serving(caplog: pytest.LogCaptureFixture) -> None:
    """A config's health-check interval has no upper bound; threading refuses waits past
    TIMEOUT_MAX, which once ended the helper thread and every later delay with it."""
    caplog.set_level(logging.ERROR, logger="extproc.wakeups")

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        forever = loop.create_task(wakeups.sleep(threading.TIMEOUT_MAX * 10))
        await asyncio.sleep(0.05)  # the helper thread is waiting for it now
        await asyncio.wait_for(wakeups.sleep(0.01), 5)  # an earlier one still wakes
        forever.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forever
        return wakeups._clock._thread is not None and wakeups._clock._thread.is_alive()

    assert asyncio.run(main())
    assert caplog.records == [], "the long wait was waited for, not failed over and over"


def test_sleep_waits_its_delay_and_is_cancellable() -> None:
    async def main() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await wakeups.sleep(0.03)
        slept = loop.time() - start
        sleeper = loop.create_task(wakeups.sleep(3600))
        await asyncio.sleep(0)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        return slept, sleeper.cancelled()

    slept, cancelled = asyncio.run(main())
    assert slept >= 0.03 and cancelled


def test_a_wakeup_for_a_closed_loop_is_dropped_and_the_next_loop_still_gets_its_own() -> None:
    ran: list[str] = []

    async def leave_one_pending() -> None:
        wakeups.call_later(0.02, lambda: ran.append("closed loop"))

    asyncio.run(leave_one_pending())  # the loop closes before the delay is up
    time.sleep(0.05)  # the helper thread meets the closed loop here, and must survive it

    async def next_loop() -> None:
        done = asyncio.get_running_loop().create_future()
        wakeups.call_later(0.01, lambda: (ran.append("next loop"), done.set_result(None)))
        await asyncio.wait_for(done, 2)

    asyncio.run(next_loop())
    assert ran == ["next loop"]


def test_a_forked_child_gets_its_own_helper_thread() -> None:
    asyncio.run(wakeups.sleep(0.01))  # the parent's helper thread is running now
    pid = os.fork()
    if pid == 0:  # the child: its copy of the clock names a thread that does not exist here
        try:
            asyncio.run(asyncio.wait_for(wakeups.sleep(0.01), 2))
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONFIG = one_provider_config("wakeups")


def _scrape(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    response.read()
    return response.status


def _answered() -> float:
    metrics.flush()
    labels = {"provider": "wakeups-only", "model": "wakeups-model", "status": "200"}
    return REGISTRY.get_sample_value("holysheep_requests_total", labels) or 0.0


ANSWER = json.dumps({"id": "c1", "object": "chat.completion", "model": "wakeups-model",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()


async def _one_request(port: int) -> None:
    """Envoy's four messages of one chat completion answered by the provider."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pbg.ExternalProcessorStub(channel).Process(timeout=10)
        for req in chat_messages("wakeups-model", ANSWER):
            await call.write(req)
            await call.read()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF


def test_a_serving_data_plane_keeps_no_timer_on_its_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Long enough that the batch is surely still pending when the loop is looked at.
    monkeypatch.setattr(settlements, "DELAY", 2.0)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "api-key").write_text("sk-wakeups-0001")
    (tmp_path / "config.yaml").write_text(CONFIG)
    port = _free_port()
    plane = DataPlane(ServerOptions(
        config_path=str(tmp_path / "config.yaml"), secrets_dir=str(tmp_path), grpc_address=f"127.0.0.1:{port}",
        http_host="127.0.0.1", http_port=_free_port(), identity_from=IdentityFrom.INSECURE,
        reload_interval=0.05, drain_delay_seconds=0, drain_seconds=1))

    async def main() -> tuple[list[object], int, int, float, float, int]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        running = loop.create_task(plane.run(stop))
        deadline = loop.time() + 20
        while not plane.serving and loop.time() < deadline:
            await asyncio.sleep(0.01)
        before = _answered()

        def timers() -> list[object]:
            return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]

        await _one_request(port)
        pending = settlements.pending()  # the answer's settle and counts wait for their batch
        # The config watcher (every 50 ms here), the Secret and TLS pollers and that batch are
        # all waiting now, and not one of them on the loop's own timer heap.
        found = timers()
        # A scraper that keeps its connection open, as Prometheus does (from a thread: a client
        # on this loop would bring timers of its own). Its render runs the batch first.
        scraper = http.client.HTTPConnection("127.0.0.1", plane.options.http_port, timeout=10)
        scraped = await asyncio.to_thread(_scrape, scraper)
        await asyncio.sleep(0.05)
        found += timers()
        scraper.close()
        # The next request's batch is run by its wake-up alone: nothing reads in between.
        await _one_request(port)
        started = loop.time()
        while settlements.pending() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left, waited = settlements.pending(), loop.time() - started
        counted = _answered() - before
        stop.set()
        await running
        return found, pending, left, waited, counted, scraped

    found, pending, left, waited, counted, scraped = asyncio.run(main())
    assert scraped == 200
    assert pending > 0, "the request's settle was batched, so a delay was pending"
    assert found == []
    assert left == 0 and waited >= 1.5, "the wake-up ran the batch, on time and not before"
    assert counted == 2
