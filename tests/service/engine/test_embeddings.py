"""Embedding rows in the encoder engine: pooled vectors of embedding adapters equal PEFT + the same pooling,
in one mixed batch with classification rows of other adapters (tiny BERT); `adapter import` of PEFT
FEATURE_EXTRACTION (and untyped) adapters; and the embedded MiniLM's base vectors equal
sentence-transformers' own `encode`."""

from __future__ import annotations

import json
import random

import pytest
import torch
from factories import randomize_adapter
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

from adapters.errors import AdapterConflictError
from adapters.fingerprint import describe_base
from adapters.format import import_peft_folder, read_adapter
from adapters.pooling import Pooling
from service.engine.classifier import ClassifierEngine

POOLINGS = [Pooling(), Pooling(("cls_token",), normalize=True), Pooling(("max_tokens", "mean_tokens"), True)]


def make_embedding_adapter(base_dir, out_dir, *, seed: int, task_type: str | None = "FEATURE_EXTRACTION",
                           targets=("query", "value", "intermediate.dense")):
    """A PEFT LoRA adapter on the bare encoder (AutoModel), random non-zero weights; returns the PEFT model."""
    torch.manual_seed(seed)
    config = LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(AutoModel.from_pretrained(base_dir).eval(), config).eval()
    randomize_adapter(model, 0.3)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def base_info(tiny_base_dir, kit):
    return describe_base(kit.load_base(tiny_base_dir), str(tiny_base_dir), "classification")


@pytest.fixture(scope="module")
def embedders(tiny_base_dir, base_info, tmp_path_factory):
    """[(peft_model, AdapterWeights)] for two embedding adapters, imported the way `adapter import` does."""
    root = tmp_path_factory.mktemp("embedders")
    out = []
    for i, task_type in enumerate(("FEATURE_EXTRACTION", None)):
        folder = root / f"e{i}"
        model = make_embedding_adapter(tiny_base_dir, folder, seed=200 + i, task_type=task_type)
        manifest = import_peft_folder(folder, f"embed-{i}", str(tiny_base_dir), base_info)
        assert manifest.task == "embedding" and manifest.head is None and manifest.labels is None
        out.append((model, read_adapter(folder, base_info)))
    return out


def _vector(model, tokenizer, text: str, pooling: Pooling) -> torch.Tensor:
    """The oracle: the text alone through PEFT, then the pooling."""
    enc = tokenizer([text], truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    return pooling(hidden, enc["attention_mask"])[0]


@pytest.mark.parametrize("pooling", POOLINGS, ids=["mean", "cls-norm", "max+mean-norm"])
def test_mixed_batch_embeddings_and_logits_equal_peft(pooling, tiny_base_dir, kit, peft_adapters, embedders,
                                                       base_info):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    engine = ClassifierEngine(kit.load_base(tiny_base_dir), tokenizer, base_info, num_slots=6, max_rank=16,
                              max_length=32, pooling=pooling)
    classifiers = peft_adapters[:2]
    for slot, (_, weights, _) in enumerate(classifiers, start=1):
        engine.load_slot(slot, weights)
    for slot, (_, weights) in enumerate(embedders, start=3):
        engine.load_slot(slot, weights)
    bare = AutoModel.from_pretrained(tiny_base_dir).eval()
    rng = random.Random(0)
    texts = [kit.random_text(rng) for _ in range(16)]
    # (slot, embed): classification rows of adapters 1-2 and of the base, embedding rows of 3-4 and the base
    plan = [(rng.choice([0, 1, 2, 3, 4]), None) for _ in texts]
    plan = [(s, s >= 3 or (s == 0 and i % 2 == 0)) for i, (s, _) in enumerate(plan)]
    assert {e for _, e in plan} == {True, False} and len({s for s, _ in plan}) >= 4
    got = engine.run(engine.tokenize(texts), [s for s, _ in plan], [e for _, e in plan])
    base_cls = kit.load_base(tiny_base_dir)
    for text, (slot, embed), out in zip(texts, plan, got, strict=True):
        if embed:
            oracle = bare if slot == 0 else embedders[slot - 3][0]
            torch.testing.assert_close(out, _vector(oracle, tokenizer, text, pooling), atol=1e-4, rtol=1e-4)
        else:
            model = base_cls if slot == 0 else classifiers[slot - 1][0]
            enc = tokenizer([text], truncation=True, max_length=32, return_tensors="pt")
            with torch.no_grad():
                want = model(**enc).logits[0]
            torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_embedding_adapter_is_refused_on_a_decoder_base(embedders, base_info, tiny_base_dir, tmp_path):
    folder = tmp_path / "e"
    make_embedding_adapter(tiny_base_dir, folder, seed=7)
    import_peft_folder(folder, "e", str(tiny_base_dir), base_info)
    decoder = type(base_info)(name="dec", fingerprint=base_info.fingerprint, task="generation", modules={})
    with pytest.raises(AdapterConflictError, match="embedding"):
        read_adapter(folder, decoder)


def test_untyped_adapter_with_a_head_imports_as_classification(tiny_base_dir, kit, base_info, tmp_path):
    """No task_type: a saved head means a classifier, no head an embedding adapter (see the fixture)."""
    torch.manual_seed(3)
    model = get_peft_model(kit.load_base(tiny_base_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                                      modules_to_save=["classifier"]))
    randomize_adapter(model, 0.3, ("lora_", "modules_to_save"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config.get("task_type") is None
    assert import_peft_folder(tmp_path, "untyped", str(tiny_base_dir), base_info).task == "classification"


@pytest.mark.real_model
def test_minilm_base_vectors_equal_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from adapters.bases import DEFAULT_ENCODER, load_base, local_base
    from adapters.pooling import read_pooling

    path = local_base(DEFAULT_ENCODER)
    texts = ["I still have not received my new card", "hello", "Can I top up with a cheque? " * 8, "ok then"]
    want = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    model, tokenizer = load_base(DEFAULT_ENCODER, "classification")
    pooling = read_pooling(path)
    assert pooling == Pooling(("mean_tokens",), normalize=True, max_seq_length=256)
    engine = ClassifierEngine(model, tokenizer, num_slots=2, max_length=256, pooling=pooling)
    got = torch.stack(engine.run(engine.tokenize(texts), [0] * len(texts), [True] * len(texts)))
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)
