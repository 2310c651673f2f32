"""Every shipped recipe validates offline; those that need the Hub stop with one sentence offline."""

from __future__ import annotations


import pytest

from lmtune.config import is_chain, load_chain, load_recipe, read_recipe_yaml

from ..helpers import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
HUB_RECIPES = ["clm-eli5-distilgpt2.yaml", "clm-wikitext2-distilgpt2.yaml", "codeparrot-ds.yaml",
               "mlm-imdb-distilbert.yaml", "mlm-wikitext2-distilroberta.yaml", "qa-squad-bert.yaml",
               "classify-imdb-lora-distilbert.yaml", "sft-gsm8k-distilgpt2.yaml"]


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"codeparrot-local.yaml", "clm-finetune-stdlib-local.yaml", "mlm-bert-scratch-local.yaml",
            "mlm-imdb-minilm-local.yaml", "qa-squad-minilm-local.yaml", "classify-imdb-minilm-full-local.yaml",
            "classify-imdb-minilm-head-local.yaml", "classify-imdb-minilm-lora-local.yaml", "sft-gsm8k-local.yaml",
            "instructgpt-hh-local.yaml", "dpo-hh-local.yaml", *HUB_RECIPES} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    if is_chain(read_recipe_yaml(path)):  # every step validates; step names are their run dirs' names
        steps = load_chain(path)
        assert [s.config.name for s in steps] == [s.name for s in steps]
        assert all(s.run_dir.parent.name == path.stem for s in steps)
        return
    cfg = load_recipe(path)
    assert cfg.name == path.stem  # the run dir is named after the recipe file


def test_tutorial_hyperparameters_are_the_tutorials():
    eli5 = load_recipe(REPO / "recipes" / "clm-eli5-distilgpt2.yaml")
    assert (eli5.data.train.split, eli5.data.train.text_field, eli5.data.block_size) == (
        "train[:5000]", "answers.text", 128)
    assert (eli5.training.learning_rate, eli5.training.weight_decay, eli5.training.eval_strategy) == (
        2e-5, 0.01, "epoch")
    cp = load_recipe(REPO / "recipes" / "codeparrot-ds.yaml")
    t = cp.training
    assert (cp.data.block_size, t.batch_size, t.gradient_accumulation_steps, t.lr_scheduler, t.warmup_steps,
            t.learning_rate, t.weight_decay) == (128, 32, 8, "cosine", 1000, 5e-4, 0.1)
    assert cp.data.packing == "overflow"
    imdb = load_recipe(REPO / "recipes" / "mlm-imdb-distilbert.yaml")
    assert (imdb.task, imdb.data.block_size, imdb.data.max_train_blocks, imdb.data.max_validation_blocks) == (
        "mlm", 128, 10000, 1000)
    assert (imdb.training.learning_rate, imdb.training.weight_decay, imdb.mlm.mlm_probability) == (2e-5, 0.01, 0.15)
    lora = load_recipe(REPO / "recipes" / "classify-imdb-lora-distilbert.yaml")
    t = lora.training
    assert (lora.lora.r, lora.lora.alpha, lora.lora.dropout, lora.lora.target_modules) == (4, 32, 0.01, ["q_lin"])
    assert (t.mode, t.learning_rate, t.batch_size, t.num_epochs, t.eval_strategy, t.save_strategy,
            t.load_best_model_at_end) == ("lora", 1e-3, 4, 10, "epoch", "epoch", True)
    assert (lora.classify.truncation_side, lora.data.train.path) == ("left", "shawhin/imdb-truncated")
    squad = load_recipe(REPO / "recipes" / "qa-squad-bert.yaml")
    assert (squad.task, squad.qa.max_length, squad.qa.stride, squad.qa.n_best, squad.qa.max_answer_length) == (
        "qa", 384, 128, 20, 30)
    assert (squad.training.learning_rate, squad.training.num_epochs, squad.training.weight_decay) == (2e-5, 3, 0.01)


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_hub_recipe_offline_gives_one_sentence(name, tmp_path, capsys, monkeypatch):
    from lmtune.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", str(REPO / "recipes" / name), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lmtune: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "cannot be reached" in lines[0] and "local" in lines[0]
    assert not (tmp_path / "run").exists()
