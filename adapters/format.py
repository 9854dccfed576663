"""One adapter version folder: read it, validate everything before it is served, write its manifest.

The folder is PEFT's (adapter_config.json + adapter_model.safetensors) plus our loraswap.json (manifest.py);
the base it must match is described by fingerprint.BaseModelInfo. registry.py moves such folders around.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from adapters.errors import AdapterConflictError, AdapterValidationError
from adapters.fingerprint import BaseModelInfo
from adapters.manifest import MANIFEST_FILE, HeadTensor, LoraInfo, Manifest
from adapters.ref import validate_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PEFT_TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "generation"}

# PEFT options our engines cannot serve, with the reason shown when an adapter uses one.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "LoRA bias (lora_bias) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "loftq_config": "LoftQ (loftq_config) is not supported: it changes the base weights",
    "megatron_config": "Megatron layers (megatron_config) are not supported",
}
# Initialisations that rewrite the base weights: the adapter would only be right on that modified base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class AdapterWeights:
    """A validated adapter in memory (CPU tensors), ready to copy into an engine slot.

    `lora[path] = (A [r, in], B [out, r])` as PEFT saves them. With `rank_pattern`/`alpha_pattern` a
    module's own scale differs from `scale`; the ratio is folded into its B so one scale per adapter holds.
    """

    manifest: Manifest
    scale: float
    lora: dict[str, tuple[Tensor, Tensor]]
    head: dict[str, Tensor]
    nbytes: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(folder: Path) -> dict[str, int]:
    """Every regular file under folder (posix relative path -> size) except the manifest itself. One
    os.walk with one stat per file: what the pickle check, the file checks and the size limit all read."""
    out: dict[str, int] = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)  # follows a symlinked file, as Path.is_file does
            except OSError:
                continue
            rel = Path(path).relative_to(folder).as_posix()
            if stat.S_ISREG(st.st_mode) and rel not in (MANIFEST_FILE, f".{MANIFEST_FILE}.tmp"):
                out[rel] = st.st_size
    return out


def _files_in(folder: Path) -> list[str]:
    return sorted(_listing(folder))


def _refuse_pickles(folder: Path, listing: dict[str, int] | None = None) -> None:
    for rel in sorted(_listing(folder) if listing is None else listing):
        if rel.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterValidationError(
                f"{rel}: pickle weights are refused (never unpickled); save with safetensors"
                " (save_pretrained(..., safe_serialization=True))"
            )


def _check_files(folder: Path, manifest: Manifest, max_bytes: int, listing: dict[str, int] | None = None) -> None:
    listing = _listing(folder) if listing is None else listing
    present = set(listing)
    for rel in manifest.files:
        if rel.startswith("/") or ".." in Path(rel).parts or "\\" in rel:
            raise AdapterValidationError(f"manifest lists an unsafe file path {rel!r}")
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise AdapterValidationError(f"file {unlisted[0]} is not listed in the manifest's sha256 list")
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise AdapterValidationError(f"file {missing[0]} listed in the manifest is missing")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in present:
            raise AdapterValidationError(f"{required} is missing from {folder}")
    total = sum(listing.values())
    if total > max_bytes:
        raise AdapterValidationError(f"adapter is too large: {total} bytes > limit {max_bytes}")
    for rel, expected in manifest.files.items():
        if rel != WEIGHTS_FILE and sha256_file(folder / rel) != expected:  # weights: see _load_tensors
            _sha_mismatch(rel)


def _sha_mismatch(rel: str) -> None:
    raise AdapterValidationError(f"{rel}: sha256 does not match the manifest (corrupt or modified)")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError(f"{CONFIG_FILE} is missing from {folder}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{CONFIG_FILE}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{CONFIG_FILE}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterValidationError(
            f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not supported (LORA only)"
        )
    for key, reason in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise AdapterValidationError(f"{CONFIG_FILE}: {reason}")
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(f"{CONFIG_FILE}: bias={config['bias']!r} is not supported (only 'none')")
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
    if not config.get("target_modules"):
        raise AdapterValidationError(f"{CONFIG_FILE}: target_modules is empty")
    return config


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _pattern_value(pattern: dict[str, float], path: str, default: float) -> float:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key matching `(.*\.)?key$` wins.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _is_target(path: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _in_modules_to_save(path: str, modules: list[str]) -> bool:
    parts = path.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p == m or p.endswith("." + m) for p in prefixes for m in modules)


def _base_path(path: str, base: BaseModelInfo | None) -> str:
    """Map a path saved against a bare backbone (AutoModel) onto the base's paths (`bert.` + path)."""
    if base is None or path in base.modules:
        return path
    roots = {m.split(".", 1)[0] for m in base.modules}
    found = [f"{root}.{path}" for root in roots if f"{root}.{path}" in base.modules]
    return found[0] if len(found) == 1 else path


