"""Per-request sampling options and the batched sampler that turns one step's logits into tokens.
The model runner calls `sample` once per step; sequences carry their `SamplingParams` and RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapters.errors import RowFailedError


@dataclass
class SamplingParams:
    """OpenAI-style options of one request; temperature 0 means greedy (argmax)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    """One RNG per request, so a seeded request draws the same tokens whatever else shares its batch."""
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def sample(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """Pick one token per row of `logits` [B, V] (fp32) following each row's params.

    Greedy rows take the argmax. Sampled rows use the exponential-race trick (argmax of p / E with
    E ~ Exp(1), equivalent to drawing from p) because torch.multinomial cannot take one generator
    per row; the noise is drawn per row from that row's generator, on CPU, so seeds reproduce
    across batch compositions and devices.
    """
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens.tolist()
    idx = torch.tensor(rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device, dtype=logits.dtype)
    scaled = logits.index_select(0, idx).float() / temps.unsqueeze(1)
    vocab = scaled.shape[1]
    top_ks = [params[i].top_k if params[i].top_k > 0 else vocab for i in rows]
    top_ps = [params[i].top_p for i in rows]
    order = None
    if any(k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
        # Filtering needs ranks: work in sorted order and map the choice back at the end.
        scaled, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=scaled.device).unsqueeze(0)
        k = torch.tensor(top_ks, device=scaled.device).unsqueeze(1)
        scaled = scaled.masked_fill(ranks >= k, float("-inf"))
        probs = scaled.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        p = torch.tensor(top_ps, device=scaled.device, dtype=probs.dtype).unsqueeze(1)
        scaled = scaled.masked_fill(before >= p, float("-inf"))
    probs = scaled.softmax(dim=-1)
    noise = torch.empty(probs.shape, dtype=probs.dtype)
    for j, i in enumerate(rows):
        noise[j].exponential_(generator=generators[i])
    choice = (probs / noise.to(probs.device)).argmax(dim=-1, keepdim=True)
    if order is not None:
        choice = order.gather(1, choice)
    tokens[idx] = choice.squeeze(1).to(tokens.dtype)
    return tokens.tolist()


def sample_rows(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int | RowFailedError]:
    """`sample`, with each row's failure kept to that row: a row whose logits are not all finite (a broken
    adapter or an overflow) or whose sampling raises gets a RowFailedError instead of a token."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    out: list[int | RowFailedError] = [
        RowFailedError("the model produced non-finite logits for this request") for _ in finite
    ]
    ok = [i for i, f in enumerate(finite) if f]
    try:
        rows = torch.tensor(ok, device=logits.device)
        tokens = sample(logits.index_select(0, rows), [params[i] for i in ok], [generators[i] for i in ok])
        for i, token in zip(ok, tokens, strict=True):
            out[i] = token
    except Exception:  # noqa: BLE001 - find the row that failed; each of the others still gets its token
        for i in ok:
            try:
                out[i] = sample(logits[i : i + 1], [params[i]], [generators[i]])[0]
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                out[i] = RowFailedError(f"sampling failed for this request: {exc}")
    return out
