"""What a user sees around a run: the estimate before training (and that taking it changes nothing),
status.json, and `lmtune runs` listing finished, failed, interrupted and running runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.runs import list_runs, render_runs_table
from lmtune.tasks import clm

from ..helpers import make_documents, tiny_recipe, write_text_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs-data") / "docs.jsonl"
    write_text_records(path, make_documents(200, seed=7))
    return path


def test_the_estimate_is_written_before_training_and_leaves_the_run_unchanged(tmp_path, data, capsys):
    """Dropout on: the timed passes draw random numbers, which must be put back."""
    changes = {"training.max_steps": 12, "training.save_strategy": "no", "model.from_scratch.dropout": 0.1,
               "generation.prompts": []}
    runs = {}
    for passes in (0, 3):
        recipe = tiny_recipe(tmp_path, data, name=f"e{passes}", **changes, **{"training.estimate_steps": passes})
        capsys.readouterr()
        assert main(["train", str(recipe), "--output", str(tmp_path / f"e{passes}")]) == 0
        runs[passes] = (tmp_path / f"e{passes}", capsys.readouterr().err)
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run, _ in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    run, err = runs[3]
    estimate = json.loads((run / "estimate.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert estimate["parameters"]["total"] == metrics["parameters"]["total"] > 0
    assert estimate["total_steps"] == 12 and estimate["step_time_s"] > 0
    assert estimate["estimated_train_s"] == pytest.approx(estimate["step_time_s"] * 12, rel=0.01)
    # The estimate (timed passes' peak + AdamW state) is of the same order as the measured peak.
    measured = metrics["memory"]["train_peak_rss_mb"]
    assert 0.5 * measured < estimate["estimated_peak_memory_mb"] < 2 * measured
    assert estimate["measured_step_time_s"] > 0  # the pace of the first real steps, recorded after them
    lines = [line for line in err.splitlines() if line.startswith("lmtune: estimate:")]
    assert len(lines) == 1 and "MiB peak memory" in lines[0] and "12 steps" in lines[0]
    [untimed] = [line for line in runs[0][1].splitlines() if line.startswith("lmtune: estimate:")]
    assert "MiB" not in untimed and "12 steps" in untimed  # estimate_steps 0: parameters and steps only


def test_runs_lists_finished_failed_interrupted_and_running_runs(tmp_path, data, monkeypatch, capsys):
    root = tmp_path / "runs"
    quick = {"training.max_steps": 6, "training.save_steps": 2, "generation.prompts": []}
    # finished
    assert main(["train", str(tiny_recipe(tmp_path, data, name="good", **quick)), "--output", str(root / "good")]) == 0
    # failed: the loss turns NaN at the third step
    build = clm.build_model

    def build_poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += module.training
            if calls["n"] >= 3 and module.training:
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        # on the decoder, whose hidden states both the model's loss and lmtune's fused loss read
        model.transformer.register_forward_hook(hook)
        return model

    monkeypatch.setattr(clm, "build_model", build_poisoned)
    recipe = tiny_recipe(tmp_path, data, name="bad", **quick, **{"training.estimate_steps": 0})
    assert main(["train", str(recipe), "--output", str(root / "bad")]) == 1
    monkeypatch.undo()
    # interrupted: SIGTERM to a real training process (it saves, says so and exits 143)
    recipe = tiny_recipe(tmp_path, data, name="stopped", **{"training.max_steps": 5000, "training.save_steps": 5000,
                                                              "training.logging_steps": 1, "generation.prompts": []})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(recipe), "--output", str(root / "stopped")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = root / ".stopped.partial" / "log.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    # killed outright (no handler ran): status.json still says running, with a process id that is gone
    killed = root / ".killed.partial"
    killed.mkdir()
    (killed / "config.yaml").write_text((root / ".stopped.partial" / "config.yaml").read_text())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (killed / "status.json").write_text(json.dumps({"state": "running", "pid": int(gone.stdout), "host": None}))
    # running: the same, with a live process (this one)
    running = root / ".live.partial"
    running.mkdir()
    (running / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))

    rows = {r["name"]: r for r in list_runs(root)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "good": "done", "bad": "failed", "stopped": "interrupted", "killed": "interrupted", "live": "running"}
    good = rows["good"]
    assert good["task"] == "clm" and good["steps"] == 6 and good["metric"] == "perplexity"
    assert good["before"] > good["after"] > 0 and good["wall_s"] > 0
    assert "NonFiniteError" in rows["bad"]["error"] and rows["bad"]["steps"] == 2
    assert rows["stopped"]["steps"] >= 3 and "from scratch" in rows["stopped"]["model"]

    capsys.readouterr()
    assert main(["runs", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["name", "task", "model", "status"] and len(table) == 2 + 5
    good_line = next(line for line in table if line.startswith("good "))
    assert "done" in good_line and "perplexity" in good_line and "->" in good_line
    assert main(["runs", str(root), "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == set(rows)
    assert render_runs_table([]) == "no runs found"
    assert main(["runs", str(tmp_path / "nowhere")]) == 2


def test_tensorboard_gets_the_training_curves_when_installed(tmp_path, data, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tmp_path, data, name="tb", **{"training.max_steps": 6, "training.logging_steps": 2,
                                                       "training.save_strategy": "no", "generation.prompts": []})
    assert main(["train", str(recipe), "--output", str(tmp_path / "tb")]) == 0  # report_to: auto
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    logged = [json.loads(line)["loss"] for line in (tmp_path / "tb" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses == pytest.approx(logged) and len(losses) == 3

    from lmtune.training import engine

    monkeypatch.setattr(engine, "tensorboard_installed", lambda: False)
    capsys.readouterr()
    recipe = tiny_recipe(tmp_path, data, name="tb2", **{"training.report_to": "tensorboard"})
    assert main(["train", str(recipe), "--output", str(tmp_path / "tb2")]) == 2
    assert "pip install 'lmtune[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / ".tb2.partial").exists()
    recipe = tiny_recipe(tmp_path, data, name="tb3", **{"training.max_steps": 2, "training.save_strategy": "no",
                                                        "generation.prompts": []})
    assert main(["train", str(recipe), "--output", str(tmp_path / "tb3")]) == 0  # auto: none without it
    assert not (tmp_path / "tb3" / "tensorboard").exists()
