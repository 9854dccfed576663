"""The official `openai` client against a real `loraswap serve` on the embedded MiniLM: an embedding adapter
made by PEFT (FEATURE_EXTRACTION) and imported with `loraswap adapter import` gives PEFT + the base's pooling;
the base gives sentence-transformers' own vectors; bad input is the documented 4xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from factories import randomize_adapter
from live import live_server
from peft import LoraConfig, get_peft_model

from adapters.bases import DEFAULT_ENCODER, load_base, local_base
from adapters.pooling import read_pooling

LORASWAP = str(Path(sys.executable).with_name("loraswap"))
TEXTS = ["I still have not received my new card", "how do I top up by bank transfer?", "hello"]

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-e2e")
    base, tokenizer = load_base(DEFAULT_ENCODER, "embedding")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16,
                                            target_modules=["query", "value", "dense"])).eval()
    randomize_adapter(model, 0.02)
    model.save_pretrained(root / "search")
    cmd = [LORASWAP, "adapter", "import", str(root / "search"), "--name", "search", "--base", DEFAULT_ENCODER,
           "--registry", str(root / "registry")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with live_server(root / "registry", env={"LORASWAP_DECODER_BASE": ""}) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), model, tokenizer


def test_adapter_vectors_equal_peft_and_base_equals_sentence_transformers(served):
    from sentence_transformers import SentenceTransformer

    client, model, tokenizer = served
    pooling = read_pooling(local_base(DEFAULT_ENCODER))
    reply = client.embeddings.create(model="search", input=TEXTS)  # the client asks for base64 and decodes it
    got = torch.tensor([d.embedding for d in reply.data])
    with torch.no_grad():
        want = torch.cat([pooling(model(**(e := tokenizer(t, return_tensors="pt"))).last_hidden_state,
                                  e["attention_mask"]) for t in TEXTS])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert reply.model == "search" and reply.usage.prompt_tokens == sum(map(len, tokenizer(TEXTS)["input_ids"]))
    base = client.embeddings.create(model=DEFAULT_ENCODER, input=TEXTS, encoding_format="float")
    st = SentenceTransformer(str(local_base(DEFAULT_ENCODER)), device="cpu").encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(torch.tensor([d.embedding for d in base.data]), st.float(), atol=1e-5, rtol=0)
    short = client.embeddings.create(model="search", input=TEXTS[0], dimensions=64)
    assert len(short.data[0].embedding) == 64
    torch.testing.assert_close(torch.tensor(short.data[0].embedding),
                               torch.nn.functional.normalize(want[0, :64], dim=0), atol=1e-4, rtol=0)


def test_bad_input_is_a_4xx(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="search", input=[])
    with pytest.raises(openai.APIStatusError) as err:
        client.embeddings.create(model="search", input=["x"] * 10_000)
    assert err.value.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-adapter", input="x")
    models = {m.id: m for m in client.models.list().data}
    assert models["search"].model_extra["task"] == "embedding"
