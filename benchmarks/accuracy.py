"""accuracy suite: every shipped adapter in registry/ served by its engine under each base precision (fp32,
int8 block linears, bf16, int4 block linears) on its test split, with the budget check. Classifiers:
accuracy, within 0.5 point of fp32; the rows are what the server answers, batches of 64 texts on one
adapter. support-search: accuracy@1 through the embedding path, same budget.
Generation: support-reply's mean loss on the reply tokens of its test split (the recipe's chat format and
256-token limit), teacher-forced through the GeneratorEngine's own model and runner under each precision,
with the budget check (within 2 % of fp32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from benchmarks.common import machine_info, machine_markdown, set_threads, shipped_adapter

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ADAPTERS = {"sentiment": "sst2", "finance-sentiment": "financial_phrasebank", "support-intent": "banking77"}
# int4: every block linear the kernel takes (`quantization=int4`); `auto` takes int4 only where lossless and
# faster (quantize.py): the decoder's column is then "int4", the encoders' "fp32".
PRECISIONS = {"fp32": (torch.float32, "none"), "int8": (torch.float32, "int8"), "bf16": (torch.bfloat16, "none"),
              "int4": (torch.float32, "int4")}  # fmt: skip


def _rows(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of a JSONL split (None: all)."""
    return [json.loads(line) for line in path.read_text().splitlines()][:limit]


def _accuracy(name: str, precision: str, limit: int | None) -> float:
    from adapters.bases import DEFAULT_ENCODER, load_base
    from adapters.format import read_adapter
    from service.engine.classifier import ClassifierEngine

    dtype, quantization = PRECISIONS[precision]
    model, tokenizer = load_base(DEFAULT_ENCODER, "classification", dtype=dtype)
    engine = ClassifierEngine(model, tokenizer, None, num_slots=2, max_rank=64, dtype=dtype,
                              quantization=quantization)  # fmt: skip
    weights = read_adapter(shipped_adapter(name), engine.base_info)
    engine.load_slot(1, weights)
    rows = _rows(DATA / ADAPTERS[name] / "test.jsonl", limit)
    labels, right = weights.manifest.labels, 0
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            batch = rows[i : i + 64]
            logits = engine.classify([r["text"] for r in batch], [1] * len(batch))
            right += sum(labels[int(lg.argmax())] == r["label"] for lg, r in zip(logits, batch, strict=True))
    return right / len(rows)


def _search_accuracy(precision: str, queries: int | None, index: int | None) -> float:
    """support-search's accuracy@1 through the engine's embedding path: the first `queries` BANKING77 test
    texts against the first `index` train texts (None: all; cosine of the pooled vectors, a hit when the
    nearest index text has the query's intent; with the whole train split, what its eval report calls
    test accuracy@1 over those queries)."""
    from adapters.bases import DEFAULT_ENCODER, load_base, local_base
    from adapters.format import read_adapter
    from adapters.pooling import read_pooling
    from service.engine.classifier import ClassifierEngine
    from training.embedding import retrieval_scores

    dtype, quantization = PRECISIONS[precision]
    model, tokenizer = load_base(DEFAULT_ENCODER, "classification", dtype=dtype)
    engine = ClassifierEngine(model, tokenizer, None, num_slots=2, max_rank=64, dtype=dtype, quantization=quantization,
                              pooling=read_pooling(local_base(DEFAULT_ENCODER)))  # fmt: skip
    engine.load_slot(1, read_adapter(shipped_adapter("support-search"), engine.base_info))

    def vectors(rows: list[dict]) -> torch.Tensor:
        ids = engine.tokenize([r["text"] for r in rows], engine.embedding_length)
        out = [v for i in range(0, len(ids), 64)
               for v in engine.run(ids[i : i + 64], [1] * len(ids[i : i + 64]), [True] * len(ids[i : i + 64]))]  # fmt: skip
        return torch.nn.functional.normalize(torch.stack(out).float(), dim=-1)

    test, train = _rows(DATA / "banking77" / "test.jsonl", queries), _rows(DATA / "banking77" / "train.jsonl", index)
    with torch.inference_mode():
        scores = retrieval_scores(vectors(test), [r["label"] for r in test], vectors(train), [r["label"] for r in train])
    return scores["accuracy_at_1"]


