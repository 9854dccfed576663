import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.errors import AdapterConflictError, AdapterValidationError
from adapters.fingerprint import describe_base
from adapters.format import AdapterWeights, import_peft_folder, read_adapter, validate_adapter, write_manifest
from adapters.manifest import Manifest

WEIGHTS = "adapter_model.safetensors"


def _rewrite_manifest(folder):
    """Re-hash the files after a deliberate edit, so the test reaches the check after the hash check."""
    manifest = Manifest.load(folder)
    write_manifest(folder, **manifest.model_dump(exclude={"files"}))


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_peft_saved_keys_are_what_we_parse(peft_dir):
    keys = set(load_file(str(peft_dir / WEIGHTS)))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_import_then_read(adapter_dir, base_info, peft_state):
    weights = read_adapter(adapter_dir, base_info)
    assert isinstance(weights, AdapterWeights)
    m = weights.manifest
    assert (m.name, m.version, m.task, m.labels) == (
        "sentiment",
        1,
        "classification",
        ["LABEL_0", "LABEL_1", "LABEL_2"],
    )
    assert m.base_model.fingerprint == base_info.fingerprint
    assert m.lora.r == 4 and m.lora.alpha == 8 and m.lora.targets == ["query", "value"]
    assert m.head["classifier.weight"].shape == [3, 32]
    assert set(m.files) == {"adapter_config.json", WEIGHTS, "README.md"}
    assert weights.scale == 2.0
    assert len(weights.lora) == 4
    for path, module in weights.lora.items():
        assert torch.equal(module.A, peft_state[f"base_model.model.{path}.lora_A.weight"])
        assert torch.equal(module.B, peft_state[f"base_model.model.{path}.lora_B.weight"])
        assert module.scale == 2.0 and module.bias is None and module.magnitude is None
    assert torch.equal(weights.head["classifier.weight"], peft_state["base_model.model.classifier.weight"])
    assert weights.nbytes == sum(t.numel() * 4 for t in peft_state.values())
    assert validate_adapter(adapter_dir) == m  # structure-only validation, no base


def test_import_uses_id2label(peft_dir, base_info):
    (peft_dir / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "neu", "2": "pos"}}))
    assert import_peft_folder(peft_dir, "s", "b", base_info).labels == ["neg", "neu", "pos"]


def test_rslora_scale(tmp_path, base_folder, base_info, helpers):
    helpers.save_peft_adapter(base_folder, tmp_path / "a", r=4, lora_alpha=8, use_rslora=True)
    import_peft_folder(tmp_path / "a", "rs", "b", base_info)
    assert read_adapter(tmp_path / "a", base_info).scale == pytest.approx(8 / math.sqrt(4))


def test_rank_and_alpha_pattern_give_the_module_its_own_scale(tmp_path, base_folder, base_info, helpers):
    state = helpers.save_peft_adapter(
        base_folder, tmp_path / "a", r=4, lora_alpha=8, rank_pattern={"value": 2}, alpha_pattern={"value": 8}
    )
    import_peft_folder(tmp_path / "a", "pat", "b", base_info)
    weights = read_adapter(tmp_path / "a", base_info)
    path = "bert.encoder.layer.0.attention.self.value"
    module = weights.lora[path]
    assert module.A.shape == (2, 32)
    # PEFT scales this module by 8/2 = 4; the others by the adapter's 8/4 = 2.
    assert torch.equal(module.B, state[f"base_model.model.{path}.lora_B.weight"]) and module.scale == 4.0
    assert weights.scale == 2.0 and weights.lora["bert.encoder.layer.0.attention.self.query"].scale == 2.0


def test_adapter_saved_on_bare_backbone_maps_to_base_paths(tmp_path, base_folder, base_info):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    peft_model = get_peft_model(
        AutoModel.from_pretrained(base_folder), LoraConfig(r=2, target_modules=["query"])
    )
    peft_model.save_pretrained(tmp_path / "a")
    gen_info = describe_base(AutoModel.from_pretrained(base_folder), "b", "generation")
    gen_info.modules = base_info.modules  # paths as loaded by AutoModelFor...: bert.encoder...
    import_peft_folder(tmp_path / "a", "bare", "b", gen_info, task="generation")
    assert "bert.encoder.layer.0.attention.self.query" in read_adapter(tmp_path / "a", gen_info).lora


# ---- bad input: each refused with its own message ----


