"""Benchmark: causal-LM generation speed through lmtune's own predict path.

`lmtune predict RUN PROMPT...` loads the run's model with ``lmtune.tasks.clm.load_for_inference``
and completes its prompts in ``model.generate`` calls of up to 16 prompts of similar length
(``clm.generate`` -> ``clm._generate``: left padding, the KV cache). This script times exactly that
call, ``clm._generate``, on:

- 1 prompt per call: the 8 prompts one after the other (what a loop over ``predict`` would do);
- 8 prompts per call: the same 8 prompts batched in one call, left-padded as lmtune pads them;

each with the KV cache (the default) and without it (``use_cache=False``), greedy, fp32. The
prompts are short code prompts of different lengths (the demo's four and four more), so the batch
needs padding. Every prompt gets exactly ``--new-tokens`` new tokens: a model with random weights
may emit EOS at any step, so ``min_new_tokens`` (passed through ``_generate``'s options to
``model.generate``) holds EOS back until then; the count is checked on every output.

Model: by default the demo's shape (``recipes/codeparrot-local.yaml``: GPT-2, 4 layers, 4 heads,
width 256) with random weights, built by lmtune's ``build_from_scratch`` with 512 positions, and a
byte-level BPE tokenizer trained by lmtune's ``train_bpe_tokenizer`` on this Python's standard
library source (vocabulary up to 8,192; the model's vocabulary is the tokenizer's length). Both are
saved to a temporary folder and loaded back with ``load_for_inference``, as ``predict`` loads a run.
``--model DIR`` uses a saved model folder (or a run dir) instead; its context must hold the longest
prompt plus ``--new-tokens``.

Timing: one untimed warm-up call per prompt count, then ``--repeats`` timed passes over the 8
prompts per variant (medians reported); the passes without the cache are only there to show the
cache's gain and take 3-8 times longer, so they run ``--no-cache-repeats`` times (default 1).
Holding EOS back (``min_new_tokens``) costs a few per cent of a step (a logits processor; about 5 %
at 1 prompt on the demo's shape), so the figures are slightly below what ``predict`` reaches on a
model that does not stop early. For a small shared machine each timed pass also measures
how much CPU *other* processes used meanwhile (``/proc/stat`` minus this process's CPU time); a pass
disturbed by more than ``--max-interference`` of the machine is run again once the machine is quiet
(``--retries`` times at most).

Correctness: the batched greedy outputs must equal each prompt generated alone, and the outputs
without the cache must equal those with it (token ids); the script exits 1 if not.

Output: one JSON line per figure, ``{"bench": "generate", "figure": ..., "value": ..., "unit": ...}``
plus extra keys, then a summary line. Progress goes to stderr.

    python benchmarks/generate.py --quick           # 32 new tokens, 1 repeat: ~20 s
    python benchmarks/generate.py                   # 128 new tokens, 3 repeats (1 without the cache)
    python benchmarks/generate.py --model runs/codeparrot-local --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

# benchmarks/_machine.py
from _machine import add_quiet_options, busy_seconds, own_cpu_seconds, reporters, wait_until_quiet

os.environ["HF_HUB_OFFLINE"] = "1"  # never the Hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

# Short code prompts of different lengths: the demo recipe's four, then four more.
PROMPTS = [
    "# create some data\nx = np.random.randn(100)\ny = np.random.randn(100)\n\n# create scatter plot with x, y\n",
    "# create some data\nx = np.random.randn(100)\ny = np.random.randn(100)\n\n# create dataframe from x and y\n",
    "# dataframe with profession, income and name\ndf = pd.DataFrame({'profession': x, 'income':y, 'name': z})\n\n"
    "# calculate the mean income per profession\n",
    "# import random forest regressor from scikit-learn\nfrom sklearn.ensemble import RandomForestRegressor\n\n"
    "# fit random forest model with 300 estimators on X, y:\n",
    "import pandas as pd\n",
    "def fibonacci(n):\n",
    "import matplotlib.pyplot as plt\n\nfig, ax = plt.subplots()\n# plot a histogram of the ages\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]
DEMO_SHAPE = dict(architecture="gpt2", n_layer=4, n_head=4, n_embd=256)  # recipes/codeparrot-local.yaml
POSITIONS = 512
TOKENIZER_VOCAB = 8192
TOKENIZER_TEXT_BYTES = 3_000_000


emit, note = reporters("generate")


# --------------------------------------------------------------------------------------------------
# The model: the demo's shape with random weights, saved and loaded back as `predict` loads a run


def stdlib_code(max_bytes: int):
    """Python source from the standard library, in a fixed order: realistic code to train the
    tokenizer on, present on every machine and offline."""
    seen = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        seen += len(text)
        if seen >= max_bytes:
            return


def save_demo_model(folder: Path, seed: int) -> None:
    """The demo's model shape with random weights and a freshly trained tokenizer, in `folder`."""
    from lmtune.config import FromScratchConfig
    from lmtune.modeling import build_from_scratch
    from lmtune.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(stdlib_code(TOKENIZER_TEXT_BYTES), TOKENIZER_VOCAB, model_max_length=POSITIONS)
    spec = FromScratchConfig(**DEMO_SHAPE, n_positions=POSITIONS)
    model = build_from_scratch(spec, tokenizer, POSITIONS, seed, "clm")  # vocabulary: len(tokenizer)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def describe(model, tokenizer) -> dict:
    cfg = model.config
    return {"model_type": cfg.model_type, "n_layer": getattr(cfg, "n_layer", None),
            "n_head": getattr(cfg, "n_head", None), "n_embd": getattr(cfg, "n_embd", None),
            "n_positions": context_of(model), "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(model.dtype).replace("torch.", "")}


def context_of(model) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 10**9


# --------------------------------------------------------------------------------------------------
# Generating and timing


def new_ids(model, tokenizer, prompts: list[str], new_tokens: int, use_cache: bool) -> list[list[int]]:
    """lmtune's generation call (`clm._generate`, as `predict` makes it), greedy, forced to exactly
    `new_tokens` new tokens per prompt; the new token ids per prompt."""
    from lmtune.tasks import clm

    rows = clm._generate(model, tokenizer, prompts, new_tokens, do_sample=False, min_new_tokens=new_tokens,
                         use_cache=use_cache)
    return [ids[0].tolist() for ids in rows]


def timed_pass(model, tokenizer, per_call: int, new_tokens: int, use_cache: bool) -> dict:
    """All PROMPTS, `per_call` to a generate call; wall time, each call's time, and how much of the
    machine other processes took meanwhile."""
    outputs, call_s = [], []
    busy0, own0 = busy_seconds(), own_cpu_seconds()
    start = time.perf_counter()
    for i in range(0, len(PROMPTS), per_call):
        t = time.perf_counter()
        outputs += new_ids(model, tokenizer, PROMPTS[i : i + per_call], new_tokens, use_cache)
        call_s.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    own = own_cpu_seconds() - own0
    others = max(0.0, busy_seconds() - busy0 - own)
    return {"outputs": outputs, "wall_s": wall, "call_s": call_s, "cpu_s": own,
            "interference": others / (wall * os.cpu_count())}


def measured_pass(model, tokenizer, per_call: int, new_tokens: int, use_cache: bool, args) -> dict:
    """A timed pass, run again (after waiting for quiet) while other processes disturbed it."""
    for attempt in range(args.retries + 1):
        result = timed_pass(model, tokenizer, per_call, new_tokens, use_cache)
        result["discarded"] = attempt
        if result["interference"] <= args.max_interference:
            break
        note(f"other processes took {result['interference']:.0%} of the CPUs; "
             + ("waiting for quiet, then again" if attempt < args.retries else "kept (no retries left)"))
        if attempt < args.retries:
            wait_until_quiet(args.max_wait)
    return result


def check_counts(outputs: list[list[int]], new_tokens: int, eos_id: int | None, variant: str) -> None:
    """Every prompt got exactly `new_tokens` tokens, none of them EOS (a padded end would hide a short
    completion, and the tokens/s would then count padding)."""
    for prompt_no, ids in enumerate(outputs):
        if len(ids) != new_tokens or (eos_id is not None and eos_id in ids):
            raise SystemExit(f"{variant}: prompt {prompt_no} got {len(ids)} new tokens "
                             f"({ids.count(eos_id) if eos_id is not None else 0} EOS), expected {new_tokens}")


def first_mismatch(expected: list[list[int]], got: list[list[int]]) -> str | None:
    for prompt_no, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"prompt {prompt_no} differs from new token {step} on ({a[step:step + 5]} vs {b[step:step + 5]})"
    return None


# --------------------------------------------------------------------------------------------------
# Main


VARIANTS = [  # (name, prompts per call, KV cache)
    ("1-prompt-cache", 1, True),
    ("8-prompts-cache", 8, True),
    ("1-prompt-no-cache", 1, False),
    ("8-prompts-no-cache", 8, False),
]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Figures: see benchmarks/README.md")
    ap.add_argument("--model", help="a saved causal-LM folder or run dir instead of the demo's shape, random weights")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per variant; medians reported (default 3)")
    ap.add_argument("--no-cache-repeats", type=int, default=1,
                    help="timed passes of the two variants without the cache (default 1: they are slow)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    add_quiet_options(ap, "pass")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat: about 20 s")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.no_cache_repeats = min(args.new_tokens, 32), 1, 1
    if min(args.new_tokens, args.repeats, args.no_cache_repeats) < 1:
        ap.error("--new-tokens, --repeats and --no-cache-repeats must be at least 1")
    return args


def load_model(args, tmp: str):
    from lmtune.hub import run_model_folder
    from lmtune.tasks import clm

    if args.model:
        folder = run_model_folder(args.model)
    else:
        note("building the demo's model shape with random weights and training a tokenizer (untimed)")
        folder = Path(tmp) / "model"
        save_demo_model(folder, args.seed)
    return clm.load_for_inference(folder)


def check_context(model, tokenizer, new_tokens: int) -> None:
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)
    if longest + new_tokens > context_of(model):
        raise SystemExit(f"the longest prompt ({longest} tokens) plus --new-tokens {new_tokens} exceed the model's "
                         f"context of {context_of(model)} positions; use --new-tokens {context_of(model) - longest} "
                         "or fewer")


