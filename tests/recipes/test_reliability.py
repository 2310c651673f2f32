"""Reliability of training runs, through the real CLI and Trainer on tiny models:
- a NaN or infinite loss or gradient stops the run before the optimizer step, keeps the last good
  checkpoint and says what happened (exit code 1);
- checkpoints are published whole (manifest last) and resume skips one that is not;
- a run killed with SIGKILL at a random step and resumed ends bitwise identical to an uninterrupted one
  (causal LM; masked LM with random masking and dropout), as does one stopped by SIGTERM / SIGINT;
- a full disk while saving keeps the earlier checkpoint; gradient accumulation changes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from lmtune.cli import main
from lmtune.tasks import clm

from ..helpers import make_documents, tiny_recipe, write_text_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def docs_file(tmp_path):
    data = tmp_path / "docs.jsonl"
    write_text_records(data, make_documents(200, seed=7))
    return data


def poison(model, kind: str, from_call: int):
    calls = {"n": 0}

    def forward_hook(module, inputs, output):
        if not module.training:
            return output
        calls["n"] += 1
        if calls["n"] < from_call:
            return output
        if kind == "loss":  # NaN hidden states: the fused loss reads them, the model's own loss their logits
            output.last_hidden_state = output.last_hidden_state * float("nan")
        else:  # a finite loss whose backward overflows in one weight
            weight = module.get_input_embeddings().weight
            if not getattr(weight, "_poisoned", False):
                weight.register_hook(lambda grad: grad * float("inf"))
                weight._poisoned = True
        return output

    # On the decoder (GPT-2's `transformer`), whose output both the model's loss and the fused loss use.
    model.transformer.register_forward_hook(forward_hook)


@pytest.mark.parametrize("kind, words", [("loss", "the training loss became nan at step 4"),
                                         ("gradient", "became NaN or infinite at step 4")])
def test_a_non_finite_value_stops_before_the_optimizer_step_and_keeps_the_checkpoint(
        tmp_path, kind, words, capsys, monkeypatch):
    data = docs_file(tmp_path)
    # estimate_steps 0: the poison counts training forwards, and the estimate's timed passes are some
    recipe = tiny_recipe(tmp_path, data, **{"training.save_steps": 2, "training.max_steps": 10,
                                            "loss.type": "cross_entropy", "generation.prompts": [],
                                            "training.estimate_steps": 0})
    build, captured = clm.build_model, {}

    def build_poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        poison(model, kind, from_call=4)
        captured["model"] = model
        return model

    monkeypatch.setattr(clm, "build_model", build_poisoned)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(recipe), "--output", str(run)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmtune: error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
    assert "checkpoint-2" in errors[0] and "learning_rate" in errors[0]
    # nothing non-finite reached the weights: the optimizer never stepped with it
    model = captured["model"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    work = tmp_path / ".run.partial"
    assert not run.exists() and (work / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (work / "checkpoints" / "checkpoint-4").exists()
    assert "training stopped" in (work / "train.log").read_text()


# --------------------------------------------------------------------------------------------------
# Crash-safe checkpoints


def test_a_manifest_vouches_for_every_file_of_a_checkpoint(tmp_path):
    from lmtune.training.checkpoints import checkpoint_problem, write_manifest

    folder = tmp_path / "checkpoint-3"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    (folder / "sub" / "state.json").write_text("{}")
    assert checkpoint_problem(folder) == "it has no manifest (the save did not finish)"
    manifest = write_manifest(folder)
    assert [e["path"] for e in manifest["files"]] == ["model.safetensors", "sub/state.json"]
    assert checkpoint_problem(folder) is None
    (folder / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")  # same size, one byte flipped
    assert checkpoint_problem(folder) == "model.safetensors differs from what was saved"
    (folder / "sub" / "state.json").unlink()
    (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    assert checkpoint_problem(folder) == "sub/state.json is missing"


def test_pruning_keeps_the_newest_and_the_best_and_leaves_incomplete_folders(tmp_path):
    from lmtune.training.checkpoints import prune_checkpoints, write_manifest

    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "f").write_text(str(step))
        write_manifest(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-10").mkdir()  # no manifest: not a checkpoint, not ours to delete
    prune_checkpoints(tmp_path, keep=2, protected=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-8"]


def test_checkpoints_are_published_whole_and_resume_skips_an_unfinished_one(tmp_path, capsys):
    from lmtune.training.checkpoints import MANIFEST, checkpoint_problem

    data = docs_file(tmp_path)
    recipe = tiny_recipe(tmp_path, data, **{"training.save_steps": 2, "training.max_steps": 6,
                                            "training.save_total_limit": 2, "generation.prompts": []})
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--output", str(run)]) == 0
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert all(checkpoint_problem(p) is None for p in checkpoints.iterdir())
    # Weights as safetensors only (no pickled TrainingArguments either); the rest of the training state
    # loads with weights_only=True, as the Trainer loads it on resume.
    files = list((checkpoints / "checkpoint-6").iterdir())
    assert any(f.name == "model.safetensors" for f in files) and not any(f.suffix == ".bin" for f in files)
    torch_files = [f for f in files if f.suffix in (".pt", ".pth")]
    assert {f.name for f in torch_files} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():  # numpy arrays and dtypes allowed -- the RNG state -- and nothing that runs code
        for f in torch_files:
            torch.load(f, weights_only=True)
    # A kill while checkpoint-6 was being written: its files are there, its manifest is not.
    (checkpoints / "checkpoint-6" / MANIFEST).unlink()
    capsys.readouterr()
    assert main(["train", str(recipe), "--output", str(run), "--resume", "--set", "training.max_steps=8"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint-6 is skipped: it has no manifest" in err and "resuming from" in err
    assert "checkpoint-4" in err.split("resuming from")[1].splitlines()[0]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8


# --------------------------------------------------------------------------------------------------
# Exact resume: a run killed with SIGKILL and resumed is the run that would have happened


def _train_subprocess(recipe, run, *extra):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(recipe), "--output", str(run), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _losses(run) -> dict[int, float]:
    """step -> logged training loss; a resumed run re-logs the steps after its checkpoint, the later line wins."""
    losses = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def _weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("task", ["clm", "mlm", "clm-stream"])
def test_a_run_killed_at_a_random_step_and_resumed_ends_bitwise_identical(tmp_path, task):
    """clm-stream: a streamed corpus with a shuffle window of 24 blocks continues from the position its
    checkpoint saved (not by re-reading the stream), in the window's shuffled order."""
    import random as stdlib_random
    import signal
    import time

    import yaml

    from ..helpers import mlm_recipe, topic_documents

    data = tmp_path / "docs.jsonl"
    if task == "clm":
        write_text_records(data, make_documents(200, seed=7))
        recipe = tiny_recipe(tmp_path, data, **{"training.save_steps": 1, "training.max_steps": 16,
                                                "training.logging_steps": 1, "generation.prompts": []})
    elif task == "clm-stream":
        write_text_records(data, make_documents(200, seed=7))
        recipe = tiny_recipe(tmp_path, data, **{
            "training.save_steps": 1, "training.max_steps": 16, "training.logging_steps": 1,
            "generation.prompts": [], "data.train": {"path": str(data), "streaming": True},
            "data.validation": {"path": str(data), "max_documents": 20}, "data.shuffle_buffer": 24})
    else:  # random masking and dropout: the RNG state must come back too
        write_text_records(data, topic_documents(200, seed=5))
        recipe = tmp_path / "mlm.yaml"
        recipe.write_text(yaml.safe_dump(mlm_recipe(data, **{
            "training.save_strategy": "steps", "training.save_steps": 1, "training.max_steps": 16,
            "training.logging_steps": 1, "model.from_scratch.dropout": 0.1, "generation.prompts": []})))
    whole = tmp_path / "whole"
    proc = _train_subprocess(recipe, whole)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    # an arbitrary step, seeded by the task so that a failure reproduces (steps 5, 8, 8 for clm, mlm, clm-stream)
    kill_after = stdlib_random.Random(f"kill-{task}").randint(3, 12)
    run = tmp_path / "killed"
    proc = _train_subprocess(recipe, run)
    checkpoints = tmp_path / ".killed.partial" / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints / f"checkpoint-{kill_after}").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not run.exists(), "the run finished before it could be killed"
    proc = _train_subprocess(recipe, run, "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "resuming from" in err
    resumed_from = int(err.split("resuming from")[1].split("checkpoint-")[1].split()[0])
    assert resumed_from >= kill_after, (kill_after, err)
    if task == "clm-stream":
        assert (tmp_path / "killed" / "checkpoints" / "checkpoint-16" / "stream_position.json").is_file()
        assert "read again from its start" not in err

    assert _losses(run) == _losses(whole) and len(_losses(whole)) == 16
    got, expected = _weights(run), _weights(whole)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), f"killed after step {kill_after}"


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_at_the_next_step_and_resume_finishes_the_same_run(tmp_path, signame):
    import signal
    import time

    data = docs_file(tmp_path)
    recipe = tiny_recipe(tmp_path, data, **{"training.save_steps": 1000, "training.max_steps": 40,
                                            "training.logging_steps": 1, "generation.prompts": []})
    whole = tmp_path / "whole"
    proc = _train_subprocess(recipe, whole)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    run = tmp_path / "stopped"
    proc = _train_subprocess(recipe, run)
    log = tmp_path / ".stopped.partial" / "log.jsonl"
    deadline = time.time() + 600
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=600)
    signum = getattr(signal, signame)
    assert proc.returncode == 128 + signum, err
    message = [line for line in err.splitlines() if line.startswith("lmtune: stopped by")]
    assert len(message) == 1 and signame in message[0] and "--resume" in message[0], err
    step = int(message[0].split("after step ")[1].split(";")[0])
    assert 3 <= step < 40 and f"checkpoint-{step}" in message[0] and not run.exists()

    proc = _train_subprocess(recipe, run, "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert _losses(run) == _losses(whole)
    got, expected = _weights(run), _weights(whole)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------------------------------
# Gradient accumulation


@pytest.mark.parametrize("loss", ["cross_entropy", "keytoken"])
def test_accumulating_eight_batches_of_one_equals_one_batch_of_eight(tmp_path, loss):
    data = docs_file(tmp_path)
    runs = {}
    for batch, accumulation in ((8, 1), (1, 8)):
        name = f"b{batch}x{accumulation}"
        recipe = tiny_recipe(tmp_path, data, name=name, **{
            "training.batch_size": batch, "training.gradient_accumulation_steps": accumulation,
            "training.max_steps": 6, "training.logging_steps": 1, "training.save_strategy": "no",
            "loss.type": loss, "generation.prompts": []})
        assert main(["train", str(recipe), "--output", str(tmp_path / name)]) == 0
        runs[name] = tmp_path / name
    one, many = _losses(runs["b8x1"]), _losses(runs["b1x8"])
    assert one.keys() == many.keys() and len(one) == 6
    assert all(abs(one[k] - many[k]) <= 1e-4 * abs(one[k]) for k in one), (one, many)
    a, b = _weights(runs["b8x1"]), _weights(runs["b1x8"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_a_full_disk_while_saving_keeps_the_earlier_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    import errno

    import transformers.modeling_utils

    from lmtune.training.checkpoints import checkpoint_problem

    data = docs_file(tmp_path)
    recipe = tiny_recipe(tmp_path, data, **{"training.save_steps": 2, "training.max_steps": 6,
                                            "generation.prompts": []})
    save_file, calls = transformers.modeling_utils.safe_save_file, {"n": 0}

    def save_file_until_the_disk_fills(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's weights: half a file, then no space
            open(args[1], "wb").write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file_until_the_disk_fills)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(recipe), "--output", str(run)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmtune: error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "step 4" in errors[0] and "Traceback" not in err
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-2"]  # no half-written one, no staging left
    assert checkpoint_problem(checkpoints / "checkpoint-2") is None and not run.exists()
