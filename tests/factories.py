"""Tiny models and real PEFT adapters for service and end-to-end tests (built in-process, no downloads).

The oracle for every served answer is PEFT itself, so the factories return the PEFT model too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    PreTrainedTokenizerFast,
)

WORDS = [f"w{i}" for i in range(95)] + ["great", "movie", "dull", "boring", "loved"]
ALL_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_bert_base(folder: Path) -> Path:
    """A saved 2-layer BertForSequenceClassification with a word-level tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


def randomize_adapter(model: torch.nn.Module, std: float, parts: tuple[str, ...] = ("lora_",)) -> None:
    """PEFT initialises lora_B to zero (a no-op adapter): draw every parameter whose name contains one of
    `parts` from N(0, std), in named_parameters order, so a seeded test gets the same weights each run."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in parts):
                param.normal_(0, std)


def randomize_peft(model: torch.nn.Module, std: float = 0.3) -> None:
    """Random LoRA A/B (and lora_B biases) and modules_to_save heads; DoRA magnitudes scaled around PEFT's
    ||W|| init (a trained adapter's range), so DoRA's rescale is far from 1 and tested."""
    randomize_adapter(model, std, ("lora_A", "lora_B", "modules_to_save"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + std * torch.randn_like(param))


def make_cls_adapter(base_dir: Path, out_dir: Path, *, num_labels: int, r: int = 4, targets=None,
                     seed: int = 0) -> PeftModel:
    """Save a PEFT SEQ_CLS LoRA adapter with random (non-zero) weights; returns the PEFT model."""
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels,
                                                              ignore_mismatched_sizes=True).eval()
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=targets or ALL_LINEARS)
    model = get_peft_model(base, config)
    randomize_adapter(model, 0.5, ("lora_", "modules_to_save"))
    model.save_pretrained(out_dir)
    return model.eval()


def publish_cls_adapter(registry, base_dir: Path, work: Path, name: str, *, num_labels: int, seed: int = 0,
                        version: int | None = None, manifest_update: dict | None = None, **kwargs) -> PeftModel:
    """make_cls_adapter + import (writes the manifest, with `manifest_update` fields such as `dataset` and
    `training` set on it) + publish into `registry`."""
    from adapters.bases import load_base
    from adapters.fingerprint import describe_base
    from adapters.format import import_peft_folder
    from adapters.manifest import Manifest

    folder = work / f"{name}-{seed}"
    model = make_cls_adapter(base_dir, folder, num_labels=num_labels, seed=seed, **kwargs)
    base, _ = load_base(base_dir, "classification")
    manifest = import_peft_folder(folder, name, str(base_dir), describe_base(base, str(base_dir), "classification"),
                                  version=version or 1)
    if manifest_update:
        Manifest.model_validate({**manifest.model_dump(), **manifest_update}).save(folder)
    registry.publish(folder, name=name, version=version)
    return model


def publish_embedding_adapter(registry, base_dir: Path, work: Path, name: str, *, seed: int,
                              version: int | None = None) -> PeftModel:
    """A PEFT FEATURE_EXTRACTION adapter with random weights on the encoder, imported and published."""
    from transformers import AutoModel

    from adapters.bases import load_base
    from adapters.fingerprint import describe_base
    from adapters.format import import_peft_folder

    torch.manual_seed(seed)
    model = get_peft_model(AutoModel.from_pretrained(base_dir).eval(),
                           LoraConfig(task_type="FEATURE_EXTRACTION", r=4, lora_alpha=8,
                                      target_modules=["query", "value", "output.dense"])).eval()
    randomize_adapter(model, 0.3)
    folder = work / f"{name}-{seed}"
    model.save_pretrained(folder)
    base, _ = load_base(base_dir, "classification")
    import_peft_folder(folder, name, str(base_dir), describe_base(base, str(base_dir), "classification"),
                       version=version or 1)
    registry.publish(folder, name=name, version=version)
    return model


def peft_logits(model: PeftModel, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """The oracle: each text alone through PEFT (no padding effects)."""
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            out.append(model(**enc).logits[0])
    return out


# A byte-level tokenizer for tiny decoder tests (no vocab download): EOS id and a minimal chat template.
EOS = 0
# A tiny Llama-shaped decoder (LlamaConfig(**TINY_DECODER)). The wide init makes random tiny models produce
# varied tokens (the default 0.02 repeats one token).
TINY_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=0.2,
                    eos_token_id=EOS, bos_token_id=1, pad_token_id=EOS)  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, printable ASCII first (ids 1..95), so the 128-token model's text is ASCII."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    order = list(range(32, 127)) + list(range(0, 32)) + list(range(127, 256))
    vocab = {"<eos>": EOS, **{table[b]: i + 1 for i, b in enumerate(order)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def oracle(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """HF `generate`, greedy, `n` new tokens for one prompt alone: what a served greedy request must equal."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


async def collect(engine, prompt: list[int], params, slot: int = 0) -> tuple[list[int], str, str | None]:
    """(token ids, text, finish reason) of one request streamed from a GeneratorEngine."""
    ids, text, reason = [], "", None
    async for delta in engine.generate(prompt, params, slot):
        ids += delta.token_ids
        text += delta.text
        reason = delta.finish_reason
    return ids, text, reason


async def run_plan(engine, plan: list[tuple[int, int, int, int]], prompts: list[list[int]]) -> list[list[int]]:
    """Greedy token ids of every request of `plan` ((slot, prompt length, max_tokens, engine steps to wait
    before arriving)), run at once on `engine`, which is stopped at the end: late arrivals join running ones."""
    import asyncio

    async def request(i: int) -> list[int]:
        slot, _, n, wait_steps = plan[i]
        while engine.steps < wait_steps:
            await asyncio.sleep(0.001)
        ids, _, reason = await collect(engine, prompts[i], greedy(n), slot)
        assert reason == "length"
        return ids

    try:
        return await asyncio.gather(*(request(i) for i in range(len(plan))))
    finally:
        engine.shutdown()


def greedy(n: int, **kw):
    """Greedy sampling for exactly `n` tokens (EOS ignored, as the oracle runs to max_new_tokens)."""
    from service.engine.sampling import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def openai_error(resp, status: int, code: str | None = None) -> dict:
    """Assert `resp` is the documented error: `status`, body `{"error": {message, type, param, code}}`, the
    expected `code` when given, and a Bearer challenge on 401/403. Returns the error object."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code:
        assert body["error"]["code"] == code, body
    if status in (401, 403):
        assert resp.headers["www-authenticate"].startswith("Bearer"), resp.headers
    return body["error"]
