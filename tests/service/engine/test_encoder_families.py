"""Every encoder family ClassifierEngine serves, against PEFT per row: tiny random bases, adapters made by
`get_peft_model` (all-linear, DoRA, a target list with another label count), imported and read through the
service's own adapter path, served in one padded mixed batch with base rows.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from factories import randomize_peft
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from adapters.fingerprint import describe_base
from adapters.format import import_peft_folder, read_adapter
from service.engine.classifier import ClassifierEngine
from service.engine.heads import FAMILIES

WORDS = [f"w{i}" for i in range(95)]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _modernbert(pooling: str) -> T.PretrainedConfig:
    # A 3-layer stack with a short local window: global, local (sliding window 8 < the longest row), global.
    return T.ModernBertConfig(vocab_size=100, **{**SMALL, "num_hidden_layers": 3}, max_position_embeddings=128,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                              local_attention=8, global_attn_every_n_layers=2, classifier_pooling=pooling)  # fmt: skip


# family id -> (config, targets of the third adapter; its `dense`/`embeddings_project` reach head or embedding
# Linears). RoBERTa-style bases pad with id 1 and number positions from it.
BASES = {
    "bert": (lambda: T.BertConfig(vocab_size=100, **SMALL, max_position_embeddings=128), ["query", "dense"]),
    "roberta": (lambda: T.RobertaConfig(vocab_size=100, **SMALL, max_position_embeddings=130, pad_token_id=1,
                                        bos_token_id=0, eos_token_id=2), ["query", "value"]),
    "xlm-roberta": (lambda: T.XLMRobertaConfig(vocab_size=100, **SMALL, max_position_embeddings=130,
                                               pad_token_id=1, bos_token_id=0, eos_token_id=2), ["key", "dense"]),
    "electra": (lambda: T.ElectraConfig(vocab_size=100, embedding_size=16, **SMALL, max_position_embeddings=128),
                ["query", "embeddings_project"]),
    "distilbert": (lambda: T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                              max_position_embeddings=128), ["q_lin", "lin1"]),
    "deberta-v3": (lambda: T.DebertaV2Config(vocab_size=100, **SMALL, max_position_embeddings=128,
                                             relative_attention=True, pos_att_type=["p2c", "c2p"],
                                             position_biased_input=False, position_buckets=8, share_att_key=True,
                                             norm_rel_ebd="layer_norm", max_relative_positions=-1),
                   ["query_proj", "dense"]),
    "deberta-v2": (lambda: T.DebertaV2Config(vocab_size=100, **SMALL, max_position_embeddings=128,
                                             relative_attention=True, pos_att_type=["p2c", "c2p"],
                                             share_att_key=False, position_biased_input=True),
                   ["pos_key_proj", "value_proj"]),
    "modernbert-cls": (lambda: _modernbert("cls"), ["Wqkv", "dense"]),
    "modernbert-mean": (lambda: _modernbert("mean"), ["Wo", "Wi"]),
}  # fmt: skip
NATIVE = {"bert", "roberta", "xlm-roberta", "electra"}  # run by the engine's own BERT-style layer loop


def word_tokenizer(pad_id: int) -> T.PreTrainedTokenizerFast:
    """Word-level: `w<i>` -> an id, `[CLS] ... [SEP]` around each text, `[PAD]` at the model's pad id."""
    specials = ["[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    specials.insert(pad_id, "[PAD]")
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", unk_token="[UNK]")  # fmt: skip


def adapter_specs(family: str) -> list[tuple]:
    """(targets, rank, labels, options): all-linear, all-linear DoRA, and a target list with lora_bias."""
    listed = BASES[family][1]
    if family != "distilbert":
        return [("all-linear", 4, 3, {}), ("all-linear", 8, 2, {"use_dora": True}),
                (listed, 2, 5, {"lora_bias": True})]  # fmt: skip
    # PEFT cannot apply all-linear to DistilBERT SEQ_CLS (pre_classifier gets LoRA, then PEFT's modules_to_save
    # suffix rule wraps it again), so its linears are listed. That rule ("classifier" ends "pre_classifier")
    # also saves pre_classifier whole with PEFT's defaults (the first adapter); the others name it.
    every = ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]
    keep = {"modules_to_save": ["pre_classifier"]}
    return [(every, 4, 3, {}), (every, 8, 2, {**keep, "use_dora": True}),
            (listed, 2, 5, {**keep, "lora_bias": True})]  # fmt: skip