def test_pickle_refused_never_unpickled(adapter_dir, base_info):
    # A pickle that would create a file if it were ever loaded.
    marker = adapter_dir.parent / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (adapter_dir / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(AdapterValidationError, match="pickle weights are refused"):
        read_adapter(adapter_dir, base_info)
    with pytest.raises(AdapterValidationError, match="pickle"):
        import_peft_folder(adapter_dir, "x", "b", base_info)
    assert not marker.exists()


def test_truncated_safetensors(adapter_dir, base_info):
    path = adapter_dir / WEIGHTS
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(AdapterValidationError, match="sha256 does not match"):
        read_adapter(adapter_dir, base_info)
    _rewrite_manifest(adapter_dir)
    with pytest.raises(AdapterValidationError, match="not a valid safetensors file"):
        read_adapter(adapter_dir, base_info)


def test_modified_weights_that_still_parse_are_refused(adapter_dir, base_info):
    # The hash runs beside the parsing (format._load_tensors): a valid file with other numbers must
    # still fail on the hash, after parsing succeeded.
    tensors = load_file(str(adapter_dir / WEIGHTS))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(adapter_dir / WEIGHTS))
    with pytest.raises(AdapterValidationError, match=f"{WEIGHTS}: sha256 does not match"):
        read_adapter(adapter_dir, base_info)


def test_wrong_shape(adapter_dir, base_info):
    tensors = load_file(str(adapter_dir / WEIGHTS))
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    tensors[key] = torch.zeros(48, 4)
    save_file(tensors, str(adapter_dir / WEIGHTS))
    _rewrite_manifest(adapter_dir)
    with pytest.raises(AdapterValidationError, match="query: wrong shape.*out=32"):
        read_adapter(adapter_dir, base_info)


def test_wrong_rank_vs_config(adapter_dir, base_info):
    _edit_config(adapter_dir, r=8, lora_alpha=16)
    manifest = Manifest.load(adapter_dir)
    manifest.lora.r, manifest.lora.alpha = 8, 16
    write_manifest(adapter_dir, **manifest.model_dump(exclude={"files"}))
    with pytest.raises(AdapterValidationError, match="do not match rank 8"):
        read_adapter(adapter_dir, base_info)


def test_rank_over_limit(adapter_dir, base_info):
    with pytest.raises(AdapterValidationError, match="exceeds the maximum rank 2"):
        read_adapter(adapter_dir, base_info, max_rank=2)


def test_too_large(adapter_dir, base_info):
    with pytest.raises(AdapterValidationError, match="too large"):
        read_adapter(adapter_dir, base_info, max_bytes=1000)


def test_wrong_dtype(adapter_dir, base_info):
    tensors = load_file(str(adapter_dir / WEIGHTS))
    tensors["base_model.model.classifier.bias"] = torch.zeros(3, dtype=torch.int64)
    save_file(tensors, str(adapter_dir / WEIGHTS))
    _rewrite_manifest(adapter_dir)
    with pytest.raises(AdapterValidationError, match="dtype torch.int64 is not supported"):
        read_adapter(adapter_dir, base_info)


def test_unexpected_tensor(adapter_dir, base_info):
    tensors = load_file(str(adapter_dir / WEIGHTS))
    tensors["base_model.model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    save_file(tensors, str(adapter_dir / WEIGHTS))
    _rewrite_manifest(adapter_dir)
    with pytest.raises(AdapterValidationError, match="unexpected tensor"):
        read_adapter(adapter_dir, base_info)


def test_other_base_fingerprint_mismatch(adapter_dir, other_base_folder, helpers):
    other = describe_base(helpers.load_cls(other_base_folder), "other", "classification")
    with pytest.raises(AdapterValidationError, match="trained on another base.*fingerprint mismatch"):
        read_adapter(adapter_dir, other)


def test_task_mismatch(adapter_dir, base_info):
    gen = describe_base(torch.nn.Linear(2, 2), base_info.name, "generation")
    gen.fingerprint = base_info.fingerprint
    with pytest.raises(AdapterConflictError, match="for classification but the base serves generation"):
        read_adapter(adapter_dir, gen)


def test_hash_mismatch(adapter_dir, base_info):
    (adapter_dir / "README.md").write_text("changed")
    with pytest.raises(AdapterValidationError, match="README.md: sha256 does not match"):
        read_adapter(adapter_dir, base_info)


def test_unlisted_file(adapter_dir, base_info):
    (adapter_dir / "extra.txt").write_text("x")
    with pytest.raises(AdapterValidationError, match="extra.txt is not listed"):
        read_adapter(adapter_dir, base_info)


def test_manifest_missing(peft_dir, base_info):
    with pytest.raises(AdapterValidationError, match="no loraswap.json.*adapter import"):
        read_adapter(peft_dir, base_info)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_dora": True}, "lora_magnitude_vector missing but use_dora=True"),  # DoRA needs its vectors
        ({"lora_bias": True}, "lora_B.bias missing but lora_bias=True"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING' is not supported"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"target_parameters": ["query.weight"]}, "target_parameters"),
        ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
        ({"use_dora": True, "lora_bias": True}, "lora_bias with use_dora"),
        ({"bias": "all"}, "bias='all' .* is not supported"),
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ],
)
def test_unsupported_options(peft_dir, base_info, change, match):
    _edit_config(peft_dir, **change)
    with pytest.raises(AdapterValidationError, match=match):
        import_peft_folder(peft_dir, "x", "b", base_info)
    assert not (peft_dir / "loraswap.json").exists()


