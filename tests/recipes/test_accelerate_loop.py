"""examples/accelerate_loop.py, the hand-written Accelerate loop, against `lmtune train` (the Trainer).

One tiny causal-LM recipe (fp32, dropout 0, keytoken loss, gradient accumulation 2, weight decay,
warmup, 40 steps over 120 training blocks, so two epoch boundaries) is trained three times, for real:
`lmtune train` in this process, the loop in one process (batch 4), and the loop in two processes
launched by `accelerate launch` (batch 2 each, gloo on the CPU). The validation set has 7 blocks and
the evaluation batch is 2, so two processes get an uneven share (one block is repeated to fill the
last batch and must be dropped when gathering).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from lmtune.cli import main

from ..helpers import REPO, make_documents, tiny_recipe, write_text_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOOP = REPO / "examples" / "accelerate_loop.py"
STEPS, LOG_EVERY, VALIDATION_BLOCKS, BLOCK = 40, 5, 7, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_loop(recipe, output, *extra, processes: int = 1) -> list[dict]:
    """The example as a user runs it; its JSON lines from stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = [str(LOOP), str(recipe), "--output", str(output), *extra]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", str(free_port()), *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=output.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def final_eval(records) -> dict:
    (final,) = [r for r in records if r.get("final")]
    return final


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    data = tmp / "docs.jsonl"
    write_text_records(data, make_documents(400, seed=7))
    recipe = tiny_recipe(tmp, data, name="loop", **{
        "data.max_train_blocks": 120, "data.max_validation_blocks": VALIDATION_BLOCKS,
        "model.from_scratch.dropout": 0.0,
        "training.batch_size": 4, "training.gradient_accumulation_steps": 2, "training.max_steps": STEPS,
        "training.logging_steps": LOG_EVERY, "training.weight_decay": 0.01, "training.eval_batch_size": 2,
        "training.eval_strategy": "steps", "training.eval_steps": 20, "training.save_strategy": "no",
        "generation.prompts": [],
    })
    run = tmp / "trainer"
    assert main(["train", str(recipe), "--output", str(run)]) == 0  # also fills the cache the loops read
    one = run_loop(recipe, tmp / "loop1")
    two = run_loop(recipe, tmp / "loop2", "--set", "training.batch_size=2", processes=2)
    return tmp, recipe, run, one, two


def validation_blocks(recipe):
    from lmtune.config import load_recipe
    from lmtune.tasks import clm

    return clm.prepare(load_recipe(recipe)).validation


def evaluate_saved(folder, blocks) -> dict:
    from transformers import AutoModelForCausalLM

    from lmtune.tasks import clm

    return clm.evaluate(AutoModelForCausalLM.from_pretrained(str(folder)), blocks)


def test_one_process_loop_reproduces_lmtune_train(runs):
    """Same data order (the Trainer's seeded sampler, reseeded each epoch), same optimizer groups,
    schedule, clipping and accumulation: in fp32 on one thread the same operations run in the same
    order, so the logged losses agree to float rounding (observed: identical). rel 1e-5 leaves room
    for summation-order noise; a different batch order, a missed epoch reseed or a wrong
    accumulation scale moves them by 1e-2 or more."""
    tmp, recipe, run, one, _ = runs
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    trainer = losses(logged)
    mine = losses(one)
    assert sorted(trainer) == sorted(mine) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for step in trainer:
        assert mine[step] == pytest.approx(trainer[step], rel=1e-5), step
    rates = {r["step"]: r["learning_rate"] for r in logged if "learning_rate" in r}
    assert {r["step"]: r["lr"] for r in one if "lr" in r} == pytest.approx(rates, rel=1e-12)
    assert mine[STEPS] < mine[LOG_EVERY]  # it learned
    # The periodic evaluation ran, and the final one equals lmtune's after-training perplexity.
    assert [r["step"] for r in one if "perplexity" in r] == [20, STEPS]
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert final_eval(one)["perplexity"] == pytest.approx(after["perplexity"], rel=1e-6)


def test_one_process_loop_saves_a_model_transformers_loads(runs):
    import torch
    from safetensors.torch import load_file

    tmp, recipe, run, one, _ = runs
    folder = tmp / "loop1"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    blocks = validation_blocks(recipe)
    reloaded = evaluate_saved(folder, blocks)
    assert reloaded["perplexity"] == pytest.approx(final_eval(one)["perplexity"], rel=1e-6)
    assert reloaded["tokens"] == final_eval(one)["tokens"] == VALIDATION_BLOCKS * (BLOCK - 1)
    # and the weights are the Trainer's
    ours, theirs = load_file(str(folder / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    # Summation-order noise passes through Adam's normalisation, so it grows with the steps: CI's CPU
    # saw 1.04e-5 after 40 steps where this machine sees less. A different batch order or a missed
    # update moves weights by about lr x steps (1e-2), three orders of magnitude above this bound.
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) < 1e-4
    assert not all(torch.equal(ours[k], torch.zeros_like(ours[k])) for k in ours)


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(runs):
    """Process i gets batches i, i+2, ... of the same seeded order, so a step sees exactly the blocks
    one process with twice the batch sees; gradients are averaged by DDP instead of summed in one
    backward, so only float summation order differs (observed: rel ~2e-7 after 40 steps). The learning
    rates are equal exactly: a scheduler stepped once per process would be off by a factor of 2."""
    tmp, recipe, run, one, two = runs
    single, double = losses(one), losses(two)
    assert sorted(double) == sorted(single)
    for step in single:
        assert double[step] == pytest.approx(single[step], rel=1e-4), step
    assert [r["lr"] for r in two if "lr" in r] == [r["lr"] for r in one if "lr" in r]
    assert final_eval(two)["perplexity"] == pytest.approx(final_eval(one)["perplexity"], rel=1e-4)
    # only the main process wrote the model
    assert sorted(p.name for p in (tmp / "loop2").iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]


def test_evaluation_gathered_over_two_processes_counts_each_block_once(runs):
    """7 blocks, batch 2, 2 processes: the last batch pair holds 1 real block and 1 repeated to fill it.
    The gathered evaluation must count 7 blocks, and equal one process evaluating the same weights."""
    tmp, recipe, run, _, two = runs
    blocks = validation_blocks(recipe)
    assert len(blocks) == VALIDATION_BLOCKS and len(blocks) % 2 == 1
    gathered = final_eval(two)
    assert gathered["tokens"] == VALIDATION_BLOCKS * (BLOCK - 1)  # with the repeat it would be 8 blocks
    alone = evaluate_saved(tmp / "loop2", blocks)
    assert gathered["eval_loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert gathered["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
