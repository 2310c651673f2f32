"""The shipped SmolLM2-135M-Instruct recipes end to end, as `lmtune train` runs them: each recipe's figures
before -> after, its training time, wall time and peak RSS (each run a fresh process; wait4's peak).

    python benchmarks/smollm2_recipes.py --data ../shared/data                  # every recipe below
    python benchmarks/smollm2_recipes.py --data ../shared/data --recipes sft-gsm8k-smollm2-lora --set training.max_steps=20

Recipes and what is reported:
- clm-code-smollm2-lora (make demo-llm): validation perplexity; the code chapter's four completions
- clm-wikitext2-smollm2-lora: WikiText-2 test perplexity
- sft-gsm8k-smollm2-lora: held-out reply perplexity, final-answer accuracy of 50 held-out questions
- sft-imdb-sentiment-smollm2-lora: accuracy of the one-word chat reply on 500 held-out reviews
- classify-imdb-smollm2-lora: accuracy and F1 of a classification head on 500 held-out reviews
- rlhf-hh-smollm2-lora (a chain): reward accuracy; DPO implicit-reward accuracy and log-prob margin; RL mean reward
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import reporters, run_recipe  # benchmarks/_machine.py

REPO = Path(__file__).resolve().parents[1]

# Per recipe: the data paths under --data, and the figures to report (metric keys of before/after).
RECIPES = {
    "clm-code-smollm2-lora": ([], ["perplexity", "loss"]),
    "clm-wikitext2-smollm2-lora": (["data.train.path=wikitext-2/valid.txt.gz",
                                    "data.validation.path=wikitext-2/test.txt.gz"], ["perplexity", "loss"]),
    "sft-gsm8k-smollm2-lora": (["data.train.path=gsm8k/train.jsonl.gz", "data.validation.path=gsm8k/test.jsonl.gz"],
                               ["perplexity", "answer_accuracy", "answers_found"]),
    "sft-imdb-sentiment-smollm2-lora": (["data.train.path=imdb/imdb_aclImdb_v1_50k.jsonl.gz",
                                         "data.validation.path=imdb/imdb_aclImdb_v1_50k.jsonl.gz"],
                                        ["answer_accuracy", "answers_found", "perplexity"]),
    "classify-imdb-smollm2-lora": (["data.train.path=imdb/imdb_aclImdb_v1_50k.jsonl.gz",
                                    "data.validation.path=imdb/imdb_aclImdb_v1_50k.jsonl.gz"], ["accuracy", "f1"]),
    "rlhf-hh-smollm2-lora": ([f"{step}.data.train.path=hh-rlhf/harmless-base-test.jsonl.gz"
                              for step in ("reward", "dpo", "rl")],
                             ["accuracy", "margin", "reward_accuracy", "reward_margin", "logp_margin", "mean_reward"]),
}


def with_data(overrides: list[str], data: Path) -> list[str]:
    return [f"{key}={data / value}" for key, value in (item.split("=", 1) for item in overrides)]


def run_chain(recipe: str, overrides: list[str]) -> tuple[dict, float, float]:
    """A chain recipe in a child process: each step's metrics.json, the wall seconds and the peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lmtune", "train", str(REPO / "recipes" / f"{recipe}.yaml"), "--output", tmp]
        for item in overrides:
            cmd += ["--set", item]
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=sys.stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{recipe} failed")
        steps = {p.name: json.loads((p / "metrics.json").read_text()) for p in sorted(Path(tmp).iterdir())
                 if (p / "metrics.json").is_file()}
    return steps, time.time() - start, usage.ru_maxrss / 1024


def figures(m: dict, keys: list[str]) -> dict:
    out = {}
    for key in keys:
        if key in m["before"] or key in m["after"]:
            out[key] = [round(m["before"].get(key, float("nan")), 4), round(m["after"].get(key, float("nan")), 4)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--set", action="append", default=[], help="more overrides for every recipe (key=value)")
    args = ap.parse_args()
    emit, note = reporters("smollm2_recipes")
    data = Path(args.data)
    for recipe in args.recipes:
        paths, keys = RECIPES[recipe]
        overrides = with_data(paths, data) + args.set
        note(f"{recipe} {' '.join(overrides)}")
        if recipe.startswith("rlhf"):
            steps, wall, peak = run_chain(recipe, overrides)
            for name, m in steps.items():
                emit(f"{recipe}/{name}", figures(m, keys), "before -> after", steps=m["steps"],
                     train_s=round(m["timings"]["train_s"], 1), precision=m["precision"],
                     samples_after=m["after"].get("samples") or m["after"].get("example"))
            emit(f"{recipe}/chain", round(wall, 1), "s wall", peak_rss_mb=round(peak, 1))
            continue
        m, wall, peak = run_recipe(REPO, f"{recipe}.yaml", overrides)
        samples = m["after"].get("samples") or m.get("samples")
        emit(recipe, figures(m, keys), "before -> after", steps=m["steps"], precision=m["precision"],
             train_s=round(m["timings"]["train_s"], 1), wall_s=round(wall, 1), peak_rss_mb=round(peak, 1),
             trainable=m["parameters"]["trainable"], samples_before=m["before"].get("samples"), samples_after=samples)


if __name__ == "__main__":
    main()
