"""README claims about routing, metric values, reloads and the cache's entry limit, through a
real Envoy, each checked against an oracle the ext_proc does not keep: the providers' own
request logs, the usage the provider put in its answers (as the client received them), a
statistical bound that cannot flake, and what a client is served once every provider fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.dev.mock_provider import MockProvider
from extproc.dev.processes import wait_until
from tests import metrics_text as m
from tests.harness import Stack, running

pytestmark = pytest.mark.e2e

LIMIT = 4096  # cache.maxEntryBytes of the "values" document
PRICES = {"priced-model": (2.5, 10.0), "provider-side-model": (1.0, 4.0)}  # USD per million in/out

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: values, namespace: default}
spec:
  timeout: 2s
  maxRetries: 2
  circuitBreaker: {enabled: true, failureThreshold: 1000, resetTimeout: 60s}
  providers:
    - {name: heavy, baseUrl: "{heavy}", auth: {env: CL_HEAVY_KEY}}
    - {name: light, baseUrl: "{light}", auth: {env: CL_LIGHT_KEY}}
    - {name: never, baseUrl: "{never}", auth: {env: CL_NEVER_KEY}}
    - {name: fa, baseUrl: "{fa}", auth: {env: CL_FA_KEY}}
    - {name: fb, baseUrl: "{fb}", auth: {env: CL_FB_KEY}}
    - {name: priced, baseUrl: "{priced}", auth: {env: CL_PRICED_KEY}}
    - {name: rw, baseUrl: "{rw}", auth: {env: CL_RW_KEY}}
    - {name: sz, baseUrl: "{sz}", auth: {env: CL_SZ_KEY}}
    - {name: kp, baseUrl: "{kp}", auth: {env: CL_KP_KEY}}
  routes:
    - models: [weighted-model]
      backends:
        - {provider: heavy, weight: 3}
        - {provider: light, weight: 1}
        - {provider: never, priority: 1, weight: 1000000}
    - {models: [fo-model], backends: [{provider: fa}, {provider: fb, priority: 1}]}
    - {models: [priced-model], backends: [{provider: priced}]}
    - {models: ["gpt-*"], backends: [{provider: rw, model: provider-side-model}]}
    - {models: [sz-model], backends: [{provider: sz}]}
    - {models: [keep-model], backends: [{provider: kp}]}
ALIAS
  pricing:
    - {model: priced-model, inputPerMillion: 2.5, outputPerMillion: 10}
    - {model: provider-side-model, inputPerMillion: 1, outputPerMillion: 4}
  cache: {mode: Fallback, maxEntryBytes: 4096}
---
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: carry, namespace: default}
spec:
  timeout: 2s
  circuitBreaker: {enabled: true, failureThreshold: 2, resetTimeout: 60s}
  providers:
    - {name: ca, baseUrl: "{ca}", auth: {env: CL_CA_KEY}}
    - {name: cb, baseUrl: "{cb}", auth: {env: CL_CB_KEY}}
  routes:
    - {models: [carry-model], backends: [{provider: ca}, {provider: cb, priority: 1}]}
  cache: {mode: "Off"}
"""
# An unrelated change: one more model alias in the "values" document.
ALIAS = "    - {models: [alias-model], backends: [{provider: kp}]}\n"
NAMES = ("heavy", "light", "never", "fa", "fb", "priced", "rw", "sz", "kp", "ca", "cb")
KEYS = {n: f"sk-claims-{n}-{i:04d}" for i, n in enumerate(NAMES)}
REPLY = "one two three four five six seven"  # 7 words: the mock's completion_tokens


def config(alias: bool = False) -> str:
    return TEMPLATE.replace("ALIAS\n", ALIAS if alias else "")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    mocks = {n: MockProvider(n, expect_key=k, reply=REPLY if n in ("priced", "rw") else None) for n, k in KEYS.items()}
    with running(Stack(config(), mocks, env={f"CL_{n.upper()}_KEY": k for n, k in KEYS.items()})) as s:
        yield s