# One thread hashes the weights while the caller parses them: hashlib releases the GIL on large buffers.
_HASHER = ThreadPoolExecutor(1, thread_name_prefix="adapter-sha256")


def _load_tensors(
    folder: Path, expected_sha256: str | None = None, parse: Callable[[dict[str, Tensor]], Any] | None = None
) -> Any:
    """Read the weights once: the bytes that are hashed are the bytes that are loaded (no window for the
    file to change between the check and the load, and one read instead of two on the load path).
    `expected_sha256` None: no manifest yet (import), nothing to check against.

    With `parse`, returns parse(tensors), run while another thread hashes the same bytes (the ~2 ms sha256
    of a few-MB adapter leaves the load path when a core is free). A hash mismatch is still reported
    first, before any error `parse` raised, and nothing is returned unless the hash matched."""
    data = (folder / WEIGHTS_FILE).read_bytes()
    digest = None if expected_sha256 is None else _HASHER.submit(lambda: hashlib.sha256(data).hexdigest())

    def verify() -> None:
        if digest is not None and digest.result() != expected_sha256:
            _sha_mismatch(WEIGHTS_FILE)

    if parse is None:
        verify()
    try:
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: not a valid safetensors file (truncated or corrupt: {exc})"
            ) from None
        result = tensors if parse is None else parse(tensors)
    except AdapterValidationError:
        verify()
        raise
    verify()
    return result


def split_tensors(
    tensors: dict[str, Tensor], config: dict[str, Any], base: BaseModelInfo | None = None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Sort PEFT's saved keys into LoRA pairs `{path: {"A": .., "B": ..}}` and head tensors `{path.param: t}`."""
    lora: dict[str, dict[str, Tensor]] = {}
    head: dict[str, Tensor] = {}
    modules_to_save = list(config.get("modules_to_save") or [])
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: unexpected tensor {key!r} (expected {PEFT_PREFIX}...)"
            )
        rest = key[len(PEFT_PREFIX) :]
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest)
        if match:
            path = match[1]
            if not _is_target(path, config["target_modules"]):
                raise AdapterValidationError(
                    f"{WEIGHTS_FILE}: {path} has LoRA weights but is not in target_modules"
                )
            lora.setdefault(_base_path(path, base), {})[match[2]] = tensor
        elif rest.rsplit(".", 1)[-1] in ("weight", "bias") and _in_modules_to_save(
            rest.rsplit(".", 1)[0], modules_to_save
        ):
            module, param = rest.rsplit(".", 1)
            head[f"{_base_path(module, base)}.{param}"] = tensor
        else:
            raise AdapterValidationError(
                f"{WEIGHTS_FILE}: unexpected tensor {key!r} (neither LoRA nor modules_to_save)"
            )
    if not lora:
        raise AdapterValidationError(f"{WEIGHTS_FILE}: no LoRA weights found")
    return lora, head


def output_rows(head: dict[str, Tensor]) -> int:
    """Number of labels a classification head produces (rows of its output weight)."""
    weights = {k: t for k, t in head.items() if k.endswith(".weight") and t.dim() == 2}
    if len(weights) > 1:
        weights = {k: t for k, t in weights.items() if t.shape[0] != t.shape[1]}
    if len(weights) != 1:
        raise AdapterValidationError(f"cannot tell the head's output layer from its tensors {sorted(head)}")
    return int(next(iter(weights.values())).shape[0])


