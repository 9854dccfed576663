"""`python -m benchmarks run --suite all --quick` end to end, in a subprocess writing into tmp_path: every
suite writes a JSON (machine info, dtype, the expected cases with numeric fields) and a markdown table.
It checks the shape of the output, never the speed (--quick numbers mean nothing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# --quick is about 35 s of CPU time in all; on a 2-core machine shared with training jobs and other test
# runs it has taken over 10 minutes of wall time, so the timeout only catches a hang.
TIMEOUT_S = 1200
pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 60)]

# Case names of a --quick run (it uses fewer adapters than a full run: 4 instead of 32, 10 resident
# instead of 100), every suite reporting ours next to its references.
EXPECTED = {
    "cls": {"hf_base", "peft_one_adapter", "peft_mixed_batch", "peft_forward_per_adapter", "ours_0_adapters",
            "ours_1_adapters", "ours_4_adapters", "hf_base_batch1", "peft_batch1_adapter",
            "ours_batch1_no_adapter", "ours_batch1_adapter"},
    "gen": {"hf_generate", "peft_mixed_2", "ours_base", "ours_mixed_2", "ours_mixed_4", "ours_streams_1",
            "ours_paced_20_rps", "decode_step"},
    "load": {"read_adapter", "ours_load_to_first_answer_1_resident", "ours_load_to_first_answer_10_resident",
             "ours_load_response_1_resident", "ours_load_step_1_resident", "peft_load_adapter_1_resident",
             "peft_load_adapter_10_resident",
             "peft_load_to_first_answer_1_resident", "peft_load_to_first_answer_10_resident", "churn",
             "ours_forward_1_text_1_resident", "read_forward_bytes_1_resident"},
    "server": {"http_concurrency_1", "http_concurrency_16", "http_concurrency_64", "http_one_adapter_64",
               "engine_raw"},
    "fairness": {"fair", "fifo"},
    "overload": {"bounded", "unbounded"},
    "families-gen": {"llama", "gpt2", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3"},
    "families-cls": {"hf_batch1", "ours_batch1_no_adapter", "ours_batch1_adapter"},
    "kernels": {"bert_prefill.qkv.base", "bert_prefill.qkv.bmm.r64", "bert_prefill.qkv.bmm.r4",
                "bert_prefill.ffn_in.grouped_mm.r4", "gpt2_decode.c_attn.base", "gpt2_decode.c_attn.bmm.r4"},
    "accuracy": {"sentiment", "finance-sentiment", "support-intent", "support-search", "support-reply"},
    "rank": {"decode_16rows_fp32", "decode_16rows_int8", "decode_16rows_auto", "classify_64x64_32adapters_fp32",
             "classify_64x64_32adapters_int8"},
    "single": {"hf_generate_auto", "peft_adapter_auto", "server_base_auto", "server_adapter_auto",
               "server_2_streams_auto", "server_memory_auto", "server_long_prompt_auto"},
    "linears": {"fp32_onednn_packed_1rows", "int4_weight_only_bf16_1rows", "int8_dynamic_16rows"},
}  # fmt: skip


def _rows(obj) -> list[dict]:
    """Every dict with a "case" key anywhere in a result."""
    if isinstance(obj, dict):
        own = [obj] if "case" in obj else []
        return own + [row for value in obj.values() for row in _rows(value)]
    if isinstance(obj, list):
        return [row for value in obj for row in _rows(value)]
    return []


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_all_suites_quick(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "benchmarks", "run", "--suite", "all", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    written = [
        Path(line.removeprefix("wrote ")) for line in proc.stderr.splitlines() if line.startswith("wrote ")
    ]
    assert len(written) == 2 * len(EXPECTED) and all(p.parent == tmp_path for p in written), written

    for suite, expected in EXPECTED.items():
        [json_path] = tmp_path.glob(f"{suite}-cpu-*.json")
        [md_path] = tmp_path.glob(f"{suite}-cpu-*.md")
        result = json.loads(json_path.read_text())
        assert result["suite"] == suite and result["quick"] is True
        machine = result["machine"]
        assert (
            machine["cpu"] and machine["cpu_count"] >= 1 and machine["torch"] and machine["device"] == "cpu"
        )
        assert _is_number(machine["torch_threads"]) and result["setup"]["dtype"] == "float32"
        assert all(_is_number(v) for v in result["elapsed"].values())

        rows = {row["case"]: row for row in _rows(result)}
        assert expected <= set(rows), f"{suite}: missing cases {sorted(expected - set(rows))}"
        for name in expected:
            fields = {k: v for k, v in rows[name].items() if k != "case"}
            numbers = [v for v in fields.values() if not isinstance(v, list)]
            assert numbers and all(_is_number(v) for v in numbers), f"{suite}.{name}: {fields}"
            assert all(_is_number(x) for v in fields.values() if isinstance(v, list) for x in v), name

        lines = md_path.read_text().splitlines()
        assert lines[0].startswith(f"# {suite} ") and any(line.startswith("- machine: ") for line in lines)
        table = [i for i, line in enumerate(lines) if line.startswith("|---")]
        assert table and lines[table[0] - 1].startswith("| case |"), f"{suite}: no results table"
        assert lines[table[0] + 1].startswith("| "), f"{suite}: empty results table"


def test_gen_gpu_shape_runs_quick() -> None:
    """The shape `--suite gen --device cuda` uses (GPT-2-small, Conv1D targets), shrunk, on CPU: so a GPU
    session's first run measures instead of debugging."""
    from benchmarks import gen

    result, markdown = gen.run("cpu", True, shape="gpt2-small")
    assert result["setup"]["shape"] == "gpt2-small" and result["setup"]["targets"] == gen.GPT2_LINEARS
    rows = {row["case"]: row for row in _rows(result)}
    assert EXPECTED["gen"] <= set(rows), sorted(EXPECTED["gen"] - set(rows))
    assert all(_is_number(rows[name]["tokens_per_s"]) for name in EXPECTED["gen"] - {"decode_step"})
    assert "GPT-2-small" in markdown


