"""Benchmark: lmtune's causal-LM path against the tutorials' way, measured in the same run.

The reference every lmtune performance figure is divided by. Two sides train the same model on the
same data for the same number of steps, each run in a fresh child process, alternated
(baseline, lmtune, baseline, lmtune, ... for every precision in every repeat):

- **baseline**: the Hugging Face tutorials' causal-LM recipe, written plainly with no lmtune import:
  ``datasets.Dataset.from_dict({"text": texts})``, ``.map(tokenize, batched=True,
  remove_columns=["text"])``, ``.map(group_texts, batched=True)`` where ``group_texts`` concatenates
  each batch's lists with ``itertools.chain``, cuts ``block_size`` pieces, drops the batch's remainder
  and copies ``input_ids`` to ``labels``; a ``GPT2Config`` of the recipe's sizes and
  ``AutoModelForCausalLM.from_config`` after ``set_seed``; a default ``TrainingArguments`` with only the
  settings needed to match (output dir, batch size, learning rate, weight decay, scheduler, warm-up,
  steps, seed, logging every step, no saving, no reporting, ``use_cpu`` without CUDA, ``bf16`` for the
  bf16 variant); ``Trainer`` with ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``.
- **lmtune**: lmtune's own path, as ``benchmarks/train_clm.py`` drives it (the recipe validated by
  lmtune, ``task.prepare``, ``task.build_model``, ``training_arguments``), with the trainer ``lmtune
  train`` builds (``reliable(LmtuneTrainer)`` with ``NonFiniteGradientGuard`` and ``StopOnSignal``),
  cross-entropy instead of the recipe's keytoken loss (a like-for-like loss), ``training.precision``
  set to the variant, logging every step, no checkpoints.

What is identical: the training documents (the recipe's corpus, ``recipes/codeparrot-local.yaml`` by
default: lmtune loads and splits it once in a setup process, which writes the training texts for the
baseline), the tokenizer (lmtune trains it once; the baseline loads the saved copy), the model
(GPT-2 of the recipe's ``from_scratch`` sizes and dropout, same seed: both children report a hash of
the initial weights and the parent checks they are equal), block size, batch size, learning rate,
weight decay, schedule and warm-up, steps, seed, torch threads. What differs is the method: the
baseline groups the concatenated documents (the tutorials' ``group_texts``), lmtune packs as the
recipe says (``overflow`` for the demo: each file cut on its own, only full blocks).

Per child: data preparation seconds (baseline: ``from_dict`` + both ``map`` calls; lmtune: its
``prepare_blocks`` call on the training texts, uncached: each lmtune child gets a fresh cache holding
only the tokenizer and the validation blocks), training tokens/s between the end of step ``--warmup``
and the end of step ``--steps`` (a ``TrainerCallback``, as ``train_clm.py``), peak RSS (``wait4`` in
the parent, which imports neither torch nor lmtune, so the figure is the child's own), the logged
training loss at every step (so losses are compared after the same number of tokens: both sides
train ``batch_size x block_size`` tokens a step), and the validation loss of the final model on the
same held-out blocks (lmtune's validation split, at most ``data.max_validation_blocks`` blocks),
computed by one function in fp32 on both sides (the bf16 models without the Trainer's autocast
wrapper). The baseline's logged training loss is 127/128 of the mean at block 128: its ``Trainer``
divides by every label position, as transformers does for a GPT-2 built from a config (no loss type),
where lmtune divides by the predicted tokens; the validation loss has no such difference.

Figures are medians of ``--repeats`` (default 3). The summary gives lmtune / baseline per precision:
tokens/s, preparation time, peak RSS, the relative difference of the final losses, and the goals:
speed >= 2x the fp32 baseline (lmtune fp32) and >= 1.5x the bf16 baseline (lmtune bf16), validation
loss within +-2 %, peak memory no higher than the baseline's.

bf16 on a CPU without native bf16 (no AVX512-BF16 / AMX, as ``torch.cpu`` reports) is emulated
and can be tens of times slower than fp32 on both sides (lmtune's ``precision: auto`` picks fp32
there); ``--bf16-steps`` / ``--bf16-warmup`` / ``--bf16-repeats`` give that variant fewer steps and
runs so that it fits in the run.

On a small shared machine each child also records how much CPU *other* processes used during its
timed steps; a child disturbed by more than ``--max-interference`` of the machine is run again once
the machine is quiet (``--retries`` times at most).

Output: one JSON line per figure, ``{"bench": "baseline_clm", "figure": ..., "value": ..., "unit":
..., "side": ..., "precision": ...}``, then one summary line. Progress goes to stderr.

    python benchmarks/baseline_clm.py --quick       # 15 steps (5 warm-up; bf16 4), 1 repeat, 60 documents
    python benchmarks/baseline_clm.py               # 60 steps (10 warm-up), fp32 and bf16, 3 repeats
    python benchmarks/baseline_clm.py --precisions fp32 --repeats 5
    python benchmarks/baseline_clm.py --bf16-steps 6 --bf16-warmup 2 --bf16-repeats 1   # no native bf16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import (add_quiet_options, busy_seconds, make_clock, own_cpu_seconds, status_kib,  # benchmarks/_machine.py
                      wait_until_quiet)

os.environ["HF_HUB_OFFLINE"] = "1"  # never the Hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the same for both sides, and no fork warning

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "codeparrot-local.yaml"
SIDES = ("baseline", "lmtune")
PRECISIONS = ("fp32", "bf16")
SPEED_GOALS = {"fp32": 2.0, "bf16": 1.5}  # lmtune tokens/s over the baseline's, same precision
LOSS_TOLERANCE = 0.02
EVAL_BATCH = 16


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"bench": "baseline_clm", "figure": figure, "value": value, "unit": unit, **extra}),
          flush=True)


def note(msg: str) -> None:
    print(f"[baseline_clm] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The recipe as lmtune reads it (one place, for the setup and the lmtune children)


def lmtune_recipe(raw: dict, spec: dict, precision: str | None) -> dict:
    """The recipe with the benchmark's changes, through train_clm.py's own adjustment."""
    from train_clm import bench_recipe  # benchmarks/train_clm.py

    ns = argparse.Namespace(steps=spec["steps"], data=None, max_documents=spec["max_documents"])
    raw = bench_recipe(raw, ns)
    raw["training"]["logging_steps"] = 1  # a loss per step, on both sides
    raw.setdefault("loss", {})["type"] = "cross_entropy"  # the model's own loss, as the baseline's
    if precision is not None:
        raw["training"]["precision"] = precision
    return raw


# --------------------------------------------------------------------------------------------------
# Shared by both children: the clock, the weights' hash, the validation loss, the figures


def native_bf16() -> bool:
    """Whether torch sees bf16 instructions on this CPU (AVX512-BF16 or AMX), or a CUDA GPU with bf16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def validation_loss(model, blocks) -> float:
    """Token-weighted mean next-token cross-entropy over the blocks: fp32, eval mode, fixed order."""
    import numpy as np
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(blocks), EVAL_BATCH):
            ids = torch.as_tensor(np.asarray(blocks[s : s + EVAL_BATCH], dtype=np.int64))
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    model.train()
    return total / count