def load(folder: Path, **kwargs) -> torch.nn.Module:
    return T.AutoModelForSequenceClassification.from_pretrained(folder, **kwargs).eval()


@pytest.fixture(scope="module", params=sorted(BASES))
def served(request, tmp_path_factory) -> SimpleNamespace:
    """family, engine with base + 3 PEFT adapters in slots 1-3, oracles [base, PEFT models], the adapters'
    AdapterWeights by slot (`loaded`), and the saved base (`base_dir`)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    config = BASES[family][0]()
    T.AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "base")
    tok = word_tokenizer(config.pad_token_id)
    base = load(root / "base")
    info = describe_base(base, family, "classification")
    engine = ClassifierEngine(base, tok, info, num_slots=5, max_rank=16, max_length=64)
    oracles = [load(root / "base")]
    loaded = {}
    for slot, (targets, r, labels, options) in enumerate(adapter_specs(family), start=1):
        torch.manual_seed(slot)
        model = load(root / "base", num_labels=labels, ignore_mismatched_sizes=True)
        cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=targets, **options)
        peft_model = get_peft_model(model, cfg).eval()
        randomize_peft(peft_model)
        folder = root / f"a{slot}"
        peft_model.save_pretrained(folder)
        import_peft_folder(folder, f"a{slot}", family, info)
        loaded[slot] = read_adapter(folder, info)
        engine.load_slot(slot, loaded[slot])
        oracles.append(peft_model)
    return SimpleNamespace(
        family=family, engine=engine, oracles=oracles, loaded=loaded, base_dir=root / "base"
    )


def test_mixed_padded_batch_matches_peft_per_row(served) -> None:
    family, engine, oracles = served.family, served.engine, served.oracles
    assert (engine.layers is not None) == (family in NATIVE)
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(14)]
    slots = [i % len(oracles) for i in range(len(texts))]
    rng.shuffle(slots)
    for text, slot, logits in zip(texts, slots, engine.classify(texts, slots), strict=True):
        with torch.no_grad():
            want = oracles[slot](**engine.tokenizer([text], return_tensors="pt")).logits[0]
        assert logits.shape == want.shape, (family, slot)
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4, msg=f"{family} slot {slot}")
        torch.testing.assert_close(logits.softmax(-1), want.softmax(-1), atol=1e-4, rtol=0)


def test_adapters_reach_head_and_embedding_linears_as_peft_put_them(served) -> None:
    """The all-linear adapter's LoRA on Linears outside the blocks is served, not dropped: folded into the
    slot's head copy (BERT/DeBERTa pooler, ModernBERT head.dense) or wrapped (ELECTRA embeddings_project)."""
    family, engine, oracles = served.family, served.engine, served.oracles
    saved = {n.split(".lora_")[0].removeprefix("base_model.model.") for n, _ in oracles[1].named_parameters()
             if ".lora_A." in n}  # fmt: skip
    outside = {p for p in saved if p not in engine.slots.modules}
    assert outside <= set(engine.heads.linears), outside
    expected = {"bert": {"bert.pooler.dense"}, "deberta-v2": {"pooler.dense"}, "deberta-v3": {"pooler.dense"},
                "modernbert-cls": {"head.dense"}, "modernbert-mean": {"head.dense"}}.get(family, set())  # fmt: skip
    assert outside == expected
    assert ("electra.embeddings_project" in engine.slots.modules) == (family == "electra")


