"""Benchmark: training throughput and peak memory of the demo's model, through lmtune's own path.

The recipe (default ``recipes/codeparrot-local.yaml``: GPT-2 from scratch, 4 layers, 4 heads, width
256, vocabulary 8192, block 128, batch 16, overflow packing, keytoken loss) is loaded and validated
by lmtune, with only these changes: ``training.max_steps`` = ``--steps``, no checkpoints, no
periodic evaluation, and per variant (``VARIANTS``) ``training.precision`` (``fp32`` / ``bf16``),
``loss.type`` (``keytoken`` / ``cross_entropy``), ``training.fused_loss``, ``torch.compile`` and GPT-2's
activation (``gelu_pytorch_tanh``, lmtune's, or ``gelu_new``): the "plain" variants undo the training
step's optimisations, alone or together, so each one's gain is measured. Model FLOPs utilisation is
the model's matrix-product FLOPs per second over a [2048 x 2048] matrix product's speed measured in
the same process (``matmul_flops_per_token``, ``matmul_peak_gflops``). Then, as ``lmtune train`` does (``lmtune.run._train_in``): the
task's ``prepare`` (sources, tokenizer, ``prepare_blocks``) and ``build_model``,
``lmtune.training.engine.training_arguments`` and ``LmtuneTrainer`` with the prepared dataset,
collator, tokenizer and keytoken arguments, and ``trainer.train()``. A ``TrainerCallback`` starts
the clock after ``--warmup`` steps, so start-up and the first slow steps are not counted.

Data: by default the recipe's own corpus (``python-code``) and tokenizer (trained once, in the
parent, untimed; the children find it and the packed blocks in a temporary ``LMTUNE_CACHE``), or
``--data`` files instead; ``--synthetic`` trains on uniformly random token ids instead (no corpus,
no tokenizer: the speed of a step does not depend on the ids).

Every variant runs in a fresh subprocess, so its peak RSS is its own and nothing (allocator, thread
pools) carries over. ``peak_rss_mb`` is the whole process's peak (``VmHWM``: what ``lmtune train``
needs up to the end of training with the blocks already cached: corpus, tokenizer, blocks, model,
optimiser); ``train_added_mb`` is what training itself adds on top of what the process held when
``trainer.train()`` started.

For a small shared machine: the child also measures how much CPU *other* processes used during the
timed steps; a variant disturbed by more than ``--max-interference`` of the machine is run again
once the machine is quiet (``--retries`` times at most).

Output: one JSON line per figure, ``{"bench": "train_clm", "figure": ..., "variant": ..., "value":
..., "unit": ...}``, then a summary line. Progress goes to stderr.

    python benchmarks/train_clm.py --quick          # 15 steps (5 warm-up), fp32 and fp32-plain, 60 documents
    python benchmarks/train_clm.py --repeats 3      # 60 steps (10 warm-up), the default variants
    python benchmarks/train_clm.py --synthetic --variants bf16,bf16-plain
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import add_quiet_options, make_clock, status_kib, wait_until_quiet  # benchmarks/_machine.py

os.environ["HF_HUB_OFFLINE"] = "1"  # never the Hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "codeparrot-local.yaml"
# name: what differs from lmtune's default path (one-kernel GELU, fused linear cross-entropy, the
# recipe's keytoken loss, no torch.compile). The "plain" ones undo the step's optimisations one by one,
# so each shows its own gain.
DEFAULT_PATH = {"precision": "fp32", "keytoken": True, "activation": "gelu_pytorch_tanh", "fused_loss": True,
                "compile": False}
# torch.compile (TrainingArguments.torch_compile) is measured but not offered by lmtune: on this model
# and a 2-core CPU it gave no gain (benchmarks/README.md).
VARIANTS = {
    "fp32": {},
    "fp32-plain": {"activation": "gelu_new", "fused_loss": False},  # the path before the optimisations
    "fp32-gelu_new": {"activation": "gelu_new"},
    "fp32-logits_loss": {"fused_loss": False},
    "fp32-compile": {"compile": True},
    "fp32-cross_entropy": {"keytoken": False},
    "bf16": {"precision": "bf16"},
    "bf16-plain": {"precision": "bf16", "activation": "gelu_new", "fused_loss": False},
}
DEFAULT_VARIANTS = "fp32,fp32-plain,fp32-gelu_new,fp32-logits_loss,fp32-compile"


def variant_settings(name: str) -> dict:
    return {**DEFAULT_PATH, **VARIANTS[name]}


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"bench": "train_clm", "figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def note(msg: str) -> None:
    print(f"[train_clm] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Measuring on a shared machine






# --------------------------------------------------------------------------------------------------
# The recipe, adjusted for a benchmark


def bench_recipe(raw: dict, args, variant: str | None = None) -> dict:
    """The recipe as a plain dict with the benchmark's changes (validated later by lmtune)."""
    raw = copy.deepcopy(raw)
    training = raw.setdefault("training", {})
    training.update(max_steps=args.steps, save_strategy="no", eval_strategy="no", logging_steps=args.steps)
    if args.data:
        raw["data"]["train"] = {"path": list(args.data), "text_field": args.text_field, "txt_unit": args.txt_unit}
    if args.max_documents:
        raw["data"]["train"]["max_documents"] = args.max_documents
    if variant is not None:
        settings = variant_settings(variant)
        training.update(precision=settings["precision"], fused_loss=settings["fused_loss"])
        raw.setdefault("loss", {})["type"] = "keytoken" if settings["keytoken"] else "cross_entropy"
    return raw


