"""Publish a trained adapter: stage the DESIGN.md folder, write its manifest, validate, hand it to the registry.

Everything about the folder format and the registry lives in adapters/; this file only assembles the fields.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from adapters.errors import LoraswapError
from adapters.fingerprint import BaseModelInfo
from adapters.format import peft_fields, validate_adapter, write_manifest
from adapters.peft import CONFIG_FILE, WEIGHTS_FILE, read_config


def stage(adapter_dir: Path, eval_dir: Path | None, into: Path) -> Path:
    """Copy PEFT's two files and eval/ into a fresh folder (the run folder keeps its own copy)."""
    into.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / name).is_file():
            raise LoraswapError(f"{adapter_dir}: {name} is missing (was this a BitFit run? those are not published)")
        shutil.copy2(adapter_dir / name, into / name)
    if eval_dir is not None and eval_dir.is_dir():
        shutil.copytree(eval_dir, into / "eval", dirs_exist_ok=True)
    return into


def manifest_fields(folder: Path, *, name: str, version: int, task: str, base_info: BaseModelInfo,
                    labels: list[str] | None, metrics: dict[str, Any], dataset: dict[str, Any] | None,
                    training: dict[str, Any] | None, calibration: dict[str, float] | None = None) -> dict[str, Any]:
    fields = peft_fields(folder, read_config(folder), base_info, task, labels)
    return dict(name=name, version=version, base_model={"name": base_info.name, "fingerprint": base_info.fingerprint},
                metrics=metrics, dataset=dataset, training=training, **fields,
                **({"calibration": {"temperature": calibration["temperature"]}, "min_score": calibration["min_score"]}
                   if calibration else {}))  # fmt: skip


def publish(adapter_dir: Path, eval_dir: Path | None, *, registry: str, name: str, task: str,
            base_info: BaseModelInfo, labels: list[str] | None, metrics: dict[str, Any],
            dataset: dict[str, Any] | None, training: dict[str, Any] | None,
            promote: str | None = None, calibration: dict[str, float] | None = None) -> tuple[str, int]:
    """Publish as the next version of `name` (atomic, by the registry); optionally point an alias at it."""
    from adapters.registry import Registry

    reg = Registry(registry)
    try:
        versions = reg.versions(name)
    except LoraswapError:
        versions = []
    version = max(versions, default=0) + 1
    with tempfile.TemporaryDirectory(prefix="loraswap-publish-") as tmp:
        folder = stage(adapter_dir, eval_dir, Path(tmp) / name)
        write_manifest(folder, **manifest_fields(folder, name=name, version=version, task=task, base_info=base_info,
                                                 labels=labels, metrics=metrics, dataset=dataset, training=training,
                                                 calibration=calibration))
        validate_adapter(folder, base_info)  # refuse here, with the reason, rather than at serve time
        manifest = reg.publish(folder, name=name, version=version)
    if promote:
        reg.set_alias(name, promote, manifest.version)
    return name, manifest.version
