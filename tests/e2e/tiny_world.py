"""Tiny worlds for the robustness tests (fuzz, load, faults, shutdown), built in-process in seconds.

- a saved 2-layer BERT classification base (tests/factories.py) with PEFT SEQ_CLS adapters in a registry;
- a saved 2-layer Llama with a byte-level tokenizer and a chat template, so `decoder_base` can be its folder
  (the same path `loraswap serve` takes), with PEFT CAUSAL_LM adapters in the same registry;
- `served(app)`: uvicorn in a thread on a free 127.0.0.1 port.

Import it as `from e2e.tiny_world import ...` (tests/ is on the pytest pythonpath).
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from factories import EOS, byte_tokenizer, publish_cls_adapter, randomize_adapter, tiny_bert_base
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapters.bases import load_base
from adapters.fingerprint import describe_base
from adapters.format import import_peft_folder
from adapters.registry import Registry
from service.config import Settings

CLS_ADAPTERS = {"sentiment": 2, "intent": 3, "topic": 4, "spam": 2}  # name -> labels
GEN_ADAPTERS = {"alpha": ["q_proj", "v_proj"], "beta": ["o_proj", "down_proj"]}


def tiny_llama_base(folder: Path) -> Path:
    """A saved 2-layer LlamaForCausalLM (vocab 257, context 256) plus its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=257, max_position_embeddings=256, initializer_range=0.2,
                         eos_token_id=EOS, bos_token_id=1, pad_token_id=EOS)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def publish_gen_adapter(registry: Registry, base_dir: Path, work: Path, name: str, targets: list[str],
                        seed: int = 0) -> None:
    base, _ = load_base(base_dir, "generation")
    info = describe_base(base, str(base_dir), "generation")
    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    randomize_adapter(peft_model, 0.3)
    folder = work / f"{name}-{seed}"
    peft_model.save_pretrained(folder)
    import_peft_folder(folder, name, str(base_dir), info, task="generation")
    registry.publish(folder, name=name)


def build_world(root: Path, *, generation: bool = True, cls_adapters: dict[str, int] = CLS_ADAPTERS) -> dict:
    """Bases and adapters under `root`; returns the paths and a Settings for create_app / env vars."""
    registry_dir = root / "registry"
    registry = Registry(registry_dir)
    encoder = tiny_bert_base(root / "bert")
    for i, (name, labels) in enumerate(cls_adapters.items()):
        publish_cls_adapter(registry, encoder, root / "work", name, num_labels=labels, seed=i + 1)
    decoder = ""
    if generation:
        decoder = str(tiny_llama_base(root / "llama"))
        for i, (name, targets) in enumerate(GEN_ADAPTERS.items()):
            publish_gen_adapter(registry, Path(decoder), root / "work", name, targets, seed=10 + i)
    settings = Settings(registry=str(registry_dir), encoder_base=str(encoder), decoder_base=decoder,
                        watch_interval_s=0, max_gpu_adapters=8, max_tokens=16, max_model_len=64)
    return {"root": root, "registry": registry, "registry_dir": registry_dir, "encoder": encoder,
            "decoder": decoder, "settings": settings}


def env_for(world: dict, **extra: str) -> dict[str, str]:
    """LORASWAP_* variables for a `loraswap serve` subprocess on this world."""
    return {"LORASWAP_ENCODER_BASE": str(world["encoder"]), "LORASWAP_DECODER_BASE": world["decoder"],
            "LORASWAP_WATCH_INTERVAL_S": "0", "LORASWAP_MAX_GPU_ADAPTERS": "8", "LORASWAP_LOG_LEVEL": "warning",
            **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


@contextlib.contextmanager
def served(app):
    """uvicorn serving `app` in a thread (lifespan included); yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 120, "uvicorn start")
        assert server.started, "uvicorn did not start (see the log above)"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]
