"""One adapter version folder: read it, validate everything before it is served, write its manifest.

The folder is PEFT's (adapter_config.json + adapter_model.safetensors) plus our loraswap.json (manifest.py);
the base it must match is described by fingerprint.BaseModelInfo. registry.py moves such folders around.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from adapters.errors import AdapterConflictError, AdapterValidationError
from adapters.fingerprint import BaseModelInfo
from adapters.manifest import MANIFEST_FILE, HeadTensor, LoraInfo, Manifest
from adapters.peft import (
    BASE_TASKS,
    CONFIG_FILE,
    PEFT_TASKS,
    WEIGHTS_FILE,
    LoraModule,
    check_tensor,
    default_scale,
    lora_modules,
    manifest_lora,
    read_config,
    split_tensors,
)
from adapters.ref import validate_name

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class AdapterWeights:
    """A validated adapter in memory (CPU tensors), ready to copy into an engine slot.

    `lora[path]` is that module's LoraModule (adapters/peft.py), with its own scale (rank_pattern,
    alpha_pattern); `scale` is the config's default, alpha / r (or / sqrt(r) with rsLoRA).
    """

    manifest: Manifest
    scale: float
    lora: dict[str, LoraModule]
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
    os.walk with one lstat per entry: what the pickle check, the file checks and the size limit all read.
    Symbolic links (to files or folders) are refused: an adapter folder is read, hashed and copied into
    the registry, and nothing outside it may come along."""
    out: dict[str, int] = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            rel = Path(path).relative_to(folder).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise AdapterValidationError(f"{rel}: symbolic links are refused in an adapter folder")
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


def output_rows(head: dict[str, Tensor]) -> int:
    """Number of labels a classification head produces (rows of its output weight)."""
    weights = {k: t for k, t in head.items() if k.endswith(".weight") and t.dim() == 2}
    if len(weights) > 1:
        weights = {k: t for k, t in weights.items() if t.shape[0] != t.shape[1]}
    if len(weights) != 1:
        raise AdapterValidationError(f"cannot tell the head's output layer from its tensors {sorted(head)}")
    return int(next(iter(weights.values())).shape[0])


def _check_head(manifest: Manifest, head: dict[str, Tensor], base: BaseModelInfo | None) -> None:
    if manifest.task != "classification":
        if head:
            raise AdapterValidationError(f"modules_to_save is not supported for {manifest.task} adapters")
        return
    if not head:
        raise AdapterValidationError("classification adapter has no head weights (modules_to_save)")
    for key, tensor in head.items():
        check_tensor(key, tensor)
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
        if BASE_TASKS.get(manifest.task, manifest.task) != base.task:
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
    config = read_config(folder)
    _check_manifest_vs_config(manifest, config)
    modules = None if base is None else base.modules

    def parse(tensors: dict[str, Tensor]) -> AdapterWeights:
        lora_parts, head = split_tensors(tensors, config, modules)
        lora = lora_modules(lora_parts, config, modules, max_rank, f"base {base.name}" if base else "the base")
        _check_head(manifest, head, base)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return AdapterWeights(manifest=manifest, scale=default_scale(config), lora=lora, head=head, nbytes=nbytes)

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


def peft_fields(
    src: Path, config: dict[str, Any], base_info: BaseModelInfo, task: str, labels: list[str] | None = None
) -> dict[str, Any]:
    """The manifest fields a PEFT folder decides: task, lora, and for classification the head tensors (as the
    validator will see them) and labels (given, else config.json's id2label, else LABEL_i)."""
    _, head = split_tensors(_load_tensors(src), config, base_info.modules)
    fields: dict[str, Any] = dict(task=task, lora=LoraInfo(**manifest_lora(config)))
    if task == "classification" and head:
        fields["labels"] = labels or _labels(src, output_rows(head))
        fields["head"] = {
            k: HeadTensor(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch.")) for k, t in head.items()
        }
    return fields


def _untyped_task(src: Path, config: dict[str, Any], base_info: BaseModelInfo) -> str:
    """A PEFT folder without task_type: on an encoder base, a classifier when it saves a head, else an
    embedding adapter (PEFT's FEATURE_EXTRACTION); on a decoder base, generation."""
    if base_info.task == "classification":
        _, head = split_tensors(_load_tensors(src), config, base_info.modules)
        return "classification" if head else "embedding"
    return base_info.task


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
    config = read_config(src)
    if not (src / WEIGHTS_FILE).is_file():
        raise AdapterValidationError(f"{WEIGHTS_FILE} is missing from {src}")
    task = task or PEFT_TASKS.get(config.get("task_type") or "") or _untyped_task(src, config, base_info)
    fields = dict(name=name, version=version, base_model={"name": base_model, "fingerprint": base_info.fingerprint},
                  **peft_fields(src, config, base_info, task))  # fmt: skip
    (src / MANIFEST_FILE).unlink(missing_ok=True)
    manifest = write_manifest(src, **fields)
    try:
        read_adapter(src, base_info)
    except Exception:
        (src / MANIFEST_FILE).unlink(missing_ok=True)  # leave the folder as we found it
        raise
    return manifest
