"""The PEFT LoRA contract, in one place: what `adapter_config.json` means and how the safetensors keys are laid
out. Validation (format.py), import, training's publish and both engines read adapters through this module.

Where PEFT has the rule as a function (target matching, rank/alpha patterns), it is called, not rewritten:
an adapter is served the way PEFT itself would apply it.

What is served: LoRA on any Linear/Conv1D (`target_modules` as a list, a regex or `all-linear`, with
`exclude_modules`, `layers_to_transform`/`layers_pattern`), per-module `rank_pattern`/`alpha_pattern`,
`use_rslora`, `lora_bias`, `use_dora`, `fan_in_fan_out` (it only says how the base stores a Conv1D weight;
the saved A/B layout is the same), and `modules_to_save` heads. Everything else is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import Tensor

from adapters.errors import AdapterValidationError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "generation", "FEATURE_EXTRACTION": "embedding"}
# The task of the base an adapter's task is served on: embedding adapters run on the encoder base.
BASE_TASKS = {"embedding": "classification"}
ALL_LINEAR = "all-linear"
# PEFT's classification heads, which `all-linear` leaves out (peft.utils.constants.SEQ_CLS_HEAD_NAMES).
SEQ_CLS_HEADS = ("score", "classifier")

# PEFT options that cannot be served exactly, with the reason shown when an adapter uses one.
UNSUPPORTED_OPTIONS = {
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices (trainable tokens) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "loftq_config": "LoftQ (loftq_config) is not supported: it changes the base weights",
    "megatron_config": "Megatron layers (megatron_config) are not supported",
    "modules_to_tie": "modules_to_tie (tied trainable embeddings) is not supported",
}
# Initialisations that rewrite the base weights: the adapter would only be right on that modified base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")
# A LoRA module's saved tensors: `<path>.<part>` after PEFT_PREFIX.
_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias", "lora_magnitude_vector": "magnitude"}
_LORA_KEY = re.compile(r"(.+)\.(" + "|".join(map(re.escape, _PARTS)) + ")")


@dataclass
class LoraModule:
    """One module's adapter in PEFT's layout and meaning: delta(x) = scale * (B A x + bias), and with DoRA
    the output rescaled per row by magnitude / ||W + scale B A||_row (peft.tuners.lora.dora)."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float
    bias: Tensor | None = None  # lora_B's bias [out] (lora_bias=True)
    magnitude: Tensor | None = None  # DoRA's magnitude vector [out] (use_dora=True)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.A, self.B, self.bias, self.magnitude) if t is not None]

    def map(self, fn) -> LoraModule:
        """The same module with every tensor passed through `fn` (pinning, moving)."""
        return LoraModule(fn(self.A), fn(self.B), self.scale, *(None if t is None else fn(t)
                                                                for t in (self.bias, self.magnitude)))

    def dora_scale(self, weight_sq: Tensor, weight_a: Tensor) -> Tensor:
        """DoRA's per-output factor magnitude / ||W + scale B A||_row, from ||W_row||^2 [out] and W A^T
        [out, r] (what an engine can compute without a dense W: a packed linear applied to A's rows).
        ||W + sBA||^2 = ||W||^2 + 2s <W, BA> + s^2 ||BA||^2 per row, summed in float64."""
        b, a = self.B.double(), self.A.double()
        cross = (weight_a.double() * b).sum(1)
        lora_sq = ((b @ a) ** 2).sum(1)
        norm = (weight_sq.double() + 2 * self.scale * cross + self.scale**2 * lora_sq).clamp_min(0).sqrt()
        return (self.magnitude.double() / norm).float()

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(weight [out, in], bias) of an nn.Linear with this adapter merged in: exact where the engine keeps a
        private copy of the module per slot (a pooler or head), so no LoRA runs there at serving time."""
        w = weight.float() + self.scale * (self.B.float() @ self.A.float())
        if self.magnitude is not None:
            w = w * self.dora_scale((weight.float() ** 2).sum(1), weight.float() @ self.A.float().t())[:, None]
        if self.bias is not None:
            extra = self.scale * self.bias.float()
            bias = extra if bias is None else bias.float() + extra
        return w.to(weight.dtype), None if bias is None else bias.to(weight.dtype)


def read_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA folder, refused with the option's name if it cannot be served."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError(f"{CONFIG_FILE} is missing from {folder}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{CONFIG_FILE}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{CONFIG_FILE}: expected a JSON object")
    check_config(config)
    return config


def check_config(config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterValidationError(
            f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not supported (LORA only)"
        )
    for key, reason in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise AdapterValidationError(f"{CONFIG_FILE}: {reason}")
    if config.get("use_dora") and config.get("lora_bias"):
        raise AdapterValidationError(f"{CONFIG_FILE}: lora_bias with use_dora is not a PEFT combination")
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(
            f"{CONFIG_FILE}: bias={config['bias']!r} (trained base biases) is not supported (only 'none')"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterValidationError(
            f"{CONFIG_FILE}: init_lora_weights={init!r} changes the base weights; not supported"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterValidationError(f"{CONFIG_FILE}: r must be a positive integer and lora_alpha a number")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) for v in pattern.values()):
            raise AdapterValidationError(f"{CONFIG_FILE}: {key} must map module patterns to numbers")
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, (str, list)):
        raise AdapterValidationError(f"{CONFIG_FILE}: target_modules is empty")


def is_target(config: dict[str, Any], path: str) -> bool:
    """PEFT's own rule (check_target_module_exists): list entries match a path or its suffix, a string is a
    full-match regex, then exclude_modules, modules_to_save and layers_to_transform/layers_pattern.
    `all-linear` (kept as a string only in hand-written configs; PEFT saves the expanded list) matches every
    module but the heads PEFT leaves out; whether it is a Linear is checked against the base."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if path.split(".")[0] in SEQ_CLS_HEADS or path == "lm_head":
            return False
        targets = [path]
    view = SimpleNamespace(
        target_modules=targets,
        exclude_modules=config.get("exclude_modules"),
        modules_to_save=config.get("modules_to_save"),
        target_parameters=None,
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
    )
    return bool(check_target_module_exists(view, path))