def _api(mock: MockProvider) -> list[Any]:
    return [r for r in mock.requests if r.path.endswith("/chat/completions")]


def _metrics(stack: Stack) -> str:
    return stack.extproc.metrics()


# --- routing ------------------------------------------------------------------------------------

def test_weighted_order_within_a_priority(stack: Stack) -> None:
    """weight 3 vs 1 at priority 0: the first choice is the heavy backend with probability 3/4.

    N = 800, counted from the two providers' own logs. Under the claim the heavy count is
    Binomial(800, 0.75): mean 600, sd 12.2. The bounds [500, 700] are 8.2 sd away (a false
    failure has probability below 1e-15); weights ignored (mean 400, sd 14.1) or inverted
    (mean 200) fall outside them just as surely. Priority beats any weight: `never` gets none.
    """
    heavy, light, never = (stack.mocks[n] for n in ("heavy", "light", "never"))
    before = len(_api(heavy)), len(_api(light)), len(_api(never))
    n = 800
    for i in range(n):
        resp = stack.chat("weighted-model", content=f"w{i}")
        assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] in ("heavy", "light")
    got_heavy = len(_api(heavy)) - before[0]
    got_light = len(_api(light)) - before[1]
    assert got_heavy + got_light == n
    assert 500 <= got_heavy <= 700, (got_heavy, got_light)
    assert len(_api(never)) == before[2]


# --- metric values --------------------------------------------------------------------------------

def test_failovers_total_counts_each_failover(stack: Stack) -> None:
    fa, fb = stack.mocks["fa"], stack.mocks["fb"]
    series = {"from_provider": "fa", "to_provider": "fb"}
    before = m.value(_metrics(stack), "holysheep_failovers_total", **series)
    fa_before, fb_before = len(_api(fa)), len(_api(fb))
    fa.mode = "500"
    try:
        k = 7
        for i in range(k):
            resp = stack.chat("fo-model", content=f"fo{i}")
            assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] == "fb"
    finally:
        fa.mode = "ok"
    # The providers' logs: each of the k requests failed at fa, then fb answered it.
    assert [r.status for r in _api(fa)[fa_before:]] == [500] * k
    assert [r.status for r in _api(fb)[fb_before:]] == [200] * k
    text = _metrics(stack)
    assert m.value(text, "holysheep_failovers_total", **series) - before == k
    assert m.value(text, "holysheep_failovers_total", from_provider="fb") == 0


def _sse_usages(body: bytes) -> list[dict[str, int]]:
    """The usage objects of a stream's data events, in order (the client's copy of the answer)."""
    out = []
    for event in body.split(b"\n\n"):
        data = event.partition(b"data: ")[2]
        if data and data != b"[DONE]":
            usage = json.loads(data).get("usage")
            if usage:
                out.append(usage)
    return out


def _expected_cost(model: str, tokens_in: int, tokens_out: int) -> float:
    price_in, price_out = PRICES[model]
    return (tokens_in * price_in + tokens_out * price_out) / 1e6


def test_tokens_and_cost_from_the_usage_the_provider_returned(stack: Stack) -> None:
    labels = {"provider": "priced", "model": "priced-model"}
    text = _metrics(stack)
    before = (m.value(text, "holysheep_tokens_total", type="input", **labels),
              m.value(text, "holysheep_tokens_total", type="output", **labels),
              m.value(text, "holysheep_cost_usd_total", **labels))
    tokens_in = tokens_out = 0
    # A JSON answer, a stream whose usage rides on its finish chunk, and one (include_usage)
    # whose usage is only in its last event, after the finish chunk.
    variants: list[dict[str, Any]] = [{}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}]
    for i, extra in enumerate(variants):
        body = {"model": "priced-model", "messages": [{"role": "user", "content": "p" * (40 + 13 * i)}], **extra}
        resp = stack.client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text[:200]
        if extra:
            usages = _sse_usages(resp.content)
            assert len(usages) == 1
            if "stream_options" in extra:
                last = [e for e in resp.content.split(b"\n\n") if e.startswith(b"data: {")][-1]
                assert b'"usage"' in last and b'"choices": []' in last  # only the last event has it
            usage = usages[0]
        else:
            usage = resp.json()["usage"]
        tokens_in += usage["prompt_tokens"]
        tokens_out += usage["completion_tokens"]
    assert tokens_out == 3 * len(REPLY.split())
    wait_until(lambda: m.value(_metrics(stack), "holysheep_tokens_total", type="output", **labels)
               >= before[1] + tokens_out, timeout=5, what="usage counted")
    text = _metrics(stack)
    assert m.value(text, "holysheep_tokens_total", type="input", **labels) - before[0] == tokens_in
    assert m.value(text, "holysheep_tokens_total", type="output", **labels) - before[1] == tokens_out
    cost = m.value(text, "holysheep_cost_usd_total", **labels) - before[2]
    assert cost == pytest.approx(_expected_cost("priced-model", tokens_in, tokens_out), rel=1e-9, abs=1e-15)


