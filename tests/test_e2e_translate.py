"""Issue 16 end to end: routes whose providers speak another API family, through a real Envoy.

The unmodified ``openai`` SDK against the validating Anthropic mock, and the unmodified
``anthropic`` SDK against the validating OpenAI mock (tests/upstreams), both through Envoy and our
ext_proc: the first attempt's request is rewritten in the request-body phase and its answer
translated chunk by chunk in the response-body phase; a failover attempt (the processor's own
call) is translated whole. The mocks refuse, and record, any request the real API would refuse
(``rejected`` stays empty), so a passing SDK call also proves the request was valid there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.dev.processes import wait_until
from tests.harness import Stack, running
from tests.upstreams.base import LoopbackProvider
from tests.upstreams.mock_anthropic import MockAnthropic
from tests.upstreams.mock_openai import MockOpenAI

pytestmark = pytest.mark.e2e

TEMPLATE = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: translate, namespace: default}
spec:
  timeout: 5s
  maxRetries: 2
  circuitBreaker: {enabled: true, failureThreshold: 1000, resetTimeout: 60s}
  providers:
    - {name: claude, baseUrl: "{claude}", api: Anthropic, maxTokens: 333,
       auth: {type: XApiKey, env: E2E_T_CLAUDE_KEY}}
    - {name: gpt, baseUrl: "{gpt}", auth: {env: E2E_T_GPT_KEY}}
    - {name: primary, baseUrl: "{primary}", auth: {env: E2E_T_PRIMARY_KEY}}
    - {name: fallback, baseUrl: "{fallback}", api: Anthropic, auth: {type: XApiKey, env: E2E_T_FALLBACK_KEY}}
    - {name: aprimary, baseUrl: "{aprimary}", api: Anthropic, auth: {type: XApiKey, env: E2E_T_APRIMARY_KEY}}
  routes:
    - {models: [claude-direct, cached-model], backends: [{provider: claude, model: claude-sonnet-test}]}
    - {models: [gpt-direct], backends: [{provider: gpt, model: gpt-test}]}
    - models: [fo-model]
      backends: [{provider: primary}, {provider: fallback, priority: 1, model: claude-fallback}]
    - models: [claude-fo]
      backends: [{provider: aprimary}, {provider: gpt, priority: 1, model: gpt-fallback}]
    - {models: [only-claude], backends: [{provider: claude}]}
    - {models: [mixed-model], backends: [{provider: claude}, {provider: gpt, priority: 1}]}
  cache: {mode: Fallback}
  pricing:
    - {model: claude-fallback, inputPerMillion: 3, outputPerMillion: 15}
    - {model: gpt-fallback, inputPerMillion: 2, outputPerMillion: 8}
---
# An Anthropic provider's health check: Anthropic refuses a request without anthropic-version.
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {name: translate-health, namespace: default}
spec:
  healthCheck: {interval: 200ms, endpoint: /models}
  providers:
    - {name: hc-claude, baseUrl: "{hc-claude}", api: Anthropic, anthropicVersion: "2023-01-01",
       auth: {type: XApiKey, env: E2E_T_HC_CLAUDE_KEY}}
  routes:
    - {models: [hc-model], backends: [{provider: hc-claude}]}
"""

WEATHER: Any = {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
ANT_WEATHER: Any = {"name": "weather", "description": "Weather in a city", "input_schema": WEATHER["function"][
    "parameters"]}


def _mocks() -> dict[str, LoopbackProvider]:
    return {
        "claude": MockAnthropic("claude", key="sk-ant-e2e-claude-0001", reply="hello from claude"),
        "gpt": MockOpenAI("gpt", key="sk-e2e-gpt-0002", reply="hello from gpt"),
        "primary": MockOpenAI("primary", key="sk-e2e-primary-0003", reply="hello from primary"),
        "fallback": MockAnthropic("fallback", key="sk-ant-e2e-fallback-0004", reply="hello from the fallback"),
        "aprimary": MockAnthropic("aprimary", key="sk-ant-e2e-aprimary-0005", reply="hello from aprimary"),
        "hc-claude": MockAnthropic("hc-claude", key="sk-ant-e2e-health-0006"),
    }


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    mocks = _mocks()
    env = {f"E2E_T_{name.upper().replace('-', '_')}_KEY": mock.key for name, mock in mocks.items()}
    # The Stack runs any mock with start_in_thread/stop_in_thread, port and prefix (LoopbackProvider has them).
    s = Stack(TEMPLATE, cast(Any, mocks), env=env, log_level="INFO")
    with running(s):
        yield s
    for mock in mocks.values():
        assert not mock.rejected, [(r.path, r.error) for r in mock.rejected]


def mock(stack: Stack, name: str) -> LoopbackProvider:
    return cast(LoopbackProvider, stack.mocks[name])


def oai(stack: Stack) -> openai.OpenAI:
    # The openai SDK still takes a (legacy) httpx client: the leak guard sees every answer it reads.
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client-not-a-provider-key", max_retries=0,
                         http_client=cast(Any, stack.recording_client("openai sdk")))


