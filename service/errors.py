"""The one error shape of the API (OpenAI's): {"error": {"message", "type", "param", "code"}}.

Every exception that reaches FastAPI is turned into it here, by its type only (`LoraswapError` subclasses
carry status, code and Retry-After); internals never leak to clients.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import LoraswapError

log = logging.getLogger("loraswap.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The OpenAI error shape every non-2xx answer of the API has."""

    error: ErrorDetail


_WHEN = {
    400: "Bad input (e.g. the body is not JSON)",
    401: "Missing or unknown API key",
    403: "The API key lacks the scope or the adapter",
    404: "Unknown adapter or route",
    409: "Task mismatch or conflicting version",
    413: "Body, inputs or characters over the limits",
    415: "The body was not sent as application/json",
    422: "The body does not match the schema, or a refused adapter",
    429: "Overloaded (queue full or too many concurrent requests for the key); see Retry-After",
    500: "Internal error (logged with the request id; no internals in the answer)",
    503: "Not ready, draining, registry unreachable or a transient engine failure",
    504: "The request did not start answering within request_timeout_s",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """`responses=` for routes: the documented error statuses with the error schema."""
    return {status: {"model": ErrorBody, "description": _WHEN[status]} for status in statuses}


# What every API route may answer besides its success (auth, limits, overload, drain, timeouts).
COMMON_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 503, 504)


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class APIError(LoraswapError):
    """An HTTP-level refusal with its status given where it is raised (auth, limits, routing); domain
    failures raise their own `LoraswapError` subclass instead."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message, param=param)
        self.status, self.code, self._headers = status, code, headers
        self.type = type or error_type(status)

    @property
    def headers(self) -> dict[str, str] | None:
        return self._headers


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type or error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None) or request.headers.get("x-request-id")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraswapError)
    async def _domain_error(request: Request, exc: LoraswapError):
        if exc.status >= 500:
            log.warning("%s answered %d (request_id=%s): %s", type(exc).__name__, exc.status,
                        _request_id(request), exc.message)
        return error_response(exc.status, exc.message, type=getattr(exc, "type", None), param=exc.param,
                              code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # A body that is not JSON at all is a bad request; a JSON body of the wrong shape is 422.
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "request body is not valid JSON", code="json_invalid")
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5]
        )
        return error_response(422, message, param=".".join(loc) or None, code="validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        rid = _request_id(request)
        log.exception("internal error (request_id=%s)", rid)
        return error_response(500, f"internal error (request id {rid})", type="server_error")
