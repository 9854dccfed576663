"""Embedding adapters: pairs, the in-batch-negatives loss on the HF Trainer, and retrieval evaluation.

Data is either pairs (`anchor_column`, `positive_column`) or labelled texts, where each row's positive is
another row of the same label. The loss is multiple-negatives ranking (InfoNCE): each anchor must pick
its own positive among every positive in the batch, and each positive its anchor (symmetric). Rows of the
same label are not negatives of each other: they are masked out rather than pushed apart.

With `confusable_batches`, batches are not random: each holds a few rows of each of a set of labels that
lie close together in the base's space (`confusable_order`), so every in-batch negative is a hard one.

Evaluation is retrieval of one split against the train split (the index): accuracy@1 by the nearest
neighbour's label, recall@5 (a same-label row among the 5 nearest), MRR@10; for the adapter and its base.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer

from adapters.pooling import Pooling
from training.recipe import Recipe

RETRIEVAL_KEYS = ("accuracy_at_1", "recall_at_5", "mrr_at_10")
SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default (cosine x 20)
_SIDES = ("anchor", "positive")


def has_pairs(ds: Dataset, recipe: Recipe) -> bool:
    return recipe.anchor_column in ds.column_names and recipe.positive_column in ds.column_names


def pairs(ds: Dataset, recipe: Recipe) -> Dataset:
    """anchor/positive/group rows: given pairs (each its own group), or same-label pairs drawn with the seed."""
    if has_pairs(ds, recipe):
        return Dataset.from_dict({"anchor": ds[recipe.anchor_column], "positive": ds[recipe.positive_column],
                                  "group": list(range(len(ds)))})
    texts, labels = ds[recipe.text_column], [str(x) for x in ds[recipe.label_column]]
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    ids = {label: g for g, label in enumerate(sorted(by_label))}
    rng = random.Random(recipe.seed)
    anchor, positive, group = [], [], []
    for i, label in enumerate(labels):
        others = [j for j in by_label[label] if j != i]
        if not others:
            continue  # a label with one row has no positive
        anchor.append(texts[i])
        positive.append(texts[rng.choice(others)])
        group.append(ids[label])
    return Dataset.from_dict({"anchor": anchor, "positive": positive, "group": group})


def tokenize_pairs(ds: Dataset, tokenizer, recipe: Recipe) -> Dataset:
    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"group": batch["group"]}
        for side in _SIDES:
            enc = tokenizer(batch[side], truncation=True, max_length=recipe.max_length)
            out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = enc["input_ids"], enc["attention_mask"]
        out["length"] = [len(a) + len(p) for a, p in zip(out["anchor_input_ids"], out["positive_input_ids"], strict=True)]
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize pairs")


def confusable_order(groups: list[int], vectors: torch.Tensor, batch_size: int, per_group: int,
                     seed: int) -> list[int]:
    """A row order whose consecutive `batch_size` rows come from mutually close groups: a random group with
    rows left seeds a batch, then groups by the cosine of their centroid to the seed's, `per_group` rows
    each, until the batch is full. `vectors`: unit vectors of the rows (the base's)."""
    rng = random.Random(seed)
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    ids = sorted(rows)
    centroids = F.normalize(torch.stack([vectors[rows[g]].mean(0) for g in ids]), dim=-1)
    near = (centroids @ centroids.T).argsort(dim=1, descending=True).tolist()  # by closeness, itself first
    for members in rows.values():
        rng.shuffle(members)
    order: list[int] = []
    while len(order) < len(groups):
        seed_group = rng.choice([k for k, g in enumerate(ids) if rows[g]])
        batch: list[int] = []
        for j in near[seed_group]:
            take = rows[ids[j]][: min(per_group, batch_size - len(batch))]
            del rows[ids[j]][: len(take)]
            batch += take
            if len(batch) == batch_size:
                break
        order += batch
    return order


class PairCollator:
    """Pads each side of the pairs on its own (dynamic padding, as for classification)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {"group": torch.tensor([r["group"] for r in rows])}
        for side in _SIDES:
            padded = self.tokenizer.pad([{"input_ids": r[f"{side}_input_ids"],
                                          "attention_mask": r[f"{side}_attention_mask"]} for r in rows],
                                        return_tensors="pt")
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = padded["input_ids"], padded["attention_mask"]
        return batch


def in_batch_negatives_loss(anchor: torch.Tensor, positive: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over cosine similarities x SCALE; same-group off-diagonal pairs are masked."""
    sim = SCALE * F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T
    same = group[:, None] == group[None, :]
    sim = sim.masked_fill(same & ~torch.eye(len(group), dtype=torch.bool, device=sim.device), float("-inf"))
    target = torch.arange(len(group), device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2


class EmbeddingTrainer(Trainer):
    """The HF Trainer with the pair loss, and retrieval metrics (validation vs train) as its evaluation."""

    loss_is_scaled_for_ga = False  # a per-batch mean

    def __init__(self, *args, pooling: Pooling, recipe: Recipe, index: Dataset, queries: Dataset, **kwargs):
        super().__init__(*args, **kwargs)
        self.pooling, self.recipe, self.index, self.queries = pooling, recipe, index, queries

    def _get_train_sampler(self, *args, **kwargs):
        """Batches as `confusable_order` arranged the rows, when it did."""
        if self.recipe.confusable_batches:
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        vectors = [self.pooling(model(input_ids=inputs[f"{s}_input_ids"],
                                      attention_mask=inputs[f"{s}_attention_mask"]).last_hidden_state,
                                inputs[f"{s}_attention_mask"]) for s in _SIDES]
        loss = in_batch_negatives_loss(*vectors, inputs["group"])
        return (loss, {}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict[str, float]:
        scores = retrieval(self.model, self.processing_class, self.pooling, self.recipe, self.index,
                           {"validation": self.queries})["validation"]
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items() if k != "rows"}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


@torch.no_grad()
def encode(model, tokenizer, texts: list[str], pooling: Pooling, max_length: int, batch_size: int = 128) -> torch.Tensor:
    """Unit vectors of `texts` (rows in input order), batched longest first so each batch pads little."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks: list[torch.Tensor] = []
    for start in range(0, len(order), batch_size):
        rows = [texts[i] for i in order[start:start + batch_size]]
        enc = tokenizer(rows, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        chunks.append(F.normalize(pooling(hidden, enc["attention_mask"]), dim=-1).cpu())
    model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    out = torch.empty(len(texts), chunks[0].shape[1])
    out[torch.tensor(order)] = torch.cat(chunks)
    return out


def retrieval_scores(queries: torch.Tensor, query_labels: list[str], index: torch.Tensor,
                     index_labels: list[str]) -> dict[str, float]:
    """accuracy@1, recall@5 and MRR@10 by label, cosine similarity of unit vectors."""
    labels = {label: i for i, label in enumerate(sorted(set(index_labels) | set(query_labels)))}
    q = torch.tensor([labels[x] for x in query_labels])
    ix = torch.tensor([labels[x] for x in index_labels])
    top = (queries @ index.T).topk(min(10, len(index_labels)), dim=1).indices
    hit = ix[top] == q[:, None]  # [queries, 10]
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.zeros_like(q))
    mrr = torch.where(first > 0, 1.0 / first.clamp_min(1).float(), torch.zeros(len(q)))
    return {"accuracy_at_1": float(hit[:, 0].float().mean()), "recall_at_5": float(hit[:, :5].any(1).float().mean()),
            "mrr_at_10": float(mrr.mean()), "rows": len(query_labels)}


def _side(ds: Dataset, recipe: Recipe, role: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of a split as queries or as the index: labelled texts as they are; pairs as anchors
    (queries) looking for their own positive (index), each pair its own label."""
    if has_pairs(ds, recipe):
        column = recipe.anchor_column if role == "queries" else recipe.positive_column
        return list(ds[column]), [str(i) for i in range(len(ds))]
    return list(ds[recipe.text_column]), [str(x) for x in ds[recipe.label_column]]


def retrieval(model, tokenizer, pooling: Pooling, recipe: Recipe, index: Dataset,
              splits: dict[str, Dataset]) -> dict[str, dict[str, float]]:
    """Scores of each split's queries against `index` (for pairs, each split is its own index: see _side);
    the index is encoded once for all splits."""
    def vectors(texts: list[str]) -> torch.Tensor:
        return encode(model, tokenizer, texts, pooling, recipe.max_length, recipe.eval_batch_size)

    shared = None
    out = {}
    for name, queries in splits.items():
        own = has_pairs(queries, recipe)
        (q_texts, q_labels), (i_texts, i_labels) = _side(queries, recipe, "queries"), _side(queries if own else index, recipe, "index")
        if own:
            keys = vectors(i_texts)
        else:
            shared = vectors(i_texts) if shared is None else shared
            keys = shared
        out[name] = retrieval_scores(vectors(q_texts), q_labels, keys, i_labels)
    return out


def evaluate_retrieval(model, tokenizer, pooling: Pooling, recipe: Recipe, index: Dataset,
                       splits: dict[str, Dataset]) -> dict[str, dict[str, Any]]:
    """Adapter and base (PEFT's disable_adapter) retrieval scores per split, the base's as `base_*`."""
    scores: dict[str, dict[str, Any]] = retrieval(model, tokenizer, pooling, recipe, index, splits)
    with model.disable_adapter():
        base = retrieval(model, tokenizer, pooling, recipe, index, splits)
    for name, values in base.items():
        scores[name].update({f"base_{k}": v for k, v in values.items() if k != "rows"})
    return scores
