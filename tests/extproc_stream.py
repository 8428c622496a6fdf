"""What Envoy sends an ext_proc for one chat completion, for tests that drive the product's
servicer over real gRPC in this process (tests/test_service_bug_path.py, tests/test_wakeups.py)."""

from __future__ import annotations

import json

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb


def one_provider_config(name: str, cache_mode: str = "Fallback", breaker: str = "") -> str:
    """A HolySheepConfig named ``name``: provider ``{name}-only`` (Bearer from Secret ``only``,
    key ``api-key``, a host that cannot resolve) serving model ``{name}-model``."""
    spec_breaker = f"  circuitBreaker: {breaker}\n" if breaker else ""
    return (
        "apiVersion: holysheep.ai/v1\nkind: HolySheepConfig\n"
        f"metadata: {{name: {name}, namespace: default}}\nspec:\n{spec_breaker}"
        f"  providers:\n    - {{name: {name}-only, baseUrl: \"https://only.invalid/v1\","
        " auth: {type: Bearer, secretName: only, key: api-key}}\n"
        f"  routes:\n    - {{models: [{name}-model], backends: [{{provider: {name}-only}}]}}\n"
        f"  cache: {{mode: {cache_mode}}}\n"
    )


def headers(pairs: dict[str, str], end_of_stream: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]),
        end_of_stream=end_of_stream)


def chat_messages(model: str, answer: bytes | None = None) -> list[pb.ProcessingRequest]:
    """Request headers, the buffered body, a 200's headers and, given ``answer``, its body."""
    messages = [
        pb.ProcessingRequest(request_headers=headers(
            {":method": "POST", ":path": "/v1/chat/completions", ":authority": "only.invalid"})),
        pb.ProcessingRequest(request_body=pb.HttpBody(
            body=json.dumps({"model": model, "messages": []}).encode(), end_of_stream=True)),
        pb.ProcessingRequest(response_headers=headers({":status": "200", "content-type": "application/json"})),
    ]
    if answer is not None:
        messages.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=answer, end_of_stream=True)))
    return messages
