"""Which path a mixed-adapter batch takes on a GPU (`MIXED_PATHS["cuda"]` in lora.py): the torch gathered
bmm, the rows sorted by slot through `torch._grouped_mm`, or the Triton kernels (triton_lora.py). None wins
everywhere (DESIGN.md: on an H100 the grouped GEMM lost to bmm at BERT's 8k tokens), so each is timed once
per device and shape, on the first batch of that shape, and the fastest kept. Any error falls back to the
torch path, logged once per path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

from service.engine.lora_segments import Segments, segment_tokens

log = logging.getLogger(__name__)

# (y [tokens, out], x [tokens, in], segments, A [S, in, R], B [S, R, out]): y += (x A[s]) B[s], in place.
Path = Callable[[Tensor, Tensor, Segments, Tensor, Tensor], None]
# lora.py's gathered bmm: (y, x, slot_ids, A, B) with one slot id per row of x and y (2-D or 3-D).
TorchPath = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]


def grouped_mm(y: Tensor, x: Tensor, seg: Segments, A: Tensor, B: Tensor) -> None:
    """Tokens sorted by slot, two grouped GEMMs over every slot (empty groups cost nothing), added back."""
    offs = seg.bounds[1:]
    xa = torch._grouped_mm(x.index_select(0, seg.order), A, offs=offs)
    y.index_add_(0, seg.order, torch._grouped_mm(xa, B, offs=offs))


def triton_segmented(y: Tensor, x: Tensor, seg: Segments, A: Tensor, B: Tensor) -> None:
    from service.engine import triton_lora  # optional dependency: imported on first use

    triton_lora.add_lora([y], x, [A], [B], seg)


def triton_per_token(y: Tensor, x: Tensor, seg: Segments, A: Tensor, B: Tensor) -> None:
    from service.engine import triton_lora

    triton_lora.add_lora([y], x, [A], [B], seg, per_token=True)


def available_paths() -> dict[str, Path]:
    """The candidates besides the torch path that this torch and environment have."""
    paths: dict[str, Path] = {}
    if hasattr(torch, "_grouped_mm"):
        paths["grouped_mm"] = grouped_mm
    try:
        import triton  # noqa: F401
    except ImportError:
        return paths
    paths["triton_segmented"] = triton_segmented
    paths["triton_per_token"] = triton_per_token
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoraPaths:
    """Callable as a `MIXED_PATHS` entry: (y, x, state, A, B). `choices` maps each shape key met so far to
    the path that won its timing ("bmm" is the torch path); `force` names one path for every shape."""

    def __init__(self, torch_path: TorchPath, paths: dict[str, Path] | None = None, reps: int = 5,
                 force: str | None = None) -> None:  # fmt: skip
        self.torch_path = torch_path
        self.paths = available_paths() if paths is None else paths
        self.reps, self.force = reps, force
        self.choices: dict[tuple, str] = {}
        self._logged: set[str] = set()
        self._local = threading.local()  # engines in other threads route other batches

    def segments(self, slot_ids: Tensor, tokens_per_row: int, num_slots: int) -> Segments:
        """One Segments per forward pass: every wrapped linear gets the same slot_ids tensor."""
        # Inside a CUDA-graph capture the segments must be computed by the graph itself, not reused from
        # an eager pass: a replay would route new slot ids by the old ones.
        capturing = slot_ids.is_cuda and torch.cuda.is_current_stream_capturing()
        key = (slot_ids._version, tokens_per_row, num_slots, capturing)
        c = getattr(self._local, "cached", None)
        if c is None or c[0] is not slot_ids or c[1] != key:
            c = self._local.cached = (slot_ids, key, segment_tokens(slot_ids, tokens_per_row, num_slots))
        return c[2]

    def __call__(self, y: Tensor, x: Tensor, state, A: Tensor, B: Tensor) -> None:
        slot_ids = state.slot_ids
        tokens_per_row = x[0].numel() // x.shape[-1] if x.shape[0] else 1
        tokens = x.numel() // x.shape[-1]
        key = (str(x.device), x.dtype, 1 << max(tokens - 1, 0).bit_length(), tokens_per_row == 1,
               x.shape[-1], y.shape[-1], A.shape[-1], A.shape[0])  # fmt: skip
        name = self.force or self.choices.get(key)
        if name is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                name = "bmm"  # no timing inside a capture; the warm-up before it chose for this shape
            else:
                name = self.choices[key] = self._choose(key, y, x, slot_ids, A, B)
        if name != "bmm":
            try:
                seg = self.segments(slot_ids, tokens_per_row, A.shape[0])
                self.paths[name](y.view(tokens, -1), x.reshape(tokens, -1), seg, A, B)
                return
            except Exception:  # noqa: BLE001 - serving goes on with the torch path; the log says why
                self._log_once(name, "LoRA path %s failed; the torch path serves %s from now on", key)
                self.choices[key] = "bmm"
        self.torch_path(y, x, slot_ids, A, B)

    def _log_once(self, name: str, message: str, key: tuple) -> None:
        if name not in self._logged:
            self._logged.add(name)
            log.exception(message, name, key)

    def _choose(self, key: tuple, y: Tensor, x: Tensor, slot_ids: Tensor, A: Tensor, B: Tensor) -> str:
        """Time every candidate `reps` times on copies of y; the fastest wins (the first run of each,
        which compiles, is not timed). A candidate that fails here is skipped for this shape."""
        tokens = y.numel() // y.shape[-1]
        seg = self.segments(slot_ids, tokens // slot_ids.numel() if slot_ids.numel() else 1, A.shape[0])
        runs: dict[str, Callable[[Tensor], None]] = {"bmm": lambda out: self.torch_path(out, x, slot_ids, A, B)}
        for name, path in self.paths.items():
            if name != "triton_per_token" or key[3]:  # the decode variant only for one token per row
                runs[name] = lambda out, path=path: path(out.view(tokens, -1), x.reshape(tokens, -1), seg, A, B)
        times = {}
        for name, run in runs.items():
            out = y.clone()
            try:
                run(out)
                _sync(y.device)
            except Exception:  # noqa: BLE001
                self._log_once(name, "LoRA path %s failed on its first run; not used for %s", key)
                continue
            start = time.perf_counter()
            for _ in range(self.reps):
                run(out)
            _sync(y.device)
            times[name] = (time.perf_counter() - start) / self.reps
        best = min(times, key=times.get)
        log.info("LoRA path for %s: %s (%s)", key, best, ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in times.items()))
        return best
