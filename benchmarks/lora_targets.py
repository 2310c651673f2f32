"""Which Llama modules LoRA should adapt by default: query/value projections only (peft's and the LoRA
paper's choice) against every linear projection of attention and MLP (QLoRA's), on SmolLM2-135M-Instruct
instruction-tuned on GSM8K (recipes/sft-gsm8k-smollm2-lora.yaml, same data, steps, rank and seed).

Quality per training minute, two ways: the drop in held-out reply loss divided by the training minutes
after the same steps, and -- since the loss falls fastest at first -- the held-out loss when both train for
the same time: q/v is run again for as many more steps as all-projections' steps took longer
(``q_v_same_time``). The variants alternate (q/v, all, q/v, all ...) so that a slower or busier stretch of
the machine hits both.

    python benchmarks/lora_targets.py --data ../shared/data [--steps 60] [--repeats 1] [--precision fp32]
    python benchmarks/lora_targets.py --variants q_v --steps 78     # one variant, another step count
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _machine import reporters, run_recipe  # benchmarks/_machine.py

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"q_v": ["q_proj", "v_proj"],
            "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--variants", default="q_v,all_linear", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides (key=value)")
    args = ap.parse_args()
    emit, note = reporters("lora_targets")
    gsm8k = Path(args.data) / "gsm8k"
    if not (gsm8k / "train.jsonl.gz").is_file():
        raise SystemExit(f"GSM8K not found in {gsm8k}; pass --data PATH_TO_SHARED_DATA")
    common = [f"data.train.path={gsm8k / 'train.jsonl.gz'}", f"data.validation.path={gsm8k / 'test.jsonl.gz'}",
              f"training.precision={args.precision}", "sft.answer_pattern=null", "sft.samples=[]",
              "training.save_strategy=no", *args.set]
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]

    def run(name: str, targets: list[str], steps: int) -> None:
        note(f"{name} ({', '.join(targets)}), {steps} steps")
        m, wall, peak = run_recipe(REPO, "sft-gsm8k-smollm2-lora.yaml", common + [
            f"training.max_steps={steps}", f"lora.target_modules={json.dumps(targets)}"])
        minutes = m["timings"]["train_s"] / 60
        gain = m["before"]["loss"] - m["after"]["loss"]
        results.setdefault(name, []).append({"loss_before": m["before"]["loss"], "loss_after": m["after"]["loss"],
                                             "steps": steps, "train_min": minutes, "gain_per_min": gain / minutes,
                                             "trainable": m["parameters"]["trainable"], "peak_rss_mb": peak})
        emit(f"{name}_run", round(gain / minutes, 5), "reply-loss drop per training minute",
             **{k: round(v, 4) if isinstance(v, float) else v for k, v in results[name][-1].items()})

    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for name in chosen:
            run(name, VARIANTS[name], args.steps)
        if {"q_v", "all_linear"} <= set(chosen):  # q/v again, for as long as all-projections trained
            ratio = results["all_linear"][-1]["train_min"] / results["q_v"][-1]["train_min"]
            run("q_v_same_time", VARIANTS["q_v"], round(args.steps * ratio))
    summary = {}
    for name, runs in results.items():
        summary[name] = {key: round(statistics.median(r[key] for r in runs), 4)
                         for key in ("loss_after", "train_min", "gain_per_min", "peak_rss_mb")}
        summary[name].update(trainable=runs[0]["trainable"], steps=runs[0]["steps"])
    same_time = {}
    if {"all_linear", "q_v_same_time"} <= set(summary):
        same_time = {"all_linear_loss": summary["all_linear"]["loss_after"],
                     "q_v_loss": summary["q_v_same_time"]["loss_after"],
                     "better": min(("all_linear", "q_v_same_time"), key=lambda k: summary[k]["loss_after"])}
    print(json.dumps({"bench": "lora_targets", "figure": "summary", "steps": args.steps,
                      "precision": args.precision, "variants": summary,
                      "most_loss_drop_per_minute_at_equal_steps": max(summary, key=lambda k: summary[k]["gain_per_min"]),
                      "at_equal_training_time": same_time}), flush=True)


if __name__ == "__main__":
    main()
