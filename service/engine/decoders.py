"""What differs between decoder families, as the model runner (model_runner.py) needs it: each family maps
a Hugging Face model onto `Block`s of the model's own modules plus a few hooks (q/k norms, sliding windows,
soft-caps). A family that is not listed here, or a feature that could not be served exactly, is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

QKV = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass
class Block:
    """One transformer block as the runner needs it; every module is the model's own.

    x += post_attn_norm(out_proj(attention(norm1(x)))); x += post_mlp_norm(mlp(norm2(x))), where a missing
    post norm is the identity. Attention: q, k = rope(q_norm(q), k_norm(k)) per head, scores
    softcap * tanh(q k^T * scaling / softcap) when `softcap` is set, and a query at position p sees cache
    positions p - window < j <= p (`window` None: every j <= p)."""

    norm1: nn.Module
    qkv: QKV  # h [B, T, hidden] -> q [B, T, H*hd], k, v [B, T, Hkv*hd]
    out_proj: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    scaling: float
    q_norm: nn.Module | None = None  # applied to [B, T, H, hd] before RoPE (Qwen3)
    k_norm: nn.Module | None = None
    post_attn_norm: nn.Module | None = None  # Gemma2
    post_mlp_norm: nn.Module | None = None  # Gemma2
    softcap: float | None = None  # attention-logit soft-capping (Gemma2)
    window: int | None = None  # sliding-window attention (Mistral, Gemma2's local layers, Qwen2/3 option)


class Decoder:
    """A decoder model as blocks plus the parts around them: embeddings, positions, output."""

    blocks: list[Block]
    final_norm: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    logit_softcap: float | None = None  # final-logit soft-capping (Gemma2)
    max_positions: int | None = None  # the longest context served exactly (None: no limit of its own)
    apply_rope: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token (+ position) embeddings, and the rotary (cos, sin) for `positions` if the family uses RoPE."""
        raise NotImplementedError


