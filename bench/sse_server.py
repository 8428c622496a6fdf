"""Streaming upstream for target (d): an OpenAI-style SSE chat completion with a fixed number
of chunks a fixed time apart, then a usage chunk and [DONE]; and on /v1/messages the same answer
as Anthropic streams it (message_start, the text deltas at the same times, message_delta with
the usage, message_stop), for d_stream_translated.

    python -m bench.sse_server --port P [--chunks 8] [--gap-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from aiohttp import web


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _named(obj: dict[str, object]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\n" + _event(obj)


def make_app(chunks: int, gap: float) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model", "bench")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
        for i in range(chunks):
            if i:
                await asyncio.sleep(gap)
            delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"tok{i} "}
            await resp.write(_event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        await asyncio.sleep(gap)
        await resp.write(
            _event(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": 9 + chunks},
                }
            )
            + b"data: [DONE]\n\n"
        )
        await resp.write_eof()
        return resp

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        message = {"id": "msg_bench", "type": "message", "role": "assistant", "model": body.get("model", "bench"),
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 9, "output_tokens": 1}}
        for i in range(chunks):  # the same writes at the same times as completions()
            if i:
                await asyncio.sleep(gap)
                delta = {"type": "text_delta", "text": f"tok{i} "}
                await resp.write(_named({"type": "content_block_delta", "index": 0, "delta": delta}))
            else:
                await resp.write(_named({"type": "message_start", "message": message}) + _named(
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
        await asyncio.sleep(gap)
        await resp.write(
            _named({"type": "content_block_stop", "index": 0})
            + _named({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                      "usage": {"output_tokens": chunks}})
            + _named({"type": "message_stop"})
        )
        await resp.write_eof()
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    return app


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse_server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--gap-ms", type=float, default=20.0)
    args = p.parse_args()
    web.run_app(make_app(args.chunks, args.gap_ms / 1000), host=args.host, port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
