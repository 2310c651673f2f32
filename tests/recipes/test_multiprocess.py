"""Training in two processes (`lmtune train --nproc 2`: torch's elastic launcher, gloo on this CPU).

A 2-process run with per-device batch B must train as a 1-process run with batch 2B (same examples per
step, gradients averaged across processes), and its before/after evaluation, split across the processes
and gathered, must equal a 1-process evaluation of the same weights -- every example (every QA window)
counted once, also when the count does not divide by two. Every task family runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmtune.cli import main

from ..helpers import make_documents, save_tiny_gpt2, with_changes, write_jsonl

DOCS = make_documents(301, seed=5)  # odd counts everywhere: the processes' shares differ


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny BERT and GPT-2 folders without dropout (so 1 and 2 processes can agree bitwise-ish), a
    one-output BERT as reward model, and data for every task."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from lmtune.tokenizer import train_bpe_tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("multiprocess")
    wordpiece = train_tokenizer(DOCS, vocab_size=300, min_frequency=1, style="bert", model_max_length=64)
    bert = BertConfig(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(bert).save_pretrained(str(tmp / "bert"))
    wordpiece.save_pretrained(str(tmp / "bert"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**{**bert.to_dict(), "num_labels": 1})).save_pretrained(
        str(tmp / "reward-bert"))
    wordpiece.save_pretrained(str(tmp / "reward-bert"))
    save_tiny_gpt2(tmp / "gpt2", train_bpe_tokenizer(DOCS, vocab_size=300, min_frequency=1, model_max_length=64),
                   n_positions=64)

    write_jsonl(tmp / "text.jsonl", [{"text": d} for d in DOCS])
    write_jsonl(tmp / "labelled.jsonl", [{"text": d, "label": int("model" in d)} for d in DOCS])
    squad = []
    for i, d in enumerate(DOCS[:61]):
        words = d.split()
        answer = words[len(words) // 2]
        squad.append({"id": str(i), "title": f"t{i % 7}", "context": d, "question": f"which word is {i}?",
                      "answers": {"text": [answer], "answer_start": [d.index(answer)]}})
    write_jsonl(tmp / "squad.jsonl", squad)
    write_jsonl(tmp / "qa.jsonl", [{"question": f"what follows {d.split()[0]}?", "answer": " ".join(d.split()[1:6])}
                                   for d in DOCS])
    write_jsonl(tmp / "pairs.jsonl", [{"prompt": f"Q: {d.split()[0]}?\nA:", "chosen": " " + " ".join(d.split()[1:4]),
                                       "rejected": " no idea"} for d in DOCS[:121]])
    return tmp


def recipe(world: Path, task: str, name: str, **changes) -> Path:
    models = {"clm": None, "mlm": "bert", "qa": "bert", "classify": "bert", "sft": "gpt2", "reward": "gpt2",
              "dpo": "gpt2", "rl": "gpt2"}
    data = {"clm": "text", "mlm": "text", "qa": "squad", "classify": "labelled", "sft": "qa", "reward": "pairs",
            "dpo": "pairs", "rl": "pairs"}
    r = {"task": task, "name": name,
         "data": {"train": {"path": str(world / f"{data[task]}.jsonl")}, "validation_fraction": 0.2},
         "training": {"learning_rate": 2e-3, "batch_size": 4, "max_steps": 6, "logging_steps": 2, "save_steps": 3,
                      "precision": "fp32", "seed": 3, "eval_batch_size": 5}}
    if task == "clm":
        r.update(tokenizer={"train": True, "vocab_size": 300, "min_frequency": 1},
                 model={"from_scratch": {"n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0}})
        r["data"]["block_size"] = 16
    else:
        r["model"] = {"name_or_path": str(world / models[task])}
    if task == "mlm":
        r["data"]["block_size"] = 32
    if task == "qa":
        r["qa"] = {"max_length": 48, "stride": 16}
    if task == "sft":
        r["sft"] = {"max_length": 64, "template": "Q: {question}\nA: {answer}"}
    if task in ("reward", "dpo", "rl"):
        r["preference"] = {"prompt_template": "{prompt}", "max_length": 32}
    if task == "rl":
        r["rl"] = {"reward_model": str(world / "reward-bert"), "num_generations": 2, "max_completion_length": 6,
                   "eval_generations": 1}
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(with_changes(r, changes)))
    return path


def train_in_processes(world: Path, recipe_path: Path, run: Path, nproc: int = 2,
                       cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           **({"LMTUNE_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "lmtune", "train", str(recipe_path), "--output", str(run),
                           "--nproc", str(nproc)], capture_output=True, text=True, env=env, timeout=600)


def logged(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def assert_written_once_and_checkpoints_complete(run: Path) -> None:
    from lmtune.training.checkpoints import checkpoint_problem

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    for c in checkpoints:
        assert checkpoint_problem(c) is None
        assert (c / "rng_state_0.pth").is_file() and (c / "rng_state_1.pth").is_file()  # both processes saved
    assert not (run / "checkpoints" / ".staging").exists()
    assert not list(run.parent.glob(f".{run.name}.*"))
    lines = (run / "train.log").read_text().splitlines()
    assert sum("before training" in line for line in lines) == 1  # one process wrote the log


def reevaluate(world: Path, recipe_path: Path, run: Path) -> dict:
    """The saved model evaluated here, in one process, on the recipe's validation data."""
    from lmtune.config import load_recipe
    from lmtune.tasks import task_module

    cfg = load_recipe(recipe_path, [])
    task = task_module(cfg.task)
    prepared = task.prepare(cfg)
    model, _ = task.load_for_inference(run / "model", **({"task": cfg.task} if cfg.task in ("reward", "dpo", "rl")
                                                          else {}))
    if cfg.task == "rl":
        prepared.extra["scorer"].model.eval()
    return task.evaluate_run(model, prepared, cfg)


