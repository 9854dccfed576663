"""Sentence-embedding pooling as the base says: its sentence-transformers files (`modules.json`, the
Pooling module's `config.json`, a Normalize module), so served vectors equal `SentenceTransformer.encode`.

Shared by the service (embedding rows) and training (retrieval evaluation); the rule is written once here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from adapters.errors import LoraswapError

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
# sentence-transformers' Pooling concatenates the enabled modes in this order.
_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")


@dataclass(frozen=True)
class Pooling:
    """Token states [batch, seq, hidden] + attention mask [batch, seq] -> one vector per row."""

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False
    max_seq_length: int | None = None

    def __call__(self, hidden: Tensor, mask: Tensor) -> Tensor:
        hidden = hidden.float()
        m = mask.to(hidden.dtype).unsqueeze(-1)
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(m == 0, -1e9).max(1).values)
            elif mode == "lasttoken":
                # The last attended position of each row (right padding; left padding ends at seq - 1).
                last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
                parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
            else:
                total, count = (hidden * m).sum(1), m.sum(1).clamp_min(1e-9)
                parts.append(total / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count))
        out = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        return torch.nn.functional.normalize(out, p=2, dim=1) if self.normalize else out


def read_pooling(model_dir: str | Path | None) -> Pooling:
    """The pooling of a local base folder. Without `modules.json` (a plain Hugging Face encoder) it is
    mean pooling without normalisation, sentence-transformers' own fallback. Modules that change the vector
    beyond pooling and normalising (Dense, ...) are refused by name: serving them would give other vectors."""
    folder = Path(model_dir) if model_dir else None
    if folder is None or not (folder / "modules.json").is_file():
        return Pooling()
    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [m["type"] for m in modules]
        pooling_cfg: dict = {}
        for module in modules:
            if module["type"] == _POOLING:
                pooling_cfg = json.loads((folder / module["path"] / "config.json").read_text())
        bert_cfg = folder / "sentence_bert_config.json"
        max_len = json.loads(bert_cfg.read_text()).get("max_seq_length") if bert_cfg.is_file() else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoraswapError(f"{folder}: unreadable sentence-transformers files ({exc})") from None
    other = [k for k in kinds if k not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if other:
        raise LoraswapError(f"{folder}: sentence-transformers module {other[0]} is not supported for embeddings")
    modes = tuple(m for m in _MODES if pooling_cfg.get(f"pooling_mode_{m}"))
    if pooling_cfg.get("pooling_mode_weightedmean_tokens"):
        raise LoraswapError(f"{folder}: weighted-mean pooling is not supported")
    return Pooling(modes=modes or ("mean_tokens",), normalize=_NORMALIZE in kinds, max_seq_length=max_len)