@pytest.mark.parametrize("packed", [False, True])
def test_weight_and_lora_bytes_count_what_a_forward_reads(packed: bool) -> None:
    """The byte counts behind the benchmarks' bandwidth floors, on a tiny Llama counted by hand: every
    linear once (a tied lm_head once with the embedding it shares), oneDNN-packed linears at their dense
    size, and r_max x (in + out) of A/B per slot of each LoRA-wrapped linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common import lora_bytes, weight_bytes
    from service.engine.lora_model import inject_multi_lora
    from service.engine.packed_linear import pack_block_linears

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    inject_multi_lora(model, None, num_slots=5, max_rank=3)
    if packed:
        assert pack_block_linears(model) > 0
    kv = 2 * 4  # 2 kv heads x head_dim 4
    per_layer = 16 * 16 * 2 + 16 * kv * 2 + 16 * 24 * 3  # q, o; k, v; gate, up, down
    assert weight_bytes(model) == 4 * (2 * per_layer + 50 * 16)  # + the tied lm_head / embedding once
    lora_per_layer = 3 * ((16 + 16) * 2 + (16 + kv) * 2 + (16 + 24) * 3)
    assert lora_bytes(model, 1) == 4 * 2 * lora_per_layer
    assert lora_bytes(model, 4) == 4 * lora_bytes(model, 1)


def test_encoder_base_gives_seeded_random_weights_for_a_config_only_folder(tmp_path, monkeypatch) -> None:
    """What the cls and load suites run on a machine without the embedded package: a folder holding only
    a config and tokenizer files gets seeded random weights of that shape, the same on every call, that
    the service's base loader takes; with the variable unset the suites run the embedded MiniLM."""
    import torch
    from transformers import BertConfig, BertTokenizerFast

    from adapters.bases import load_base
    from benchmarks.common import ENCODER_ENV, encoder_base

    monkeypatch.delenv(ENCODER_ENV, raising=False)
    path, described = encoder_base(tmp_path)
    assert "embedded" in described and (Path(path) / "config.json").exists()

    src = tmp_path / "shape"
    src.mkdir()
    BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32).save_pretrained(src)  # fmt: skip
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    BertTokenizerFast(vocab_file=str(src / "vocab.txt")).save_pretrained(src)
    monkeypatch.setenv(ENCODER_ENV, str(src))
    first, described = encoder_base(tmp_path / "one")
    second, _ = encoder_base(tmp_path / "two")
    assert "random init" in described and not any(src.glob("*.safetensors"))  # the source is untouched
    a, b = (load_base(p, "classification")[0].base_model for p in (first, second))
    assert a.config.hidden_size == 16 and len(a.encoder.layer) == 2
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert encoder_base(tmp_path / "one")[0] == first  # saved once per work folder
    monkeypatch.setenv(ENCODER_ENV, first)  # a folder with weights is used as it is
    assert encoder_base(tmp_path)[0] == first


def test_gpu_session_scripts_parse_and_name_what_exists() -> None:
    """benchmarks/gpu/*.sh run only in a GPU session (the CPU dry run in benchmarks/README.md is too slow
    for every test run): they must at least parse, run suites that exist, and ask for wheels of packages
    this environment has (prepare.sh downloads this venv's versions)."""
    import re
    from importlib.metadata import version

    from benchmarks.__main__ import SUITES

    scripts = REPO / "benchmarks" / "gpu"
    for script in ("prepare.sh", "run.sh"):
        proc = subprocess.run(["bash", "-n", str(scripts / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    suites = re.findall(r"--suite (\w+)", (scripts / "run.sh").read_text())
    assert suites and set(suites) <= set(SUITES), suites
    packages = re.search(r'PACKAGES="([^"]+)"', (scripts / "prepare.sh").read_text()).group(1).split()
    assert "fastapi" in packages and all(version(name) for name in packages)