class Phase:
    """Wall and own CPU seconds of a block, and the share of the CPUs other processes used meanwhile."""

    def __enter__(self):
        self.t0, self.c0, self.b0 = time.perf_counter(), own_cpu_seconds(), busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = own_cpu_seconds() - self.c0
        others = max(0.0, busy_seconds() - self.b0 - self.cpu)
        self.interference = others / (self.wall * os.cpu_count()) if self.wall > 0.25 else 0.0


def train_and_measure(trainer, model, clock, spec: dict, val_blocks) -> dict:
    """trainer.train() and what both sides report about it."""
    import torch

    steps, warmup = spec["steps"], spec["warmup"]
    rss_before = status_kib("VmRSS")
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    seconds = clock.marks[steps] - clock.marks[warmup]
    timed = steps - warmup
    own = clock.cpu[steps][1] - clock.cpu[warmup][1]
    others = max(0.0, clock.cpu[steps][0] - clock.cpu[warmup][0] - own)
    step_times = [clock.marks[s] - clock.marks[s - 1] for s in range(warmup + 1, steps + 1)]
    losses = {int(h["step"]): float(h["loss"]) for h in trainer.state.log_history if "loss" in h}
    # With bf16 the Trainer's accelerator wraps forward in autocast; the validation loss is taken in fp32
    # on both sides, so the wrapper comes off first.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    t = time.perf_counter()
    val = validation_loss(model, val_blocks)
    validation_s = time.perf_counter() - t
    from train_clm import matmul_flops_per_token, matmul_peak_gflops  # benchmarks/train_clm.py

    tokens_per_s = timed * spec["batch_size"] * spec["block_size"] / seconds
    return {
        "tokens_per_s": tokens_per_s,
        "model_gflops_per_s": tokens_per_s * matmul_flops_per_token(model.config, spec["block_size"]) / 1e9,
        "matmul_peak_gflops_per_s": matmul_peak_gflops(spec["precision"]),
        "step_s_median": statistics.median(step_times),
        "cpu_s_per_step": own / timed,
        "interference": others / (seconds * os.cpu_count()),
        "train_wall_s": wall,
        "rss_before_train_mb": rss_before / 1024,
        "losses": [losses.get(s) for s in range(1, steps + 1)],
        "validation_loss": val,
        "validation_s": validation_s,
        "threads": torch.get_num_threads(),
    }


