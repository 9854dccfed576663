"""Recipe options: freeze_layers and LoRA settings reach the adapter; `--set` typing; the shipped recipes."""

from __future__ import annotations

import json
import re

import pytest

from adapters.errors import LoraswapError
from tests.training.helpers import (
    REPO,
    adapter_tensors,
    recipe,
    single_thread,  # noqa: F401  (autouse)
)
from training.recipe import RECIPES_DIR, Recipe, load_recipe, parse_set
from training.train import train

_LAYER = re.compile(r"\.layer\.(\d+)\.")


def test_freeze_layers_and_lora_settings_reach_the_adapter(tiny_encoder, sst2_slice, tmp_path):
    r = recipe(tiny_encoder, sst2_slice, tmp_path / "run", freeze_layers=1, lora_r=2, lora_alpha=6,
               lora_dropout=0.0, lora_targets=["query", "value"], max_steps=2, eval_steps=2)
    folder = train(r).adapter_dir
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 6 and config["lora_dropout"] == 0.0
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["layers_to_transform"] == [1] and config["task_type"] == "SEQ_CLS"

    tensors = adapter_tensors(folder)
    lora = {k: t for k, t in tensors.items() if "lora_" in k}
    layers = {int(_LAYER.search(k).group(1)) for k in lora}
    assert layers == {1}, f"LoRA weights outside layer 1: {sorted(lora)}"
    modules = {k.split(".layer.1.")[1].rsplit(".lora_", 1)[0] for k in lora}
    assert modules == {"attention.self.query", "attention.self.value"}
    assert len(lora) == 4 and all(t.shape in ((2, 32), (32, 2)) for t in lora.values())
    # The head (classifier + pooler) travels in full through modules_to_save.
    assert any(k.startswith("base_model.model.classifier.") for k in tensors)
    assert any("pooler.dense" in k for k in tensors)


def test_freeze_layers_must_leave_a_layer(tiny_encoder, sst2_slice, tmp_path):
    with pytest.raises(LoraswapError, match="freeze_layers=2 leaves none of the 2 layers"):
        train(recipe(tiny_encoder, sst2_slice, tmp_path / "run", freeze_layers=2))


def test_set_values_are_typed():
    raw = parse_set(["lora_r=3", "learning_rate=1e-3", "lora_targets=[query, value]", "resume=true",
                     "max-train-rows=10", "system_prompt=", "lora_alpha=2.5e1", "extra={team: nlp}"])
    assert raw["lora_r"] == "3" and raw["max_train_rows"] == "10"  # strings until load_recipe types them
    r = load_recipe(None, {"name": "t", "data": "d", **raw})
    assert r.lora_r == 3 and type(r.lora_r) is int
    assert r.learning_rate == 1e-3 and type(r.learning_rate) is float  # YAML 1.1 reads 1e-3 as a string
    assert r.lora_alpha == 25.0 and type(r.lora_alpha) is float
    assert r.lora_targets == ["query", "value"]
    assert r.resume is True and r.max_train_rows == 10 and r.system_prompt is None
    assert r.extra == {"team": "nlp"}
    commas = load_recipe(None, {"name": "t", "data": "d", **parse_set(["lora_targets=query, key"])})
    assert commas.lora_targets == ["query", "key"]
    assert parse_set(["system_prompt=a=b"]) == {"system_prompt": "a=b"}  # only the first '=' splits


@pytest.mark.parametrize(("items", "message"), [
    (["no_such_key=1"], "unknown recipe key 'no_such_key'"),
    (["learning_rate=fast"], "recipe key learning_rate: expected a number"),
])
def test_bad_set_values_are_refused(items, message):
    with pytest.raises(LoraswapError, match=re.escape(message)):
        load_recipe(None, {"name": "t", "data": "d", **parse_set(items)})


@pytest.mark.parametrize("item", ["lora_r", "=3", ""])
def test_set_needs_key_equals_value(item):
    with pytest.raises(LoraswapError, match="--set expects key=value"):
        parse_set([item])


def test_shipped_recipe_by_name_with_overrides():
    r = load_recipe("sentiment")
    assert (r.name, r.task, r.data) == ("sentiment", "classification", "../shared/data/sst2")
    assert r.learning_rate == 1e-3 and r.eval_steps == 350 and r.max_length == 64 and r.freeze_layers == 2
    assert r.run_dir.as_posix() == "runs/sentiment" and r.best_metric == "accuracy"
    over = load_recipe("sentiment", {"lora_r": "4", "epochs": None})  # None: "flag not given"
    assert over.lora_r == 4 and over.epochs == r.epochs


def test_every_shipped_recipe_loads_and_points_at_data():
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        r = load_recipe(path)
        assert r.name == path.stem, path
        assert isinstance(r, Recipe) and r.validate() is r
        assert load_recipe(path.stem).to_dict() == r.to_dict()  # by name == by path
        data = REPO / r.data  # recipes are run from the repository root
        assert any(data.glob("train.*")), f"{path.name}: no training file under {data}"


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\ndata: d\nno_such: 1\n", "unknown recipe key 'no_such'"),
    ("- a\n- b\n", "a recipe is a YAML mapping"),
    ("name: [unclosed\n", "invalid YAML"),
    ("name: x\ndata: d\ntask: regression\n", "unknown task 'regression'"),
    ("name: x\ndata: d\ntask: generation\nmethod: bitfit\n", "BitFit is only supported for classification"),
    ("data: d\n", "a recipe needs a name"),
    ("name: x\ndata: d\nlabel_smoothing: 1.0\n", "label_smoothing must be in [0, 1)"),
    ("name: x\ndata: d\ntask: generation\nlabel_smoothing: 0.1\n", "label_smoothing is only supported"),
])
def test_bad_recipe_files_are_refused(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(LoraswapError, match=re.escape(message)):
        load_recipe(path)


def test_unknown_recipe_name():
    with pytest.raises(LoraswapError, match="recipe no-such-recipe not found"):
        load_recipe("no-such-recipe")


def test_label_smoothing_reaches_the_trainer(tmp_path):
    from training.train import training_arguments

    recipe = Recipe(name="x", data="d", label_smoothing=0.1).validate()
    assert training_arguments(recipe, tmp_path).label_smoothing_factor == 0.1
    assert training_arguments(Recipe(name="x", data="d"), tmp_path).label_smoothing_factor == 0.0
