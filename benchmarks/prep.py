"""Benchmark: causal-LM data preparation, lmtune against the tokenizer's ceiling and the tutorial.

One corpus (by default the built-in ``python-code`` source, as ``make demo`` uses it; or ``--data``
files) and one byte-level BPE tokenizer (trained once, untimed, vocabulary 8192; or ``--tokenizer
DIR``). Each figure is the median of ``--repeats`` runs, the variants alternated inside every repeat
(and their order rotated from one repeat to the next):

- ``encode_batch``: the Rust tokenizer's ``encode_batch`` over batches of 1,024 documents,
  collecting ``.ids``: the ceiling named in the design; ``encode_batch_fast`` is the same call
  without character offsets, which is what ``lmtune.data.packing.tokenize_texts`` uses;
- ``prepare_concat`` / ``prepare_overflow``: lmtune's whole preparation,
  ``prepare_blocks(..., use_cache=False)``: tokenize + pack into ``[n, block_size]`` int32 blocks
  (the first run of each is also checked against packing the ``encode_batch`` ids);
- ``pack_concat`` / ``pack_overflow``: packing alone on pre-tokenized lists (target >= 15M tokens/s);
- ``tutorial_group_texts``: the Hugging Face tutorials' ``group_texts`` (``sum(lists, [])`` per batch
  of 1,000 examples, the per-batch remainder dropped, as ``datasets.map(batched=True)`` calls it) on
  the same pre-tokenized lists;
- ``tutorial_map_pipeline`` (one run): the tutorial's whole pipeline,
  ``Dataset.from_dict({"text": texts}).map(tokenize, batched=True).map(group_texts, batched=True)``
  with ``datasets.disable_caching()``, on the first ``--map-documents`` documents (default 1,000: one
  full ``map`` batch; the output says when it is a subset);
- ``fingerprint_texts`` and ``cached_rerun``: what a second run of the same recipe pays: the corpus
  hash, and ``prepare_blocks(..., use_cache=True)`` when its cache (``LMTUNE_CACHE``, pointed at a
  temporary folder) already holds the blocks;
- ``prepare_concat_peak_rss_added_mb``: the peak memory ``prepare_blocks`` adds, in a fresh process.

This is meant for a small shared machine: every timed run also records how much CPU *other*
processes used meanwhile (``/proc/stat`` minus this process's own time); a run where they took more
than ``--max-interference`` of the machine is discarded and repeated once the machine is quiet
(``--retries`` times at most). Figures also carry the process CPU seconds, which contention
disturbs far less than wall time.

Output: one JSON line per figure, ``{"bench": "prep", "figure": ..., "value": ..., "unit": ...}``,
then one summary line with the ratios ``prepare_<mode>_s / encode_batch_s`` (target <= 1.1) and
whether each target is met. Progress goes to stderr.

    python benchmarks/prep.py --quick                  # the first 2 MB of documents, < 1 minute
    python benchmarks/prep.py                          # the demo's whole python-code corpus
    python benchmarks/prep.py --data ../shared/data/wikitext-2/valid.txt.gz --txt-unit line
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _machine import busy_seconds, status_kib, wait_until_quiet  # benchmarks/_machine.py

os.environ["HF_HUB_OFFLINE"] = "1"  # never the Hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The Rust tokenizer's own thread pool, as in a real run (and no warning when a child is started).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

TOKENIZE_BATCH = 1024  # documents per encode_batch call, as lmtune's tokenize_texts
TUTORIAL_BATCH = 1000  # datasets.map(batched=True)'s default batch size
PACK_TARGET_TOKENS_PER_S = 15e6
PREPARE_OVER_ENCODE_TARGET = 1.1


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"bench": "prep", "figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def note(msg: str) -> None:
    print(f"[prep] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Timing on a shared machine




class Run:
    """Wall seconds, this process's CPU seconds, and the share of all CPUs other processes used."""

    def __init__(self, fn):
        gc.collect()
        t0, c0, b0 = time.perf_counter(), os.times(), busy_seconds()
        self.result = fn()
        t1, c1, b1 = time.perf_counter(), os.times(), busy_seconds()
        self.wall = t1 - t0
        self.cpu = (c1.user + c1.system) - (c0.user + c0.system)
        others = max(0.0, (b1 - b0) - self.cpu)
        # /proc/stat counts in clock ticks: a run of a few ticks cannot be judged
        self.interference = others / (self.wall * os.cpu_count()) if self.wall > 0.25 else 0.0


def measure(fn, args, label: str, check=None) -> Run:
    """One run of fn, repeated (after waiting for quiet) while other work disturbed it too much."""
    for attempt in range(args.retries + 1):
        run = Run(fn)
        if check is not None:
            check(run.result)
            check = None
        run.result = None  # free the blocks / token lists before the next run
        run.discarded = attempt
        if run.interference <= args.max_interference:
            break
        if attempt < args.retries:
            note(f"{label}: other processes took {run.interference:.0%} of the CPUs; waiting, then again")
            wait_until_quiet(args.max_wait)
    return run


