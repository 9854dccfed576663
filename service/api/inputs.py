"""Bounds on what a client may send, checked before anything logs, labels, echoes or computes with it.

Refs (`adapter`, `model`) are bounded in length and characters at the schema, so an error message, an
access-log field or a metric label can never carry a megabyte; texts must be valid Unicode (a lone
surrogate can never be tokenized, so it is a 400, not an engine failure that invites retries).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request
from pydantic import Field

from adapters.errors import InvalidInputError

REF_MAX_CHARS = 256
# No whitespace or control characters: a ref is an adapter name (+ @version/@alias) or a base model id/path.
Ref = Annotated[str, Field(min_length=1, max_length=REF_MAX_CHARS, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
Short = Annotated[str, Field(max_length=REF_MAX_CHARS)]
# torch.Generator.manual_seed takes [-2^63, 2^64): outside it a seed could only fail deep in the engine.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
TOP_K_MAX = 2**31 - 1


ROUTE_KEY_HEADER = "x-loraswap-route-key"


def route_key(request: Request, user: str | None) -> str | None:
    """Who the caller is, for canary stickiness: the X-Loraswap-Route-Key header, else the body's `user`."""
    return request.headers.get(ROUTE_KEY_HEADER) or user or None


def check_text(text: str, param: str) -> None:
    """400 unless `text` is encodable Unicode (JSON lets a client send a lone surrogate such as \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{param} is not valid Unicode text: lone surrogate at character {exc.start}",
                                param=param) from None