def ant(stack: Stack) -> anthropic.Anthropic:
    # The anthropic SDK brings its own HTTP client (httpx2), which the leak guard cannot wrap: its
    # answers are scanned through the recording clients of the tests below, logs and /metrics.
    return anthropic.Anthropic(base_url=stack.url, api_key="sk-ant-client-not-a-provider-key", max_retries=0)


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def metric(stack: Stack, name: str, **labels: str) -> float:
    return value(stack.extproc.metrics(), name, **labels)


def tokens(stack: Stack, provider: str, model: str) -> tuple[float, float]:
    text = stack.extproc.metrics()
    return (value(text, "holysheep_tokens_total", provider=provider, model=model, type="input"),
            value(text, "holysheep_tokens_total", provider=provider, model=model, type="output"))


def counted(stack: Stack, provider: str, model: str, before: tuple[float, float], added: tuple[int, int]) -> None:
    """Usage is settled after the last chunk's ack: wait until the counters moved by ``added``."""
    want = (before[0] + added[0], before[1] + added[1])
    wait_until(lambda: tokens(stack, provider, model) == want, timeout=10,
               what=f"tokens of {provider}/{model} to reach {want} (now {tokens(stack, provider, model)})")


# --- the openai SDK against an Anthropic provider, first attempt through Envoy ---------------------


