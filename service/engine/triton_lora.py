"""Triton kernels for the multi-LoRA delta y_t += (x A_t[s]) B_t[s] of up to three targets sharing x
(query/key/value), s the token's slot; the LoRA scale is folded into B at load time (lora.py).

Two kernels per variant, as Punica and vLLM split it: shrink (xa_t = x A_t[s], rank-wide) and expand-add
(y_t += xa_t B_t[s]), each one launch for every target. The segmented variant (Punica's SGMV) reads the
tokens of each slot through `Segments` (lora_segments.py), so a tile of tokens shares one slot's A/B;
the per-token variant (BGMV) is for decode, one token per row, where segments hold a token or two. Every
launch grid is fixed by shapes alone (tokens, slots, targets, output tiles): programs past their slot's
tokens, and all of slot 0 (no adapter), return at once. Nothing reads device values on the host, so the
launches can be captured in a CUDA graph. The rank loop bound is A's last dimension: slice the stacks to
the batch's real maximum rank before calling and no padded rank column is read.

`TRITON_INTERPRET=1` runs these on CPU tensors (the tests). The interpreter's `tl.dot` multiplies the bit
patterns of bfloat16 operands (triton-lang/triton#11584, unsupported there), so under it the operands
are upcast to fp32 first; a GPU multiplies them as they are, accumulating in fp32 either way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from service.engine.lora_segments import Segments

# triton.jit reads the same variable when this module's kernels are decorated, i.e. at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MAX_TARGETS = 3
_PICKED = ["n0", "n1", "n2", "sb_s0", "sb_s1", "sb_s2", "sb_r0", "sb_r1", "sb_r2", "sy0", "sy1", "sy2"]


@triton.jit
def _pick(t, v0, v1, v2):
    """Target t's value of a per-target argument (pointers and strides of up to three targets)."""
    if t == 0:
        v = v0
    elif t == 1:
        v = v1
    else:
        v = v2
    return v


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:  # fp32 stacks: exact fp32 like torch's matmul, not TF32
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _segment(order_ptr, bounds_ptr, slot, pid_m, BLOCK_M: tl.constexpr):
    """This program's tokens: up to BLOCK_M of slot `slot`'s, by their place in `order`."""
    start = tl.load(bounds_ptr + slot)
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = i < tl.load(bounds_ptr + slot + 1) - start
    return tl.load(order_ptr + start + i, mask=ok, other=0), ok


