"""Through Envoy: the answers' usage, cost and cache copies are settled in batches after the
answers (extproc/settlements.py), and nothing that reads them ever sees them late.

Each test reads right after the last answer, without waiting: a settle still in the batch
(up to settlements.DELAY later) would show here as a missing count, a cache miss, or a
request admitted past its budget."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import wait_until
from tests import metrics_text as m
from tests.budget_helpers import fresh_window
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

KEY = "sk-settle-one-4471"
TOKEN_LIMIT = 40


def _stack(mode: str = "Fallback", budgets: tuple[dict[str, Any], ...] = ()) -> Stack:
    """One provider behind a catch-all route, priced at $1,000 per million tokens each way."""
    spec: dict[str, Any] = {
        "circuitBreaker": {"enabled": False},
        "providers": [{"name": "one", "baseUrl": "{one}", "auth": {"env": "SETTLE_ONE_KEY"}}],
        "routes": [{"models": ["*"], "backends": [{"provider": "one"}]}],
        "cache": {"mode": mode},
        "pricing": [{"model": "*", "inputPerMillion": 1000, "outputPerMillion": 1000}],
    }
    if budgets:
        spec["budgets"] = list(budgets)
    config = {"apiVersion": "holysheep.ai/v1", "kind": "HolySheepConfig",
              "metadata": {"name": "settle", "namespace": "default"}, "spec": spec}
    return Stack(yaml.safe_dump(config, sort_keys=False), {"one": MockProvider("one", expect_key=KEY)},
                 env={"SETTLE_ONE_KEY": KEY})


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running(_stack()) as s:
        yield s


def test_a_scrape_right_after_the_answers_counts_every_one(stack: Stack) -> None:
    labels = {"provider": "one", "model": "settle-scrape"}
    before = stack.extproc.metrics()
    tokens_in = tokens_out = 0
    for i in range(12):
        resp = stack.chat("settle-scrape", content=f"question {i} " + "word " * i)
        assert resp.status_code == 200
        tokens_in += resp.json()["usage"]["prompt_tokens"]
        tokens_out += resp.json()["usage"]["completion_tokens"]
    text = stack.extproc.metrics()  # at once: the render runs the batch first

    def grown(name: str, **only: str) -> float:
        return m.value(text, name, **only) - m.value(before, name, **only)

    assert grown("holysheep_requests_total", status="200", **labels) == 12
    assert grown("holysheep_tokens_total", type="input", **labels) == tokens_in
    assert grown("holysheep_tokens_total", type="output", **labels) == tokens_out
    assert grown("holysheep_cost_usd_total", **labels) == pytest.approx((tokens_in + tokens_out) * 1000 / 1e6,
                                                                        rel=1e-9)
    assert grown("holysheep_upstream_request_duration_seconds_count", provider="one") == 12
    assert grown("holysheep_cache_events_total", event="store") == 12


def test_the_fallback_right_after_the_answer_serves_it(stack: Stack) -> None:
    """The provider fails on the very next request: its lookup runs the batch first, so the
    answer settled a moment ago is there to serve."""
    one = stack.mocks["one"]
    for i in range(5):
        first = stack.chat("settle-fallback", content=f"asked twice {i}")
        assert first.status_code == 200 and "x-holysheep-cache" not in first.headers
        one.mode = "500"
        try:
            again = stack.chat("settle-fallback", content=f"asked twice {i}")  # at once
        finally:
            one.mode = "ok"
        assert again.status_code == 200, f"repeat {i}: {again.text}"
        assert again.headers.get("x-holysheep-cache") == "fallback"
        assert again.json() == first.json()


def test_a_client_that_hangs_up_right_after_done_is_still_counted(stack: Stack) -> None:
    """The provider sends the usage and [DONE] but holds its body open; the client stops at
    [DONE] and hangs up, so Envoy resets the stream before the end of the body reaches the
    ext_proc. The answer is settled all the same, from what was read (and not cached, being
    partial). It used to go uncounted and unbudgeted: a way around a token budget."""
    one = stack.mocks["one"]
    labels = {"provider": "one", "model": "settle-hangup"}
    before = stack.extproc.metrics()
    one.mode = "linger-stream"
    try:
        body = {"model": "settle-hangup", "messages": [{"role": "user", "content": "stop at done"}],
                "stream": True, "stream_options": {"include_usage": True}}
        usage = None
        with stack.new_client(label="hang-up client") as client, \
                client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[len("data: "):])["usage"] or usage
                if line == "data: [DONE]":
                    break  # the body is not over: leaving the block drops the connection
        assert usage is not None

        def grown(name: str, **only: str) -> float:
            return m.value(stack.extproc.metrics(), name, **labels, **only) - m.value(before, name, **labels, **only)

        wait_until(lambda: grown("holysheep_tokens_total", type="output") == usage["completion_tokens"],
                   timeout=5, what="the hung-up stream's usage counted")
        assert grown("holysheep_tokens_total", type="input") == usage["prompt_tokens"]
        text = stack.extproc.metrics()
        assert m.value(text, "holysheep_cache_events_total", event="store") == \
            m.value(before, "holysheep_cache_events_total", event="store")  # a partial answer is not kept
    finally:
        one.mode = "ok"


def test_in_always_mode_a_repeat_right_after_the_first_answer_is_a_hit() -> None:
    with running(_stack("Always")) as s:
        one = s.mocks["one"]
        for i in range(5):
            first = s.chat("settle-repeat", content=f"asked twice {i}")
            assert first.status_code == 200 and "x-holysheep-cache" not in first.headers
            calls = one.count("/chat/completions")
            again = s.chat("settle-repeat", content=f"asked twice {i}")  # at once
            assert again.headers.get("x-holysheep-cache") == "hit", f"repeat {i} missed the cache"
            assert again.json() == first.json()
            assert one.count("/chat/completions") == calls


def test_a_budgeted_route_is_charged_before_the_next_request_is_admitted() -> None:
    """The answer that crosses the token limit completes, and the very next request is refused."""
    budget = {"name": "settle-tokens", "namespaces": ["default"], "window": "1h", "tokens": TOKEN_LIMIT}
    with running(_stack(budgets=(budget,))) as s:
        fresh_window(3600)  # the whole scenario in one window
        spent = answered = 0
        while spent < TOKEN_LIMIT:
            resp = s.chat("settle-budget", content=f"question {answered} with a few more words in it")
            assert resp.status_code == 200, f"refused after {spent} of {TOKEN_LIMIT} tokens: {resp.text}"
            assert resp.headers["x-ratelimit-remaining-tokens"] == str(max(0, TOKEN_LIMIT - spent))
            spent += resp.json()["usage"]["total_tokens"]
            answered += 1
        refused = s.chat("settle-budget", content="one more")  # no wait
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert answered >= 2
