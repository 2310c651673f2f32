"""Before training: how big the model is, how much memory and how long the run will take.

The estimate comes from a few timed forward/backward passes on the first real training batches,
through the trainer's own collator and loss (so the keytoken loss, DPO's four forwards or a reward
model's pairs are what is timed). The passes leave no trace: gradients are dropped and every random
number generator is put back, so the run that follows is the run that would have happened. A
callback then checks the pace on the first real steps and says how long is left.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from lmtune.progress import format_seconds

log = logging.getLogger("lmtune")

ADAM_STATE_BYTES = 8  # AdamW keeps two fp32 moments per trainable parameter


def total_steps(args, train_dataset) -> int | None:
    """Optimizer steps the Trainer will take (None: a stream without max_steps, which is refused)."""
    if args.max_steps > 0:
        return args.max_steps
    if not hasattr(train_dataset, "__len__"):
        return None
    batches = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * max(args.world_size, 1)))
    return max(1, math.ceil(args.num_train_epochs * max(1, batches // args.gradient_accumulation_steps)))


def _rng_states() -> tuple:
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _restore(states: tuple) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def first_batches(trainer, n: int) -> list:
    """The first n training batches as the trainer's collator makes them (in dataset order)."""
    loader = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size,
                                         collate_fn=trainer.data_collator)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def timed_passes(trainer, n: int) -> tuple[float | None, float | None]:
    """Seconds per forward/backward pass (the first, which warms allocators up, not counted) and the
    peak memory in MiB while they ran (RSS on a CPU, allocated memory on a GPU); (None, None) when the
    trainer cannot take a pass outside its loop (RL trainers generate inside their step)."""
    from lmtune.run import peak_rss_mb, reset_peak_rss

    model = trainer.model
    states = _rng_states()
    was_training = model.training
    cuda = torch.cuda.is_available()
    times = []
    try:
        batches = first_batches(trainer, n + 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        model.train()
        for batch in batches:
            start = time.perf_counter()
            inputs = trainer._prepare_inputs(batch)
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    except Exception as exc:  # an estimate must never stop a run
        log.info("estimate: no timed pass outside the training loop for this trainer (%s)", type(exc).__name__)
        return None, None
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        _restore(states)
    per_pass = float(np.mean(times[1:] if len(times) > 1 else times))
    return per_pass, peak


def estimate_before_training(trainer, params: dict, passes: int) -> dict:
    args = trainer.args
    steps = total_steps(args, trainer.train_dataset)
    estimate: dict = {"parameters": params, "total_steps": steps, "timed_passes": passes}
    if passes > 0:
        per_pass, peak = timed_passes(trainer, passes)
        if per_pass is not None:
            optimizer_mb = params["trainable"] * ADAM_STATE_BYTES / 2**20
            step_s = per_pass * args.gradient_accumulation_steps
            estimate.update(step_time_s=round(step_s, 4), estimated_peak_memory_mb=round(peak + optimizer_mb, 1),
                            estimated_train_s=round(step_s * steps, 3) if steps else None,
                            memory_basis="peak of the timed passes plus AdamW's two moments per trainable "
                                         "parameter" + (" (a GPU's allocated memory)" if torch.cuda.is_available()
                                                        else " (process RSS)"))
    log.info(describe(estimate))
    return estimate


def describe(estimate: dict) -> str:
    p = estimate["parameters"]
    parts = [f"estimate: {p['total']:,} parameters, {p['trainable']:,} trainable"]
    if "estimated_peak_memory_mb" in estimate:
        parts.append(f"about {estimate['estimated_peak_memory_mb']:,.0f} MiB peak memory")
    if estimate.get("estimated_train_s") is not None:
        parts.append(f"{estimate['step_time_s']:.3g} s per step x {estimate['total_steps']:,} steps = about "
                     f"{format_seconds(estimate['estimated_train_s'])} of training")
    elif estimate.get("total_steps"):
        parts.append(f"{estimate['total_steps']:,} steps (the pace is measured on the first ones)")
    return "; ".join(parts)


class PaceCallback(TrainerCallback):
    """After the first `after` steps (the first one not counted: it warms up), logs the measured time
    per step and what is left, and records it beside the estimate."""

    def __init__(self, path: Path, estimate: dict, after: int = 5):
        self.path, self.estimate, self.after = path, estimate, after
        self.start_step = None
        self.start_time = None
        self.done = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.done or not state.is_world_process_zero:
            return
        if self.start_step is None:
            self.start_step, self.start_time = state.global_step, time.perf_counter()
            return
        taken = state.global_step - self.start_step
        if taken < self.after and state.global_step < state.max_steps:
            return
        self.done = True
        per_step = (time.perf_counter() - self.start_time) / max(taken, 1)
        left = per_step * max(state.max_steps - state.global_step, 0)
        self.estimate.update(measured_step_time_s=round(per_step, 4), measured_after_steps=state.global_step)
        from lmtune.run import write_json

        write_json(self.path, self.estimate)
        log.info("pace: %.3g s per step over steps %d-%d; about %s left", per_step, self.start_step + 1,
                 state.global_step, format_seconds(left))
