import subprocess
import sys

import torch
from transformers import AutoModel, GPT2Config, GPT2LMHeadModel

from adapters.fingerprint import describe_base, fingerprint


def test_same_weights_same_fingerprint(base_folder, helpers):
    assert fingerprint(helpers.load_cls(base_folder)) == fingerprint(helpers.load_cls(base_folder))
    assert fingerprint(helpers.load_cls(base_folder)).startswith("sha256:")


def test_backbone_not_head(base_folder, helpers):
    # AutoModel vs ...ForSequenceClassification (any label count): same backbone, same fingerprint.
    assert fingerprint(AutoModel.from_pretrained(base_folder)) == fingerprint(
        helpers.load_cls(base_folder, num_labels=5)
    )


def test_dtype_does_not_matter(base_folder):
    bf16 = AutoModel.from_pretrained(base_folder, dtype=torch.bfloat16)
    assert fingerprint(bf16) == fingerprint(AutoModel.from_pretrained(base_folder))


def test_different_base_differs(base_folder, other_base_folder, helpers):
    assert fingerprint(helpers.load_cls(base_folder)) != fingerprint(helpers.load_cls(other_base_folder))


def test_one_weight_change_in_sample_differs(base_folder):
    model = AutoModel.from_pretrained(base_folder)
    before = fingerprint(model)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[0, 0] += 1.0
    assert fingerprint(model) != before


def test_identical_across_processes(base_folder, helpers):
    code = (
        "import sys; from transformers import AutoModel; from adapters.fingerprint import fingerprint;"
        "print(fingerprint(AutoModel.from_pretrained(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(base_folder)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == fingerprint(helpers.load_cls(base_folder))


def test_describe_base_linear_modules(base_folder, helpers):
    info = describe_base(helpers.load_cls(base_folder, num_labels=3), "tiny", "classification")
    assert info.modules["bert.encoder.layer.0.attention.self.query"] == (32, 32)
    assert info.modules["bert.encoder.layer.1.intermediate.dense"] == (32, 64)
    assert info.modules["classifier"] == (32, 3)
    assert info.task == "classification" and info.name == "tiny"


def test_describe_base_conv1d_is_in_out():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16))
    info = describe_base(model, "tiny-gpt2", "generation")
    assert info.modules["transformer.h.0.attn.c_attn"] == (32, 96)
    assert info.modules["transformer.h.0.mlp.c_fc"] == (32, 128)
    assert info.modules["lm_head"] == (32, 100)