# --------------------------------------------------------------------------------------------------
# The tutorial's way, written as the tutorials write it


def make_group_texts(block_size: int):
    """The tutorials' ``group_texts``: concatenate every column of the batch with ``sum(lists, [])``,
    cut it into ``block_size`` pieces, drop the remainder of the batch; labels are a copy of the ids."""

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    return group_texts


def tutorial_group_texts(token_lists: list[list[int]], block_size: int) -> list[list[int]]:
    """``group_texts`` over pre-tokenized ids, one call per batch of 1,000 examples, as
    ``datasets.map(group_texts, batched=True)`` calls it (without the Arrow round trip)."""
    group_texts = make_group_texts(block_size)
    blocks: list[list[int]] = []
    for start in range(0, len(token_lists), TUTORIAL_BATCH):
        blocks.extend(group_texts({"input_ids": token_lists[start : start + TUTORIAL_BATCH]})["input_ids"])
    return blocks


def tutorial_map_pipeline(texts: list[str], tokenizer, block_size: int):
    import datasets

    datasets.disable_caching()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    raw = datasets.Dataset.from_dict({"text": texts})
    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    return tokenized.map(make_group_texts(block_size), batched=True)


# --------------------------------------------------------------------------------------------------
# Data


def load_texts(args) -> list[str]:
    from lmtune.config import SourceConfig
    from lmtune.data.sources import load_corpus

    if args.data:
        src = SourceConfig(path=list(args.data), text_field=args.text_field, txt_unit=args.txt_unit)
    else:
        src = SourceConfig(type="python-code")
    texts = load_corpus(src, "bench").texts
    if args.max_documents:
        texts = texts[: args.max_documents]
    if args.max_bytes:
        total = 0
        for n, text in enumerate(texts):
            total += len(text.encode("utf-8", "surrogatepass"))
            if total > args.max_bytes:
                texts = texts[: max(n, 1)]
                break
    return texts


# --------------------------------------------------------------------------------------------------
# Peak memory of prepare_blocks, in a fresh process



