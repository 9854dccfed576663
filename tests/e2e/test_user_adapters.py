"""Adapters as users bring them: made by PEFT itself on the embedded bases (all-MiniLM-L6-v2, SmolLM2) with
`target_modules="all-linear"` and with DoRA, imported by `loraswap adapter import`, served by a real
`loraswap serve`; every answer equal to PEFT for that adapter alone. Adapters the server cannot serve
exactly are refused by name, and the server's adapters stay as they were."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from factories import randomize_adapter
from live import live_server
from peft import LoraConfig, get_peft_model

from adapters.bases import DEFAULT_DECODER, DEFAULT_ENCODER, load_base
from adapters.format import sha256_file

LORASWAP = str(Path(sys.executable).with_name("loraswap"))
TEXTS = ["I loved this film", "a dull, boring mess", "where is my card?", "great movie, I would watch it again"]
PROMPT = "The customer asked for a refund because"
TOKENS = 12

pytestmark = pytest.mark.real_model

# name -> (base, LoraConfig options)
ADAPTERS = {
    "cls-all-linear": (DEFAULT_ENCODER, dict(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear")),
    "cls-dora": (DEFAULT_ENCODER, dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value",
                                                                                                "dense"], use_dora=True)),
    "gen-all-linear": (DEFAULT_DECODER, dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear")),
    "gen-dora": (DEFAULT_DECODER, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                       use_dora=True)),
}  # fmt: skip


def _peft(base_name: str, options: dict, seed: int):
    base, tokenizer = load_base(base_name, "classification" if options["task_type"] == "SEQ_CLS" else "generation",
                                num_labels=3 if options["task_type"] == "SEQ_CLS" else None)  # fmt: skip
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**options)).eval()
    randomize_adapter(model, 0.02, ("lora_A", "lora_B", "modules_to_save"))
    return model, tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The PEFT oracles and a registry holding their imported adapters."""
    root = tmp_path_factory.mktemp("user-adapters")
    registry = root / "registry"
    oracles = {}
    for seed, (name, (base_name, options)) in enumerate(ADAPTERS.items()):
        model, tokenizer = _peft(base_name, options, seed)
        model.save_pretrained(root / name)
        cmd = [LORASWAP, "adapter", "import", str(root / name), "--name", name, "--base", base_name,
               "--registry", str(registry)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        oracles[name] = (model, tokenizer)
    with live_server(registry) as url:
        yield url, oracles, root


@pytest.mark.parametrize("name", ["cls-all-linear", "cls-dora"])
def test_classification_equals_peft(served, name):
    url, oracles, _ = served
    resp = httpx.post(f"{url}/v1/classify", json={"adapter": name, "inputs": TEXTS}, timeout=120)
    assert resp.status_code == 200, resp.text
    model, tokenizer = oracles[name]
    labels = [model.config.id2label[i] for i in range(3)]
    with torch.no_grad():
        want = torch.stack([torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits[0], -1) for t in TEXTS])
    got = torch.tensor([[r["scores"][label] for label in labels] for r in resp.json()["results"]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gen-all-linear", "gen-dora"])
def test_generation_equals_peft_greedy(served, name):
    url, oracles, _ = served
    model, tokenizer = oracles[name]
    ids = tokenizer(PROMPT)["input_ids"]
    body = {"model": name, "prompt": ids, "max_tokens": TOKENS, "temperature": 0}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    with torch.no_grad():
        prompt = torch.tensor([ids])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=TOKENS,
                             do_sample=False)[0, len(ids) :]  # fmt: skip
    assert resp.json()["choices"][0]["text"] == tokenizer.decode(out, skip_special_tokens=True)


def test_mixed_requests_at_once(served):
    """All four adapters and both bases in flight together: the answers do not depend on the company."""
    url, _, _ = served

    def classify(name):
        return httpx.post(f"{url}/v1/classify", json={"adapter": name, "inputs": TEXTS}, timeout=300).json()

    alone = {name: classify(name) for name in ("cls-all-linear", "cls-dora")}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = {name: pool.submit(classify, name) for name in ("cls-all-linear", "cls-dora")}
        gens = [pool.submit(httpx.post, f"{url}/v1/completions", timeout=300,
                            json={"model": m, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
                for m in ("gen-all-linear", "gen-dora", DEFAULT_DECODER)]  # fmt: skip
        assert all(g.result().status_code == 200 for g in gens)
        for name, future in futures.items():
            got = [r["scores"] for r in future.result()["results"]]
            want = [r["scores"] for r in alone[name]["results"]]
            for g, w in zip(got, want, strict=True):
                assert g.keys() == w.keys() and all(abs(g[k] - w[k]) < 1e-4 for k in g)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("trainable_token_indices", [1, 2], "trainable_token_indices"),
        ("peft_type", "IA3", "peft_type 'IA3' is not supported"),
        ("target_parameters", ["query.weight"], "target_parameters"),
        ("use_qalora", True, "QALoRA"),
    ],
)
def test_refused_adapter_names_the_option_and_changes_nothing(served, option, value, message):
    """A PEFT folder with an option that cannot be served exactly: `adapter import` refuses it by name; a
    version folder whose config was changed to use it after import (its manifest hashes updated) is refused
    at load with a 4xx naming it, never a 5xx, and the server's adapters stay as they were."""
    url, _, root = served
    before = httpx.get(f"{url}/v1/adapters", timeout=30).json()
    config = json.loads((root / "cls-dora" / "adapter_config.json").read_text())
    bad = root / f"bad-{option}"
    shutil.copytree(root / "registry" / "cls-dora" / "1", bad)  # a valid version folder, manifest included
    (bad / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    cmd = [LORASWAP, "adapter", "import", str(bad), "--name", "bad", "--base", DEFAULT_ENCODER, "--no-publish"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr

    manifest = json.loads((bad / "loraswap.json").read_text())
    manifest["files"]["adapter_config.json"] = sha256_file(bad / "adapter_config.json")
    (bad / "loraswap.json").write_text(json.dumps(manifest))
    resp = httpx.post(f"{url}/v1/adapters", json={"path": str(bad)}, timeout=60)
    assert 400 <= resp.status_code < 500 and message in resp.text, resp.text
    assert httpx.get(f"{url}/v1/adapters", timeout=30).json() == before