def _reply_loss(precision: str, limit: int | None) -> float:
    """Mean cross-entropy per reply token of support-reply on its test split, through the engine's runner
    (every position's logits: the runner's own layers and head, one row at a time, in a KV row of its own)."""
    from adapters.bases import DEFAULT_DECODER, load_base
    from adapters.fingerprint import describe_base
    from adapters.format import read_adapter
    from service.engine.generator import GeneratorEngine
    from service.engine.sampling import SamplingParams
    from service.engine.sequence import Sequence
    from training.data import chat_prompt

    dtype, quantization = PRECISIONS[precision]
    model, tok = load_base(DEFAULT_DECODER, "generation", dtype=dtype)
    info = describe_base(model, DEFAULT_DECODER, "generation")
    engine = GeneratorEngine(model, tok, info, num_slots=2, max_rank=64, max_num_seqs=1, max_model_len=512,
                             dtype=dtype, quantization=quantization)  # fmt: skip
    engine.load_slot(1, read_adapter(shipped_adapter("support-reply"), info))
    total, count, runner = 0.0, 0, engine.runner
    with torch.inference_mode():
        for row in _rows(DATA / "bitext_customer_support" / "test.jsonl", limit):
            prompt = chat_prompt(tok, row["instruction"], None)
            reply = tok(row["response"].strip() + tok.eos_token, add_special_tokens=False)["input_ids"]
            ids = (prompt + reply)[:256]
            seq = Sequence(ids, SamplingParams(max_tokens=1))
            engine.kv_cache.allocate(seq)
            with runner.slots.use([1]):
                hidden = runner._layers(torch.tensor([ids]), torch.arange(len(ids))[None], slice(seq.row, seq.row + 1))
            engine.kv_cache.free(seq)
            logits = runner._logits(hidden[0, len(prompt) - 1 : -1])
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[len(prompt) :]), reduction="sum"))
            count += len(ids) - len(prompt)
    engine.shutdown()
    return total / count


def run(device: str, quick: bool) -> tuple[dict, str]:
    """LORASWAP_BENCH_PRECISIONS (comma list, default all) narrows the precisions: bf16 is ~3x slower than
    fp32 on a CPU without AMX. LORASWAP_BENCH_ROWS takes the first rows of each test split only, and
    LORASWAP_BENCH_THREADS sets the threads (for a shared machine)."""
    set_threads(device, quick)
    if os.environ.get("LORASWAP_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["LORASWAP_BENCH_THREADS"]))
    limit = 64 if quick else int(os.environ.get("LORASWAP_BENCH_ROWS", 0)) or None
    chosen = os.environ.get("LORASWAP_BENCH_PRECISIONS", ",".join(PRECISIONS)).split(",")
    others = [p for p in chosen if p != "fp32"]
    cases = []
    for name in ADAPTERS:
        acc = {p: _accuracy(name, p, limit) for p in ["fp32", *others]}
        cases.append({"case": name, **acc, **{f"{p}_minus_fp32_points": 100 * (acc[p] - acc["fp32"]) for p in others}})
    queries, index = (16, 64) if quick else (limit, None)  # the whole train split as the index
    search = {p: _search_accuracy(p, queries, index) for p in ["fp32", *others]}
    cases.append({"case": "support-search", **search,
                  **{f"{p}_minus_fp32_points": 100 * (search[p] - search["fp32"]) for p in others}})  # fmt: skip
    reply_rows = 8 if quick else int(os.environ.get("LORASWAP_BENCH_REPLY_ROWS", 200))
    loss = {p: _reply_loss(p, reply_rows) for p in ["fp32", *others]}
    replies = {"case": "support-reply", "rows": reply_rows, **loss,
               **{f"{p}_over_fp32": loss[p] / loss["fp32"] for p in others}}  # fmt: skip
    result = {"suite": "accuracy", "quick": quick, "machine": machine_info(device), "setup": {"dtype": "float32", "rows_per_split": limit, "batch": 64}, "cases": [*cases, replies]}
    md = ["# accuracy — shipped classification adapters per base precision (test split)", "",
          machine_markdown(result["machine"], "per column"), "",
          "| case | fp32 | " + " | ".join(others) + " | " + " | ".join(f"{p} - fp32 (points)" for p in others) + " |",
          "|---" * (2 + 2 * len(others)) + "|"]
    for c in cases:
        md.append(f"| {c['case']} | {c['fp32']:.4f} | " + " | ".join(f"{c[p]:.4f}" for p in others) + " | "
                  + " | ".join(f"{c[p + '_minus_fp32_points']:+.2f}" for p in others) + " |")
    md += ["", f"support-reply, mean loss per reply token, first {reply_rows} test rows (budget: within 2 % of fp32):",
           "", "| case | fp32 | " + " | ".join(others) + " | " + " | ".join(f"{p} / fp32" for p in others) + " |",
           "|---" * (2 + 2 * len(others)) + "|",
           f"| support-reply | {loss['fp32']:.4f} | " + " | ".join(f"{loss[p]:.4f}" for p in others) + " | "
           + " | ".join(f"{replies[p + '_over_fp32']:.4f}" for p in others) + " |"]
    return result, "\n".join(md) + "\n"
