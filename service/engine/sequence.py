"""One generation request as the engine sees it: token ids, status, KV cache row, adapter slot, params.
The scheduler, KV cache and model runner pass these objects around; no tensors or I/O live here.
"""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto

import torch

from service.engine.sampling import SamplingParams, make_generator

_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Everything about one request; `token_ids` is prompt + generated so far."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, slot: int = 0, tenant: str | None = None) -> None:
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        self.seq_id = next(_ids)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.slot = slot
        self.tenant = tenant  # the API key's id: admission takes tenants in turn (None: auth off)
        self.status = SequenceStatus.WAITING
        self.row: int | None = None  # KV cache row while RUNNING
        self.num_cached = 0  # tokens whose K/V are in the cache
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.generator: torch.Generator = make_generator(params.seed)
        self.arrival = time.perf_counter()
        self.queue_wait: float | None = None  # arrival -> its prefill step (set by the engine)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, slot={self.slot}, len={len(self)}, {self.status.name})"

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
