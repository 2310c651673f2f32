"""A tiny causal-LM recipe, run for real through the CLI: train from scratch, then fine-tune.

Real tokenizer training, real Trainer, real files; asserts that something was learned and that the
saved folder works in plain `transformers.pipeline`."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import yaml

from lmtune.cli import main

from ..helpers import assert_report, make_documents, tiny_recipe, write_text_records


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "docs.jsonl"
    write_text_records(data, make_documents(300, seed=7))
    recipe = tiny_recipe(tmp, data)
    run = tmp / "runs" / "tiny"
    assert main(["train", str(recipe), "--output", str(run)]) == 0
    return tmp, recipe, run, data


def test_perplexity_falls_and_run_dir_is_complete(trained):
    tmp, recipe, run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["before"]["perplexity"], metrics["after"]["perplexity"]
    assert before > 100  # an untrained model is near-uniform over the 400-token vocabulary
    assert after < before / 5, (before, after)
    for name in ("config.yaml", "metrics.json", "log.jsonl", "train.log", "model/model.safetensors",
                 "model/config.json", "model/tokenizer.json"):
        assert (run / name).is_file(), name
    assert not (run.parent / ".tiny.partial").exists()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 60 and resolved["training"]["weight_decay"] == 0.0
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert metrics["steps"] == 60 and metrics["parameters"]["total"] > 0
    assert [s["prompt"] for s in metrics["samples"]] == ["the model", "import numpy"]
    page = assert_report(run, ["perplexity", "loss"], "the model", "import numpy",
                         metrics["samples"][0]["completions"][0])
    assert 'alt="throughput in tokens/s by step"' in page  # the Trainer counts the input tokens


def test_plain_pipeline_loads_the_saved_model(trained):
    from transformers import pipeline

    _, _, run, _ = trained
    generator = pipeline("text-generation", model=str(run / "model"))
    out = generator("the model", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("the model")


def test_predict_and_eval_commands(trained, capsys):
    _, _, run, data = trained
    capsys.readouterr()
    assert main(["predict", str(run), "the model", "import pandas", "--max-new-tokens", "6"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["the model", "import pandas"]
    assert all(len(x["completions"]) == 1 and x["completions"][0] for x in lines)
    assert main(["predict", str(run), "the", "--temperature", "0.8", "--num-return-sequences", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completions"]) == 3
    assert main(["eval", str(run), "--data", str(data), "--block-size", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert result["perplexity"] < metrics["before"]["perplexity"] / 5


def test_existing_run_dir_is_refused_and_left_untouched(trained, capsys):
    _, recipe, run, _ = trained
    digest = tree_digest(run)
    assert main(["train", str(recipe), "--output", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    # --overwrite with input that fails: the old run survives byte for byte.
    assert main(["train", str(recipe), "--output", str(run), "--overwrite",
                 "--set", "data.train.path=/nonexistent/docs.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert tree_digest(run) == digest


def test_second_run_uses_the_cache_and_overwrite_replaces(trained, capsys):
    tmp, recipe, run, _ = trained
    capsys.readouterr()
    assert main(["train", str(recipe), "--output", str(run), "--overwrite", "--set", "training.max_steps=2"]) == 0
    err = capsys.readouterr().err
    assert "reusing the one trained earlier" in err and "cached, not tokenized again" in err
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2


def test_finetune_pretrained_model_on_new_domain(trained, tmp_path):
    tmp, _, run, _ = trained
    rng = random.Random(3)
    domain = ["alpha beta gamma delta " * rng.randint(2, 6) + "epsilon" for _ in range(200)]
    data = tmp_path / "domain.txt"
    data.write_text("\n".join(domain))
    recipe = {
        "task": "clm",
        "name": "ft",
        "model": {"name_or_path": str(run / "model")},
        "data": {"train": {"path": str(data), "txt_unit": "line"}, "block_size": 32},
        "training": {"learning_rate": 2e-3, "batch_size": 8, "max_steps": 30, "precision": "fp32",
                     "save_strategy": "no"},
    }
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--output", str(tmp_path / "ft")]) == 0
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"] / 3


def test_block_size_beyond_pretrained_context_is_an_input_error(trained, tmp_path, capsys):
    tmp, _, run, data = trained
    recipe = {"task": "clm", "name": "big", "model": {"name_or_path": str(run / "model")},
              "data": {"train": {"path": str(data)}, "block_size": 64}}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--output", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert "larger than the model's context of 32 positions" in err and "Traceback" not in err
    assert not (tmp_path / "big").exists() and not (tmp_path / ".big.partial").exists()


def test_resume_continues_from_the_newest_checkpoint(trained, tmp_path, capsys):
    tmp, recipe, _, _ = trained
    run = tmp_path / "resumable"
    assert main(["train", str(recipe), "--output", str(run), "--set", "training.max_steps=20",
                 "--set", "training.save_steps=10"]) == 0
    first = run / "checkpoints" / "checkpoint-20"
    assert first.is_dir()
    capsys.readouterr()
    assert main(["train", str(recipe), "--output", str(run), "--resume", "--set", "training.max_steps=30",
                 "--set", "training.save_steps=10"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-20" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 30
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == 30


def test_streaming_training_reads_the_corpus_on_the_fly(trained, tmp_path):
    tmp, _, run, data = trained
    recipe = {
        "task": "clm",
        "name": "stream",
        "model": {"tokenizer": str(run / "model"), "from_scratch": {"n_layer": 1, "n_head": 2, "n_embd": 32}},
        "data": {"train": {"path": str(data), "streaming": True}, "validation": {"path": str(data),
                 "max_documents": 30}, "block_size": 32},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 25, "precision": "fp32",
                     "save_strategy": "no"},
    }
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--output", str(tmp_path / "stream")]) == 0
    metrics = json.loads((tmp_path / "stream" / "metrics.json").read_text())
    assert metrics["steps"] == 25 and metrics["data"]["streaming"] is True
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"] / 3


def test_the_logged_training_loss_is_the_mean_over_predicted_tokens(trained, tmp_path):
    """With a learning rate too small to move the weights, one epoch's logged training loss is the mean
    next-token cross-entropy over the training blocks: T - 1 predictions per block of T, not T (the
    Trainer's own count for a model without a named loss type)."""
    from transformers import AutoModelForCausalLM

    from lmtune.config import load_recipe
    from lmtune.tasks import clm

    tmp, _, run, data = trained
    recipe = tiny_recipe(tmp_path, data, name="still", **{
        "model": {"name_or_path": str(run / "model")}, "tokenizer": {"train": False}, "loss.type": "cross_entropy",
        "data.max_train_blocks": 64, "training.batch_size": 8, "training.max_steps": 8, "training.logging_steps": 8,
        "training.learning_rate": 1e-30, "training.warmup_steps": 0, "training.save_strategy": "no",
        "generation.prompts": []})
    assert main(["train", str(recipe), "--output", str(tmp_path / "still")]) == 0
    logged = [json.loads(line) for line in (tmp_path / "still" / "log.jsonl").read_text().splitlines()]
    [loss] = [r["loss"] for r in logged if "loss" in r]
    prepared = clm.prepare(load_recipe(recipe, []))
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    expected = clm.evaluate(model, prepared.train.blocks, 16)["loss"]
    assert loss == pytest.approx(expected, rel=1e-4), (loss, expected)