def test_openai_sdk_chat_against_anthropic(stack: Stack) -> None:
    claude = mock(stack, "claude")
    n = len(claude.requests)
    before = tokens(stack, "claude", "claude-sonnet-test")
    raw = oai(stack).chat.completions.with_raw_response.create(
        model="claude-direct", temperature=0.2, stop=["STOP"],
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    cc = raw.parse()
    assert raw.headers["x-holysheep-provider"] == "claude"
    assert raw.headers["content-type"] == "application/json"
    assert cc.object == "chat.completion" and cc.choices[0].message.content == "hello from claude"
    assert cc.choices[0].finish_reason == "stop"
    (rec,) = claude.requests[n:]
    assert rec.path == "/v1/messages" and rec.error is None
    assert rec.headers["x-api-key"] == claude.key and "authorization" not in rec.headers
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert rec.headers["accept-encoding"] == "identity"  # the translator reads the answer's bytes
    assert rec.body["model"] == "claude-sonnet-test" and rec.body["system"] == "be brief"
    assert rec.body["max_tokens"] == 333  # the provider's maxTokens: the client set none
    assert rec.body["stop_sequences"] == ["STOP"]
    assert rec.usage is not None and cc.usage is not None
    assert (cc.usage.prompt_tokens, cc.usage.completion_tokens) == (rec.usage["input_tokens"],
                                                                    rec.usage["output_tokens"])
    counted(stack, "claude", "claude-sonnet-test", before, (rec.usage["input_tokens"], rec.usage["output_tokens"]))


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_sdk_streaming_against_anthropic_chunk_by_chunk(stack: Stack, include_usage: bool) -> None:
    claude = mock(stack, "claude")
    claude.reply, claude.stream_gap = "one two three four five six", 0.15
    n = len(claude.requests)
    before = tokens(stack, "claude", "claude-sonnet-test")
    try:
        extra: Any = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = oai(stack).chat.completions.create(
            model="claude-direct", messages=[{"role": "user", "content": "count"}], stream=True, **extra)
        texts, arrivals, usage, finish = [], [], None, None
        for chunk in stream:
            arrivals.append(time.time())
            if chunk.choices:
                texts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
    finally:
        claude.reply, claude.stream_gap = "hello from claude", 0.0
    (rec,) = claude.requests[n:]
    assert rec.body["stream"] is True and rec.usage is not None
    assert "".join(texts) == "one two three four five six" and finish == "stop"
    # Translated as they arrived: the client read its first chunk before the provider wrote its last.
    assert len(rec.sent) > 6 and arrivals[0] < rec.sent[-1] - 0.5, (arrivals[0], rec.sent)
    if include_usage:
        assert usage is not None and usage.completion_tokens == rec.usage["output_tokens"]
    else:
        assert usage is None  # not asked for, not sent; still counted, from the provider's events:
    counted(stack, "claude", "claude-sonnet-test", before, (rec.usage["input_tokens"], rec.usage["output_tokens"]))


def test_a_large_json_answer_is_collected_across_chunks_and_translated_whole(stack: Stack) -> None:
    # Envoy hands a body this size over in many chunks; a JSON answer is translated with the last.
    claude = mock(stack, "claude")
    claude.reply = " ".join(f"w{i}" for i in range(60_000))
    try:
        cc = oai(stack).chat.completions.create(model="claude-direct", messages=[{"role": "user", "content": "long"}])
    finally:
        claude.reply = "hello from claude"
    assert cc.choices[0].message.content == " ".join(f"w{i}" for i in range(60_000))
    assert cc.usage is not None and cc.usage.completion_tokens == 60_000


def test_openai_sdk_tools_against_anthropic(stack: Stack) -> None:
    client, claude = oai(stack), mock(stack, "claude")
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    first = client.chat.completions.create(model="claude-direct", messages=messages, tools=[WEATHER],
                                           tool_choice="required")
    assert first.choices[0].finish_reason == "tool_calls"
    call = cast(Any, first.choices[0].message.tool_calls)[0]
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert claude.last.body["tool_choice"] == {"type": "any"}
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "22C"})
    second = client.chat.completions.create(model="claude-direct", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "hello from claude; tool said 22C"
    assert claude.last.body["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id,
                                                             "content": "22C"}
    # streamed: the tool call arrives as deltas the SDK's accumulator assembles
    with client.chat.completions.stream(model="claude-direct", messages=messages[:1], tools=[WEATHER],
                                        tool_choice="required") as events:
        final = events.get_final_completion()
    streamed = cast(Any, final.choices[0].message.tool_calls)[0]
    assert final.choices[0].finish_reason == "tool_calls" and streamed.function.name == "weather"
    assert json.loads(streamed.function.arguments) == {"city": "Paris", "days": 3}


# --- the anthropic SDK against an OpenAI-compatible provider ---------------------------------------


def test_anthropic_sdk_against_openai(stack: Stack) -> None:
    client, gpt = ant(stack), mock(stack, "gpt")
    n = len(gpt.requests)
    before = tokens(stack, "gpt", "gpt-test")
    raw = client.messages.with_raw_response.create(
        model="gpt-direct", max_tokens=64, system="be brief", messages=[{"role": "user", "content": "hello"}])
    msg = raw.parse()
    assert raw.headers["x-holysheep-provider"] == "gpt" and raw.headers["content-type"] == "application/json"
    assert msg.type == "message" and msg.content[0].type == "text" and msg.content[0].text == "hello from gpt"
    assert msg.stop_reason == "end_turn"
    (rec,) = gpt.requests[n:]
    assert rec.path == "/v1/chat/completions" and rec.error is None
    assert rec.headers["authorization"] == f"Bearer {gpt.key}" and "x-api-key" not in rec.headers
    assert rec.body["messages"][0] == {"role": "system", "content": "be brief"} and rec.body["max_tokens"] == 64
    assert rec.usage is not None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (rec.usage["prompt_tokens"],
                                                                 rec.usage["completion_tokens"])
    counted(stack, "gpt", "gpt-test", before, (rec.usage["prompt_tokens"], rec.usage["completion_tokens"]))

    # streaming, through the SDK's own event accumulator
    gpt.reply = "streamed from gpt in pieces"
    try:
        with client.messages.stream(model="gpt-direct", max_tokens=64,
                                    messages=[{"role": "user", "content": "stream"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    finally:
        gpt.reply = "hello from gpt"
    assert text == "streamed from gpt in pieces" and final.stop_reason == "end_turn"
    assert gpt.last.body["stream_options"] == {"include_usage": True}
    assert gpt.last.usage is not None and final.usage.output_tokens == gpt.last.usage["completion_tokens"]


def test_anthropic_sdk_tools_and_a_failed_tool_against_openai(stack: Stack) -> None:
    client, gpt = ant(stack), mock(stack, "gpt")
    first = client.messages.create(model="gpt-direct", max_tokens=64, tools=[ANT_WEATHER],
                                   tool_choice={"type": "any"},
                                   messages=[{"role": "user", "content": "weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert use.name == "weather" and use.input == {"city": "Paris", "days": 3}
    # An agent SDK marks a failed tool with is_error: kept as text the model can read, not refused.
    conversation: list[Any] = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "service down",
                                      "is_error": True}]}]
    second = client.messages.create(model="gpt-direct", max_tokens=64, tools=[ANT_WEATHER], messages=conversation)
    assert second.content[0].type == "text"
    assert second.content[0].text == "hello from gpt; tool said Error: service down"
    assert gpt.last.body["messages"][-1] == {"role": "tool", "tool_call_id": use.id, "content": "Error: service down"}


# --- failover across API families within one request ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_failover_from_failing_openai_primary_to_anthropic_secondary(stack: Stack, stream: bool) -> None:
    primary, fallback = mock(stack, "primary"), mock(stack, "fallback")
    primary.fail(500, "server_error", "primary is down")
    n_primary, n_fallback = len(primary.requests), len(fallback.requests)
    before = tokens(stack, "fallback", "claude-fallback")
    cost = metric(stack, "holysheep_cost_usd_total", provider="fallback", model="claude-fallback")
    body: dict[str, Any] = {"model": "fo-model", "messages": [{"role": "user", "content": f"fail over {stream}"}]}
    client = oai(stack)
    if stream:
        with client.chat.completions.with_streaming_response.create(**body, stream=True,
                                                                    stream_options={"include_usage": True}) as raw:
            headers = raw.headers
            chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert headers["content-type"].startswith("text/event-stream")
    else:
        resp = client.chat.completions.with_raw_response.create(**body)
        headers, cc = resp.headers, resp.parse()
        text, usage = cc.choices[0].message.content or "", cc.usage
        assert cc.object == "chat.completion" and headers["content-type"] == "application/json"
    assert headers["x-holysheep-provider"] == "fallback"
    assert text == "hello from the fallback"
    assert len(primary.requests) == n_primary + 1 and primary.last.status == 500
    (rec,) = fallback.requests[n_fallback:]
    assert rec.body["model"] == "claude-fallback" and rec.body.get("stream", False) is stream
    assert rec.usage is not None and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (rec.usage["input_tokens"], rec.usage["output_tokens"])
    # Usage and cost: what the secondary reported, priced as the secondary's model.
    counted(stack, "fallback", "claude-fallback", before, (rec.usage["input_tokens"], rec.usage["output_tokens"]))
    want = (rec.usage["input_tokens"] * 3 + rec.usage["output_tokens"] * 15) / 1e6
    assert metric(stack, "holysheep_cost_usd_total", provider="fallback", model="claude-fallback") == \
        pytest.approx(cost + want)
    assert metric(stack, "holysheep_failovers_total", from_provider="primary", to_provider="fallback") >= 1


def test_anthropic_sdk_fails_over_from_anthropic_to_an_openai_provider(stack: Stack) -> None:
    aprimary, gpt = mock(stack, "aprimary"), mock(stack, "gpt")
    aprimary.fail(529, "overloaded_error", "Overloaded")
    n = len(gpt.requests)
    before = tokens(stack, "gpt", "gpt-fallback")
    raw = ant(stack).messages.with_raw_response.create(model="claude-fo", max_tokens=50,
                                                       messages=[{"role": "user", "content": "are you there?"}])
    msg = raw.parse()
    assert raw.headers["x-holysheep-provider"] == "gpt"
    assert msg.content[0].type == "text" and msg.content[0].text == "hello from gpt"
    (rec,) = gpt.requests[n:]
    assert rec.body["model"] == "gpt-fallback" and rec.usage is not None
    counted(stack, "gpt", "gpt-fallback", before, (rec.usage["prompt_tokens"], rec.usage["completion_tokens"]))


# --- the cache keeps the client's format -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_cache_fallback_answers_in_the_clients_format(stack: Stack, stream: bool) -> None:
    claude = mock(stack, "claude")
    body: dict[str, Any] = {"model": "cached-model", "messages": [{"role": "user", "content": f"cache me {stream}"}]}
    if stream:
        body["stream"] = True
    stores = metric(stack, "holysheep_cache_events_total", event="store")
    client = stack.recording_client("cache client")
    first = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200 and first.headers["x-holysheep-provider"] == "claude"
    # The translated answer is stored after the last chunk's ack.
    wait_until(lambda: metric(stack, "holysheep_cache_events_total", event="store") > stores, timeout=10,
               what="the translated answer stored in the cache")
    claude.fail(500, "api_error", "claude is down")
    again = client.post("/v1/chat/completions", json=body)
    assert again.status_code == 200 and again.headers["x-holysheep-cache"] == "fallback"
    assert again.content == first.content  # what the client got the first time: OpenAI's format
    if stream:
        assert again.headers["content-type"].startswith("text/event-stream")
        events = [line for line in again.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
    else:
        assert again.json()["object"] == "chat.completion"
        assert again.json()["choices"][0]["message"]["content"] == "hello from claude"


# --- what cannot be translated -------------------------------------------------------------------


def test_untranslatable_field_is_a_400_naming_it_and_no_provider_sees_the_request(stack: Stack) -> None:
    claude, gpt = mock(stack, "claude"), mock(stack, "gpt")
    n_claude, n_gpt = len(claude.requests), len(gpt.requests)
    client = stack.recording_client("untranslatable client")
    resp = stack.chat("only-claude", n=2)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "n" and err["code"] == "unsupported_parameter" and "'n'" in err["message"]
    resp = client.post("/v1/embeddings", json={"model": "only-claude", "input": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_endpoint"
    resp = client.post("/v1/messages", json={"model": "gpt-direct", "max_tokens": 10,
                                             "thinking": {"type": "enabled", "budget_tokens": 1024},
                                             "messages": [{"role": "user", "content": "think"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "thinking"
    assert len(claude.requests) == n_claude and len(gpt.requests) == n_gpt
    # A backend that can serve it still does: the one that cannot is skipped, not tried.
    resp = stack.chat("mixed-model", n=2)
    assert resp.status_code == 200 and resp.headers["x-holysheep-provider"] == "gpt"
    assert len(claude.requests) == n_claude and gpt.last.body["n"] == 2


def test_anthropic_sdk_sees_a_translated_provider_error(stack: Stack) -> None:
    gpt = mock(stack, "gpt")
    gpt.fail(400, "invalid_request_error", "context too long")
    with pytest.raises(anthropic.BadRequestError) as err:
        ant(stack).messages.create(model="gpt-direct", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 400
    assert err.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                          "message": "context too long"}}


def test_openai_sdk_sees_a_translated_provider_error(stack: Stack) -> None:
    claude = mock(stack, "claude")
    claude.fail(404, "not_found_error", "model: claude-sonnet-test")
    with pytest.raises(openai.NotFoundError) as err:
        oai(stack).chat.completions.create(model="claude-direct", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert cast(dict[str, Any], err.value.body)["message"] == "model: claude-sonnet-test"


def test_an_anthropic_providers_health_check_sends_its_version(stack: Stack) -> None:
    hc = mock(stack, "hc-claude")
    wait_until(lambda: any(r.path == "/v1/models" for r in hc.requests), timeout=10, what="a health check")
    checks = [r for r in hc.requests if r.path == "/v1/models"]
    assert all(r.status == 200 and r.headers["anthropic-version"] == "2023-01-01" for r in checks), checks
    assert metric(stack, "holysheep_provider_healthy", provider="hc-claude") == 1


def test_no_provider_key_reaches_a_client_or_a_log(stack: Stack) -> None:
    stack.check_leaks()
    for name in ("claude", "fallback", "aprimary", "hc-claude"):
        assert all("authorization" not in r.headers for r in mock(stack, name).requests)
