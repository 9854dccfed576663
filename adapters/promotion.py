"""The promotion gate: promote a version only when its shadow traffic on a live server agreed enough.

A server compares a name's `shadow` version with what it serves (service/shadow.py) and summarises it at
`GET /v1/adapters/{name}/shadow`; `loraswap adapter promote NAME@V --server URL --require-agreement 0.95
--min-requests 500` reads that summary and refuses, with the numbers, when they fall short.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from adapters.errors import LoraswapError, PromotionRefused


@dataclass(frozen=True)
class Gate:
    min_requests: int = 0
    require_agreement: float | None = None  # classification: share of inputs with the same top label
    require_cosine: float | None = None  # embeddings: mean cosine between the vectors


def fetch_summary(server: str, name: str, api_key: str | None = None, timeout: float = 30.0) -> dict:
    """The server's shadow summary of `name` (`GET /v1/adapters/{name}/shadow`)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{server.rstrip('/')}/v1/adapters/{name}/shadow"
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise LoraswapError(f"cannot read {url}: {exc}") from exc
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        raise LoraswapError(f"{url} answered {resp.status_code}: {message}")
    return resp.json()


def check(summary: dict, version: int, gate: Gate) -> str:
    """A one-line account of `version`'s shadow record when it passes `gate`; raises PromotionRefused
    with the numbers otherwise. Pairs against every primary version are pooled."""
    name = summary.get("name", "?")
    pairs = [p for p in summary.get("pairs", []) if p["shadow"] == version]
    if not pairs:
        raise PromotionRefused(f"no shadow traffic recorded for {name}@{version} on this server"
                               f" (point the shadow alias at it and let traffic run first)")
    requests = sum(p["requests"] for p in pairs)
    rows = sum(p["rows"] for p in pairs)
    against = ", ".join(str(p["primary"]) for p in pairs)
    measured = {"agreement": _pooled(pairs, "agreement"), "cosine": _pooled(pairs, "mean_cosine")}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in measured.items() if v is not None)
    account = f"{name}@{version}: {requests} shadowed requests ({rows} inputs) against version {against}: {shown}"
    short = []
    if requests < gate.min_requests:
        short.append(f"{requests} requests < {gate.min_requests}")
    for key, required in (("agreement", gate.require_agreement), ("cosine", gate.require_cosine)):
        if required is None:
            continue
        if measured[key] is None:
            short.append(f"no {key} measured (a {pairs[0]['task']} adapter)")
        elif measured[key] < required:
            short.append(f"{key} {measured[key]:.4f} < {required}")
    if short:
        raise PromotionRefused(f"refusing to promote {account}; short of the gate: {'; '.join(short)}")
    return account


def _pooled(pairs: list[dict], field: str) -> float | None:
    """A per-input mean over several pairs, weighted by their inputs."""
    known = [p for p in pairs if p.get(field) is not None and p["rows"]]
    rows = sum(p["rows"] for p in known)
    return sum(p[field] * p["rows"] for p in known) / rows if rows else None