def quiet_libraries() -> None:
    """As `lmtune predict` sets them up: no progress bars or notices from transformers on stderr."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    args = parse_args()
    import torch

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmtune-bench-generate-") as tmp:
        model, tokenizer = load_model(args, tmp)
    check_context(model, tokenizer, args.new_tokens)
    prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    emit("model", args.model or "demo shape, random weights", "", **describe(model, tokenizer),
         prompts=len(PROMPTS), prompt_tokens=prompt_tokens, new_tokens=args.new_tokens,
         threads=torch.get_num_threads())

    for per_call in (1, 8):  # the first calls of a shape are slower (allocations, kernels): not timed
        new_ids(model, tokenizer, PROMPTS[:per_call], args.new_tokens, use_cache=True)

    runs: dict[str, list[dict]] = {name: [] for name, _, _ in VARIANTS}
    for r in range(max(args.repeats, args.no_cache_repeats)):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]  # no variant always goes first
        for name, per_call, use_cache in order:
            repeats = args.repeats if use_cache else args.no_cache_repeats
            if r >= repeats:
                continue
            note(f"{name}: pass {r + 1}/{repeats}, {len(PROMPTS)} prompts x {args.new_tokens} new tokens")
            result = measured_pass(model, tokenizer, per_call, args.new_tokens, use_cache, args)
            check_counts(result["outputs"], args.new_tokens, tokenizer.eos_token_id, name)
            note(f"{name}: {len(PROMPTS) * args.new_tokens / result['wall_s']:,.0f} tokens/s, "
                 f"other processes took {result['interference']:.0%} of the CPUs")
            runs[name].append(result)

    reference = runs["1-prompt-cache"][0]["outputs"]  # each prompt alone, with the cache
    for name, _, _ in VARIANTS[1:]:
        mismatch = first_mismatch(reference, runs[name][0]["outputs"])
        if mismatch:
            raise SystemExit(f"{name} does not generate what each prompt alone with the cache does: {mismatch}")
    emit("outputs_identical", True, "", compared="each variant against 1 prompt per call with the cache",
         prompts=len(PROMPTS), new_tokens=args.new_tokens)

    summary = {"bench": "generate", "figure": "summary", "new_tokens": args.new_tokens, "prompts": len(PROMPTS),
               "repeats": args.repeats, "no_cache_repeats": args.no_cache_repeats, "threads": torch.get_num_threads()}
    generated = len(PROMPTS) * args.new_tokens
    for name, per_call, use_cache in VARIANTS:
        passes = runs[name]
        tps = statistics.median(generated / p["wall_s"] for p in passes)
        calls = [s for p in passes for s in p["call_s"]]
        common = {"variant": name, "prompts_per_call": per_call, "use_cache": use_cache}
        emit("tokens_per_s", round(tps, 1), "tokens/s", **common,
             runs=[round(generated / p["wall_s"], 1) for p in passes],
             cpu_s_per_token=round(statistics.median(p["cpu_s"] for p in passes) / generated, 5),
             interference=[round(p["interference"], 3) for p in passes],
             discarded=sum(p["discarded"] for p in passes))
        # A batched prompt waits for the whole batch: its latency is the call's time.
        emit("latency_s", round(statistics.median(calls), 4), "s", **common,
             per_new_token_ms=round(1000 * statistics.median(calls) / args.new_tokens, 2),
             max_s=round(max(calls), 4))
        summary[f"{name}_tokens_per_s"] = round(tps, 1)
    summary["batching_speedup_cache"] = round(summary["8-prompts-cache_tokens_per_s"]
                                              / summary["1-prompt-cache_tokens_per_s"], 3)
    summary["batching_speedup_no_cache"] = round(summary["8-prompts-no-cache_tokens_per_s"]
                                                 / summary["1-prompt-no-cache_tokens_per_s"], 3)
    for per_call in ("1-prompt", "8-prompts"):
        summary[f"cache_speedup_{per_call}"] = round(summary[f"{per_call}-cache_tokens_per_s"]
                                                    / summary[f"{per_call}-no-cache_tokens_per_s"], 3)
    summary["outputs_identical"] = True
    summary["worst_interference"] = round(max(p["interference"] for v in runs.values() for p in v), 3)
    summary["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
