"""Extractive-QA post-processing: the course chapter's loops against lmtune's vectorised version.

Synthetic but window-shaped inputs: contexts of random words (one token per word), each window
starting with ~130 non-context tokens (CLS, question, SEP) followed by a slice of the context, a
final SEP and padding; some examples need 2-3 overlapping windows (stride overlap 128 tokens). The
logits are normal noise with a planted answer bump. Both versions run on the same inputs; the
answers must be identical (text and characters exactly, score to 1e-6) or the script exits 1.

Times are the median of `--repeats` runs, the two versions alternating (wall, `time.perf_counter`;
process CPU alongside), with the cyclic GC off while timing. The vectorised time starts from the
dense offsets array; turning the chapter's None-lists into it (`offsets_to_array`, a Python pass
over every token) is reported apart as `convert_s`, since a pipeline can build that array straight
from the tokenizer's `offset_mapping` and `sequence_ids`.

    python benchmarks/qa_postprocess.py [--examples 2000] [--features-per-example 1.1] [--seq-len 384]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

from lmtune.tasks.qa_postprocess import offsets_to_array, postprocess_predictions  # noqa: E402
from tests.unit.qa_reference import reference_postprocess  # noqa: E402
from _machine import reporters  # noqa: E402 benchmarks/_machine.py

WORDS = ("the river stone carried light across a northern valley where seven old towers stood "
         "above quiet fields and markets traded grain salt copper glass paper wool").split()
DOC_STRIDE = 128


def build_inputs(n_examples: int, features_per_example: float, seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    p_multi = min(max((features_per_example - 1.0) / 1.5, 0.0), 1.0)  # 2 or 3 windows: +1.5 on average
    contexts: list[str] = []
    offset_lists: list[list[tuple[int, int] | None]] = []
    fei: list[int] = []
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for ex in range(n_examples):
        question = int(rng.integers(120, 141))
        prefix = 1 + question + 1  # CLS, question, SEP
        capacity = seq_len - prefix - 1  # final SEP
        step = max(capacity - DOC_STRIDE, 1)
        n_windows = int(rng.choice([2, 3])) if rng.random() < p_multi else 1
        if n_windows == 1:
            n_words = int(rng.integers(max(capacity // 3, 1), capacity + 1))
        else:
            low = capacity + (n_windows - 2) * step + 1
            n_words = int(rng.integers(low, low + step))
        words = rng.choice(WORDS, size=n_words)
        spans, pos = [], 0
        for w in words:
            spans.append((pos, pos + len(w)))
            pos += len(w) + 1
        contexts.append(" ".join(words.tolist()))
        ans_start = int(rng.integers(0, n_words))
        ans_end = min(ans_start + int(rng.integers(0, 5)), n_words - 1)
        for w in range(n_windows):
            first = w * step
            window = spans[first:first + capacity]
            offs = [None] * prefix + window
            offs += [None] * (seq_len - len(offs))
            s = rng.normal(size=seq_len).astype(np.float32)
            e = rng.normal(size=seq_len).astype(np.float32)
            if first <= ans_start < first + len(window):
                s[prefix + ans_start - first] += 6.0
            if first <= ans_end < first + len(window):
                e[prefix + ans_end - first] += 6.0
            offset_lists.append(offs)
            fei.append(ex)
            starts.append(s)
            ends.append(e)
    return np.stack(starts), np.stack(ends), offset_lists, np.array(fei, dtype=np.int64), contexts


def time_once(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and CPU time of one call, with the cyclic GC off (as `timeit` does): the ~850k offset
    tuples kept alive here would otherwise make full collections land at random inside whichever
    version happens to be allocating."""
    gc.disable()
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        return time.perf_counter() - w0, time.process_time() - c0, result
    finally:
        gc.enable()


def timed_pair(first: Callable[[], object], second: Callable[[], object], repeats: int):
    """Median times of two versions run alternately, so that load from other processes on a small
    shared machine falls on both alike rather than on whichever runs second."""
    runs: list[list[tuple[float, float, object]]] = [[], []]
    for _ in range(repeats):
        runs[0].append(time_once(first))
        runs[1].append(time_once(second))
    return [(statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[-1][2])
            for rs in runs]


def same_answers(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x["text"], x["start_char"], x["end_char"]) != (y["text"], y["start_char"], y["end_char"]):
            return False
        if (x["score"] is None) != (y["score"] is None):
            return False
        if x["score"] is not None and not math.isclose(x["score"], y["score"], rel_tol=1e-6, abs_tol=1e-6):
            return False
    return True


emit, _ = reporters("qa_postprocess")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--features-per-example", type=float, default=1.1)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--n-best", type=int, default=20)
    ap.add_argument("--max-answer-length", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    start, end, offset_lists, fei, contexts = build_inputs(args.examples, args.features_per_example,
                                                           args.seq_len, args.seed)
    convert_s, _, offsets = time_once(lambda: offsets_to_array(offset_lists, args.seq_len))
    kw = {"n_best": args.n_best, "max_answer_length": args.max_answer_length}
    (ref_s, ref_cpu, ref), (vec_s, vec_cpu, vec) = timed_pair(
        lambda: reference_postprocess(start, end, offset_lists, fei, contexts, **kw),
        lambda: postprocess_predictions(start, end, offsets, fei, contexts, **kw), args.repeats)
    identical = same_answers(ref, vec)
    speedup = ref_s / vec_s if vec_s > 0 else float("inf")
    common = {"examples": args.examples, "features": int(start.shape[0]), "seq_len": args.seq_len}
    emit("reference_s", round(ref_s, 4), "s", cpu_s=round(ref_cpu, 4), **common)
    emit("vectorised_s", round(vec_s, 4), "s", cpu_s=round(vec_cpu, 4), convert_s=round(convert_s, 4), **common)
    emit("speedup", round(speedup, 1), "x", identical=identical, target=10)
    print(json.dumps({"bench": "qa_postprocess", "figure": "summary", **common, "reference_s": round(ref_s, 4),
                      "vectorised_s": round(vec_s, 4), "speedup": round(speedup, 1), "identical": identical,
                      "target_speedup": 10, "target_met": bool(identical and speedup >= 10)}), flush=True)
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
