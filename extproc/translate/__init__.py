"""Translation between LLM API families, for routes whose providers speak another API than the client.

One ``Translator`` per (client API, backend API) pair, behind the small interface of
``extproc.translate.base``; ``translator_for`` picks it from the client's endpoint and the
provider's API family:

    tr = translator_for(endpoint.suffix, provider_api)     # None: the provider speaks the client's API
    req = tr.request(parsed.payload, model, options)       # -> suffix, body, headers; 400s name a field
    answer = tr.response(status, body)                     # -> client status, body, usage
    st = tr.stream(req); out = st.feed(chunk) ... st.end() # -> client SSE bytes, per chunk
"""

from __future__ import annotations

from extproc.errors import UntranslatableEndpoint
from extproc.translate.anthropic_openai import AnthropicToOpenAI, ChunksToAnthropic
from extproc.translate.base import (
    ANTHROPIC,
    DEFAULT_OPTIONS,
    EVENT_STREAM,
    JSON,
    OPENAI,
    BackendOptions,
    BackendRequest,
    ClientResponse,
    StreamTranslator,
    Translator,
)
from extproc.translate.openai_anthropic import AnthropicToChunks, OpenAIToAnthropic

__all__ = [
    "ANTHROPIC",
    "API_OF_ENDPOINT",
    "DEFAULT_OPTIONS",
    "EVENT_STREAM",
    "JSON",
    "OPENAI",
    "AnthropicToChunks",
    "AnthropicToOpenAI",
    "BackendOptions",
    "BackendRequest",
    "ChunksToAnthropic",
    "ClientResponse",
    "OpenAIToAnthropic",
    "StreamTranslator",
    "Translator",
    "can_serve",
    "translator_for",
]

# The API family of each endpoint suffix extproc.api classifies.
API_OF_ENDPOINT = {
    "/chat/completions": OPENAI,
    "/completions": OPENAI,
    "/embeddings": OPENAI,
    "/responses": OPENAI,
    "/messages": ANTHROPIC,
}

_TRANSLATORS: dict[tuple[str, str], Translator] = {
    ("/chat/completions", ANTHROPIC): OpenAIToAnthropic(),
    ("/messages", OPENAI): AnthropicToOpenAI(),
}


def _bare(suffix: str) -> str:
    return suffix.partition("?")[0].rstrip("/")


def translator_for(suffix: str, backend_api: str) -> Translator | None:
    """The translator for a request on ``suffix`` (an ``extproc.api.Endpoint.suffix``, query
    allowed) to a provider speaking ``backend_api``; None when no translation is needed.

    Raises ``UntranslatableEndpoint`` (400) when that provider cannot serve the endpoint at all
    (embeddings, say, on an Anthropic provider); ``can_serve`` asks without raising.
    """
    bare = _bare(suffix)
    if API_OF_ENDPOINT.get(bare) == backend_api:
        return None
    translator = _TRANSLATORS.get((bare, backend_api))
    if translator is None:
        raise UntranslatableEndpoint(bare, backend_api)
    return translator


def can_serve(suffix: str, backend_api: str) -> bool:
    bare = _bare(suffix)
    return API_OF_ENDPOINT.get(bare) == backend_api or (bare, backend_api) in _TRANSLATORS
