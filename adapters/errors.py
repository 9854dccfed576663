"""Errors of the adapter contract, each carrying the HTTP status the service maps it to.

Raised by manifest/format/registry code; the CLI prints `.message`, the server turns `.status` into a response.
"""

from __future__ import annotations


class LoraswapError(Exception):
    """Base error: a refusal or failure with a one-line, user-facing message."""

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdapterNotFoundError(LoraswapError):
    status = 404


class AdapterValidationError(LoraswapError):
    """A refused adapter: corrupt, mismatched, too big, pickle, bad name..."""

    status = 422


class AdapterConflictError(LoraswapError):
    """The version exists already, or the adapter's task does not match the base."""

    status = 409


class RegistryError(LoraswapError):
    """The registry is unreachable or an I/O operation on it failed."""

    status = 503
