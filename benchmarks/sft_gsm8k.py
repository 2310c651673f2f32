"""Instruction tuning on GSM8K with the article's Q/A template: reply perplexity before/after, answers
to sample questions, whether they stop at EOS, time and memory.

Runs recipes/sft-gsm8k-local.yaml, whose starting model is the demo's small GPT-2 (pretrained from
scratch on Python code by `make demo`), or --model PATH.

    python benchmarks/sft_gsm8k.py --data ../shared/data [--model runs/codeparrot-local/model] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _machine import run_recipe  # benchmarks/_machine.py

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--model", default=str(REPO / "runs" / "codeparrot-local" / "model"))
    ap.add_argument("--steps", type=int, help="override training.max_steps")
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides (key=value)")
    args = ap.parse_args()
    gsm8k = Path(args.data) / "gsm8k"
    if not (gsm8k / "train.jsonl.gz").is_file():
        raise SystemExit(f"GSM8K not found in {gsm8k}; pass --data PATH_TO_SHARED_DATA")
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"no model at {args.model}; run `make demo` first or pass --model A_CAUSAL_LM_FOLDER")
    overrides = [f"data.train.path={gsm8k / 'train.jsonl.gz'}", f"data.validation.path={gsm8k / 'test.jsonl.gz'}",
                 f"model.name_or_path={args.model}"] + ([f"training.max_steps={args.steps}"] if args.steps else [])
    overrides += args.set
    m, wall, peak = run_recipe(REPO, "sft-gsm8k-local.yaml", overrides)
    print(json.dumps({
        "bench": "sft_gsm8k", "train_examples": m["data"]["train_examples"],
        "validation_examples": m["data"]["validation_examples"], "steps": m["steps"],
        "reply_perplexity_before": round(m["before"]["perplexity"], 2),
        "reply_perplexity_after": round(m["after"]["perplexity"], 2),
        "train_s": round(m["timings"]["train_s"], 1), "wall_s": round(wall, 1), "peak_rss_mb": round(peak, 1),
        "train_peak_rss_mb": round(m["memory"]["train_peak_rss_mb"], 1), "precision": m["precision"],
        "samples_after": m["after"].get("samples", []),
    }))


if __name__ == "__main__":
    main()