def test_clear_restores_the_base_head(served) -> None:
    family, engine = served.family, served.engine
    text = "w3 w4 w5"
    base = engine.classify([text], [0])[0]
    assert not torch.allclose(engine.classify([text], [3])[0][:2], base, atol=1e-3), family
    weights = served.loaded[3]
    engine.clear_slot(3)
    torch.testing.assert_close(engine.classify([text], [3])[0], base)
    assert engine.heads.slots[3] is engine.heads.base  # the base modules themselves, no copies
    engine.load_slot(3, weights)  # as the module's other tests expect it


def test_unsupported_family_is_refused_naming_the_supported_ones() -> None:
    config = T.AlbertConfig(vocab_size=100, embedding_size=16, **SMALL)
    model = T.AlbertForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="'albert'.*supported: bert, deberta-v2, distilbert, electra"):
        ClassifierEngine(model, word_tokenizer(0), None)
    multiple_choice = T.BertForMultipleChoice(BASES["bert"][0]()).eval()  # BERT's pooler and classifier
    with pytest.raises(ValueError, match="not a ...ForSequenceClassification"):
        ClassifierEngine(multiple_choice, word_tokenizer(0), None)
    served = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "modernbert"}
    assert set(FAMILIES) >= served


def test_modernbert_pooling_it_cannot_serve_is_refused() -> None:
    config = _modernbert("cls")
    model = T.ModernBertForSequenceClassification(config).eval()
    object.__setattr__(model.config, "classifier_pooling", "max")  # past the config's own validation
    with pytest.raises(ValueError, match="classifier_pooling='max'"):
        ClassifierEngine(model, word_tokenizer(0), None)


def test_refused_adapters_leave_the_slot_as_it_was(served) -> None:
    from adapters.peft import LoraModule

    engine, good = served.engine, served.loaded[1]
    before = engine.classify(["w7 w8 w9"], [1])[0]
    out = engine.heads.family.output
    fan_in = engine.heads.params[f"{out}.weight"].shape[1]
    bad = {
        "classifier head": {**good.head, f"{out}.weight": torch.randn(3, fan_in + 1)},
        "cannot serve": {**good.head, "nothing.weight": torch.randn(2)},
    }
    for match, head in bad.items():
        with pytest.raises(ValueError, match=match):
            engine.load_slot(1, SimpleNamespace(**{**vars(good), "head": head}))
    first = next(iter(engine.slots.modules))  # a wrapped Linear, and an unwrapped non-head module
    for path, lm in [(first, LoraModule(torch.randn(2, 7), torch.randn(5, 2), 1.0)),
                     ("nowhere.dense", LoraModule(torch.randn(2, 4), torch.randn(4, 2), 1.0))]:  # fmt: skip
        with pytest.raises(ValueError, match=path):
            engine.load_slot(1, SimpleNamespace(**{**vars(good), "lora": {**good.lora, path: lm}}))
    torch.testing.assert_close(engine.classify(["w7 w8 w9"], [1])[0], before)


def _mixed_rows(n: int, slots: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) for _ in range(n)]
    return texts, [rng.randrange(slots) for _ in texts]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_batch_matches_peft_per_row(served) -> None:
    """The same family on a GPU (fp32; slots loaded from host tensors) against PEFT per row on the CPU."""
    gpu = ClassifierEngine(load(served.base_dir), served.engine.tokenizer, served.engine.base_info, num_slots=5,
                           max_rank=16, max_length=64, device="cuda")  # fmt: skip
    for slot, weights in served.loaded.items():
        gpu.load_slot(slot, weights)
    texts, slots = _mixed_rows(12, len(served.oracles), seed=5)
    for text, slot, logits in zip(texts, slots, gpu.classify(texts, slots), strict=True):
        with torch.no_grad():
            want = served.oracles[slot](**gpu.tokenizer([text], return_tensors="pt")).logits[0]
        torch.testing.assert_close(logits, want, atol=1e-3, rtol=1e-3, msg=f"{served.family} slot {slot}")