def use_activation(model, name: str) -> None:
    """GPT-2's MLPs with activation `name` (lmtune builds them with gelu_pytorch_tanh)."""
    from transformers.activations import ACT2FN

    model.config.activation_function = name
    for module in model.modules():
        if type(module).__name__ == "GPT2MLP":
            module.act = ACT2FN[name]


class _VocabOnly:
    """What building a model reads from a tokenizer, for --synthetic (no corpus, no tokenizer)."""

    def __init__(self, size: int):
        self.size = size
        self.bos_token_id = self.eos_token_id = 0
        self.pad_token_id = 1

    def __len__(self) -> int:
        return self.size


# --------------------------------------------------------------------------------------------------
# Model FLOPs utilisation


def matmul_flops_per_token(config, block_size: int) -> float:
    """Matrix-product FLOPs of one training token (forward + backward = 3 x forward) of a GPT-2: every
    projection and the output layer (2 FLOPs per weight), plus attention's two [T x T] products per layer
    (SDPA computes them whole on a CPU, the causal half included). Elementwise work is not counted."""
    d, layers, inner = config.n_embd, config.n_layer, config.n_inner or 4 * config.n_embd
    per_layer = 2 * (d * 3 * d + d * d + 2 * d * inner) + 2 * 2 * block_size * d
    forward = layers * per_layer + 2 * d * config.vocab_size
    return 3.0 * forward


def matmul_peak_gflops(precision: str, seconds: float = 2.0) -> float | None:
    """This process's matrix-multiply speed in GFLOP/s, the best of repeated [2048 x 2048] products in
    the training precision, measured with the same threads: the peak that model FLOPs utilisation is
    reported against. None for bf16 without native bf16 (emulated: its speed depends on the shapes, so
    no one product is a peak)."""
    import torch

    from lmtune.training.engine import cpu_supports_bf16

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if dtype == torch.bfloat16 and not (torch.cuda.is_available() or cpu_supports_bf16()):
        return None
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for i in range(100):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        if i >= 3 and time.perf_counter() > deadline:
            break
    return 2 * n ** 3 / best / 1e9


# --------------------------------------------------------------------------------------------------
# One variant, in its own process


