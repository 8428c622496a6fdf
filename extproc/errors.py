"""Every error the data plane returns to an HTTP client, in OpenAI's error format.

Keeping them in one place keeps status codes, types and codes consistent, and makes it easy to
check that no message can carry a credential: messages are built only from request metadata
(model names, provider names, sizes), never from headers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


class ClientError(Exception):
    """An error answered to the client; ``body`` is the OpenAI-style JSON."""

    status = 400
    type = "invalid_request_error"
    code = "bad_request"
    headers: tuple[tuple[str, str], ...] = ()  # sent with the answer (e.g. retry-after)

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def body(self) -> bytes:
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        ).encode()


class InvalidJSON(ClientError):
    code = "invalid_json"

    def __init__(self, detail: str) -> None:
        super().__init__(f"The request body is not valid JSON: {detail}")


class MissingModel(ClientError):
    code = "model_required"

    def __init__(self, detail: str = "you must provide a model parameter") -> None:
        super().__init__(detail, param="model")


class UnknownModel(ClientError):
    status = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or no route serves it", param="model")


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"The request body is {size} bytes; the limit is {limit} bytes")


class UnsupportedEndpoint(ClientError):
    status = 404
    code = "unknown_endpoint"

    def __init__(self, path: str) -> None:
        super().__init__(f"Unknown AI endpoint: {path[:200]}")


class NoProviderAvailable(ClientError):
    status = 503
    type = "service_unavailable"
    code = "no_provider_available"

    def __init__(self, model: str, tried: Sequence[str], skipped: Sequence[str] = ()) -> None:
        parts = [f"No provider could answer for model '{model}'."]
        parts.append(f" Tried: {', '.join(tried)}." if tried else " No provider was tried.")
        if skipped:
            parts.append(f" Skipped (circuit open or unhealthy): {', '.join(skipped)}.")
        super().__init__("".join(parts))
        self.tried = tuple(tried)


class NotConfigured(ClientError):
    status = 503
    type = "service_unavailable"
    code = "not_ready"

    def __init__(self) -> None:
        super().__init__("The holysheep-mesh data plane has no valid configuration loaded")


class InternalError(ClientError):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self) -> None:
        super().__init__("The holysheep-mesh data plane failed to process the request")


# --- API translation (extproc/translate): a route whose provider speaks another API family ---


class UntranslatableField(ClientError):
    """A request field the provider's API has no equivalent for: a 400 naming it, never a silent drop."""

    code = "unsupported_parameter"

    def __init__(self, field: str, api: str, reason: str) -> None:
        super().__init__(f"'{field}' cannot be translated for this route's {api} provider: {reason}", param=field)


class UntranslatableEndpoint(ClientError):
    code = "unsupported_endpoint"

    def __init__(self, endpoint: str, api: str) -> None:
        super().__init__(f"The endpoint {endpoint[:200]} cannot be served by this route's {api} provider")


class UntranslatableAnswer(ClientError):
    """A provider's answer that could not be re-expressed in the client's API."""

    status = 502
    type = "server_error"
    code = "untranslatable_provider_response"

    def __init__(self, api: str, detail: str) -> None:
        super().__init__(f"The {api} provider's answer could not be translated: {detail}")


class ProviderError(ClientError):
    """A provider's own error re-expressed in OpenAI's format, for a client of another API family.

    The message is the provider's: providers mask keys in theirs, and an untranslated failover
    answer passes it on unchanged too.
    """

    def __init__(self, status: int, kind: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.code = status, kind, code


# --- budgets (spec.budgets, extproc/budgets.py) ---------------------------------------------


class BudgetExceeded(ClientError):
    """A budget is used up: OpenAI's 429, so the official SDKs raise their RateLimitError.

    As OpenAI answers: ``type`` ``requests`` or ``tokens`` with ``code`` ``rate_limit_exceeded``
    for a rate limit, ``insufficient_quota`` for both for spent money; ``retry-after`` in whole
    seconds. The message names the budget, its limit and when the window turns; it is built
    from the config and the clock only.
    """

    status = 429

    def __init__(self, budget: str, unit: str, limit: str, window: str, retry_after: int, resets_at: str) -> None:
        what = {"requests": "requests", "tokens": "tokens", "usd": "USD"}[unit]
        super().__init__(f"Budget '{budget}' is used up: its limit of {limit} {what} per {window} is reached. "
                         f"It resets in {retry_after}s, at {resets_at}.")
        self.budget = budget
        self.type = "insufficient_quota" if unit == "usd" else unit
        self.code = "insufficient_quota" if unit == "usd" else "rate_limit_exceeded"
        self.retry_after = retry_after
        self.headers = (("retry-after", str(retry_after)),)
