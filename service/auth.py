"""API keys: bearer authentication, scopes and per-adapter authorization (FastAPI dependencies).

Keys come from `LORASWAP_API_KEYS_FILE` (a JSON file, the Helm Secret) or `LORASWAP_API_KEYS` (the JSON
itself): a list of `{"key": "...", "scopes": ["infer", "admin"], "adapters": ["glob", ...]}`; an entry may
give `"key_sha256"` (hex) instead of `"key"`, and an optional `"name"` (shown in logs). Only the sha256 of
each key is kept in memory; a presented key is hashed and compared with `hmac.compare_digest`.

Auth is on when keys are configured or `LORASWAP_AUTH_ENABLED=true` (then with no keys every protected
request is refused). `LORASWAP_AUTH_ENABLED=false` with no keys turns it off (local development); keys,
when configured, always turn it on. `loraswap serve` refuses to bind a non-loopback address with auth off
unless `LORASWAP_AUTH_ENABLED=false` was given explicitly (see `check_bind_address`).

Scopes are independent: `infer` for /v1/classify, /v1/completions, /v1/chat/completions; `admin` for the
management endpoints (load/unload/aliases and the vLLM aliases) and for the manifest's training details and
the residency's local paths; `metrics` (or `admin`) for `/metrics`. The adapter globs (`fnmatch`, default
`["*"]`) apply to every endpoint that names an adapter (the base model's id is matched like a name): a
key not allowed an adapter gets 403 for it and does not see it in `/v1/models`, `/v1/adapters` or the
`adapter` label of `/metrics`. `/health` and `/ready` need no key (probes). Errors are 401 (no/unknown key)
and 403 (missing scope or adapter), in the OpenAI error shape, with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters.errors import LoraswapError
from service.errors import APIError

log = logging.getLogger("loraswap.auth")

SCOPES = frozenset({"infer", "admin", "metrics"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_FIELDS = {"key", "key_sha256", "scopes", "adapters", "name"}

# Declares the scheme in OpenAPI (so clients and fuzzers know about it); we parse the header ourselves.
bearer_scheme = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


class AuthConfigError(LoraswapError):
    """The key configuration is unusable: the server refuses to start (exit 1, one line)."""

    status = 500


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    sha256: str
    scopes: frozenset[str]
    adapters: tuple[str, ...]
    name: str | None = None

    @property
    def id(self) -> str:
        """What logs and limits call this key: its name, else a short prefix of its hash."""
        return self.name or f"sha256:{self.sha256[:12]}"

    def allows(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.adapters)


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Parse and validate the JSON key list; every problem is one clear AuthConfigError."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise AuthConfigError(f"{source}: invalid JSON ({exc})") from None
    if not isinstance(raw, list):
        raise AuthConfigError(f"{source}: expected a JSON list of key entries")
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{source}[{i}]"
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{where}: expected an object")
        unknown = set(entry) - _ENTRY_FIELDS
        if unknown:
            raise AuthConfigError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: {sorted(_ENTRY_FIELDS)})")
        if ("key" in entry) == ("key_sha256" in entry):
            raise AuthConfigError(f"{where}: give exactly one of 'key' or 'key_sha256'")
        if "key" in entry:
            if not isinstance(entry["key"], str) or len(entry["key"]) < 8 or entry["key"] != entry["key"].strip():
                raise AuthConfigError(f"{where}: 'key' must be a string of at least 8 characters, no outer spaces")
            digest = hash_key(entry["key"])
        else:
            digest = entry["key_sha256"]
            digest = digest.lower().removeprefix("sha256:") if isinstance(digest, str) else digest
            if not isinstance(digest, str) or not _HEX64.match(digest):
                raise AuthConfigError(f"{where}: 'key_sha256' must be 64 hex digits")
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise AuthConfigError(f"{where}: 'scopes' must be a non-empty list of {sorted(SCOPES)}")
        if set(scopes) - SCOPES:
            raise AuthConfigError(f"{where}: unknown scope(s) {sorted(set(scopes) - SCOPES)} (allowed: {sorted(SCOPES)})")
        adapters = entry.get("adapters", ["*"])
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            raise AuthConfigError(f"{where}: 'adapters' must be a list of glob patterns")
        name = entry.get("name")
        if name is not None and not isinstance(name, str):
            raise AuthConfigError(f"{where}: 'name' must be a string")
        if digest in seen:
            raise AuthConfigError(f"{where}: duplicate key")
        seen.add(digest)
        keys.append(ApiKey(digest, frozenset(scopes), tuple(adapters), name))
    return keys


class KeyStore:
    """The configured keys (hashes only) and whether auth is on."""

    def __init__(self, keys: list[ApiKey], enabled: bool):
        self.keys = list(keys)
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings) -> KeyStore:
        keys: list[ApiKey] = []
        if settings.api_keys_file is not None:
            path = Path(settings.api_keys_file)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise AuthConfigError(f"cannot read API keys file {path}: {exc.strerror or exc}") from None
            keys += parse_keys(text, str(path))
        if settings.api_keys:
            keys += parse_keys(settings.api_keys, "LORASWAP_API_KEYS")
        if len({k.sha256 for k in keys}) != len(keys):
            raise AuthConfigError("the same key is configured twice (LORASWAP_API_KEYS and the keys file)")
        enabled = bool(keys) or settings.auth_enabled is True
        if keys and settings.auth_enabled is False:
            log.warning("LORASWAP_AUTH_ENABLED=false is ignored: %d API key(s) are configured, auth is on", len(keys))
        return cls(keys, enabled)

    def lookup(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented)
        found = None
        for key in self.keys:  # compare with every key, so timing does not tell which one matched
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname or an odd value: treat as public


def check_bind_address(settings, store: KeyStore) -> None:
    """Refuse to serve without auth on a public address unless auth was disabled explicitly."""
    if not store.enabled and not is_loopback(settings.host) and settings.auth_enabled is not False:
        raise AuthConfigError(
            f"refusing to serve {settings.host} without authentication: configure API keys "
            "(LORASWAP_API_KEYS_FILE or LORASWAP_API_KEYS) or set LORASWAP_AUTH_ENABLED=false explicitly"
        )


# ---- request side ------------------------------------------------------------------------------------


def _challenge(error: str | None = None) -> dict[str, str]:
    value = 'Bearer realm="loraswap"' + (f', error="{error}"' if error else "")
    return {"WWW-Authenticate": value}


def _unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, code=code, headers=_challenge("invalid_token" if code == "invalid_api_key" else None))


def forbidden(message: str, code: str = "permission_denied", param: str | None = None) -> APIError:
    return APIError(403, message, code=code, param=param, headers=_challenge("insufficient_scope"))


def _store(request: Request) -> KeyStore | None:
    return getattr(request.app.state, "auth", None)


def _auth_on(request: Request) -> bool:
    store = _store(request)
    return store is not None and store.enabled


def _add_log_field(request: Request, key: str, value) -> None:
    fields = getattr(request.state, "log_fields", None)
    if isinstance(fields, dict):
        fields[key] = value


async def authenticate(request: Request,
                       credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> ApiKey | None:
    """The caller's key (None when auth is off); 401 when auth is on and the key is missing or unknown."""
    if not _auth_on(request):
        return None
    store = _store(request)
    if credentials is None:
        raise _unauthorized("missing API key: send `Authorization: Bearer <key>`", "missing_api_key")
    key = store.lookup(credentials.credentials)
    if key is None:
        raise _unauthorized("invalid API key", "invalid_api_key")
    request.state.api_key = key
    _add_log_field(request, "key_id", key.id)
    return key


