"""Tests for service/engine/triton_lora.py, lora_segments.py and lora_paths.py: every kernel against the per-row
torch reference over random slot mixes, ranks and dtypes, with the segment edge cases; the kernels compiled
for an H100/H200 (sm_90) on this CPU; path selection and its fallback. Without CUDA the kernels run in
Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py where there is no GPU).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("LORASWAP_REQUIRE_TRITON") == "1":
    import triton  # noqa: F401 - make test-kernels: a missing triton fails the run instead of skipping it
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

from service.engine import triton_lora  # noqa: E402
from service.engine.lora import MIXED_PATHS, MultiLoraLinear, SlotState, _add_lora_cpu  # noqa: E402
from service.engine.lora import _add_lora_gathered_bmm as torch_path  # noqa: E402
from service.engine.lora_paths import LoraPaths, available_paths  # noqa: E402
from service.engine.lora_segments import segment_tokens  # noqa: E402

DEVICE = "cpu" if triton_lora.INTERPRETED else "cuda"
REPO = Path(__file__).resolve().parents[3]
SLOTS, IN = 6, 40  # slot 0 = no adapter, 1-5 adapters
# name: (slot id of each row, tokens per row, stack rank R, adapters' real rank, output sizes of the targets)
CASES = {
    "mixed": ([3, 0, 1, 3, 3, 5, 1], 3, 12, 12, [24, 150, 8]),  # 150: two output tiles
    "one_row": ([4], 1, 12, 12, [24, 150, 8]),
    "all_one_slot": ([2, 2, 2, 2], 2, 12, 12, [24, 150]),
    "no_adapter": ([0, 0, 0], 2, 12, 12, [24]),  # every row slot 0: y unchanged, bit for bit
    "empty_slots": ([5, 1, 5, 1, 1], 1, 12, 12, [24, 150, 8]),  # slots 2-4 have no rows
    "rank_below_max": ([1, 3, 0, 3, 2], 2, 32, 5, [24, 150, 8]),  # zero-padded past rank 5
    "rank_tiles": ([1, 2, 2, 0, 5], 1, 80, 80, [24]),  # R > 64: two rank tiles / loop steps
    "many_tokens": ([1, 2, 0, 5, 3, 1, 1, 4, 2, 1], 30, 16, 16, [24, 8]),  # 300 tokens: 64-token tiles
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _stacks(rank_max: int, rank: int, outs: list[int], dtype: torch.dtype) -> tuple[list, list]:
    """A [S, IN, R] and B [S, R, out] per target, slot 0 zeros, slots' ranks past `rank` zeros (as loaded)."""
    As, Bs = [], []
    for out in outs:
        A, B = torch.randn(SLOTS, IN, rank_max), torch.randn(SLOTS, rank_max, out) / rank**0.5
        A[0], B[0], A[:, :, rank:], B[:, rank:] = 0, 0, 0, 0
        As.append(A.to(DEVICE, dtype))
        Bs.append(B.to(DEVICE, dtype))
    return As, Bs


def _expected(y, x, slots, A, B):
    """y + (x A[s]) B[s] per token in fp32, xa rounded to the dtype in between as both torch and the kernels do."""
    s = slots.tolist()
    xa = torch.stack([x[i].float() @ A[j].float() for i, j in enumerate(s)]).to(x.dtype).float()
    return y.float() + torch.stack([xa[i] @ B[j].float() for i, j in enumerate(s)])


def _assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # bf16: xa and y are rounded to 8 bits; sums in another order flip an ulp here and there (at 2^-7 of the
    # largest output a bf16 check failed on 1 of 504 values); a wrong slot or target is off by ~100 %.
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol * float(want.abs().max()))


# The shape cases run in fp32 only and the 300-token one segmented only: the interpreter is slow.
RUNS = [(case, per_token, dtype) for case in CASES for per_token in (False, True) for dtype in DTYPES
        if case not in ("rank_tiles", "many_tokens") or (dtype == "fp32" and not (per_token and case == "many_tokens"))]


@pytest.mark.parametrize(("case", "per_token", "dtype"), RUNS,
                         ids=[f"{c}-{'per_token' if p else 'segmented'}-{d}" for c, p, d in RUNS])  # fmt: skip