def module_rank_alpha(config: dict[str, Any], path: str) -> tuple[int, float]:
    """(r, alpha) of one module after rank_pattern/alpha_pattern (PEFT's get_pattern_key)."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(list(ranks), path), config["r"])
    alpha = alphas.get(get_pattern_key(list(alphas), path), config["lora_alpha"])
    return int(r), float(alpha)


def scale_of(config: dict[str, Any], r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def default_scale(config: dict[str, Any]) -> float:
    return scale_of(config, int(config["r"]), float(config["lora_alpha"]))


def _in_modules_to_save(path: str, modules: list[str]) -> bool:
    """PEFT's rule (peft.utils.other._set_trainable): a module is saved in full when its path ends with an
    entry, as plain text: `classifier` also matches DistilBERT's `pre_classifier`. `path` may be inside it."""
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p.endswith(m) for p in prefixes for m in modules)


def base_path(path: str, modules: dict[str, Any] | None) -> str:
    """Map a path saved against a bare backbone (AutoModel) onto the base's paths (`bert.` + path)."""
    if modules is None or path in modules:
        return path
    roots = {m.split(".", 1)[0] for m in modules}
    found = [f"{root}.{path}" for root in roots if f"{root}.{path}" in modules]
    return found[0] if len(found) == 1 else path


