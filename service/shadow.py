"""Shadow traffic: a copy of a request's rows run on the name's `shadow` version, compared, never answered.

The copy starts once the primary's answer is computed (a task of its own) and goes to the encoder batcher
as background work: it runs only while no other row waits, in short batches of its own (several shadowed
adapters share them), so it never joins or changes a primary's batch and delays one by at most one short
batch. A copy that fails (its queue full, a refused load) is counted, not retried; a shadow version refused
for good (invalid, or of another task: versions never change) is not tried again, so a bad shadow alias
costs no fetch or validation per request.

Comparisons per (adapter, primary version, shadow version): classification = the top label agrees,
KL(primary || shadow) and total variation between the calibrated score vectors; embeddings = cosine
between the two vectors. Kept here for `GET /v1/adapters/{name}/shadow` (this process) and exported as
Prometheus metrics (all workers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import torch

from adapters.errors import LoraswapError
from service.engine.classifier import ClassifierEngine
from service.metrics import Metrics
from service.router import AdapterRouter, Lease

log = logging.getLogger("loraswap.shadow")
TENANT = "loraswap:shadow"  # the batcher's fairness key of every shadow copy

Pair = tuple[str, int, int]  # adapter name, primary version, shadow version


@dataclass
class PairStats:
    task: str
    requests: int = 0  # copies compared
    dropped: int = 0  # copies that could not run
    rows: int = 0
    agreements: int = 0  # classification: same top label
    comparable: int = 0  # classification rows whose label sets match (KL/TV defined)
    kl: float = 0.0
    tv: float = 0.0
    cosine: float = 0.0
    primary_seconds: float = 0.0
    shadow_seconds: float = 0.0

    def summary(self) -> dict:
        def mean(total: float, n: int) -> float | None:
            return round(total / n, 6) if n else None

        classify = self.task == "classification"
        return {"task": self.task, "requests": self.requests, "dropped": self.dropped, "rows": self.rows,
                "agreement": mean(self.agreements, self.rows) if classify else None,
                "mean_kl": mean(self.kl, self.comparable) if classify else None,
                "mean_tv": mean(self.tv, self.comparable) if classify else None,
                "mean_cosine": None if classify else mean(self.cosine, self.rows),
                "primary_ms": mean(self.primary_seconds * 1e3, self.requests),
                "shadow_ms": mean(self.shadow_seconds * 1e3, self.requests)}


class ShadowTraffic:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._stats: dict[Pair, PairStats] = {}
        self._running: set[asyncio.Task] = set()
        self._refused: set[tuple[str, int]] = set()  # shadow versions refused for good (409/422)

    def copy(self, router: AdapterRouter, engine: ClassifierEngine, task: str, primary: Lease, rows: list,
             answers: list[torch.Tensor], primary_seconds: float) -> None:
        """Run `rows` on `primary.shadow` in the background and compare with the primary's `answers`."""
        if primary.shadow is None:
            return
        job = asyncio.get_running_loop().create_task(
            self._run(router, engine, task, primary, rows, answers, primary_seconds))
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    async def _run(self, router: AdapterRouter, engine: ClassifierEngine, task: str, primary: Lease, rows: list,
                   answers: list[torch.Tensor], primary_seconds: float) -> None:
        name, version = primary.shadow
        pair = (name, primary.version, version)
        stats = self._stats.setdefault(pair, PairStats(task))
        if primary.shadow in self._refused:
            stats.dropped += 1
            self._observe_drop(pair, "refused")
            return
        started = time.perf_counter()
        try:
            async with router.lease(f"{name}@{version}", task, traffic=False) as shadow:
                outputs = await engine.submit(rows, shadow.slot, TENANT, embed=task == "embedding", background=True)
        except Exception as exc:  # overloaded, refused, unloaded meanwhile: this copy is lost, counted
            stats.dropped += 1
            self._observe_drop(pair, type(exc).__name__)
            if isinstance(exc, LoraswapError) and exc.status in (409, 422):
                self._refused.add(primary.shadow)
                log.warning("shadow %s@%d refused (%s); its copies are dropped from now on", name, version, exc)
            else:
                log.debug("shadow copy %s@%d dropped: %s", name, version, exc)
            return
        seconds = time.perf_counter() - started
        stats.requests += 1
        stats.primary_seconds += primary_seconds
        stats.shadow_seconds += seconds
        if task == "embedding":
            cosines = [float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))
                       for a, b in zip(answers, outputs, strict=True)]
            stats.rows += len(cosines)
            stats.cosine += sum(cosines)
            self._observe(pair, task, seconds, len(cosines), 0, {"cosine": cosines})
            return
        agreements, kl, tv = self.compare(answers, primary, outputs, shadow)
        stats.rows += len(answers)
        stats.agreements += agreements
        stats.comparable += len(kl)
        stats.kl += sum(kl)
        stats.tv += sum(tv)
        self._observe(pair, task, seconds, len(answers), agreements, {"kl": kl, "tv": tv})

    @staticmethod
    def compare(primary_logits: list[torch.Tensor], primary: Lease, shadow_logits: list[torch.Tensor],
                shadow: Lease) -> tuple[int, list[float], list[float]]:
        """(rows whose top label agrees, KL(p || q) per row, total variation per row). Labels are matched by
        name; when the two versions' label sets differ only the top labels are compared."""
        agreements, kl, tv = 0, [], []
        for a, b in zip(primary_logits, shadow_logits, strict=True):
            p, p_labels = primary.scores(a)
            q, q_labels = shadow.scores(b)
            agreements += p_labels[int(p.argmax())] == q_labels[int(q.argmax())]
            if sorted(p_labels) != sorted(q_labels):
                continue
            q = q[[q_labels.index(label) for label in p_labels]]
            kl.append(float((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum()))
            tv.append(float((p - q).abs().sum() / 2))
        return agreements, kl, tv

    def _observe(self, pair: Pair, task: str, seconds: float, rows: int, agreements: int,
                 measures: dict[str, list[float]]) -> None:
        if self.metrics is not None:
            self.metrics.observe_shadow(*pair, task, seconds, rows, agreements, measures)

    def _observe_drop(self, pair: Pair, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_shadow_drop(*pair, reason)

    def summary(self, name: str) -> list[dict]:
        """Per (primary, shadow) version pair of `name`, since start (this process)."""
        return [{"primary": p, "shadow": s, **stats.summary()}
                for (n, p, s), stats in sorted(self._stats.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2]))
                if n == name]

    async def drain(self) -> None:
        """Wait for copies in flight (tests; shutdown cancels them with the engines)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
