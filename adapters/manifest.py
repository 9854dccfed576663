"""The manifest `loraswap.json` of one adapter version, as a pydantic model with a schema version.

format.py fills and checks it; registry.py reads it to list and resolve versions.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters.errors import AdapterValidationError

SCHEMA_VERSION = 1
MANIFEST_FILE = "loraswap.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    # Unknown fields are refused: a typo or a newer writer must not pass silently.
    model_config = ConfigDict(extra="forbid")


class BaseModelRef(_Strict):
    name: str
    fingerprint: str


class HeadTensor(_Strict):
    shape: list[int]
    dtype: str


class LoraInfo(_Strict):
    r: int = Field(ge=1)
    alpha: float
    targets: list[str]
    dropout: float = 0.0
    use_rslora: bool = False


class DatasetInfo(_Strict):
    path: str
    sha256: str
    rows: dict[str, int] = {}


class Calibration(_Strict):
    temperature: float = Field(gt=0)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: int = Field(ge=1)
    task: Literal["classification", "generation", "embedding"]
    base_model: BaseModelRef
    labels: list[str] | None = None
    head: dict[str, HeadTensor] | None = None
    lora: LoraInfo
    metrics: dict[str, Any] = {}
    dataset: DatasetInfo | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    training: dict[str, Any] | None = None
    files: dict[str, str] = {}
    # classification, optional (older manifests serve as T=1, no abstention): the softmax temperature fitted
    # on validation, and the default abstention threshold on the calibrated top score
    calibration: Calibration | None = None
    min_score: float | None = Field(None, ge=0, le=1)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, name: str) -> str:
        if not _NAME_RE.fullmatch(name) or ".." in name:
            raise ValueError(f"invalid adapter name {name!r}: must match {_NAME_RE.pattern}")
        return name

    @classmethod
    def parse(cls, data: str | bytes, source: str = MANIFEST_FILE) -> Manifest:
        """Parse manifest JSON; every problem becomes one clear AdapterValidationError."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterValidationError(f"{source}: invalid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise AdapterValidationError(f"{source}: expected a JSON object")
        schema = raw.get("schema_version")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise AdapterValidationError(f"{source}: missing or non-integer schema_version")
        if schema > SCHEMA_VERSION:
            raise AdapterValidationError(
                f"{source}: schema_version {schema} is newer than this loraswap supports ({SCHEMA_VERSION});"
                " upgrade loraswap to read it"
            )
        if schema < 1:
            raise AdapterValidationError(f"{source}: invalid schema_version {schema}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise AdapterValidationError(f"{source}: {where}: {first['msg']}{more}") from None

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read `<folder>/loraswap.json`; a clear error when it is missing, invalid or too new."""
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise AdapterValidationError(
                f"no {MANIFEST_FILE} in {folder} (a plain PEFT folder? run `loraswap adapter import` first)"
            )
        return cls.parse(path.read_bytes(), str(path))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def save(self, folder: str | Path) -> None:
        """Write `<folder>/loraswap.json` atomically (temp file + rename)."""
        path = Path(folder) / MANIFEST_FILE
        tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
