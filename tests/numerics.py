"""Tolerances for comparing two float computations of the same value that sum in different orders.

Different kernels (oneDNN vs MKL, bmm vs addmm, SDPA vs matmul+softmax) and different CPUs (AVX2 vs
AVX-512/AMX) add the same terms in other orders, so bit-equal results are not expected. Recursive
summation of n terms errs by at most n*u*sum|terms| with u = eps/2 (Higham, Accuracy and Stability of
Numerical Algorithms, Thm 4.1); two orders differ by at most twice that, n*eps*sum|terms|. Through a
network the first-order errors of each reduction on the path add up, so `n` is the sum of the reduction
lengths along the longest path, and `magnitude` bounds the |terms| (the largest |value| compared).
A wrong slot, position or weight moves outputs by O(magnitude), far above this bound.
"""

from __future__ import annotations

import torch


def reorder_atol(dtype: torch.dtype, reduction: int, magnitude: float) -> float:
    """Absolute tolerance for results of `magnitude` after reductions of total length `reduction`."""
    return torch.finfo(dtype).eps * reduction * max(magnitude, 1.0)


def decoder_reduction(config, span: int) -> int:
    """Sum of the reduction lengths on one token's path through a Llama/GPT-2-style decoder: per layer the
    q/k/v, score (head_dim), attention (the `span` cache positions read), output, MLP up and down
    projections and two norms; then the final norm and the LM head."""
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    per_layer = hidden + hidden // heads + span + hidden + hidden + inter + 2 * hidden
    return layers * per_layer + 2 * hidden