def require(scope: str, *also: str):
    """Dependency: an authenticated key with `scope` (or one of `also`), holding one of its concurrent-request
    slots."""
    accepted = frozenset((scope, *also))
    if accepted - SCOPES:
        raise ValueError(sorted(accepted - SCOPES))

    async def dependency(request: Request, key: ApiKey | None = Depends(authenticate)) -> AsyncIterator[ApiKey | None]:
        if key is not None and not key.scopes & accepted:
            raise forbidden(f"this API key lacks the {scope!r} scope", code="insufficient_scope")
        async with _concurrency_slot(request, key):
            yield key

    dependency.__name__ = f"require_{scope}"
    return dependency


require_infer = require("infer")
require_admin = require("admin")
_metrics_scoped = require("metrics", "admin")  # an admin key may read what it manages


def _metrics_open(request: Request) -> bool:
    return bool(getattr(request.app.state.ctx.settings, "metrics_open", False))


async def require_metrics(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
                          ) -> AsyncIterator[ApiKey | None]:
    """A `metrics` or `admin` key when auth is on, unless `metrics_open` is set: an endpoint picker (Gateway API
    Inference Extension) reads the vllm:* gauges of every pod and cannot send a key."""
    if _metrics_open(request):
        yield None
        return
    async for key in _metrics_scoped(request, await authenticate(request, credentials)):
        yield key


async def require_key(request: Request, key: ApiKey | None = Depends(authenticate)) -> AsyncIterator[ApiKey | None]:
    """Dependency for read-only listings: any valid key (any scope), holding a concurrency slot."""
    async with _concurrency_slot(request, key):
        yield key


def _concurrency_slot(request: Request, key: ApiKey | None):
    from service.limits import KeyConcurrency

    limiter: KeyConcurrency | None = getattr(request.app.state, "key_concurrency", None)
    return limiter.slot(key.sha256 if key else None) if limiter else KeyConcurrency.noop()


def _subject(ref: str, base_ids: set[str]) -> str:
    """The name a glob is matched against: the base id itself, else the ref's name (`name@3` → `name`)."""
    if ref in base_ids:
        return ref
    return ref.partition("@")[0]


def _base_ids(request: Request) -> set[str]:
    ctx = request.app.state.ctx
    return {b for task in ("classification", "generation") if (b := ctx.base_id(task))}


def allowed(request: Request, ref: str) -> bool:
    """Whether the caller may use/see adapter (or base model) `ref`; always True when auth is off."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if not _auth_on(request):
        return True
    if key is None:
        return False
    return key.allows(_subject(ref, _base_ids(request)))


def check_adapter(request: Request, ref: str, param: str = "adapter") -> None:
    """403 unless the caller's key allows adapter (or base model) `ref`. Call it after the body is parsed."""
    if not allowed(request, ref):
        raise forbidden(f"this API key is not allowed to use {ref!r}", code="adapter_not_allowed", param=param)


def sees_internals(request: Request) -> bool:
    """Whether the caller may see how adapters were made and where they live (dataset, training settings,
    file list, local paths): admin keys, and everyone when auth is off (a local server is its owner's)."""
    if not _auth_on(request):
        return True
    key: ApiKey | None = getattr(request.state, "api_key", None)
    return key is not None and "admin" in key.scopes


def adapter_filter(request: Request) -> Callable[[str], bool] | None:
    """Which adapter names the caller may see in `/metrics`: None for all (auth off, or a key allowed every
    adapter), else a predicate on names. Base model ids and `_other_` are the metrics module's to keep."""
    if not _auth_on(request) or _metrics_open(request):
        return None
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is None:
        return lambda name: False
    return None if key.allows("*") else key.allows
