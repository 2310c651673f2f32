"""Benchmark: memory and speed of streaming pretraining data, on generated corpora of growing size.

For each size in ``--sizes-mb`` (default 100 and 1,000 MB) a JSON Lines corpus is generated in
``--workdir`` (once; reused when already there): documents of a few hundred words drawn from a Zipf
distribution over a few thousand pseudo-words, with commas and full stops, so that a byte-level BPE
tokenizer meets realistic text. Generation itself streams (one document at a time to disk).

Each corpus then goes through lmtune's whole streaming path in a fresh child process:
``lmtune.tasks.clm.prepare_streaming`` on a recipe with ``data.train.streaming: true`` and
``tokenizer.train: true`` (byte-level BPE, vocabulary 8,192, trained on the first ``--tokenizer-mb``
MB of the stream and cached), then one full pass over the corpus through the returned
``StreamingBlockDataset``: read + tokenize + pack (concat, ``--block-size``) + windowed shuffle
(``--shuffle-buffer``) + the torch tensors the Trainer would get. The child reports:

- ``stream_peak_rss_mb``: peak resident memory of the pass (``VmHWM``, reset after preparation
  through ``/proc/self/clear_refs``), the figure that must not grow with the corpus;
- ``process_peak_rss_mb``: the child's whole peak (from ``wait4``), preparation and tokenizer
  training included;
- ``tokens_per_s`` (tokens packed into blocks per wall second of the pass), ``mb_per_s``, and counts.

The summary line gives the ratio of the largest to the smallest ``stream_peak_rss_mb`` (goal: within
10 %, ``rss_ratio <= 1.10``). With ``--train-steps N`` it also runs ``lmtune train`` for N steps on
the largest corpus (a tiny GPT-2 from scratch) and reports that run's peak RSS.

    nice python benchmarks/stream_memory.py --workdir /tmp/stream-bench           # 100 MB and 1 GB
    nice python benchmarks/stream_memory.py --sizes-mb 20,200 --workdir /tmp/sb    # quicker
    nice python benchmarks/stream_memory.py --workdir /tmp/stream-bench --train-steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never the Hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the Rust tokenizer's threads, as in a real run

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.10


def emit(figure: str, **fields) -> None:
    print(json.dumps({"bench": "stream_memory", "figure": figure, **fields}), flush=True)


def note(msg: str) -> None:
    print(f"[stream_memory] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# A text-like corpus, generated as a stream


def pseudo_words(n: int, rng) -> list[str]:
    """n distinct pronounceable pseudo-words of one to four syllables (short ones first, the way
    frequent words are short)."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "str", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "y"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        syllables = 1 + min(3, int(rng.exponential(0.4 + len(words) / n)))
        word = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))]
                       + codas[rng.integers(len(codas))] for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def generate_corpus(path: Path, size_mb: int, seed: int, vocab: int = 5000) -> Path:
    """A JSON Lines file of about size_mb MB ({"text": ...} per line), written a document at a time."""
    import numpy as np

    marker = path.with_suffix(".done")
    if path.is_file() and marker.is_file() and marker.read_text() == f"{size_mb} {seed} {vocab}":
        note(f"reusing {path} ({path.stat().st_size / 1e6:.0f} MB)")
        return path
    rng = np.random.default_rng(seed)
    words = pseudo_words(vocab, rng)
    forms = np.array(words + [w + "," for w in words] + [w + "." for w in words], dtype=object)
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.07
    zipf /= zipf.sum()
    target = size_mb * 1_000_000
    written = 0
    start = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", buffering=1 << 22) as fh:
        while written < target:
            lengths = np.clip(rng.lognormal(5.5, 0.6, 256).astype(int), 8, 4000)  # words per document
            ids = rng.choice(vocab, size=int(lengths.sum()), p=zipf)
            punct = rng.choice(3, size=len(ids), p=[0.87, 0.06, 0.07])
            tokens = forms[ids + vocab * punct]
            at = 0
            for n in lengths:
                text = " ".join(tokens[at : at + n].tolist())
                at += n
                line = json.dumps({"text": text[0].upper() + text[1:]}) + "\n"
                fh.write(line)
                written += len(line)
                if written >= target:
                    break
    marker.write_text(f"{size_mb} {seed} {vocab}")
    note(f"generated {path} ({written / 1e6:.0f} MB) in {time.time() - start:.0f} s")
    return path


# --------------------------------------------------------------------------------------------------
# The measured child: prepare_streaming + one whole pass over the corpus


