"""Embedding training: same-label pairs, the in-batch-negatives loss against sentence-transformers' own
MultipleNegativesRankingLoss, retrieval metrics by hand, and a tiny train -> evaluate -> publish run whose
published adapter the server's validator accepts and whose numbers `retrieval` reproduces."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from adapters.bases import load_base
from adapters.errors import LoraswapError
from adapters.fingerprint import describe_base
from adapters.format import read_adapter
from adapters.registry import Registry
from tests.training.conftest import read_jsonl, write_jsonl
from tests.training.helpers import recipe, single_thread  # noqa: F401  (autouse)
from training.cli import run
from training.embedding import confusable_order, in_batch_negatives_loss, pairs, retrieval_scores
from training.recipe import Recipe

DATA = __import__("pathlib").Path(__file__).resolve().parents[2].parent / "shared" / "data" / "banking77"


def test_pairs_come_from_the_same_label_and_skip_singletons():
    ds = Dataset.from_dict({"text": ["a1", "a2", "a3", "b1", "c1", "c2"], "label": ["a", "a", "a", "b", "c", "c"]})
    out = pairs(ds, Recipe(name="x", task="embedding", data="d"))
    label = dict(zip(ds["text"], ds["label"], strict=True))
    assert len(out) == 5 and "b1" not in out["anchor"]  # b has one row: no positive
    for anchor, positive in zip(out["anchor"], out["positive"], strict=True):
        assert anchor != positive and label[anchor] == label[positive]
    assert len(set(zip(out["group"], [label[a] for a in out["anchor"]], strict=True))) == 2  # one group id per label
    given = Dataset.from_dict({"anchor": ["q1", "q2"], "positive": ["p1", "p2"]})
    assert pairs(given, Recipe(name="x", task="embedding", data="d"))["group"] == [0, 1]


def test_loss_equals_sentence_transformers_mnrl_when_no_labels_are_shared():
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    a, p = torch.randn(6, 8), torch.randn(6, 8)
    # The symmetric form (anchor -> positives and positive -> anchors), scale 20, cosine; it needs no model here.
    loss = MultipleNegativesRankingLoss(torch.nn.Module(), scale=20.0, directions=("query_to_doc", "doc_to_query"),
                                        partition_mode="per_direction")
    want = loss.compute_loss_from_embeddings([a, p], None)
    torch.testing.assert_close(in_batch_negatives_loss(a, p, torch.arange(6)), want)
    # Same-label rows are not negatives: masking them lowers the loss where they would compete.
    same = torch.tensor([0, 0, 1, 2, 3, 4])
    assert in_batch_negatives_loss(a, p, same) < in_batch_negatives_loss(a, p, torch.arange(6))


def test_retrieval_scores_by_hand():
    index = torch.eye(4)
    index_labels = ["a", "b", "c", "a"]
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0, 0.1],  # nearest 0 (a): hit
                                                           [0.9, 0.1, 0.0, 0.0],  # nearest 0 (a), b second
                                                           [0.0, 0.1, 0.05, 1.0]]), dim=1)  # 3 (a), 1 (b), 2 (c)
    scores = retrieval_scores(queries, ["a", "b", "c"], index, index_labels)
    assert scores["accuracy_at_1"] == pytest.approx(1 / 3)
    assert scores["recall_at_5"] == 1.0
    # ranks of the first same-label row: 1, 2 and 3 -> MRR (1 + 1/2 + 1/3) / 3
    assert scores["mrr_at_10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


@pytest.fixture(scope="module")
def banking_slice(tmp_path_factory):
    folder = tmp_path_factory.mktemp("banking-slice")
    for split, n in (("train", 240), ("validation", 40), ("test", 40)):
        write_jsonl(folder / f"{split}.jsonl", read_jsonl(DATA / f"{split}.jsonl", n))
    return folder


def test_train_evaluate_publish(tiny_encoder, banking_slice, tmp_path):
    r = recipe(tiny_encoder, banking_slice, tmp_path / "run", task="embedding", registry=str(tmp_path / "reg"),
               eval_steps=8)
    outcome = run(r, publish=True)
    assert outcome["published"] == "tiny@1"
    m = outcome["metrics"]
    for split in ("validation", "test"):
        for key in ("accuracy_at_1", "recall_at_5", "mrr_at_10"):
            assert 0 <= m[f"{split}_base_{key}"] <= 1 and 0 <= m[f"{split}_{key}"] <= 1
        assert m[f"{split}_accuracy_at_1"] <= m[f"{split}_recall_at_5"]
    assert m["test_accuracy_at_1"] != m["test_base_accuracy_at_1"] or m["test_mrr_at_10"] != m["test_base_mrr_at_10"]
    reg = Registry(tmp_path / "reg")
    folder = reg.fetch(*reg.resolve("tiny"))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION"
    base, _ = load_base(tiny_encoder, "classification")
    weights = read_adapter(folder, describe_base(base, str(tiny_encoder), "classification"))
    assert weights.manifest.task == "embedding" and not weights.head
    assert all(p.startswith("bert.encoder.layer.") for p in weights.lora)  # served on the encoder's paths
    report = (folder / "eval" / "report.md").read_text()
    assert "accuracy@1" in report and (folder / "eval" / "retrieval.png").is_file()


def test_confusable_order_fills_batches_from_close_groups():
    """Two clusters of four labels: every full batch draws from one cluster only, per_group rows a label,
    and the order is a permutation of the rows."""
    torch.manual_seed(0)
    axes = torch.eye(16)
    groups, vectors = [], []
    for g in range(8):
        centre = axes[0] if g < 4 else axes[1]
        for _ in range(6):
            groups.append(g)
            vectors.append(centre + 0.05 * axes[2 + g] + 0.01 * torch.randn(16))
    vectors = torch.nn.functional.normalize(torch.stack(vectors), dim=-1)
    order = confusable_order(groups, vectors, batch_size=8, per_group=2, seed=1)
    assert sorted(order) == list(range(len(groups)))
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    for batch in batches[:4]:  # before the clusters run out of rows, batches stay within one
        labels = [groups[i] for i in batch]
        assert len({g < 4 for g in labels}) == 1, labels
        assert max(labels.count(g) for g in labels) <= 2


def test_confusable_batches_train_in_that_order(tiny_encoder, banking_slice, tmp_path):
    r = recipe(tiny_encoder, banking_slice, tmp_path / "run", task="embedding", eval_steps=8, confusable_batches=2,
               max_steps=2)
    assert run(r, publish=False)["metrics"]["test_accuracy_at_1"] >= 0
    with pytest.raises(LoraswapError, match="confusable_batches is for embedding"):
        recipe(tiny_encoder, banking_slice, tmp_path / "x", task="classification", confusable_batches=2)