def test_model_label_is_the_rewritten_model(stack: Stack) -> None:
    rw = stack.mocks["rw"]
    seen_before = len(_api(rw))
    resp = stack.chat("gpt-4o-mini", content="r" * 64)
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    assert [r.model for r in _api(rw)[seen_before:]] == ["provider-side-model"]  # what the provider got
    wait_until(lambda: m.value(_metrics(stack), "holysheep_tokens_total", provider="rw") > 0, timeout=5,
               what="usage counted")
    text = _metrics(stack)
    labels = {"provider": "rw", "model": "provider-side-model"}
    assert m.value(text, "holysheep_requests_total", status="200", **labels) == 1
    assert m.value(text, "holysheep_tokens_total", type="input", **labels) == usage["prompt_tokens"]
    assert m.value(text, "holysheep_tokens_total", type="output", **labels) == usage["completion_tokens"]
    assert m.value(text, "holysheep_cost_usd_total", **labels) == pytest.approx(
        _expected_cost("provider-side-model", usage["prompt_tokens"], usage["completion_tokens"]), rel=1e-9)
    for name in ("holysheep_requests_total", "holysheep_tokens_total", "holysheep_cost_usd_total"):
        assert "gpt-4o-mini" not in m.label_values(text, name, "model"), name


def test_client_errors_total_by_type(stack: Stack) -> None:
    sends = {"invalid_json": (b"{not json", 3), "model_not_found": (b'{"model": "no-such"}', 2),
             "model_required": (b'{"messages": []}', 1)}
    before = {t: m.value(_metrics(stack), "holysheep_client_errors_total", type=t) for t in sends}
    for kind, (body, times) in sends.items():
        for _ in range(times):
            resp = stack.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert resp.json()["error"]["code"] == kind  # what the client was told
    text = _metrics(stack)
    for kind, (_, times) in sends.items():
        assert m.value(text, "holysheep_client_errors_total", type=kind) - before[kind] == times, kind


# --- reloads --------------------------------------------------------------------------------------

INVALID = "apiVersion: holysheep.ai/v1\nkind: HolySheepConfig\nmetadata: {name: x}\nspec: {timeout: soon}\n"


def _reloads(stack: Stack) -> tuple[float, float]:
    text = _metrics(stack)
    return (m.value(text, "holysheep_config_reloads_total", result="ok"),
            m.value(text, "holysheep_config_reloads_total", result="invalid"))


def _alias_served(stack: Stack) -> bool:
    return stack.chat("alias-model").status_code == 200


def test_config_reloads_total_by_result(stack: Stack) -> None:
    ok, invalid = _reloads(stack)
    try:
        stack.write_config(config(alias=True))
        wait_until(lambda: _alias_served(stack), timeout=10, what="the new config served")
        assert _reloads(stack) == (ok + 1, invalid)
        rejected = stack.logs().count("config rejected")
        stack.write_config(INVALID)
        wait_until(lambda: stack.logs().count("config rejected") > rejected, timeout=10,
                   what="the bad config rejected")
        assert _alias_served(stack), "the last good config stays"
        assert _reloads(stack) == (ok + 1, invalid + 1)
    finally:
        stack.write_config()
        wait_until(lambda: not _alias_served(stack), timeout=10, what="restored")
    assert _reloads(stack) == (ok + 2, invalid + 1)