@pytest.mark.parametrize("task", ["clm", "classify"])
def test_two_processes_train_as_one_with_twice_the_batch(world, task):
    one, two = world / "runs" / f"{task}-one", world / "runs" / f"{task}-two"
    held_out = {"data.validation_fraction": 0.21}  # 63 of 301 documents or examples: odd shares
    assert main(["train", str(recipe(world, task, f"{task}-one", **{"training.batch_size": 8}, **held_out)),
                 "--output", str(one)]) == 0
    cache = world / f"cache-{task}"  # fresh: the main process fills it, the other reads it
    result = train_in_processes(world, recipe(world, task, f"{task}-two", **held_out), two, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    if task == "clm":  # one tokenizer, the train and validation blocks, nothing half-written
        assert [p.suffix for p in (cache / "tokenizers").iterdir()] == [""]
        assert sorted(p.suffix for p in (cache / "blocks").iterdir()) == [".npy", ".npy"]
    assert_written_once_and_checkpoints_complete(two)
    # Same examples per optimizer step; the gradient averaged over processes equals the big batch's.
    np.testing.assert_allclose(logged(two, "loss"), logged(one, "loss"), rtol=1e-4)
    np.testing.assert_allclose(logged(two, "grad_norm"), logged(one, "grad_norm"), rtol=1e-3)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    # The evaluation, split in two odd shares and gathered, counts every example once.
    if task == "clm":
        assert m2["after"]["tokens"] == m1["after"]["tokens"]
        assert m2["after"]["perplexity"] == pytest.approx(m1["after"]["perplexity"], rel=1e-4)
        assert m2["after"]["perplexity"] < m2["before"]["perplexity"]
    else:
        assert m2["after"]["examples"] == m1["after"]["examples"] == 63
        for key in ("accuracy", "f1"):
            assert m2["after"][key] == pytest.approx(m1["after"][key], abs=1e-9)
        assert m2["after"]["confusion_matrix"] == m1["after"]["confusion_matrix"]
    # The run's output says it once (the main process).
    assert result.stdout.count('"run_dir"') == 1
    assert result.stderr.count("before training") == 1


@pytest.mark.parametrize("task", ["mlm", "qa", "sft", "reward", "dpo", "rl"])
def test_every_task_trains_in_two_processes_and_gathers_its_evaluation_once(world, task):
    path = recipe(world, task, f"{task}-two")
    run = world / "runs" / f"{task}-two"
    result = train_in_processes(world, path, run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_written_once_and_checkpoints_complete(run)
    after = json.loads((run / "metrics.json").read_text())["after"]
    again = reevaluate(world, path, run)
    compared = {"mlm": ["loss", "masked_tokens"], "qa": ["exact_match", "f1", "questions", "windows"],
                "sft": ["loss", "response_tokens"], "reward": ["accuracy", "margin", "pairs"],
                "dpo": ["logp_margin", "logp_accuracy", "pairs"], "rl": ["mean_reward", "completions"]}[task]
    for key in compared:
        assert after[key] == pytest.approx(again[key], rel=1e-4, abs=1e-6), (key, after, again)
    if task == "qa":
        from lmtune.config import load_recipe
        from lmtune.tasks import qa

        prepared = qa.prepare(load_recipe(path, []))
        assert after["windows"] == len(prepared.validation.inputs) and after["windows"] % 2 == 1


def test_a_bad_recipe_is_rejected_once_before_any_process_starts(world, capsys):
    path = recipe(world, "clm", "bad", **{"training.learning_rate": -1})
    assert main(["train", str(path), "--output", str(world / "runs" / "bad"), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("lmtune: error:") == 1 and "learning_rate" in err and "starting" not in err


def test_a_data_error_found_in_the_processes_is_said_once_with_exit_code_2(world):
    path = recipe(world, "classify", "bad-data", **{"classify.labels": ["only"]})
    result = train_in_processes(world, path, world / "runs" / "bad-data")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("lmtune: error:") == 1 and "Traceback" not in result.stderr
    assert not (world / "runs" / "bad-data").exists() and not (world / "runs" / ".bad-data.partial").exists()


def test_gradient_accumulation_equals_a_bigger_batch_for_a_head_whose_loss_is_a_batch_mean(world):
    """Transformers 5 takes every model for one that sums its loss over `num_items_in_batch` and then
    leaves the division by accumulation steps out; the classification head returns a mean, so an
    accumulated run used to log (and apply) a loss twice too big here. (The QA head is left out: its
    softmax spans the padded positions, so a batch's padding width changes its loss a little.)"""
    task = "classify"
    runs = {}
    for batch, accumulation in ((8, 1), (4, 2)):
        name = f"{task}-b{batch}x{accumulation}"
        path = recipe(world, task, name, **{"training.batch_size": batch, "training.save_strategy": "no",
                                           "training.gradient_accumulation_steps": accumulation})
        assert main(["train", str(path), "--output", str(world / "runs" / name)]) == 0
        runs[accumulation] = world / "runs" / name
    np.testing.assert_allclose(logged(runs[2], "loss"), logged(runs[1], "loss"), rtol=1e-4)
    np.testing.assert_allclose(logged(runs[2], "grad_norm"), logged(runs[1], "grad_norm"), rtol=1e-3)


def test_sigterm_to_the_launcher_saves_and_resume_continues_bitwise(world):
    """SIGTERM to `lmtune train --nproc 2` (a scheduler's pre-emption): both processes stop after the same
    step, the checkpoint holds each process's RNG state, and --resume ends with the weights of a run
    never stopped (dropout on, so the RNG states matter)."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    changes = {"training.max_steps": 40, "training.save_steps": 1000, "training.logging_steps": 1,
               "model.from_scratch.dropout": 0.1}
    whole, stopped = world / "runs" / "whole", world / "runs" / "stopped"
    assert train_in_processes(world, recipe(world, "clm", "whole", **changes), whole).returncode == 0
    path = recipe(world, "clm", "stopped", **changes)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "lmtune", "train", str(path), "--output", str(stopped), "--nproc", "2"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = stopped.parent / ".stopped.partial" / "log.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 5) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("stopped by SIGTERM after step") == 1, err[-3000:]
    [checkpoint] = (stopped.parent / ".stopped.partial" / "checkpoints").glob("checkpoint-*")
    assert 5 <= int(checkpoint.name.split("-")[1]) < 40
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    result = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (whole, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

