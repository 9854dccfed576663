"""Schema fuzzing with schemathesis against a live uvicorn server on tiny models (a BERT classifier and a
Llama generator, each with adapters in a registry): every operation of /openapi.json, schema-valid and
schema-violating examples. Checks: no 5xx, every status is documented, every body (and content type)
matches the schema of its status. Failures of all operations are collected and reported together.
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from e2e.tiny_world import build_world, served, wait_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from service.app import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 12}
# Destructive operations go last, so that the inference routes are fuzzed with their adapters loaded.
LAST = ("DELETE /v1/adapters/{name}", "POST /v1/unload_lora_adapter")


def steering(world) -> dict[str, list]:
    """Random adapter names are nearly always 404: valid examples get a real name (or base id) half the
    time, so the fuzzing reaches the batcher, the generator, streaming and the management code."""
    cls, gen = str(world["encoder"]), world["decoder"]
    return {"adapter": ["sentiment", "intent@1", "topic@latest", cls, "alpha"],
            "model": ["alpha", "beta@1", gen, "sentiment"],
            "lora_name": ["alpha", "spam"],
            "name": ["sentiment", "beta", "intent"]}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp("fuzz"))
    # Small limits so that the fuzzer reaches them (413, 400) as well as the happy paths.
    app = create_app(world["settings"].model_copy(update={"max_inputs": 8, "max_input_chars": 512}))
    with served(app) as url:
        yield url, app, world


def _steer(case, picks: dict[str, list], i: int | None) -> None:
    if i is None:
        return
    if isinstance(case.body, dict):
        for field in ("adapter", "model", "lora_name"):
            if field in case.body:
                case.body[field] = picks[field][i % len(picks[field])]
    if case.path_parameters and "name" in case.path_parameters:
        case.path_parameters["name"] = picks["name"][i % len(picks["name"])]


def _fuzz(operation, mode: GenerationMode, n: int, seen: list[int], picks: dict[str, list]) -> str | None:
    pick = st.one_of(st.none(), st.integers(0, 99)) if mode is GenerationMode.POSITIVE else st.none()

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), i=pick)
    def run(case, i):
        _steer(case, picks, i)
        seen.append(case.call_and_validate(checks=CHECKS, timeout=30).status_code)

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
        return None
    except (FailureGroup, Exception) as exc:  # noqa: BLE001 - collected, reported with the operation below
        return f"{operation.label} [{mode.value}]: {type(exc).__name__}: {str(exc)[:3000]}"
    return None


def _explicit(world) -> list[tuple[str, dict, int, str]]:
    """(operation, body, expected status, expected content type): the happy paths, streaming included,
    validated by the same checks whatever the random generation reached."""
    gen, cls = world["decoder"], str(world["encoder"])
    chat = [{"role": "user", "content": "hi"}]
    return [
        ("POST /v1/classify", {"adapter": "sentiment", "inputs": ["great movie", "dull"], "top_k": 2}, 200, "json"),
        ("POST /v1/classify", {"adapter": cls, "inputs": "w1 w2"}, 200, "json"),
        ("POST /v1/classify", {"adapter": "alpha", "inputs": "w1"}, 409, "json"),
        ("POST /v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 4}, 200, "json"),
        ("POST /v1/completions", {"model": gen, "prompt": [5, 6], "max_tokens": 3, "stream": True,
                                  "stream_options": {"include_usage": True}}, 200, "text/event-stream"),
        ("POST /v1/chat/completions", {"model": "beta", "messages": chat, "max_tokens": 4}, 200, "json"),
        ("POST /v1/chat/completions", {"model": "alpha@1", "messages": chat, "max_tokens": 4, "stream": True},
         200, "text/event-stream"),
        ("POST /v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 999}, 400, "json"),
        ("POST /v1/adapters", {"adapter": "spam"}, 200, "json"),
    ]


def test_every_operation_survives_fuzzing(live):
    url, app, world = live
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    for expected in ("POST /v1/classify", "POST /v1/completions", "POST /v1/chat/completions",
                     "POST /v1/adapters", "DELETE /v1/adapters/{name}", "GET /ready"):
        assert expected in operations, sorted(operations)

    failures = []
    for label, body, status, content_type in _explicit(world):
        try:
            response = operations[label].Case(body=body).call_and_validate(checks=CHECKS, timeout=30)
        except (FailureGroup, Exception) as exc:  # noqa: BLE001 - collected
            failures.append(f"{label} {body}: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        assert response.status_code == status, (label, body, response.status_code, response.text[:500])
        assert content_type in response.headers["content-type"][0], (label, response.headers)
        if content_type == "text/event-stream":
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]

    picks, statuses, seconds = steering(world), {}, {}
    for op in sorted(operations.values(), key=lambda op: op.label in LAST):
        started = time.monotonic()
        for mode, n in EXAMPLES.items():
            failure = _fuzz(op, mode, n, statuses.setdefault(op.label, []), picks)
            if failure:
                failures.append(failure)
        seconds[op.label] = time.monotonic() - started
    summary = {label: sorted(set(codes)) for label, codes in sorted(statuses.items())}
    print(f"\nfuzz: {sum(map(len, statuses.values()))} requests over {len(operations)} operations")
    for label, codes in summary.items():
        print(f"  {label}: {codes} in {seconds[label]:.1f} s")
    assert not failures, "\n\n".join(failures)

    # The fuzzing really reached the engines (not only validation errors), and the server is still well.
    assert 200 in summary["POST /v1/classify"], summary
    assert 200 in summary["POST /v1/completions"] or 200 in summary["POST /v1/chat/completions"], summary
    assert any(c == 422 for codes in summary.values() for c in codes), summary
    ctx = app.state.ctx
    # Nothing leaked in flight (the count drops just after the last answer reaches the client: wait a bit).
    wait_for(lambda: ctx.in_flight == 0, 10, "no request in flight")
    assert httpx.get(f"{url}/ready").status_code == 200
    ok = httpx.post(f"{url}/v1/classify", json={"adapter": ctx.settings.encoder_base, "inputs": "great movie"})
    assert ok.status_code == 200, ok.text