def test_open_circuit_and_cached_answer_survive_an_unrelated_reload(stack: Stack) -> None:
    ca, cb, kp = stack.mocks["ca"], stack.mocks["cb"], stack.mocks["kp"]
    remembered = stack.chat("keep-model", content="remember me across a reload")
    assert remembered.status_code == 200
    stores = m.value(_metrics(stack), "holysheep_cache_events_total", event="store")
    ca.mode = "500"
    try:
        for i in range(6):
            assert stack.chat("carry-model", content=f"c{i}").headers["x-holysheep-provider"] == "cb"
        opened = len(_api(ca))
        assert [r.status for r in _api(ca)] == [500, 500]  # failureThreshold 2, then open
        stack.write_config(config(alias=True))  # the "values" document changes; "carry" does not
        wait_until(lambda: _alias_served(stack), timeout=10, what="the new config served")
        for i in range(6):
            assert stack.chat("carry-model", content=f"d{i}").headers["x-holysheep-provider"] == "cb"
        assert len(_api(ca)) == opened, "the reload forgot the open circuit"
        assert stores >= 1
        kp.mode = "500"
        again = stack.chat("keep-model", content="remember me across a reload")
        assert again.status_code == 200, again.text[:200]
        assert again.headers["x-holysheep-cache"] == "fallback"
        assert again.json() == remembered.json()
    finally:
        ca.mode = kp.mode = cb.mode = "ok"
        stack.write_config()
        wait_until(lambda: not _alias_served(stack), timeout=10, what="restored")


# --- the cache's entry limit ------------------------------------------------------------------------

def _chat_sz(stack: Stack, reply_len: int, content: str, stream: bool = False) -> bytes:
    stack.mocks["sz"].reply = "a" * reply_len  # one word: completion_tokens stays 1
    resp = stack.chat("sz-model", content=content, stream=stream)
    assert resp.status_code == 200 and "x-holysheep-cache" not in resp.headers
    return resp.content


def test_an_answer_larger_than_max_entry_bytes_is_not_cached(stack: Stack) -> None:
    sz = stack.mocks["sz"]
    try:
        # Same-length prompts and one-word replies: the answer's length moves with the reply's only.
        probe = len(_chat_sz(stack, 10, "probe"))
        fits = _chat_sz(stack, 10 + LIMIT - probe, "fitss")
        before = m.value(_metrics(stack), "holysheep_tokens_total", provider="sz", type="output")
        too_big = _chat_sz(stack, 10 + LIMIT - probe + 1, "toobg")
        assert (len(fits), len(too_big)) == (LIMIT, LIMIT + 1)
        huge = _chat_sz(stack, 64 << 10, "hugee")  # past the cache's limit and any tail a copy keeps
        assert len(huge) > 64 << 10
        # Not cached, but still charged: usage (and so token and cost budgets) never depends on
        # the cache's entry limit.
        assert m.value(_metrics(stack), "holysheep_tokens_total", provider="sz", type="output") - before == 2
        stream_before = m.value(_metrics(stack), "holysheep_tokens_total", provider="sz", type="output")
        streamed = _chat_sz(stack, 2 * LIMIT, "strmm", stream=True)
        assert len(streamed) > LIMIT
        sz.mode = "500"
        hit = stack.chat("sz-model", content="fitss")
        assert hit.status_code == 200 and hit.headers["x-holysheep-cache"] == "fallback"
        assert hit.content == fits
        for content in ("toobg", "strmm"):
            miss = stack.chat("sz-model", content=content, stream=content == "strmm")
            assert miss.status_code == 503, (content, miss.status_code)
            assert miss.json()["error"]["code"] == "no_provider_available"
        # The stream past the limit was still counted, from its last events.
        assert m.value(_metrics(stack), "holysheep_tokens_total", provider="sz", type="output") - stream_before == 1
    finally:
        sz.mode = "ok"
        sz.reply = None