def test_manifest_disagrees_with_config(adapter_dir, base_info):
    _edit_config(adapter_dir, lora_alpha=32)
    _rewrite_manifest(adapter_dir)
    with pytest.raises(AdapterValidationError, match="disagree with adapter_config.json"):
        read_adapter(adapter_dir, base_info)


def test_labels_must_match_head_rows(adapter_dir, base_info):
    manifest = Manifest.load(adapter_dir)
    manifest.labels = ["a", "b"]
    manifest.save(adapter_dir)
    with pytest.raises(AdapterValidationError, match="2 labels but the head produces 3"):
        read_adapter(adapter_dir, base_info)


def test_import_bad_name(peft_dir, base_info):
    with pytest.raises(AdapterValidationError, match="invalid adapter name"):
        import_peft_folder(peft_dir, "../Evil", "b", base_info)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_symlinks_are_refused_at_import_and_validation(tmp_path, peft_dir, base_info, kind):
    """Nothing outside an adapter folder is read or copied: a linked file or folder is refused by name."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host.txt").write_text("secret")
    link = peft_dir / ("README.md" if kind == "file" else "extra")
    link.unlink(missing_ok=True)
    link.symlink_to(outside / "host.txt" if kind == "file" else outside)
    with pytest.raises(AdapterValidationError, match=f"{link.name}: symbolic links are refused"):
        import_peft_folder(peft_dir, "x", "b", base_info)
    assert not (peft_dir / "loraswap.json").exists()


def test_symlink_added_after_import_is_refused(tmp_path, adapter_dir, base_info):
    (tmp_path / "host.txt").write_text("secret")
    (adapter_dir / "notes.txt").symlink_to(tmp_path / "host.txt")
    with pytest.raises(AdapterValidationError, match="notes.txt: symbolic links are refused"):
        read_adapter(adapter_dir, base_info)


@pytest.mark.parametrize(
    "key, value",
    [
        ("bert.encoder.layer.0.attention.self.query.lora_B.weight", float("nan")),
        ("bert.encoder.layer.1.attention.self.value.lora_A.weight", float("inf")),
        ("classifier.weight", float("-inf")),
    ],
)
def test_non_finite_weights_are_refused(peft_dir, base_info, key, value):
    from safetensors.torch import save_file

    tensors = load_file(str(peft_dir / WEIGHTS))
    tensors[f"base_model.model.{key}"][0, 0] = value
    save_file(tensors, str(peft_dir / WEIGHTS))
    with pytest.raises(AdapterValidationError, match="has NaN or infinite values"):
        import_peft_folder(peft_dir, "x", "b", base_info)
    assert not (peft_dir / "loraswap.json").exists()


def test_lora_on_embeddings_is_refused_by_name(tmp_path, base_folder, base_info, helpers):
    """PEFT can put LoRA on an nn.Embedding (lora_embedding_A/B); the engines do not serve it: refused."""
    helpers.save_peft_adapter(base_folder, tmp_path / "a", target_modules=["word_embeddings", "query"])
    with pytest.raises(AdapterValidationError, match="LoRA on embeddings"):
        import_peft_folder(tmp_path / "a", "emb", "b", base_info)
    assert not (tmp_path / "a" / "loraswap.json").exists()