def memory_child(spec: str) -> None:
    """Peak RSS that prepare_blocks adds on top of what the process held before it (Linux: the peak
    is reset through /proc/self/clear_refs once the corpus is loaded, so loading does not count)."""
    import numpy as np
    from transformers import AutoTokenizer

    from lmtune.data.packing import prepare_blocks

    data_args, tokenizer_dir, block_size, mode = json.loads(spec)
    texts = load_texts(argparse.Namespace(**data_args))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.backend_tokenizer.encode_batch(texts[:8])  # start the thread pool
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := the current RSS
    before = status_kib("VmRSS")
    blocks, _ = prepare_blocks(texts, "memory", tokenizer, block_size, mode, use_cache=False)
    peak = status_kib("VmHWM")
    print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024,
                      "blocks_mb": np.asarray(blocks).nbytes / 2**20}))


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Figures: see benchmarks/README.md")
    ap.add_argument("--data", nargs="+", metavar="PATH", help="files, folders or globs (default: python-code)")
    ap.add_argument("--text-field", default="text", help="field of .jsonl/.csv/.parquet records")
    ap.add_argument("--txt-unit", default="file", choices=["file", "line", "paragraph"], help="documents of .txt")
    ap.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: train a BPE one, untimed)")
    ap.add_argument("--save-tokenizer", metavar="DIR", help="save the trained tokenizer there")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported (>= 3)")
    ap.add_argument("--max-documents", type=int, help="use the first N documents only")
    ap.add_argument("--max-bytes", type=int, help="use the first documents up to this many bytes of text")
    ap.add_argument("--map-documents", type=int, default=TUTORIAL_BATCH,
                    help="run the tutorial's datasets.map pipeline on the first N documents (default 1000, one "
                         "full datasets.map batch; 0: all)")
    ap.add_argument("--no-map", action="store_true", help="skip the tutorial's datasets.map pipeline")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak memory of prepare_blocks")
    ap.add_argument("--max-interference", type=float, default=0.1,
                    help="discard a run if other processes used more than this share of the CPUs (default 0.1)")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a disturbed run (default 2)")
    ap.add_argument("--max-wait", type=float, default=120, help="seconds to wait for quiet before a re-run")
    ap.add_argument("--quick", action="store_true", help="the first 2 MB of documents: well under a minute")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.quick and not (args.max_documents or args.max_bytes):
        args.max_bytes = 2_000_000
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    import numpy as np
    from transformers import AutoTokenizer

    from lmtune.data.packing import _fast_backend, pack_concatenated, pack_overflow, prepare_blocks
    from lmtune.data.sources import fingerprint_texts
    from lmtune.tokenizer import train_bpe_tokenizer

    started = time.perf_counter()
    t = time.perf_counter()
    texts = load_texts(args)
    source = " ".join(args.data) if args.data else "python-code"
    n_bytes = sum(len(x.encode("utf-8", "surrogatepass")) for x in texts)
    emit("corpus_documents", len(texts), "documents", source=source, bytes=n_bytes,
         load_s=round(time.perf_counter() - t, 3), quick=args.quick)

    tmp = tempfile.TemporaryDirectory(prefix="lmtune-bench-prep-")
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        tokenizer_dir = args.tokenizer
    else:
        note(f"training a BPE tokenizer (vocab {args.vocab_size}) on {len(texts):,} documents (untimed)")
        t = time.perf_counter()
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size, max_bytes=20_000_000)
        emit("tokenizer_train_s", round(time.perf_counter() - t, 3), "s", note="one-off, outside the ratios")
        tokenizer_dir = args.save_tokenizer or os.path.join(tmp.name, "tokenizer")
        tokenizer.save_pretrained(tokenizer_dir)
    backend = _fast_backend(tokenizer)
    eos = tokenizer.eos_token_id
    block = args.block_size

    # ---- the variants ----------------------------------------------------------------------------
    def encode_batch():
        ids = []
        for s in range(0, len(texts), TOKENIZE_BATCH):
            ids.extend(e.ids for e in backend.encode_batch(texts[s : s + TOKENIZE_BATCH], add_special_tokens=False))
        return ids

    def encode_batch_fast():
        ids = []
        for s in range(0, len(texts), TOKENIZE_BATCH):
            batch = texts[s : s + TOKENIZE_BATCH]
            ids.extend(e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False))
        return ids

    token_lists = encode_batch()  # also starts the tokenizer's thread pool and fills its word cache
    n_tokens = sum(map(len, token_lists))
    emit("corpus_tokens", n_tokens, "tokens", tokens_per_document=round(n_tokens / len(texts), 1))

    def check_prepare(mode):
        """The first timed run of prepare_blocks must give exactly the packing of the encode_batch ids."""
        def check(result):
            blocks, info = result
            expected = pack_concatenated(token_lists, block, eos) if mode == "concat" else \
                pack_overflow(token_lists, block)
            if not np.array_equal(blocks, expected):
                raise SystemExit(f"prepare_blocks({mode}) differs from packing the encode_batch ids")
            emit(f"blocks_{mode}", int(blocks.shape[0]), "blocks", tokens_dropped=info["tokens_dropped"])
        return check

    variants = {
        "encode_batch": encode_batch,
        "encode_batch_fast": encode_batch_fast,
        "prepare_concat": lambda: prepare_blocks(texts, "bench", tokenizer, block, "concat", use_cache=False),
        "prepare_overflow": lambda: prepare_blocks(texts, "bench", tokenizer, block, "overflow", use_cache=False),
        "pack_concat": lambda: pack_concatenated(token_lists, block, eos),
        "pack_overflow": lambda: pack_overflow(token_lists, block),
        "tutorial_group_texts": lambda: tutorial_group_texts(token_lists, block),
        "fingerprint_texts": lambda: fingerprint_texts(texts),
    }
    if not hasattr(backend, "encode_batch_fast"):
        del variants["encode_batch_fast"]
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always runs first
        for name in order:
            check = check_prepare(name.split("_")[1]) if r == 0 and name.startswith("prepare_") else None
            runs[name].append(measure(variants[name], args, name, check))
        note(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1].wall:.3f}s" for k, v in runs.items()))
    med = {name: statistics.median(x.wall for x in v) for name, v in runs.items()}
    cpu = {name: statistics.median(x.cpu for x in v) for name, v in runs.items()}
    worst = max(x.interference for v in runs.values() for x in v)

    for name, v in runs.items():
        emit(f"{name}_s", round(med[name], 4), "s", runs=[round(x.wall, 4) for x in v],
             cpu_s=round(cpu[name], 4), interference=[round(x.interference, 3) for x in v],
             discarded=sum(x.discarded for x in v))
        if name != "fingerprint_texts":
            emit(f"{name}_tokens_per_s", round(n_tokens / med[name]), "tokens/s")

    # ---- the tutorial's whole datasets.map pipeline (slow: one run) --------------------------------
    map_rate = None
    if not args.no_map:
        subset = texts[: args.map_documents] if args.map_documents else texts
        sub_tokens = sum(map(len, token_lists[: len(subset)]))
        note(f"tutorial datasets.map pipeline on {len(subset):,} of {len(texts):,} documents (one run)")
        run = measure(lambda: tutorial_map_pipeline(subset, tokenizer, block), args, "tutorial_map_pipeline")
        worst = max(worst, run.interference)
        emit("tutorial_map_pipeline_s", round(run.wall, 3), "s", documents=len(subset), tokens=sub_tokens,
             subset=len(subset) < len(texts), repeats=1, cpu_s=round(run.cpu, 3),
             interference=round(run.interference, 3), discarded=run.discarded)
        map_rate = sub_tokens / run.wall
        emit("tutorial_map_pipeline_tokens_per_s", round(map_rate), "tokens/s", subset=len(subset) < len(texts))

    # ---- the cached re-run ---------------------------------------------------------------------------
    old_cache = os.environ.get("LMTUNE_CACHE")
    os.environ["LMTUNE_CACHE"] = os.path.join(tmp.name, "cache")
    try:
        fp = fingerprint_texts(texts)
        prepare_blocks(texts, fp, tokenizer, block, "overflow")  # the first run fills the cache
        cached_runs = [Run(lambda: prepare_blocks(texts, fp, tokenizer, block, "overflow"))
                       for _ in range(args.repeats)]
        if not all(x.result[1]["cached"] for x in cached_runs):
            raise SystemExit("a second prepare_blocks call did not hit the cache")
    finally:
        if old_cache is None:
            os.environ.pop("LMTUNE_CACHE", None)
        else:
            os.environ["LMTUNE_CACHE"] = old_cache
    cached_s = statistics.median(x.wall for x in cached_runs)
    emit("cached_rerun_s", round(cached_s, 4), "s", runs=[round(x.wall, 4) for x in cached_runs],
         with_fingerprint_texts_s=round(cached_s + med["fingerprint_texts"], 4))

    # ---- peak memory ---------------------------------------------------------------------------------
    if not args.no_memory:
        data_args = {"data": args.data, "text_field": args.text_field, "txt_unit": args.txt_unit,
                     "max_documents": args.max_documents, "max_bytes": args.max_bytes}
        # one mode: both tokenize the same way, and packing adds about the size of the blocks
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", json.dumps([data_args, tokenizer_dir, block, "concat"])],
            check=True, capture_output=True, text=True,
        ).stdout
        mem = json.loads(out.strip().splitlines()[-1])
        added = mem["peak_mb"] - mem["before_mb"]
        emit("prepare_concat_peak_rss_added_mb", round(added, 1), "MiB", blocks_mb=round(mem["blocks_mb"], 1),
             bytes_per_token=round(added * 2**20 / n_tokens, 1))

    # ---- summary -------------------------------------------------------------------------------------
    summary = {
        "bench": "prep",
        "figure": "summary",
        "source": source,
        "documents": len(texts),
        "tokens": n_tokens,
        "block_size": block,
        "repeats": args.repeats,
        "prepare_concat_over_encode_batch": round(med["prepare_concat"] / med["encode_batch"], 3),
        "prepare_overflow_over_encode_batch": round(med["prepare_overflow"] / med["encode_batch"], 3),
        "prepare_over_encode_batch_target": PREPARE_OVER_ENCODE_TARGET,
        "prepare_concat_over_encode_batch_cpu": round(cpu["prepare_concat"] / cpu["encode_batch"], 3),
        "pack_concat_tokens_per_s": round(n_tokens / med["pack_concat"]),
        "pack_overflow_tokens_per_s": round(n_tokens / med["pack_overflow"]),
        "pack_tokens_per_s_target": int(PACK_TARGET_TOKENS_PER_S),
        "pack_concat_speedup_over_tutorial_group_texts": round(med["tutorial_group_texts"] / med["pack_concat"], 1),
        "cached_rerun_s": round(cached_s, 4),
    }
    if "encode_batch_fast" in med:
        summary["prepare_concat_over_encode_batch_fast"] = round(med["prepare_concat"] / med["encode_batch_fast"], 3)
    if map_rate is not None:  # tokens/s against tokens/s: the map pipeline may have run on a subset
        summary["prepare_concat_speedup_over_tutorial_map_pipeline"] = round(
            (n_tokens / med["prepare_concat"]) / map_rate, 1)
    summary["targets_met"] = {
        "prepare_over_encode_batch": max(summary["prepare_concat_over_encode_batch"],
                                         summary["prepare_overflow_over_encode_batch"]) <= PREPARE_OVER_ENCODE_TARGET,
        "pack_tokens_per_s": min(summary["pack_concat_tokens_per_s"],
                                 summary["pack_overflow_tokens_per_s"]) >= PACK_TARGET_TOKENS_PER_S,
    }
    summary["worst_interference"] = round(worst, 3)  # other processes' share of the CPUs, worst run kept
    summary["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
