"""A training recipe: every knob of one training run, read from YAML, `--set key=value` and CLI flags.

One dataclass so that the manifest can record exactly what produced an adapter (`asdict(recipe)`),
and so `make adapters` reproduces a shipped adapter from its YAML alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters.errors import LoraswapError

RECIPES_DIR = Path(__file__).parent / "recipes"

# Linear modules *inside* the transformer layers. A bare "dense" would also hit `bert.pooler.dense`,
# which the serving engine does not wrap; the pooler is trained through modules_to_save instead.
ENCODER_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Recipe:
    name: str = ""
    task: str = "classification"  # classification | generation | embedding
    data: str = ""  # a folder with train/validation/test files, or one training file
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"  # classification; embedding: pairs are drawn from same-label rows
    anchor_column: str = "anchor"  # embedding: pair data (used when both pair columns are present)
    positive_column: str = "positive"  # embedding
    prompt_column: str = "instruction"  # generation
    response_column: str = "response"  # generation
    stratify_column: str | None = None  # generation: column to stratify an automatic validation split
    system_prompt: str | None = None  # generation: optional system message in the chat template
    val_fraction: float = 0.1  # automatic stratified validation split when no validation file exists
    max_train_rows: int | None = None  # a slice, for quick runs and tests

    base: str | None = None  # default: the embedded encoder / decoder for the task
    method: str = "lora"  # lora | bitfit (classification only; BitFit is training-only, never published)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: list[str] | None = None  # default: ENCODER_TARGETS / DECODER_TARGETS
    use_rslora: bool = False
    train_pooler: bool = True  # classification: the pooler joins the classifier in modules_to_save
    freeze_embeddings: bool = True
    freeze_layers: int = 0  # LoRA is not applied to the lowest N layers (BitFit: their biases stay frozen)

    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0  # classification: soften one-hot targets (regularizes small, noisy data)
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    max_length: int = 128
    group_by_length: bool = True
    # embedding, labelled texts: 0 = random batches; N = each batch holds N rows of each of batch_size / N
    # labels that lie close together in the base's space (their in-batch negatives are the hard ones)
    confusable_batches: int = 0
    eval_steps: int = 200
    logging_steps: int = 20
    save_total_limit: int = 2
    early_stopping_patience: int = 5  # evaluations without improvement; 0 disables
    metric: str | None = None  # default: accuracy (classification) / loss (generation)
    seed: int = 42
    abstain_coverage: float = 0.95  # classification: the default min_score keeps this share of validation answered
    out_of_scope_label: str | None = None  # classification: rows of this label should abstain (not in the share)
    max_eval_rows: int | None = None  # cap the validation rows (model selection + report; speed); test: all
    num_samples: int = 5  # generation: sample replies in the report
    max_new_tokens: int = 160

    output_dir: str | None = None  # default runs/<name>
    registry: str | None = None  # publish here when set
    promote: str | None = None  # alias to point at the new version, e.g. "stable"
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded in the manifest

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)

    @property
    def best_metric(self) -> str:
        if self.metric:
            return self.metric
        return {"classification": "accuracy", "embedding": "accuracy_at_1"}.get(self.task, "loss")

    @property
    def targets(self) -> list[str]:
        if self.lora_targets:
            return list(self.lora_targets)
        return DECODER_TARGETS if self.task == "generation" else ENCODER_TARGETS

    def validate(self) -> Recipe:
        if not self.name:
            raise LoraswapError("a recipe needs a name (--name)")
        if self.task not in ("classification", "generation", "embedding"):
            raise LoraswapError(f"unknown task {self.task!r}: expected classification, generation or embedding")
        if not self.data and not self.train_file:
            raise LoraswapError("a recipe needs data (--data PATH)")
        if self.method not in ("lora", "bitfit"):
            raise LoraswapError(f"unknown method {self.method!r}: expected lora or bitfit")
        if self.method == "bitfit" and self.task != "classification":
            raise LoraswapError("BitFit is only supported for classification")
        if not 0.0 < self.val_fraction < 1.0:
            raise LoraswapError("val_fraction must be between 0 and 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise LoraswapError("label_smoothing must be in [0, 1)")
        if not 0.0 < self.abstain_coverage <= 1.0:
            raise LoraswapError("abstain_coverage must be in (0, 1]")
        if self.confusable_batches and (self.task != "embedding" or not 0 < self.confusable_batches <= self.batch_size):
            raise LoraswapError("confusable_batches is for embedding recipes: rows per label, 1..batch_size")
        if self.label_smoothing and self.task != "classification":
            raise LoraswapError("label_smoothing is only supported for classification")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


def _coerce(key: str, value: Any) -> Any:
    """Strings from `--set` go through YAML so `3`, `1e-3`, `true`, `null`, `[a, b]` get their types."""
    if key not in _FIELDS:
        raise LoraswapError(f"unknown recipe key {key!r} (known: {', '.join(sorted(_FIELDS))})")
    if isinstance(value, str):
        value = yaml.safe_load(value) if value != "" else None
    if key in ("lora_targets",) and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    # YAML reads 1e-3 as a string (YAML 1.1 needs a dot); float fields accept it anyway.
    if _FIELDS[key].type in ("float",) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise LoraswapError(f"recipe key {key}: expected a number, got {value!r}") from None
    return value


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Recipe from YAML (a path, or a shipped recipe name), then overrides (flags and `--set`) on top."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists() and (RECIPES_DIR / f"{path}.yaml").exists():
            p = RECIPES_DIR / f"{path}.yaml"
        if not p.is_file():
            raise LoraswapError(f"recipe {path} not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise LoraswapError(f"{p}: invalid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise LoraswapError(f"{p}: a recipe is a YAML mapping")
        values.update({k: _coerce(k, v) for k, v in loaded.items()})
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    return Recipe(**values).validate()


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["lora_r=8", "epochs=2"]` -> {"lora_r": "8", "epochs": "2"} (typed later by _coerce)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LoraswapError(f"--set expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value
    return out