def split_tensors(
    tensors: dict[str, Tensor], config: dict[str, Any], modules: dict[str, Any] | None = None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Sort PEFT's saved keys into LoRA parts `{path: {"A", "B", "bias"?, "magnitude"?}}` and head tensors
    `{path.param: t}` (modules_to_save); paths are the base's (`modules`: its Linear paths, when known)."""
    lora: dict[str, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    modules_to_save = list(config.get("modules_to_save") or [])
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterValidationError(f"{WEIGHTS_FILE}: unexpected tensor {key!r} (expected {PEFT_PREFIX}...)")
        rest = key[len(PEFT_PREFIX) :]
        match = _LORA_KEY.fullmatch(rest)
        if match:
            path, part = match[1], _PARTS[match[2]]
            if not is_target(config, path):
                raise AdapterValidationError(f"{WEIGHTS_FILE}: {path} has LoRA weights but is not a target")
            lora.setdefault(base_path(path, modules), {})[part] = tensor
        elif ".lora_" in rest:
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: {key!r} is a LoRA tensor this server cannot serve (LoRA on embeddings"
                " or another non-Linear layer)"
            )
        elif rest.rsplit(".", 1)[-1] in ("weight", "bias") and _in_modules_to_save(
            rest.rsplit(".", 1)[0], modules_to_save
        ):
            module, param = rest.rsplit(".", 1)
            head[f"{base_path(module, modules)}.{param}"] = tensor
        else:
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: unexpected tensor {key!r} (neither LoRA nor modules_to_save)"
            )
    if not lora:
        raise AdapterValidationError(f"{WEIGHTS_FILE}: no LoRA weights found")
    return lora, head


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, tensor: Tensor) -> None:
    """A float dtype we serve, and finite values: a NaN or Inf would answer `null` scores or garbage text."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise AdapterValidationError(f"{name}: dtype {tensor.dtype} is not supported (float32/float16/bfloat16)")
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterValidationError(f"{name}: has NaN or infinite values")


def lora_modules(
    parts: dict[str, dict[str, Tensor]],
    config: dict[str, Any],
    modules: dict[str, tuple[int, int]] | None,
    max_rank: int,
    base_name: str = "the base",
) -> dict[str, LoraModule]:
    """Check every module's tensors against the config (rank, DoRA, bias) and the base's shapes (when
    `modules` is given: path -> (in, out)), and return them as LoraModules."""
    dora, with_bias = bool(config.get("use_dora")), bool(config.get("lora_bias"))
    out: dict[str, LoraModule] = {}
    for path, found in sorted(parts.items()):
        for need in ("A", "B"):
            if need not in found:
                raise AdapterValidationError(f"{path}: has LoRA tensors {sorted(found)} but no lora_{need}")
        if ("magnitude" in found) != dora:
            raise AdapterValidationError(
                f"{path}: lora_magnitude_vector {'missing' if dora else 'present'} but use_dora={dora}"
            )
        if ("bias" in found) != with_bias:
            raise AdapterValidationError(f"{path}: lora_B.bias {'missing' if with_bias else 'present'} but lora_bias={with_bias}")
        for part, t in found.items():
            check_tensor(f"{path}.{part}", t)
        a, b = found["A"], found["B"]
        for which, t in (("lora_A", a), ("lora_B", b)):
            if t.dim() != 2:
                raise AdapterValidationError(f"{path}.{which}: expected a 2-D tensor, got shape {list(t.shape)}")
        r, alpha = module_rank_alpha(config, path)
        if r > max_rank:
            raise AdapterValidationError(f"{path}: rank {r} exceeds the maximum rank {max_rank}")
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterValidationError(
                f"{path}: wrong shape: lora_A {list(a.shape)}, lora_B {list(b.shape)} do not match rank {r}"
            )
        for part in ("bias", "magnitude"):
            if part in found and list(found[part].shape) != [b.shape[0]]:
                raise AdapterValidationError(
                    f"{path}: {part} has shape {list(found[part].shape)}, expected [{b.shape[0]}]"
                )
        if modules is not None:
            if path not in modules:
                raise AdapterValidationError(f"{path}: no such Linear/Conv1D module in {base_name}")
            fan_in, fan_out = modules[path]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise AdapterValidationError(
                    f"{path}: wrong shape: lora_A {list(a.shape)}, lora_B {list(b.shape)} do not fit the base module"
                    f" (in={fan_in}, out={fan_out})"
                )
        out[path] = LoraModule(a.contiguous(), b.contiguous(), scale_of(config, r, alpha),
                               found.get("bias"), found.get("magnitude"))  # fmt: skip
    return out


def manifest_lora(config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `lora` fields read from a PEFT config (target_modules may be a list or a regex)."""
    targets = config["target_modules"]
    return dict(
        r=config["r"],
        alpha=config["lora_alpha"],
        targets=sorted(targets) if isinstance(targets, list) else [targets],
        dropout=config.get("lora_dropout") or 0.0,
        use_rslora=bool(config.get("use_rslora")),
    )


def seq_cls_heads(names: set[str] | list[str]) -> list[str]:
    """Which of a model's module names PEFT's SEQ_CLS trains in full: its classifier head."""
    return [n for n in SEQ_CLS_HEADS if n in names]
