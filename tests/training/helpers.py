"""Helpers shared by the training tests (not fixtures of conftest: imported explicitly where used)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_overrides
from training.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread: the tiny models are far faster without thread contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe(base: Path, data: Path, run: Path, **extra) -> Recipe:
    return load_recipe(None, tiny_overrides(base, data, run, **extra))


def env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str | Path, timeout: int = 180, program: str = "loraswap") -> subprocess.CompletedProcess:
    """A console script of the venv (loraswap, torchrun) as a child process, from the repo root."""
    return subprocess.run([str(BIN / program), *map(str, args)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def metrics_json(run_or_adapter: Path) -> dict:
    return json.loads((run_or_adapter / "eval" / "metrics.json").read_text())


def scalars(tb_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard folder (or one event file) as [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_path))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))
