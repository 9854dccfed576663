"""Suite-wide fixtures: where the shared data lives, and an offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter (test_triton_lora.py); it
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be on before anything imports triton (peft does)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    # The data is part of the CI layout (shared/ beside the repo); missing data is a failure, not a skip.
    assert DATA.is_dir(), f"shared data not found at {DATA}"
    return DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