class LlamaDecoder(Decoder):
    """Llama family (SmolLM2): RMSNorm, GQA, RoPE, separate q/k/v projections, gated MLP. The other RoPE
    families share its layout (model.model.layers[i].self_attn / .mlp) and override small hooks."""

    family = "llama"  # transformers.models.<family>.modeling_<family> holds the family's apply_rotary_pos_emb

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.check(cfg)
        modeling = importlib.import_module(f"transformers.models.{self.family}.modeling_{self.family}")
        inner = model.model
        self.inner, self.apply_rope = inner, modeling.apply_rotary_pos_emb
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.blocks = [self.block(layer, cfg) for layer in inner.layers]
        self.final_norm, self.lm_head = inner.norm, model.lm_head
        self.max_positions = self._rope_limit(cfg)

    def check(self, cfg) -> None:
        """Refuse what this runner would not compute as the family's modeling code does."""
        kinds = set(getattr(cfg, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
        if kinds:
            raise ValueError(f"{cfg.model_type}: attention layer types {sorted(kinds)} are not supported")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError(
                f"{cfg.model_type}: bidirectional attention is not supported by a causal decoder"
            )

    @staticmethod
    def _rope_limit(cfg) -> int | None:
        """LongRoPE switches every position's frequencies once the longest position of a forward passes the
        pre-training length, so a batch mixing short and long rows would rotate the short ones wrongly:
        serve contexts up to that length only (where HF uses the short factors too)."""
        rope = getattr(cfg, "rope_parameters", None) or {}
        if rope.get("rope_type") != "longrope":
            return None
        return rope.get("original_max_position_embeddings") or cfg.original_max_position_embeddings

    def block(self, layer: nn.Module, cfg) -> Block:
        attn = layer.self_attn
        return Block(
            norm1=layer.input_layernorm,
            qkv=self.qkv(attn),
            out_proj=attn.o_proj,
            norm2=layer.post_attention_layernorm,
            mlp=layer.mlp,
            scaling=attn.scaling,
            window=self.window(attn, cfg),
        )

    def qkv(self, attn: nn.Module) -> QKV:
        # Read the projections at call time: LoRA injection may replace them after construction.
        return lambda h: (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))

    def window(self, attn: nn.Module, cfg) -> int | None:
        """The block's sliding window. Families with per-layer windows (layer_types) keep it on the
        attention module, as their modeling code reads it."""
        return getattr(attn, "sliding_window", None)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        x = self.inner.embed_tokens(input_ids)
        return x, self.inner.rotary_emb(x, positions)


class Qwen2Decoder(LlamaDecoder):
    """Qwen2/2.5: Llama with q/k/v biases (the projections' own) and optional sliding layers (layer_types)."""

    family = "qwen2"


class Qwen3Decoder(LlamaDecoder):
    """Qwen3: per-head RMSNorm of q and k before RoPE."""

    family = "qwen3"

    def block(self, layer: nn.Module, cfg) -> Block:
        blk = super().block(layer, cfg)
        blk.q_norm, blk.k_norm = layer.self_attn.q_norm, layer.self_attn.k_norm
        return blk


class MistralDecoder(LlamaDecoder):
    """Mistral: every layer attends within `config.sliding_window` (None: full attention)."""

    family = "mistral"

    def window(self, attn: nn.Module, cfg) -> int | None:
        return cfg.sliding_window


class Phi3Decoder(MistralDecoder):
    """Phi-3: one fused qkv_proj; the fused gate_up_proj lives inside the model's MLP module; partial
    rotary is applied by the family's own apply_rotary_pos_emb; a sliding window, if set, on every layer."""

    family = "phi3"

    def qkv(self, attn: nn.Module) -> QKV:
        sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        return lambda h: attn.qkv_proj(h).split(sizes, dim=-1)


class GemmaDecoder(LlamaDecoder):
    """Gemma: RMSNorm scaled by (1 + weight) and a GeGLU MLP (the model's own modules); embeddings times
    sqrt(hidden) rounded to the model's dtype, which the model's scaled embedding module does itself."""

    family = "gemma"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # transformers < 5 scaled the embeddings in the model's forward, which the runner does not call.
        if not hasattr(self.inner.embed_tokens, "embed_scale"):
            raise ValueError(f"{self.family}: the embedding module does not scale by sqrt(hidden)")


class Gemma2Decoder(GemmaDecoder):
    """Gemma2: norms after attention and around the MLP, attention-logit and final-logit soft-capping,
    sliding-window layers alternating with global ones, scaling by query_pre_attn_scalar**-0.5."""

    family = "gemma2"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.logit_softcap = model.config.final_logit_softcapping

    def block(self, layer: nn.Module, cfg) -> Block:
        blk = super().block(layer, cfg)
        # Gemma2's post_attention_layernorm normalises the attention output; the MLP input has its own.
        blk.post_attn_norm, blk.norm2 = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
        blk.post_mlp_norm = layer.post_feedforward_layernorm
        blk.softcap = layer.self_attn.attn_logit_softcapping
        return blk


class GPT2Decoder(Decoder):
    """GPT-2: LayerNorm, learned positions, one fused Conv1D c_attn for q/k/v, no RoPE."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        inner = model.transformer
        self.inner = inner
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.blocks = [
            Block(
                norm1=layer.ln_1,
                qkv=self._qkv(layer.attn, cfg.n_embd),
                out_proj=layer.attn.c_proj,
                norm2=layer.ln_2,
                mlp=layer.mlp,
                scaling=layer.attn.scaling,
            )
            for layer in inner.h
        ]
        self.final_norm, self.lm_head = inner.ln_f, model.lm_head

    @staticmethod
    def _qkv(attn: nn.Module, hidden: int) -> QKV:
        return lambda h: attn.c_attn(h).split(hidden, dim=-1)

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        return self.inner.wte(input_ids) + self.inner.wpe(positions), None


DECODERS: dict[str, type[Decoder]] = {
    "llama": LlamaDecoder,
    "gpt2": GPT2Decoder,
    "qwen2": Qwen2Decoder,
    "qwen3": Qwen3Decoder,
    "mistral": MistralDecoder,
    "gemma": GemmaDecoder,
    "gemma2": Gemma2Decoder,
    "phi3": Phi3Decoder,
}


def decoder_for(model: nn.Module) -> Decoder:
    model_type = model.config.model_type
    if model_type not in DECODERS:
        raise ValueError(f"unsupported decoder {model_type!r}; supported: {sorted(DECODERS)}")
    return DECODERS[model_type](model)
