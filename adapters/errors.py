"""Errors of loraswap, each carrying the HTTP status and the error `code` the service answers with.

Raised by manifest/format/registry code and by the service's engines and validators; the CLI prints
`.message`, the server turns `.status`/`.code`/`.headers` into the one error shape. Nothing classifies an
error by its message: a new kind of failure gets a subclass here.
"""

from __future__ import annotations


class LoraswapError(Exception):
    """Base error: a refusal or failure with a one-line, user-facing message."""

    status: int = 400
    code: str = "invalid_request"
    retry_after: int | None = None  # seconds; set where a retry can succeed (429, 503)

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class InvalidInputError(LoraswapError, ValueError):
    """Input that can never succeed as sent (e.g. text that is not valid Unicode): do not retry it."""

    code = "invalid_input"


class ContextLengthError(LoraswapError, ValueError):
    """The prompt (plus one generated token) does not fit the model's context."""

    code = "context_length_exceeded"


class AdapterNotFoundError(LoraswapError):
    status = 404
    code = "adapter_not_found"


class AdapterValidationError(LoraswapError, ValueError):
    """A refused adapter: corrupt, mismatched, too big, pickle, bad name, or one this engine cannot serve."""

    status = 422
    code = "adapter_invalid"


class AdapterConflictError(LoraswapError):
    """The version exists already, or the adapter's task does not match the base."""

    status = 409
    code = "adapter_conflict"


class PromotionRefused(LoraswapError):
    """A promotion gate is not met: the version's shadow comparison falls short, or there is none."""

    status = 409
    code = "promotion_refused"


class OverloadedError(LoraswapError):
    """Too much work queued (server, engine or one API key): answered 429 with Retry-After."""

    status = 429
    code = "overloaded"
    retry_after = 1


class RegistryError(LoraswapError):
    """The registry is unreachable or an I/O operation on it failed."""

    status = 503
    code = "registry_unavailable"
    retry_after = 1


class EngineError(LoraswapError):
    """A transient engine failure (e.g. out of memory in a batch): only its requests fail; retryable."""

    status = 503
    code = "engine_error"
    retry_after = 1


class RowFailedError(LoraswapError):
    """One row of a batch or step gave no result (non-finite scores/logits, a sampling error): its request
    ends with this, the others go on. Not retryable: the same input fails the same way."""

    status = 500
    code = "row_failed"