@triton.jit
def _shrink_segmented(
    x_ptr, a0, a1, a2, xa_ptr, order_ptr, bounds_ptr, K, R, r_tiles,
    sx_m, sx_k, sa_s, sa_k, sa_r, sxa_t, sxa_m,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m, slot, pid_tr = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    span = tl.load(bounds_ptr + slot + 1) - tl.load(bounds_ptr + slot)
    if (slot == 0) | (pid_m * BLOCK_M >= span):
        return
    tok, m_ok = _segment(order_ptr, bounds_ptr, slot, pid_m, BLOCK_M)
    t = pid_tr // r_tiles
    r = (pid_tr % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    a_ptr = _pick(t, a0, a1, a2) + slot.to(tl.int64) * sa_s
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + tok[:, None] * sx_m + k[None, :] * sx_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + k[:, None] * sa_k + r[None, :] * sa_r, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc += _dot(x, a, UPCAST, IEEE)
    out = xa_ptr + t * sxa_t + tok[:, None] * sxa_m + r[None, :]
    tl.store(out, acc.to(xa_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=_PICKED)
def _expand_segmented(
    xa_ptr, b0, b1, b2, y0, y1, y2, order_ptr, bounds_ptr, R, n0, n1, n2, n_tiles,
    sxa_t, sxa_m, sb_s0, sb_s1, sb_s2, sb_r0, sb_r1, sb_r2, sy0, sy1, sy2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m, slot, pid_tn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, tile = pid_tn // n_tiles, pid_tn % n_tiles
    N = _pick(t, n0, n1, n2)
    span = tl.load(bounds_ptr + slot + 1) - tl.load(bounds_ptr + slot)
    if (slot == 0) | (pid_m * BLOCK_M >= span) | (tile * BLOCK_N >= N):
        return
    tok, m_ok = _segment(order_ptr, bounds_ptr, slot, pid_m, BLOCK_M)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    b_ptr = _pick(t, b0, b1, b2) + slot.to(tl.int64) * _pick(t, sb_s0, sb_s1, sb_s2)
    sb_r = _pick(t, sb_r0, sb_r1, sb_r2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # R: the batch's max rank when the caller sliced the stacks to it
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        xa = tl.load(xa_ptr + t * sxa_t + tok[:, None] * sxa_m + r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + r[:, None] * sb_r + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(xa, b, UPCAST, IEEE)
    y_ptr = _pick(t, y0, y1, y2) + tok[:, None] * _pick(t, sy0, sy1, sy2) + n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr, (y + acc).to(y0.dtype.element_ty), mask=mask)


@triton.jit
def _shrink_per_token(
    x_ptr, a0, a1, a2, xa_ptr, slots_ptr, K, R, r_tiles,
    sx_m, sx_k, sa_s, sa_k, sa_r, sxa_t, sxa_m,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    m, pid_tr = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + m)
    if slot == 0:
        return
    t = pid_tr // r_tiles
    r = (pid_tr % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    a_ptr = _pick(t, a0, a1, a2) + slot * sa_s
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # a GEMV: too few rows for tensor cores
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + m * sx_m + k * sx_k, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + k[:, None] * sa_k + r[None, :] * sa_r, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.sum(x[:, None] * a.to(tl.float32), axis=0)
    tl.store(xa_ptr + t * sxa_t + m * sxa_m + r, acc.to(xa_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=_PICKED)
def _expand_per_token(
    xa_ptr, b0, b1, b2, y0, y1, y2, slots_ptr, R, n0, n1, n2, n_tiles,
    sxa_t, sxa_m, sb_s0, sb_s1, sb_s2, sb_r0, sb_r1, sb_r2, sy0, sy1, sy2,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    m, pid_tn = tl.program_id(0), tl.program_id(1)
    t, tile = pid_tn // n_tiles, pid_tn % n_tiles
    N = _pick(t, n0, n1, n2)
    slot = tl.load(slots_ptr + m)
    if (slot == 0) | (tile * BLOCK_N >= N):
        return
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    b_ptr = _pick(t, b0, b1, b2) + slot * _pick(t, sb_s0, sb_s1, sb_s2)
    sb_r = _pick(t, sb_r0, sb_r1, sb_r2)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        xa = tl.load(xa_ptr + t * sxa_t + m * sxa_m + r, mask=r_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + r[:, None] * sb_r + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.sum(xa[:, None] * b.to(tl.float32), axis=0)
    y_ptr = _pick(t, y0, y1, y2) + m * _pick(t, sy0, sy1, sy2) + n
    y = tl.load(y_ptr, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr, (y + acc).to(y0.dtype.element_ty), mask=n_ok)


def _three(values: list) -> list:
    """Per-target kernel arguments for exactly MAX_TARGETS targets: unused ones repeat the first."""
    return values + [values[0]] * (MAX_TARGETS - len(values))


def _check(ys: list[Tensor], x: Tensor, As: list[Tensor], Bs: list[Tensor]) -> None:
    if not 1 <= len(As) == len(Bs) == len(ys) <= MAX_TARGETS:
        raise ValueError(f"1 to {MAX_TARGETS} targets, each with A, B and y; got {len(As)}, {len(Bs)}, {len(ys)}")
    tokens, inp = x.shape
    for A, B, y in zip(As, Bs, ys, strict=True):
        if A.shape != As[0].shape or A.stride() != As[0].stride() or A.shape[1] != inp:
            raise ValueError(f"targets sharing x need A stacks [S, {inp}, R] of one shape and layout")
        if B.shape[:2] != (A.shape[0], A.shape[2]) or B.stride(2) != 1:
            raise ValueError(f"B {tuple(B.shape)} is not [S, R, out] with unit stride over out")
        if y.shape != (tokens, B.shape[2]) or y.stride(1) != 1:
            raise ValueError(f"y {tuple(y.shape)} is not [{tokens}, {B.shape[2]}] with unit stride over out")
        if not x.dtype == A.dtype == B.dtype == y.dtype:
            raise ValueError("x, A, B and y must share one dtype")


def _rank_block(rank: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rank)))  # tl.dot needs >= 16 per dimension


def add_lora(ys: list[Tensor], x: Tensor, As: list[Tensor], Bs: list[Tensor], segments: Segments,
             per_token: bool = False) -> None:  # fmt: skip
    """ys[t] += (x A_t[s]) B_t[s] in place, s = segments.slots[token]. x [tokens, in]; As [S, in, R] (one
    shape for all targets; their last dim is the rank loop bound); Bs [S, R, out_t]; ys [tokens, out_t].
    `per_token`: the decode variant (BGMV), which ignores the segments' order."""
    _check(ys, x, As, Bs)
    tokens, inp = x.shape
    slots, rank, targets = As[0].shape[0], As[0].shape[2], len(As)
    if tokens == 0:
        return
    xa = torch.empty(targets, tokens, rank, dtype=x.dtype, device=x.device)
    block_r = _rank_block(rank)
    r_tiles = triton.cdiv(rank, block_r)
    block_n = 64 if max(B.shape[2] for B in Bs) <= 64 else 128
    n_tiles = triton.cdiv(max(B.shape[2] for B in Bs), block_n)
    a_args = (*_three(As), xa)
    shrink_strides = (inp, rank, r_tiles, x.stride(0), x.stride(1), *As[0].stride(), xa.stride(0), xa.stride(1))
    expand_args = (xa, *_three(Bs), *_three(ys))
    per_target = (
        rank, *_three([B.shape[2] for B in Bs]), n_tiles, xa.stride(0), xa.stride(1),
        *_three([B.stride(0) for B in Bs]), *_three([B.stride(1) for B in Bs]), *_three([y.stride(0) for y in ys]),
    )  # fmt: skip
    if per_token:
        _shrink_per_token[(tokens, targets * r_tiles)](x, *a_args, segments.slots, *shrink_strides,
                                                        BLOCK_K=128, BLOCK_R=block_r)  # fmt: skip
        _expand_per_token[(tokens, targets * n_tiles)](*expand_args, segments.slots, *per_target,
                                                        BLOCK_N=block_n, BLOCK_R=block_r)  # fmt: skip
        return
    block_m = 16 if tokens <= 256 else 64
    flags = {"UPCAST": INTERPRETED, "IEEE": x.dtype == torch.float32}
    grid_m = triton.cdiv(tokens, block_m)  # a slot may own every token
    seg = (segments.order, segments.bounds)
    _shrink_segmented[(grid_m, slots, targets * r_tiles)](x, *a_args, *seg, *shrink_strides, BLOCK_M=block_m,
                                                          BLOCK_K=64, BLOCK_R=block_r, **flags)  # fmt: skip
    _expand_segmented[(grid_m, slots, targets * n_tiles)](*expand_args, *seg, *per_target, BLOCK_M=block_m,
                                                          BLOCK_N=block_n, BLOCK_R=block_r, **flags)  # fmt: skip