def recipe(train: Path, validation: Path, args, steps: int = 1) -> dict:
    return {
        "task": "clm",
        "name": "stream-bench",
        "tokenizer": {"train": True, "vocab_size": args.vocab_size,
                      "max_training_bytes": args.tokenizer_mb * 1_000_000},
        "model": {"from_scratch": {"n_layer": 2, "n_head": 2, "n_embd": 64}},
        "data": {"train": {"path": str(train), "streaming": True}, "validation": {"path": str(validation)},
                 "block_size": args.block_size, "shuffle_buffer": args.shuffle_buffer, "max_validation_blocks": 64},
        "training": {"max_steps": steps, "batch_size": 8, "precision": "fp32", "save_strategy": "no",
                     "logging_steps": 10, "learning_rate": 1e-3},
    }


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(args) -> None:
    from lmtune.config import validate_recipe
    from lmtune.tasks.clm import prepare_streaming

    cfg = validate_recipe(recipe(Path(args.child), Path(args.validation), args))
    t0 = time.time()
    prepared = prepare_streaming(cfg)
    prepare_s = time.time() - t0
    prepare_peak = _status_mb("VmHWM")
    with open("/proc/self/clear_refs", "w") as fh:  # a new peak from here on
        fh.write("5")
    ds = prepared.train
    ds.epochs = 1  # one whole pass over the corpus (training repeats it forever)
    start_rss = _status_mb("VmRSS")
    blocks = 0
    checksum = 0
    t0 = time.time()
    cpu0 = os.times()
    for item in ds:
        blocks += 1
        if blocks % 4096 == 0:
            checksum = (checksum + int(item["input_ids"][0])) % 1_000_003
    seconds = time.time() - t0
    cpu1 = os.times()
    tokens = blocks * cfg.data.block_size
    size = Path(args.child).stat().st_size
    print(json.dumps({
        "corpus_mb": round(size / 1e6, 1), "documents": ds.documents_tokenized, "blocks": blocks, "tokens": tokens,
        "seconds": round(seconds, 1), "cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 1),
        "tokens_per_s": round(tokens / seconds), "mb_per_s": round(size / 1e6 / seconds, 2),
        "stream_start_rss_mb": round(start_rss, 1), "stream_peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "prepare_peak_rss_mb": round(prepare_peak, 1), "prepare_s": round(prepare_s, 1), "checksum": checksum,
    }), flush=True)


def run_child(corpus: Path, validation: Path, args) -> dict:
    """The measured child's JSON figures, with its whole peak RSS from wait4 (each child its own)."""
    cmd = [sys.executable, __file__, "--child", str(corpus), "--validation", str(validation),
           "--block-size", str(args.block_size), "--shuffle-buffer", str(args.shuffle_buffer),
           "--tokenizer-mb", str(args.tokenizer_mb), "--vocab-size", str(args.vocab_size)]
    env = {**os.environ, "LMTUNE_CACHE": str(Path(args.workdir) / "cache")}
    out_path = Path(args.workdir) / f"child-{corpus.stem}.json"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=sys.stderr, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"the child for {corpus} failed (exit {code})")
    result = json.loads(out_path.read_text().strip().splitlines()[-1])
    result["process_peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return result


def train_run(corpus: Path, validation: Path, args) -> dict:
    import yaml

    work = Path(args.workdir)
    path = work / "stream-train.yaml"
    path.write_text(yaml.safe_dump(recipe(corpus, validation, args, steps=args.train_steps)))
    run = work / "runs" / "stream-train"
    cmd = [sys.executable, "-m", "lmtune", "train", str(path), "--output", str(run), "--overwrite"]
    env = {**os.environ, "LMTUNE_CACHE": str(work / "cache")}
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"lmtune train failed (exit {code})")
    metrics = json.loads((run / "metrics.json").read_text())
    return {"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "steps": metrics["steps"],
            "wall_s": round(time.time() - start, 1), "process_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            **{k: round(v, 1) for k, v in metrics.get("memory", {}).items() if isinstance(v, float)},
            "loss_before": round(metrics["before"]["loss"], 3), "loss_after": round(metrics["after"]["loss"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="100,1000", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--workdir", default=None, help="where corpora, caches and runs go (default: a temp dir)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--shuffle-buffer", type=int, default=8192)
    parser.add_argument("--tokenizer-mb", type=int, default=20, help="train the tokenizer on the first N MB")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-steps", type=int, default=0, help="also `lmtune train` N steps on the largest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--validation", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.workdir is None:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="lmtune-stream-bench-")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes_mb.split(",") if s.strip()]
    validation = generate_corpus(work / "validation.jsonl", 1, seed=args.seed + 999)
    results = []
    for size in sizes:
        corpus = generate_corpus(work / f"corpus-{size}mb.jsonl", size, seed=args.seed + size)
        note(f"streaming {corpus.name} in a fresh process ...")
        result = run_child(corpus, validation, args)
        results.append(result)
        emit("stream", **result)
    peaks = [r["stream_peak_rss_mb"] for r in results]
    summary = {"sizes_mb": sizes, "stream_peak_rss_mb": peaks,
               "process_peak_rss_mb": [r["process_peak_rss_mb"] for r in results],
               "tokens_per_s": [r["tokens_per_s"] for r in results],
               "rss_ratio": round(max(peaks) / min(peaks), 3), "goal_ratio": GOAL_RATIO,
               "goal_met": max(peaks) / min(peaks) <= GOAL_RATIO, "block_size": args.block_size,
               "shuffle_buffer": args.shuffle_buffer}
    if args.train_steps > 0:
        largest = work / f"corpus-{max(sizes)}mb.jsonl"
        note(f"lmtune train, {args.train_steps} steps, streaming {largest.name} ...")
        summary["train"] = train_run(largest, validation, args)
        emit("train", **summary["train"])
    emit("summary", **summary)


if __name__ == "__main__":
    main()
