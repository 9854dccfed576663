"""Tests for service/api/openai.py: the official `openai` client against a real uvicorn server on 127.0.0.1
serving a tiny Llama with PEFT adapters from a registry; answers equal PEFT + HF `generate` per request.
"""

from __future__ import annotations

import copy
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from factories import EOS, TINY_DECODER, byte_tokenizer, randomize_adapter
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapters.fingerprint import describe_base
from adapters.format import import_peft_folder
from adapters.registry import Registry
from service.app import create_app
from service.config import Settings
from service.engine.generator import GeneratorEngine

BASE_ID = "tiny-llama"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_DECODER)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    base, tok = tiny_llama(), byte_tokenizer()
    info = describe_base(base, BASE_ID, "generation")
    registry = Registry(root / "registry")
    oracles = {BASE_ID: base}
    for i, (name, targets) in enumerate([("alpha", ["q_proj", "v_proj"]), ("beta", ["o_proj", "down_proj"])]):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(
            copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
        ).eval()
        randomize_adapter(peft_model, 0.3)
        folder = root / "work" / name
        peft_model.save_pretrained(folder)
        import_peft_folder(folder, name, BASE_ID, info, task="generation")
        registry.publish(folder, name=name)
        oracles[name] = peft_model
    engine = GeneratorEngine(
        copy.deepcopy(base), tok, info, num_slots=3, max_rank=8, max_num_seqs=4, max_model_len=64
    )
    settings = Settings(
        registry=str(root / "registry"),
        encoder_base="",
        decoder_base=BASE_ID,
        watch_interval_s=0,
        max_gpu_adapters=2,
        max_tokens=40,
    )
    return settings, engine, tok, oracles


@pytest.fixture(scope="module")
def server(world):
    settings, engine, _, _ = world
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, generator=engine), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield url
    srv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def expected(world, model: str, prompt_ids: list[int], max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of PEFT + HF greedy generate for this request alone."""
    _, _, tok, oracles = world
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = (
            oracles[model]
            .generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
            )[0, len(prompt_ids) :]
            .tolist()
        )
    finish = "stop" if out[-1] == EOS else "length"
    return tok.decode(out, skip_special_tokens=True), finish, len(out)


def chat_ids(world, messages: list[dict]) -> list[int]:
    tok = world[2]
    return tok(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )["input_ids"]


@pytest.mark.parametrize("model", ["alpha", "beta", BASE_ID])
def test_completion_equals_peft(client, world, model: str) -> None:
    prompt = "Once upon a time"
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    text, finish, n = expected(world, model, world[2](prompt)["input_ids"], 12)
    assert resp.object == "text_completion" and resp.model == model
    assert resp.choices[0].text == text and resp.choices[0].finish_reason == finish
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == n
    assert resp.usage.total_tokens == len(prompt) + n


def test_completion_stream_matches_and_reports_usage(client, world) -> None:
    kw = dict(model="alpha@1", prompt=[5, 6, 7, 8], max_tokens=15, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_stream_and_not(client, world) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    resp = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)
    text, finish, n = expected(world, "beta", chat_ids(world, messages), 10)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text and resp.choices[0].finish_reason == finish
    assert resp.usage.completion_tokens == n
    chunks = list(
        client.chat.completions.create(
            model="beta", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_seeded_sampling_and_stop_over_http(client) -> None:
    kw = dict(model=BASE_ID, prompt="abc", max_tokens=20, temperature=0.9, top_p=0.95, seed=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    greedy = client.completions.create(model=BASE_ID, prompt="abc", max_tokens=20, temperature=0).choices[0]
    assert len(greedy.text) > 6, greedy  # the fixture's model produces text for this prompt
    stop = greedy.text[3:5]
    cut = client.completions.create(model=BASE_ID, prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy.text[: greedy.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_have_the_openai_shape(client, server) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE_ID, prompt="y" * 80, max_tokens=2)
    assert "context" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE_ID, prompt="x", max_tokens=41)  # over the server's max_tokens
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=BASE_ID, prompt=[500], max_tokens=2
        )  # token id outside the vocabulary
    resp = httpx.post(f"{server}/v1/chat/completions", json={"model": BASE_ID, "messages": [], "n": 2})
    assert resp.status_code == 422 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_raw_sse_ends_with_done(server) -> None:
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        json={"model": "alpha", "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True},
    ) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_client_disconnect_frees_the_sequence(server, world) -> None:
    engine = world[1]
    body = {"model": BASE_ID, "prompt": "go", "max_tokens": 40, "temperature": 0.8, "seed": 1, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body) as resp:
        next(resp.iter_lines())
        steps = engine.steps
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and engine.kv_cache_usage == 0.0
    assert engine.steps - steps < 20  # 39 tokens were still to come: the disconnect stopped it early


def test_generation_requests_are_counted_and_unknown_refs_mint_no_labels(server, client):
    """Scraped from the live server after real traffic: generation requests are in requests_total under the
    adapter they resolved to; refs that resolve to nothing all count under `_other_` and take no label."""
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="alpha", prompt="hi", max_tokens=2, temperature=0)
    for i in range(3):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=f"alpha@junk{i}", prompt="hi", max_tokens=2)
    samples = [s for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)
               if f.name == "loraswap_requests" for s in f.samples if s.name == "loraswap_requests_total"]
    counts = {(s.labels["adapter"], s.labels["task"], s.labels["status"]): s.value for s in samples}
    assert counts[("alpha", "generation", "200")] >= 1
    assert counts[("_other_", "generation", "404")] >= 3
    assert not any("junk" in adapter for adapter, _, _ in counts)

