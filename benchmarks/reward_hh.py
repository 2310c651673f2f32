"""InstructGPT's steps on HH-RLHF at small scale: each step's figures before/after, time and memory.

Runs the chain recipe recipes/instructgpt-hh-local.yaml (a small GPT-2 pretrained from scratch on the
harmless-base dialogues -> SFT on the preferred replies -> reward model -> RL against it) in a child
process, then prints one JSON line per step: the reward model's held-out preference accuracy and margin,
the SFT model's reply perplexity, the policy's mean reward on held-out prompts -- before and after --
with training seconds and peak RSS of each step, and the whole chain's wall time and peak.

    python benchmarks/reward_hh.py --data ../shared/data [--set reward.training.max_steps=300]
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

REPO = Path(__file__).resolve().parents[1]
STEPS = ("pretrain", "sft", "reward", "rl")
FIGURES = {"clm": ("perplexity",), "sft": ("perplexity",), "reward": ("accuracy", "margin"),
           "rl": ("mean_reward", "reward_std")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--set", action="append", default=[], help="chain overrides, step.key=value")
    args = ap.parse_args()
    hh = Path(args.data) / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not hh.is_file():
        raise SystemExit(f"HH-RLHF data not found at {hh}; pass --data PATH_TO_SHARED_DATA")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lmtune", "train", str(REPO / "recipes" / "instructgpt-hh-local.yaml"),
               "--output", tmp]
        for item in [f"{step}.data.train.path={hh}" for step in STEPS] + args.set:
            cmd += ["--set", item]
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=sys.stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"the chain failed with exit code {os.waitstatus_to_exitcode(status)}")
        for step in STEPS:
            m = json.loads((Path(tmp) / step / "metrics.json").read_text())
            row = {"bench": "reward_hh", "step": step, "task": m["task"], "steps": m["steps"],
                   "train_s": round(m["timings"]["train_s"], 1),
                   "train_peak_rss_mb": round(m["memory"]["train_peak_rss_mb"], 1),
                   "parameters": m["parameters"]["total"]}
            for key in FIGURES[m["task"]]:
                row[f"{key}_before"] = round(m["before"][key], 4)
                row[f"{key}_after"] = round(m["after"][key], 4)
            if m["task"] == "rl":
                row["example_after"] = m["after"]["example"]
            if m["task"] == "reward":
                row["pairs"] = m["after"]["pairs"]
            print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "reward_hh", "figure": "chain", "wall_s": round(wall, 1),
                      "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