def test_kernels_match_reference(case: str, per_token: bool, dtype: str) -> None:
    slot_ids, tokens_per_row, rank_max, rank, outs = CASES[case]
    dtype = DTYPES[dtype]
    torch.manual_seed(len(case))
    ids = torch.tensor(slot_ids, device=DEVICE)
    seg = segment_tokens(ids, tokens_per_row, SLOTS)
    tokens = len(slot_ids) * tokens_per_row
    x = torch.randn(tokens, 2 * IN, device=DEVICE, dtype=dtype)[:, ::2]  # strided: not contiguous
    As, Bs = _stacks(rank_max, rank, outs, dtype)
    ys = [torch.randn(tokens, out, device=DEVICE, dtype=dtype) for out in outs]
    before = [y.clone() for y in ys]
    if rank < rank_max:  # the caller slices the stacks to the batch's max rank: same result, fewer reads
        triton_lora.add_lora(ys, x, [A[:, :, :rank] for A in As], [B[:, :rank] for B in Bs], seg, per_token)
        sliced, ys = ys, [y.clone() for y in before]
    triton_lora.add_lora(ys, x, As, Bs, seg, per_token)
    base_rows = seg.slots == 0
    for y, y0, A, B in zip(ys, before, As, Bs, strict=True):
        _assert_matches(y, _expected(y0, x, seg.slots, A, B), dtype)
        assert torch.equal(y[base_rows], y0[base_rows])  # slot 0 rows are not touched at all
        assert not torch.equal(y[~base_rows], y0[~base_rows]) or not (~base_rows).any()
    if rank < rank_max:
        for y, y_sliced in zip(ys, sliced, strict=True):
            _assert_matches(y_sliced, y.float(), dtype)


def test_segments_group_tokens_by_slot() -> None:
    seg = segment_tokens(torch.tensor([3, 0, 3, 1], device=DEVICE), 2, 5)
    assert seg.slots.tolist() == [3, 3, 0, 0, 3, 3, 1, 1]
    assert seg.order.tolist() == [2, 3, 6, 7, 0, 1, 4, 5]  # stable: arrival order within a slot
    assert seg.bounds.tolist() == [0, 2, 4, 4, 8, 8] and seg.bounds.dtype == torch.int32
    empty = segment_tokens(torch.zeros(0, dtype=torch.long, device=DEVICE), 1, 3)
    assert empty.bounds.tolist() == [0, 0, 0, 0]


def test_bad_arguments_are_refused() -> None:
    x = torch.randn(4, IN, device=DEVICE)
    As, Bs = _stacks(8, 8, [16, 16], torch.float32)
    seg = segment_tokens(torch.tensor([1, 2, 0, 1], device=DEVICE), 1, SLOTS)
    ys = [torch.zeros(4, 16, device=DEVICE) for _ in range(2)]
    with pytest.raises(ValueError, match="targets"):
        triton_lora.add_lora(ys * 2, x, As * 2, Bs * 2, seg)
    with pytest.raises(ValueError, match="one shape"):
        triton_lora.add_lora(ys, x, [As[0], As[1][:, :, :4]], Bs, seg)
    with pytest.raises(ValueError, match="dtype"):
        triton_lora.add_lora(ys[:1], x.double(), As[:1], Bs[:1], seg)
    with pytest.raises(ValueError, match="unit stride"):
        triton_lora.add_lora([torch.zeros(16, 4, device=DEVICE).t()], x, As[:1], Bs[:1], seg)


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from service.engine import triton_lora as k

POINTERS = {"order_ptr": "*i64", "slots_ptr": "*i64", "bounds_ptr": "*i32"}
BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 128, "BLOCK_R": 16, "UPCAST": False}
assert not k.INTERPRETED
# bf16 (what a GPU serves) for all four; fp32 where it changes the code: tl.dot in IEEE precision
for dtype, kernels in (("bf16", (k._shrink_segmented, k._expand_segmented, k._shrink_per_token, k._expand_per_token)),
                       ("fp32", (k._shrink_segmented, k._expand_segmented))):
    for kernel in kernels:
        signature, constexprs = {}, {}
        for p in kernel.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
                constexprs[p.name] = dtype == "fp32" if p.name == "IEEE" else BLOCKS[p.name]
            elif p.name.endswith("_ptr") or p.name[0] in "aby" and p.name[1:].isdigit():
                signature[p.name] = POINTERS.get(p.name, "*" + dtype)
            else:
                signature[p.name] = "i32"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in compiled.asm["ptx"] and compiled.asm["cubin"], kernel.fn.__name__
        print(dtype, kernel.fn.__name__, "ok")
"""


def test_kernels_compile_for_sm90() -> None:
    """The interpreter runs the kernels as Python; this compiles them as a GPU would (Triton's front end,
    the tl.dot lowering for bf16 and IEEE fp32, ptxas) for an H100/H200, on any machine."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", _COMPILE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" ok") == 6, proc.stdout