def _check_dtype(name: str, tensor: Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise AdapterValidationError(
            f"{name}: dtype {tensor.dtype} is not supported (float32/float16/bfloat16)"
        )


def _check_lora(
    lora: dict[str, dict[str, Tensor]],
    config: dict[str, Any],
    base: BaseModelInfo | None,
    max_rank: int,
    scale: float,
) -> dict[str, tuple[Tensor, Tensor]]:
    rslora = bool(config.get("use_rslora"))
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for path, pair in sorted(lora.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterValidationError(f"{path}: has lora_{next(iter(pair))} but not its partner")
        a, b = pair["A"], pair["B"]
        for which, t in (("lora_A", a), ("lora_B", b)):
            _check_dtype(f"{path}.{which}", t)
            if t.dim() != 2:
                raise AdapterValidationError(
                    f"{path}.{which}: expected a 2-D tensor, got shape {list(t.shape)}"
                )
        if a.dtype != b.dtype:
            raise AdapterValidationError(f"{path}: lora_A is {a.dtype} but lora_B is {b.dtype}")
        r = int(_pattern_value(config.get("rank_pattern") or {}, path, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"]))
        if r > max_rank:
            raise AdapterValidationError(f"{path}: rank {r} exceeds the maximum rank {max_rank}")
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterValidationError(
                f"{path}: wrong shape: lora_A {list(a.shape)}, lora_B {list(b.shape)} do not match rank {r}"
            )
        if base is not None:
            if path not in base.modules:
                raise AdapterValidationError(f"{path}: no such Linear/Conv1D module in base {base.name}")
            fan_in, fan_out = base.modules[path]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise AdapterValidationError(
                    f"{path}: wrong shape: lora_A {list(a.shape)}, lora_B {list(b.shape)} do not fit the base module"
                    f" (in={fan_in}, out={fan_out})"
                )
        module_scale = _scale(alpha, r, rslora)
        if not math.isclose(module_scale, scale):
            b = b * (module_scale / scale)
        out[path] = (a.contiguous(), b.contiguous())
    return out


def _check_head(manifest: Manifest, head: dict[str, Tensor], base: BaseModelInfo | None) -> None:
    if manifest.task == "generation":
        if head:
            raise AdapterValidationError("modules_to_save is not supported for generation adapters")
        return
    if not head:
        raise AdapterValidationError("classification adapter has no head weights (modules_to_save)")
    for key, tensor in head.items():
        _check_dtype(key, tensor)
        module = key.rsplit(".", 1)[0]
        if base is not None and key.endswith(".weight") and module in base.modules and tensor.dim() == 2:
            if tensor.shape[1] != base.modules[module][0]:
                raise AdapterValidationError(
                    f"{key}: wrong shape {list(tensor.shape)}: the base's {module} takes {base.modules[module][0]} inputs"
                )
    recorded = {k: (list(v.shape), v.dtype) for k, v in (manifest.head or {}).items()}
    actual = {k: (list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in head.items()}
    if recorded != actual:
        raise AdapterValidationError(f"head tensors {actual} do not match the manifest's head {recorded}")
    rows = output_rows(head)
    if not manifest.labels or len(manifest.labels) != rows:
        raise AdapterValidationError(
            f"manifest has {len(manifest.labels or [])} labels but the head produces {rows} outputs"
        )


def _check_manifest_vs_config(manifest: Manifest, config: dict[str, Any]) -> None:
    info = manifest.lora
    targets = config["target_modules"]
    targets = sorted(targets) if isinstance(targets, list) else [targets]
    if info.r != config["r"] or not math.isclose(info.alpha, config["lora_alpha"]):
        raise AdapterValidationError(
            f"manifest lora r={info.r}, alpha={info.alpha} disagree with {CONFIG_FILE}"
            f" (r={config['r']}, lora_alpha={config['lora_alpha']})"
        )
    if info.use_rslora != bool(config.get("use_rslora")) or sorted(info.targets) != targets:
        raise AdapterValidationError(f"manifest lora targets/use_rslora disagree with {CONFIG_FILE}")
    task = PEFT_TASKS.get(config.get("task_type") or "")
    if task is not None and task != manifest.task:
        raise AdapterValidationError(
            f"manifest task {manifest.task!r} but {CONFIG_FILE} task_type is {config['task_type']!r}"
        )


def read_adapter(
    folder: str | Path, base: BaseModelInfo | None = None, *, max_rank: int = 64, max_bytes: int = 512 * 2**20
) -> AdapterWeights:
    """Validate everything about an adapter folder and load it; raise AdapterValidationError on any problem.

    Without `base` the checks that need the base (fingerprint, task, module shapes) are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"adapter folder {folder} does not exist")
    listing = _listing(folder)
    _refuse_pickles(folder, listing)
    manifest = Manifest.load(folder)
    validate_name(manifest.name)
    if base is not None:
        if manifest.task != base.task:
            raise AdapterConflictError(
                f"adapter {manifest.name} is for {manifest.task} but the base serves {base.task}"
            )
        if manifest.base_model.fingerprint != base.fingerprint:
            raise AdapterValidationError(
                f"adapter {manifest.name} was trained on another base ({manifest.base_model.name},"
                f" {manifest.base_model.fingerprint[:19]}...), not on {base.name} ({base.fingerprint[:19]}...):"
                " fingerprint mismatch"
            )
    _check_files(folder, manifest, max_bytes, listing)
    config = _read_config(folder)
    _check_manifest_vs_config(manifest, config)
    scale = _scale(float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora")))

    def parse(tensors: dict[str, Tensor]) -> AdapterWeights:
        lora_parts, head = split_tensors(tensors, config, base)
        lora = _check_lora(lora_parts, config, base, max_rank, scale)
        _check_head(manifest, head, base)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return AdapterWeights(manifest=manifest, scale=scale, lora=lora, head=head, nbytes=nbytes)

    return _load_tensors(folder, manifest.files[WEIGHTS_FILE], parse)


def validate_adapter(folder: str | Path, base: BaseModelInfo | None = None, **limits: int) -> Manifest:
    """read_adapter for its checks only; returns the manifest."""
    return read_adapter(folder, base, **limits).manifest


def write_manifest(folder: str | Path, **fields: Any) -> Manifest:
    """Build the manifest from `fields`, hash every file in the folder into `files`, write loraswap.json."""
    folder = Path(folder)
    fields["files"] = {rel: sha256_file(folder / rel) for rel in _files_in(folder)}
    try:
        manifest = Manifest.model_validate(fields)
    except Exception as exc:  # pydantic ValidationError: report it like a bad manifest
        raise AdapterValidationError(f"invalid manifest fields: {exc}") from None
    manifest.save(folder)
    return manifest


def _labels(src: Path, rows: int) -> list[str]:
    """Labels in the head's row order: `id2label` of a saved config.json when it fits, else LABEL_i."""
    config_path = src / "config.json"
    if config_path.is_file():
        try:
            id2label = json.loads(config_path.read_text()).get("id2label") or {}
            labels = [id2label[str(i)] for i in range(rows)]
            if len(id2label) == rows:
                return [str(label) for label in labels]
        except (json.JSONDecodeError, KeyError, AttributeError):
            pass
    return [f"LABEL_{i}" for i in range(rows)]


def import_peft_folder(
    src: str | Path,
    name: str,
    base_model: str,
    base_info: BaseModelInfo,
    version: int = 1,
    task: str | None = None,
) -> Manifest:
    """Turn a plain PEFT LoRA folder into an adapter version: write its manifest in place, then validate it."""
    src = Path(src)
    validate_name(name)
    if not src.is_dir():
        raise AdapterValidationError(f"PEFT folder {src} does not exist")
    _refuse_pickles(src)
    config = _read_config(src)
    if not (src / WEIGHTS_FILE).is_file():
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing from {src}")
    task = task or PEFT_TASKS.get(config.get("task_type") or "") or base_info.task
    _, head = split_tensors(_load_tensors(src), config, base_info)
    fields: dict[str, Any] = dict(
        name=name,
        version=version,
        task=task,
        base_model={"name": base_model, "fingerprint": base_info.fingerprint},
        lora=LoraInfo.from_peft_config(config),
    )
    if task == "classification" and head:
        fields["labels"] = _labels(src, output_rows(head))
        fields["head"] = {
            k: HeadTensor(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
            for k, t in head.items()
        }
    (src / MANIFEST_FILE).unlink(missing_ok=True)
    manifest = write_manifest(src, **fields)
    try:
        read_adapter(src, base_info)
    except Exception:
        (src / MANIFEST_FILE).unlink(missing_ok=True)  # leave the folder as we found it
        raise
    return manifest