def child(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers.trainer_callback import PrinterCallback

    from lmtune.config import validate_recipe
    from lmtune.data.packing import BlockDataset
    from lmtune.modeling import count_parameters
    from lmtune.tasks import task_module
    from lmtune.training.engine import LmtuneTrainer, resolve_precision, training_arguments

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = validate_recipe(spec["raw"], origin="benchmark recipe")
    task = task_module(cfg.task)
    precision = resolve_precision(cfg.training.precision)
    steps, warmup = cfg.training.max_steps, spec["warmup"]
    block_size, batch = cfg.data.block_size, cfg.training.batch_size

    if spec["synthetic"]:
        vocab = cfg.tokenizer.vocab_size
        blocks = np.random.default_rng(0).integers(0, vocab, ((steps + 1) * batch, block_size), dtype=np.int32)
        tokenizer = _VocabOnly(vocab)
        train_dataset, collator, processing_class = BlockDataset(blocks), None, None
        kwargs = ({"keytoken_ids": list(range(300, 300 + len(cfg.loss.keywords))), "keytoken_alpha": cfg.loss.alpha}
                  if cfg.loss.type == "keytoken" else {})
    else:
        prepared = task.prepare(cfg)  # the parent filled LMTUNE_CACHE: tokenizer and blocks are reused
        tokenizer = processing_class = prepared.tokenizer
        train_dataset, collator, kwargs = prepared.train, prepared.collator, prepared.trainer_kwargs
    model = task.build_model(cfg, tokenizer)
    use_activation(model, spec["activation"])
    n_params = count_parameters(model)["total"]
    flops_per_token = matmul_flops_per_token(model.config, block_size)
    peak = matmul_peak_gflops(precision)

    clock = make_clock(warmup, steps)
    with tempfile.TemporaryDirectory(prefix="lmtune-bench-train-") as out:
        args = training_arguments(cfg.training, Path(out), precision, has_eval=False,
                                  torch_compile=spec["compile"])
        trainer = LmtuneTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=collator,
            processing_class=processing_class,
            callbacks=[clock],
            fused_loss=cfg.training.fused_loss,
            **kwargs,
        )
        trainer.remove_callback(PrinterCallback)  # stdout carries our JSON only
        # Peaks come from /proc/self/status, not getrusage: ru_maxrss survives exec, so a child would
        # report its parent's size at fork time if that was larger.
        startup_peak = status_kib("VmHWM")  # imports, data, model
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak (VmHWM): what follows is what training itself adds
        rss_before = status_kib("VmRSS")
        start = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - start
        train_peak = status_kib("VmHWM")
    timed_steps = steps - warmup
    seconds = clock.marks[steps] - clock.marks[warmup]
    step_times = [clock.marks[s] - clock.marks[s - 1] for s in range(max(warmup, 1) + 1, steps + 1)]
    own_cpu = clock.cpu[steps][1] - clock.cpu[warmup][1]
    others = max(0.0, clock.cpu[steps][0] - clock.cpu[warmup][0] - own_cpu)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "variant": spec["variant"],
        "precision": precision,
        "keytoken": bool(kwargs.get("keytoken_ids")),
        "key_token_ids": len(kwargs.get("keytoken_ids") or []),
        "parameters": n_params,
        "batch_size": batch,
        "block_size": block_size,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_s": timed_steps * batch * block_size / seconds,
        "model_gflops_per_s": timed_steps * batch * block_size * flops_per_token / seconds / 1e9,
        "matmul_peak_gflops_per_s": peak,
        "activation": spec["activation"],
        "fused_loss": cfg.training.fused_loss,
        "compile": spec["compile"],
        "step_s_median": statistics.median(step_times),
        "step_s_max": max(step_times),
        "train_wall_s": wall,
        "cpu_s_per_step": own_cpu / timed_steps,
        "interference": others / (seconds * os.cpu_count()),  # other processes' share of the CPUs
        "rss_before_train_mb": rss_before / 1024,
        "train_peak_rss_mb": train_peak / 1024,
        "process_peak_rss_mb": max(startup_peak, train_peak) / 1024,
        "loss": losses[-1] if losses else float(result.metrics.get("train_loss", float("nan"))),
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------
# The parent: the data once, then one subprocess per variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Figures: see benchmarks/README.md")
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="a causal-LM recipe with model.from_scratch")
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps per variant (default 60)")
    ap.add_argument("--warmup", type=int, default=10, help="first steps not timed (default 10)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    ap.add_argument("--repeats", type=int, default=1, help="fresh runs per variant (alternated); median reported")
    ap.add_argument("--synthetic", action="store_true", help="random token ids instead of the corpus")
    ap.add_argument("--data", nargs="+", metavar="PATH", help="files instead of the recipe's training source")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--txt-unit", default="file", choices=["file", "line", "paragraph"])
    ap.add_argument("--max-documents", type=int, help="data.train.max_documents: the first N documents only")
    add_quiet_options(ap, "variant")
    ap.add_argument("--quick", action="store_true",
                    help="15 steps (5 warm-up), fp32 and fp32-plain, the first 60 documents: about a minute")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.quick:
        args.steps, args.warmup = min(args.steps, 15), min(args.warmup, 5)
        if args.variants == DEFAULT_VARIANTS:
            args.variants = "fp32,fp32-plain"
        args.max_documents = args.max_documents or 60
    if not 0 <= args.warmup < args.steps:
        ap.error("--warmup must be at least 0 and below --steps")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    import yaml

    from lmtune.config import validate_recipe
    from lmtune.tasks import task_module
    from lmtune.training.engine import resolve_precision

    started = time.perf_counter()
    raw = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    cfg = validate_recipe(bench_recipe(raw, args), origin=f"recipe '{args.recipe}'")
    if cfg.task != "clm" or cfg.model.from_scratch is None:
        ap.error(f"{args.recipe}: needs task clm and model.from_scratch (this benchmark trains a new model)")
    fs = cfg.model.from_scratch
    emit("model", f"{fs.architecture} n_layer={fs.n_layer} n_head={fs.n_head} n_embd={fs.n_embd}", "",
         recipe=os.path.relpath(args.recipe, REPO), batch_size=cfg.training.batch_size,
         block_size=cfg.data.block_size, packing=cfg.data.packing, auto_precision=resolve_precision("auto"))

    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="lmtune-bench-train-") as tmp:
        os.environ["LMTUNE_CACHE"] = os.path.join(tmp, "cache")  # the children inherit it
        if not args.synthetic:
            note("preparing the data once (corpus, tokenizer, blocks: untimed)")
            t = time.perf_counter()
            prepared = task_module(cfg.task).prepare(cfg)
            info = prepared.info
            emit("data", info.get("train_blocks"), "blocks", source=" ".join(args.data) if args.data else
                 cfg.data.train.type, documents=info.get("train_documents"), vocab_size=len(prepared.tokenizer),
                 packing=cfg.data.packing, prepare_s=round(time.perf_counter() - t, 1))
            del prepared
        else:
            emit("data", (args.steps + 1) * cfg.training.batch_size, "blocks", source="synthetic (random ids)",
                 vocab_size=cfg.tokenizer.vocab_size)
        for r in range(args.repeats):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for name in order:
                spec = {"variant": name, "raw": bench_recipe(raw, args, name), "warmup": args.warmup,
                        **{key: variant_settings(name)[key] for key in ("activation", "compile")},
                        "threads": args.threads, "synthetic": args.synthetic}
                for attempt in range(args.retries + 1):
                    note(f"{name}: {args.steps} steps ({args.warmup} warm-up) in a fresh process")
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.stderr.write(proc.stderr[-4000:])
                        raise SystemExit(f"variant {name} failed (exit {proc.returncode})")
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    res["discarded"] = attempt
                    note(f"{name}: {res['tokens_per_s']:,.0f} tokens/s, peak RSS {res['process_peak_rss_mb']:,.0f} "
                         f"MiB, other processes took {res['interference']:.0%} of the CPUs")
                    if res["interference"] <= args.max_interference:
                        break
                    if attempt < args.retries:
                        note(f"{name}: disturbed by other processes; waiting for quiet, then again")
                        wait_until_quiet(args.max_wait)
                results[name].append(res)

    summary = {"bench": "train_clm", "figure": "summary", "steps": args.steps, "warmup": args.warmup,
               "data": "synthetic" if args.synthetic else "corpus", "repeats": args.repeats}
    for name in variants:
        runs = results[name]
        last = runs[-1]
        common = {"variant": name, "precision": last["precision"], "keytoken": last["keytoken"],
                  "activation": last["activation"], "fused_loss": last["fused_loss"], "compile": last["compile"]}
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        emit("tokens_per_s", round(tps), "tokens/s", **common, runs=[round(r["tokens_per_s"]) for r in runs],
             step_s_median=round(statistics.median(r["step_s_median"] for r in runs), 4),
             cpu_s_per_step=round(statistics.median(r["cpu_s_per_step"] for r in runs), 4),
             threads=last["threads"], interference=[round(r["interference"], 3) for r in runs],
             discarded=sum(r["discarded"] for r in runs))
        peak = max(r["process_peak_rss_mb"] for r in runs)
        emit("peak_rss_mb", round(peak), "MiB", **common, rss_before_train_mb=round(last["rss_before_train_mb"]),
             train_added_mb=round(max(r["train_peak_rss_mb"] - r["rss_before_train_mb"] for r in runs)))
        emit("final_loss", round(last["loss"], 4), "nats", **common, parameters=last["parameters"])
        gflops = statistics.median(r["model_gflops_per_s"] for r in runs)
        peaks = [r["matmul_peak_gflops_per_s"] for r in runs if r["matmul_peak_gflops_per_s"]]
        mfu = round(gflops / statistics.median(peaks), 3) if peaks else None
        emit("model_flops_utilisation", mfu, "fraction of the matmul peak", **common, model_gflops_per_s=round(gflops, 1),
             matmul_peak_gflops_per_s=round(statistics.median(peaks), 1) if peaks else "none: bf16 is emulated here")
        summary[f"{name}_mfu"] = mfu
        summary[f"{name}_tokens_per_s"] = round(tps)
        summary[f"{name}_peak_rss_mb"] = round(peak)
    base = summary.get("fp32_tokens_per_s")
    if base:  # each optimisation's gain: the default path's speed over the variant without it
        for name in variants:
            if name != "fp32":
                summary[f"fp32_over_{name}"] = round(base / summary[f"{name}_tokens_per_s"], 3)
    summary["worst_interference"] = round(max(r["interference"] for v in results.values() for r in v), 3)
    summary["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