def _layer(dtype: torch.dtype) -> tuple[MultiLoraLinear, SlotState]:
    state = SlotState()
    base = torch.nn.Linear(IN, 24).to(DEVICE, dtype)
    layer = MultiLoraLinear(base, state, num_slots=SLOTS, max_rank=8)
    As, Bs = _stacks(8, 8, [24], dtype)
    layer.lora_A.copy_(As[0])
    layer.lora_B.copy_(Bs[0])
    return layer, state


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(4, 3), (4,)])  # [rows, tokens, in] and decode's [rows, in]
def test_every_path_matches_reference_through_the_layer(shape: tuple[int, ...], dtype, monkeypatch) -> None:
    """MultiLoraLinear with LoraPaths as its mixed path (what `MIXED_PATHS["cuda"]` is): the timed choice
    and every path forced give the reference result, in eager and in static (CUDA-graph) routing."""
    torch.manual_seed(1)
    layer, state = _layer(dtype)
    x = torch.randn(*shape, IN, device=DEVICE, dtype=dtype)
    ids = torch.tensor([3, 0, 1, 3], device=DEVICE)
    tokens = x.numel() // IN
    want = _expected(layer.base(x).reshape(tokens, -1), x.reshape(tokens, -1),
                     segment_tokens(ids, tokens // 4, SLOTS).slots, layer.lora_A, layer.lora_B)  # fmt: skip
    names = ["bmm", *available_paths()]
    assert {"grouped_mm", "triton_segmented", "triton_per_token"} <= set(names)
    timed = LoraPaths(torch_path, reps=1)
    for paths in [timed, *(LoraPaths(torch_path, force=name) for name in names)]:
        monkeypatch.setitem(MIXED_PATHS, DEVICE, paths)
        for static in (False, True):
            state.set_static(ids) if static else state.set(ids)
            with torch.no_grad():
                got = layer(x)
            state.set(None)
            _assert_matches(got.reshape(tokens, -1), want, dtype)
    [(key, choice)] = timed.choices.items()
    assert choice in names and key[3] == (len(shape) == 1)  # the per-token variant is a candidate for decode


def test_failing_path_falls_back_to_torch_and_logs_once(caplog, monkeypatch) -> None:
    def boom(*args) -> None:
        raise RuntimeError("no kernel for this shape")

    layer, state = _layer(torch.float32)
    x = torch.randn(4, IN, device=DEVICE)
    ids = torch.tensor([1, 2, 0, 1], device=DEVICE)
    want = _expected(layer.base(x), x, ids, layer.lora_A, layer.lora_B)
    for paths in (LoraPaths(torch_path, {"boom": boom}, force="boom"), LoraPaths(torch_path, {"boom": boom})):
        monkeypatch.setitem(MIXED_PATHS, DEVICE, paths)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="service.engine.lora_paths"):
            for _ in range(3):
                state.set(ids)
                with torch.no_grad():
                    _assert_matches(layer(x), want, torch.float32)
        assert len(caplog.records) == 1 and "boom" in caplog.text, caplog.text
        assert paths.force or set(paths.choices.values()) == {"bmm"}


def test_segments_are_computed_once_per_forward() -> None:
    paths = LoraPaths(torch_path, {})
    ids = torch.tensor([2, 1, 2], device=DEVICE)
    first = paths.segments(ids, 1, SLOTS)
    assert paths.segments(ids, 1, SLOTS) is first  # the next wrapped linear of the same forward
    ids[0] = 1  # a new batch in the same buffer (as CUDA-graph replays do)
    assert paths.segments(ids, 1, SLOTS).order.tolist() == [0, 1, 2]


def test_cpu_keeps_its_own_path() -> None:
    assert MIXED_PATHS["cpu"] is _add_lora_cpu and isinstance(MIXED_PATHS["cuda"], LoraPaths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("per_token", [False, True], ids=["segmented", "per_token"])
def test_cuda_graph_replays_follow_new_slot_ids(per_token: bool) -> None:
    """Segments and both kernels captured once, replayed over other slot ids: no host sync, no stale routing."""
    As, Bs = _stacks(16, 16, [24, 150], torch.bfloat16)
    ids = torch.tensor([1, 0, 3, 3, 5, 2, 2, 1], device=DEVICE)
    x = torch.randn(8, IN, device=DEVICE, dtype=torch.bfloat16)
    ys = [torch.zeros(8, out, device=DEVICE, dtype=torch.bfloat16) for out in (24, 150)]

    def body() -> None:
        for y in ys:
            y.zero_()
        triton_lora.add_lora(ys, x, As, Bs, segment_tokens(ids, 1, SLOTS), per_token)

    body()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for new in ([5, 5, 0, 1, 2, 3, 4, 4], [0] * 8, [2] * 8):
        ids.copy_(torch.tensor(new))
        graph.replay()
        torch.cuda.synchronize()
        for y, A, B in zip(ys, As, Bs, strict=True):
            _assert_matches(y, _expected(torch.zeros_like(y), x, ids, A, B), torch.bfloat16)