def finish(result: dict, spec: dict) -> None:
    result["vm_hwm_mb"] = status_kib("VmHWM") / 1024  # the child's own view of its peak, beside wait4's
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The baseline child: the tutorials' way, no lmtune


def baseline_child(spec: dict) -> None:
    from itertools import chain

    import numpy as np
    import pyarrow.compute as pc
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, GPT2Config,
                              Trainer, TrainingArguments, set_seed)

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    texts = json.loads((work / "train_texts.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    block_size = spec["block_size"]

    def tokenize(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated["input_ids"])
        total_length = (total_length // block_size) * block_size  # the batch's remainder is dropped
        result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with Phase() as prep:
        raw_dataset = Dataset.from_dict({"text": texts})
        tokenized = raw_dataset.map(tokenize, batched=True, remove_columns=["text"])
        lm_dataset = tokenized.map(group_texts, batched=True)
    rss_after_prep = status_kib("VmRSS")

    m = spec["model"]
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=m["n_positions"], n_embd=m["n_embd"],
                        n_layer=m["n_layer"], n_head=m["n_head"], resid_pdrop=m["dropout"],
                        embd_pdrop=m["dropout"], attn_pdrop=m["dropout"], bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    set_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config)
    digest = weights_digest(model)

    clock = make_clock(spec["warmup"], spec["steps"])
    with tempfile.TemporaryDirectory(prefix="baseline-clm-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=spec["batch_size"],
            learning_rate=spec["learning_rate"],
            weight_decay=spec["weight_decay"],
            lr_scheduler_type=spec["lr_scheduler"],
            warmup_steps=spec["warmup_steps"],
            max_steps=spec["steps"],
            seed=spec["seed"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            bf16=spec["precision"] == "bf16",
        )
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset, processing_class=tokenizer,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[clock])
        val_blocks = np.load(work / "val_blocks.npy")
        result = train_and_measure(trainer, model, clock, spec, val_blocks)
    result.update(
        prep_s=prep.wall, prep_cpu_s=prep.cpu, prep_interference=prep.interference,
        rss_after_prep_mb=rss_after_prep / 1024, train_blocks=len(lm_dataset),
        train_tokens=int(pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py()), init_digest=digest,
        attn_implementation=model.config._attn_implementation, documents=len(texts),
    )
    finish(result, spec)


# --------------------------------------------------------------------------------------------------
# The lmtune child: lmtune's own path (as benchmarks/train_clm.py drives it)


def lmtune_child(spec: dict) -> None:
    import numpy as np
    import torch
    from transformers.trainer_callback import PrinterCallback

    import lmtune.tasks.clm as clm
    from lmtune.config import validate_recipe
    from lmtune.tasks import task_module
    from lmtune.training.engine import (LmtuneTrainer, NonFiniteGradientGuard, StopOnSignal, reliable,
                                        resolve_precision, training_arguments)

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = validate_recipe(lmtune_recipe(spec["raw"], spec, spec["precision"]), origin="benchmark recipe")
    task = task_module(cfg.task)
    precision = resolve_precision(cfg.training.precision)

    calls = []  # each prepare_blocks call of task.prepare, timed: the first is the training split
    real_prepare_blocks = clm.prepare_blocks

    def timed_prepare_blocks(texts, *a, **kw):
        with Phase() as ph:
            out = real_prepare_blocks(texts, *a, **kw)
        calls.append({"documents": len(texts), "phase": ph, "info": out[1]})
        return out

    clm.prepare_blocks = timed_prepare_blocks
    try:
        with Phase() as whole:
            prepared = task.prepare(cfg)
    finally:
        clm.prepare_blocks = real_prepare_blocks
    rss_after_prep = status_kib("VmRSS")
    train_call = calls[0]
    if train_call["info"].get("cached"):
        raise SystemExit("lmtune child: the training blocks came from the cache; the preparation was not timed")

    model = task.build_model(cfg, prepared.tokenizer)
    digest = weights_digest(model)
    clock = make_clock(spec["warmup"], spec["steps"])
    val_blocks = np.load(Path(spec["work"]) / "val_blocks.npy")
    with tempfile.TemporaryDirectory(prefix="lmtune-clm-") as out:
        args = training_arguments(cfg.training, Path(out), precision, has_eval=False)
        # As lmtune.run._train_in builds it: the NaN-stopping trainer and the per-step guards (the run dir's
        # log, progress lines, pace estimate and TensorBoard are left out: they only report).
        trainer = reliable(LmtuneTrainer)(
            model=model, args=args, train_dataset=prepared.train, data_collator=prepared.collator,
            processing_class=prepared.tokenizer, callbacks=[NonFiniteGradientGuard(), StopOnSignal(), clock],
            **prepared.trainer_kwargs)
        trainer.remove_callback(PrinterCallback)  # as train_clm.py (a line per logged step otherwise)
        result = train_and_measure(trainer, model, clock, spec, val_blocks)
    ph = train_call["phase"]
    result.update(
        prep_s=ph.wall, prep_cpu_s=ph.cpu, prep_interference=ph.interference,
        prepare_total_s=whole.wall,  # task.prepare: corpus read and split, tokenizer from the cache, both splits
        rss_after_prep_mb=rss_after_prep / 1024, train_blocks=int(train_call["info"]["blocks"]),
        train_tokens=int(train_call["info"]["tokens"]), init_digest=digest,
        attn_implementation=model.config._attn_implementation, documents=train_call["documents"],
        resolved_precision=precision,
        same_validation_blocks=bool(np.array_equal(np.asarray(prepared.validation), val_blocks)),
    )
    finish(result, spec)


# --------------------------------------------------------------------------------------------------
# The setup child: corpus, tokenizer and validation blocks once, through lmtune


def setup_child(spec: dict) -> None:
    import numpy as np

    from lmtune.config import validate_recipe
    from lmtune.tasks import task_module
    from lmtune.tasks.clm import blocks_for, get_clm_tokenizer
    from lmtune.tasks.common import load_splits
    from lmtune.training.engine import resolve_precision

    cfg = validate_recipe(lmtune_recipe(spec["raw"], spec, None), origin=f"recipe '{spec['recipe']}'")
    if cfg.task != "clm" or cfg.model.from_scratch is None or cfg.data.train.streaming:
        raise SystemExit(f"{spec['recipe']}: needs task clm, model.from_scratch and an in-memory corpus")
    if cfg.model.from_scratch.architecture != "gpt2":
        raise SystemExit(f"{spec['recipe']}: the baseline builds a GPT-2; model.from_scratch.architecture must be gpt2")
    work = Path(spec["work"])
    t = time.perf_counter()
    train, val = load_splits(cfg)  # lmtune's corpus loading and split, only to obtain the texts
    load_s = time.perf_counter() - t
    tokenizer = get_clm_tokenizer(cfg, train)  # trained once here, cached in LMTUNE_CACHE for the lmtune children
    val_blocks = blocks_for(val, tokenizer, cfg, "data.validation")
    if cfg.data.max_validation_blocks is not None:
        val_blocks = val_blocks[: cfg.data.max_validation_blocks]
    np.save(work / "val_blocks.npy", np.asarray(val_blocks))
    (work / "train_texts.json").write_text(json.dumps(train.texts), encoding="utf-8")
    tokenizer.save_pretrained(str(work / "tokenizer"))
    model = task_module(cfg.task).build_model(cfg, tokenizer)
    fs, tr = cfg.model.from_scratch, cfg.training
    result = {
        "documents": len(train.texts),
        "train_bytes": sum(len(x.encode("utf-8", "surrogatepass")) for x in train.texts),
        "validation_documents": len(val.texts),
        "validation_blocks": int(len(val_blocks)),
        "corpus_load_s": load_s,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "init_digest": weights_digest(model),
        "init_validation_loss": validation_loss(model, val_blocks),
        "packing": cfg.data.packing,
        "auto_precision": resolve_precision("auto"),
        "native_bf16": native_bf16(),
        "model": {"n_layer": fs.n_layer, "n_head": fs.n_head, "n_embd": fs.n_embd, "dropout": fs.dropout,
                  "n_positions": fs.n_positions or cfg.data.block_size},
        "training": {"block_size": cfg.data.block_size, "batch_size": tr.batch_size,
                     "learning_rate": tr.learning_rate, "weight_decay": tr.weight_decay,
                     "lr_scheduler": tr.lr_scheduler, "warmup_steps": tr.warmup_steps, "seed": tr.seed,
                     "max_grad_norm": tr.max_grad_norm, "gradient_accumulation_steps": tr.gradient_accumulation_steps},
    }
    if tr.gradient_accumulation_steps != 1 or tr.max_grad_norm != 1.0:
        raise SystemExit("the baseline keeps TrainingArguments' defaults: gradient_accumulation_steps 1 and "
                         "max_grad_norm 1.0; the recipe differs")
    finish(result, spec)


# --------------------------------------------------------------------------------------------------
# The parent: no torch, no lmtune (so wait4's peak is each child's own)


def run_child(kind: str, spec: dict, work: Path, env: dict, label: str) -> dict:
    result_path = work / f"result-{label}.json"
    log_path = work / f"log-{label}.txt"
    spec = {**spec, "result": str(result_path), "kind": kind}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=log, stderr=log,
                                env=env, cwd=str(REPO))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result_path.is_file():
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise SystemExit(f"{label} failed (exit {code}); its log is above")
    result = json.loads(result_path.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["child_wall_s"] = time.perf_counter() - start
    return result


def loss_points(losses: list, window: int) -> dict[int, float]:
    """Mean logged training loss over each `window` steps, keyed by the last step."""
    out = {}
    for end in range(window, len(losses) + 1, window):
        chunk = [x for x in losses[end - window : end] if x is not None]
        if chunk:
            out[end] = statistics.fmean(chunk)
    return out


def rel(a: float, b: float) -> float:
    return (a - b) / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Figures: see benchmarks/README.md")
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="a causal-LM recipe with a GPT-2 from_scratch")
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps per run (default 60)")
    ap.add_argument("--warmup", type=int, default=10, help="first steps not timed (default 10)")
    ap.add_argument("--bf16-steps", type=int, help="steps of the bf16 runs (default: --steps)")
    ap.add_argument("--bf16-warmup", type=int, help="untimed steps of the bf16 runs (default: --warmup)")
    ap.add_argument("--bf16-repeats", type=int, help="repeats of the bf16 pair (default: --repeats)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated, of fp32, bf16 (default both)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh runs per side and precision; medians (default 3)")
    ap.add_argument("--max-documents", type=int, help="data.train.max_documents: the first N documents only")
    add_quiet_options(ap, "child")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 15 steps (5 warm-up; bf16: 4, 2), 1 repeat, the first 60 documents")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        {"setup": setup_child, "baseline": baseline_child, "lmtune": lmtune_child}[spec["kind"]](spec)
        return
    if args.quick:
        args.steps, args.warmup, args.repeats = min(args.steps, 15), min(args.warmup, 5), 1
        args.max_documents = args.max_documents or 60
    plan = {"fp32": (args.steps, args.warmup),  # precision: (steps, untimed steps)
            "bf16": (args.bf16_steps or args.steps, args.warmup if args.bf16_warmup is None else args.bf16_warmup)}
    if args.quick and args.bf16_steps is None:
        plan["bf16"] = (4, 2)  # bf16 may be emulated (slow): a smoke test of the path only
    for p, (steps, warmup) in plan.items():
        if not 0 < warmup < steps:
            ap.error(f"{p}: the warm-up steps must be at least 1 and below the steps")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        ap.error(f"--precisions: choose from {', '.join(PRECISIONS)}")

    import yaml

    started = time.perf_counter()
    raw = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    common = {"raw": raw, "recipe": os.path.relpath(args.recipe, REPO), "steps": args.steps, "warmup": args.warmup,
              "max_documents": args.max_documents, "threads": args.threads}
    if "bf16" in precisions and not native_bf16():
        note("this CPU has no native bf16 (torch.cpu: no AVX512-BF16, no AMX): bf16 is emulated on both sides, "
             "and slow; see --bf16-steps")
    with tempfile.TemporaryDirectory(prefix="baseline-clm-bench-") as tmp:
        work = Path(tmp)
        setup_cache = work / "cache"
        env = {**os.environ, "LMTUNE_CACHE": str(setup_cache)}
        note("setup: the corpus, the tokenizer and the validation blocks through lmtune (once, untimed)")
        setup = run_child("setup", {**common, "work": tmp}, work, env, "setup")
        tr, model = setup["training"], setup["model"]
        emit("setup", setup["documents"], "documents", recipe=common["recipe"], train_mb=round(setup["train_bytes"] / 1e6, 1),
             validation_blocks=setup["validation_blocks"], vocab_size=setup["vocab_size"],
             parameters=setup["parameters"], model=model, **tr, steps=args.steps, warmup=args.warmup,
             lmtune_packing=setup["packing"], baseline_grouping="group_texts (itertools.chain, per map batch)",
             auto_precision=setup["auto_precision"], corpus_load_s=round(setup["corpus_load_s"], 1),
             init_validation_loss=round(setup["init_validation_loss"], 4), native_bf16=setup["native_bf16"],
             steps_per_precision={p: plan[p] for p in precisions})
        child_spec = {**common, "work": tmp, "model": model, **tr}

        results: dict[tuple[str, str], list[dict]] = {(s, p): [] for p in precisions for s in SIDES}
        repeats = {"fp32": args.repeats, "bf16": args.bf16_repeats or args.repeats}
        for r in range(max(repeats[p] for p in precisions)):
            for precision in [p for p in precisions if r < repeats[p]]:
                for side in SIDES:  # baseline, lmtune, baseline, lmtune, ...
                    label = f"{side}-{precision}-{r}"
                    steps, warmup = plan[precision]
                    for attempt in range(args.retries + 1):
                        child_env = env
                        if side == "lmtune":  # a fresh cache: the tokenizer and validation blocks, no training blocks
                            cache = work / f"cache-{label}-{attempt}"
                            shutil.copytree(setup_cache, cache)
                            child_env = {**env, "LMTUNE_CACHE": str(cache)}
                        note(f"{label}: {steps} steps ({warmup} warm-up) in a fresh process")
                        res = run_child(side, {**child_spec, "precision": precision, "steps": steps, "warmup": warmup},
                                        work, child_env, label)
                        if side == "lmtune":
                            shutil.rmtree(cache, ignore_errors=True)
                        res["discarded"] = attempt
                        note(f"{label}: prep {res['prep_s']:.1f} s, {res['tokens_per_s']:,.0f} tokens/s, peak RSS "
                             f"{res['peak_rss_mb']:,.0f} MiB, validation loss {res['validation_loss']:.4f}, other "
                             f"processes took {res['interference']:.0%} of the CPUs")
                        if max(res["interference"], res["prep_interference"]) <= args.max_interference:
                            break
                        if attempt < args.retries:
                            note(f"{label}: disturbed by other processes; waiting for quiet, then again")
                            wait_until_quiet(args.max_wait)
                    if res["init_digest"] != setup["init_digest"]:
                        raise SystemExit(f"{label}: the initial weights differ from lmtune's "
                                         f"({res['init_digest']} != {setup['init_digest']}); the model is not the same")
                    results[(side, precision)].append(res)

    # ---- figures -------------------------------------------------------------------------------------
    med: dict[tuple[str, str], dict] = {}
    for (side, precision), runs in results.items():
        steps = plan[precision][0]
        window = 10 if steps >= 30 else max(1, steps // 3)
        last = min(10, steps)
        tag = {"side": side, "precision": precision, "steps": steps}
        m = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
            "prep_s": statistics.median(x["prep_s"] for x in runs),
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in runs),
            "validation_loss": statistics.median(x["validation_loss"] for x in runs),
            "train_loss_last": statistics.median(
                statistics.fmean(v for v in x["losses"][-last:] if v is not None) for x in runs),
        }
        peaks = [x["matmul_peak_gflops_per_s"] for x in runs]
        m["mfu"] = None if None in peaks else round(statistics.median(
            x["model_gflops_per_s"] / x["matmul_peak_gflops_per_s"] for x in runs), 3)
        med[(side, precision)] = m
        emit("model_flops_utilisation", m["mfu"], "fraction of the matmul peak", **tag,
             model_gflops_per_s=[round(x["model_gflops_per_s"], 1) for x in runs],
             matmul_peak_gflops_per_s=[round(x, 1) if x else "none: bf16 is emulated here" for x in peaks])
        emit("tokens_per_s", round(m["tokens_per_s"]), "tokens/s", **tag,
             runs=[round(x["tokens_per_s"]) for x in runs],
             step_s_median=round(statistics.median(x["step_s_median"] for x in runs), 4),
             cpu_s_per_step=round(statistics.median(x["cpu_s_per_step"] for x in runs), 4),
             threads=runs[-1]["threads"], interference=[round(x["interference"], 3) for x in runs],
             discarded=sum(x["discarded"] for x in runs))
        extra = {"prepare_total_s": [round(x["prepare_total_s"], 2) for x in runs]} if side == "lmtune" else {}
        emit("prep_s", round(m["prep_s"], 3), "s", **tag, runs=[round(x["prep_s"], 3) for x in runs],
             cpu_s=[round(x["prep_cpu_s"], 2) for x in runs], interference=[round(x["prep_interference"], 3) for x in runs],
             train_tokens=runs[-1]["train_tokens"], train_blocks=runs[-1]["train_blocks"],
             documents=runs[-1]["documents"], **extra)
        emit("peak_rss_mb", round(m["peak_rss_mb"]), "MiB", **tag, runs=[round(x["peak_rss_mb"]) for x in runs],
             vm_hwm_mb=[round(x["vm_hwm_mb"]) for x in runs],
             rss_after_prep_mb=[round(x["rss_after_prep_mb"]) for x in runs],
             rss_before_train_mb=[round(x["rss_before_train_mb"]) for x in runs])
        emit("validation_loss", round(m["validation_loss"], 4), "nats", **tag,
             runs=[round(x["validation_loss"], 4) for x in runs], blocks=setup["validation_blocks"],
             init=round(setup["init_validation_loss"], 4))
        points = [loss_points(x["losses"], window) for x in runs]
        emit("train_loss_at_tokens", {str(step * tr["batch_size"] * tr["block_size"]):
                                      round(statistics.median(p[step] for p in points), 4) for step in points[0]},
             "nats", **tag, window_steps=window, last_steps_mean=round(m["train_loss_last"], 4), last_steps=last,
             attn_implementation=runs[-1]["attn_implementation"])

    # ---- summary: lmtune / baseline ------------------------------------------------------------------
    summary = {"bench": "baseline_clm", "figure": "summary", "steps": {p: plan[p][0] for p in precisions},
               "warmup": {p: plan[p][1] for p in precisions}, "native_bf16": setup["native_bf16"],
               "repeats": {p: repeats[p] for p in precisions}, "documents": setup["documents"], "quick": args.quick}
    goals = {}
    for p in precisions:
        b, l = med[("baseline", p)], med[("lmtune", p)]
        speed = l["tokens_per_s"] / b["tokens_per_s"]
        summary[f"speed_ratio_{p}"] = round(speed, 3)
        summary[f"speed_ratio_{p}_runs"] = [round(x["tokens_per_s"] / y["tokens_per_s"], 3)
                                            for x, y in zip(results[("lmtune", p)], results[("baseline", p)])]
        summary[f"mfu_{p}"] = {"baseline": b["mfu"], "lmtune": l["mfu"]}
        summary[f"prep_time_ratio_{p}"] = round(l["prep_s"] / b["prep_s"], 4)
        summary[f"peak_rss_ratio_{p}"] = round(l["peak_rss_mb"] / b["peak_rss_mb"], 3)
        summary[f"validation_loss_rel_diff_{p}"] = round(rel(l["validation_loss"], b["validation_loss"]), 4)
        summary[f"train_loss_rel_diff_{p}"] = round(rel(l["train_loss_last"], b["train_loss_last"]), 4)
        goals[f"speed_{p}_ge_{SPEED_GOALS[p]:g}x"] = speed >= SPEED_GOALS[p]
        goals[f"loss_{p}_within_2pct"] = abs(summary[f"validation_loss_rel_diff_{p}"]) <= LOSS_TOLERANCE
        goals[f"memory_{p}_le_baseline"] = l["peak_rss_mb"] <= b["peak_rss_mb"]
    prep_b = statistics.median(x["prep_s"] for p in precisions for x in results[("baseline", p)])
    prep_l = statistics.median(x["prep_s"] for p in precisions for x in results[("lmtune", p)])
    summary["prep_time_ratio"] = round(prep_l / prep_b, 4)  # all children of a side together
    summary["prep_speedup"] = round(prep_b / prep_l, 1)
    if "fp32" in precisions and "bf16" in precisions:
        summary["lmtune_bf16_over_baseline_fp32"] = round(
            med[("lmtune", "bf16")]["tokens_per_s"] / med[("baseline", "fp32")]["tokens_per_s"], 3)
    summary["goals_met"] = goals
    summary["worst_interference"] = round(max(max(x["interference"], x["prep_interference"])
                                              for v in results.values() for x in v), 3)
    summary["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
