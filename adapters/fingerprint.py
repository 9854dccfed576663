"""Base-model identity: a fingerprint of the backbone's config and a sample of its weights.

An adapter records the fingerprint of the base it was trained on; format.py refuses it on any other base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn

FINGERPRINT_VERSION = b"loraswap-fingerprint-v1"
SAMPLES_PER_TENSOR = 32

# Config fields that do not change what the backbone computes, so they must not change its identity:
# - where/how it was loaded: `_name_or_path`, `transformers_version`, `torch_dtype`/`dtype` (the same weights
#   served in bf16 on a GPU are the same base), `_commit_hash`, `quantization_config` (a GGUF base is
#   dequantized once and its weights are what we sample);
# - the task head, which sits outside the backbone: `architectures` (AutoModel vs ...ForSequenceClassification),
#   `id2label`/`label2id`/`num_labels`, `problem_type`, `finetuning_task`, `classifier_dropout`;
# - runtime switches: `use_cache`, `output_attentions`, `output_hidden_states`, `return_dict`, `torchscript`.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "quantization_config",
        "architectures", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
        "classifier_dropout", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
        "torchscript",
    }
)  # fmt: skip


def backbone(model: nn.Module) -> nn.Module:
    """The model without its task head (`model.base_model` in Hugging Face: `bert`, `model`, `transformer`)."""
    return getattr(model, "base_model", None) or model


def _config_json(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    data = config.to_dict() if config is not None else {}
    kept = {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, default=str)


def _weight_sample(tensor: torch.Tensor) -> bytes:
    """Evenly spaced elements, rounded to bfloat16 so fp32 and bf16 copies of the same weights agree."""
    flat = tensor.detach().reshape(-1)
    count = min(SAMPLES_PER_TENSOR, flat.numel())
    if count == 0:
        return b""
    index = torch.arange(count, dtype=torch.int64) * flat.numel() // count  # integer math: same everywhere
    values = flat[index.to(flat.device)].to(torch.float32).to(torch.bfloat16).cpu()
    return values.view(torch.int16).numpy().astype("<i2").tobytes()


def fingerprint(model: nn.Module) -> str:
    """`sha256:<hex>` of the backbone's config (minus volatile fields) and a deterministic weight sample."""
    core = backbone(model)
    digest = hashlib.sha256(FINGERPRINT_VERSION + b"\0")
    digest.update(_config_json(core).encode())
    for name, param in sorted(core.named_parameters(), key=lambda item: item[0]):
        digest.update(f"\0{name}\0{list(param.shape)}\0".encode())
        digest.update(_weight_sample(param))
    return f"sha256:{digest.hexdigest()}"


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (whose weight is [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    return None


@dataclass
class BaseModelInfo:
    """What validation needs to know about a loaded base model."""

    name: str
    fingerprint: str
    task: str  # "classification" | "generation"
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)


def describe_base(model: nn.Module, name: str, task: str) -> BaseModelInfo:
    """Fingerprint `model` and list every Linear/Conv1D by its path in the full model (e.g. `bert.encoder...`)."""
    modules = {}
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and path:
            modules[path] = shape
    return BaseModelInfo(name=name, fingerprint=fingerprint(model), task=task, modules=modules)
