"""Extractive question answering (SQuAD), the QA chapter of the Hugging Face course as one task.

    records (official nested SQuAD JSON, or flat id/title/context/question/answers rows)
    -> examples (answer_start checked against the text; bad ones counted and skipped)
    -> windows: question + a slice of the context, `max_length` tokens, consecutive slices sharing
       `stride` tokens (the tokenizer's overflowing tokens, truncation of the context only)
    -> training labels: the answer's first and last token in the window, or (0, 0) -- the CLS
       token -- when the answer is not wholly inside it
    -> AutoModelForQuestionAnswering through the Trainer
    -> evaluation: start/end logits of every window, n-best post-processing over all windows of an
       example (tasks/qa_postprocess.py), exact match / F1 exactly as the official SQuAD script.

Windows are tokenized without padding and padded per batch: SQuAD contexts are mostly far shorter
than 384 tokens, so fixed-length padding (as in the chapter) would spend most of the compute on pads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune import distributed
from lmtune.config import QAConfig, RecipeConfig, SourceConfig
from lmtune.data.sources import Records, SourceStats, fingerprint_texts, load_records
from lmtune.errors import InputError
from lmtune.progress import progress
from lmtune.metrics import squad_scores
from lmtune.modeling import build_or_load, check_pretrained_head, check_sequence_fits
from lmtune.tasks.common import FeatureDataset, Prepared, get_tokenizer, load_model_for, seeded_subset
from lmtune.tasks.qa_postprocess import NO_OFFSET, postprocess_predictions

log = logging.getLogger("lmtune")


# --------------------------------------------------------------------------------------------------
# Examples from records


@dataclass
class QAExample:
    id: str
    title: str
    context: str
    question: str
    answers: list[str]  # every gold answer text (SQuAD dev has up to 6); empty: unanswerable (v2)
    answer_starts: list[int]


def _answers_of(value: Any, location: str, where: str) -> tuple[list[str], list[int]]:
    """Answers as HF datasets store them ({text: [...], answer_start: [...]}) or as the official JSON
    does ([{text, answer_start}, ...])."""
    if isinstance(value, dict) and "text" in value and "answer_start" in value:
        texts, starts = value["text"], value["answer_start"]
        texts = [texts] if isinstance(texts, str) else list(texts) if isinstance(texts, list) else [None]
        starts = [starts] if isinstance(starts, int) else list(starts) if isinstance(starts, list) else [None]
    elif isinstance(value, list) and all(isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
        texts, starts = [a["text"] for a in value], [a["answer_start"] for a in value]
    else:
        raise InputError(f"{where}: 'answers' in {location} must be {{text: [...], answer_start: [...]}} or a list "
                         "of {text, answer_start}; fix that record.")
    if len(texts) != len(starts) or not all(isinstance(t, str) for t in texts) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in starts):
        raise InputError(f"{where}: 'answers' in {location} needs as many integer answer_start values as texts; "
                         "fix that record.")
    return texts, starts


def _example(record: dict, location: str, where: str, title: str = "") -> QAExample:
    missing = [f for f in ("id", "context", "question", "answers") if f not in record]
    if missing:
        fields = ", ".join(list(record)[:12]) or "(none)"
        raise InputError(f"{where}: {location} has no field {', '.join(repr(m) for m in missing)} (fields: "
                         f"{fields}); QA records need id, context, question and answers.")
    context, question = record["context"], record["question"]
    if not isinstance(context, str) or not context.strip():
        raise InputError(f"{where}: {location} (id {record['id']}) has an empty context; remove it or fill it in.")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: {location} (id {record['id']}) has an empty question; remove it or fill it in.")
    texts, starts = _answers_of(record["answers"], location, where)
    return QAExample(str(record["id"]), str(record.get("title") or title), context, question, texts, starts)


def examples_from_records(records: Records, where: str) -> list[QAExample]:
    """Flat rows as they are; an official SQuAD article ({title, paragraphs: [{context, qas}]})
    becomes one example per question."""
    out: list[QAExample] = []
    for location, record in records.rows:
        if not isinstance(record, dict):
            raise InputError(f"{where}: {location} is a {type(record).__name__}, not a QA record (an object with id, "
                             "context, question and answers); fix that record.")
        if "paragraphs" not in record:
            out.append(_example(record, location, where))
            continue
        paragraphs = record["paragraphs"]
        if not isinstance(paragraphs, list) or not all(
                isinstance(p, dict) and isinstance(p.get("qas", []), list)
                and all(isinstance(qa, dict) for qa in p.get("qas", [])) for p in paragraphs):
            raise InputError(f"{where}: {location}: 'paragraphs' must be a list of {{context, qas: [...]}} objects, "
                             "as in the official SQuAD JSON; fix that record.")
        for p, paragraph in enumerate(paragraphs):
            for q, qa in enumerate(paragraph.get("qas", [])):
                flat = {"context": paragraph.get("context"), **qa}
                if qa.get("is_impossible"):
                    flat["answers"] = []
                out.append(_example(flat, f"{location}, paragraph {p}, question {q}", where,
                                    title=str(record.get("title", ""))))
    return out


def answer_is_at_start(example: QAExample) -> bool:
    return all(example.context[s : s + len(t)] == t for t, s in zip(example.answers, example.answer_starts))


def drop_misplaced_answers(examples: list[QAExample], max_bad_fraction: float, where: str) -> list[QAExample]:
    """Examples whose answer_start does not point at the answer text are counted and skipped; above
    `max_bad_fraction` of the split the offsets are probably of another kind (bytes, tokens) and the
    data is refused."""
    good = [e for e in examples if answer_is_at_start(e)]
    bad = len(examples) - len(good)
    if bad:
        first = next(e for e in examples if not answer_is_at_start(e))
        share = bad / len(examples)
        if share > max_bad_fraction:
            raise InputError(
                f"{where}: in {bad} of {len(examples)} examples ({share:.1%}; first: id {first.id}) answer_start "
                "does not point at the answer text; answer_start must be a character offset into the context "
                "(raise qa.max_bad_answer_fraction to skip them).")
        log.warning("%s: skipped %d of %d examples whose answer_start does not point at the answer text "
                    "(first: id %s)", where, bad, len(examples), first.id)
    return good


def load_examples(src: SourceConfig, cfg: RecipeConfig, where: str) -> tuple[list[QAExample], SourceStats]:
    records = load_records(src, where)
    examples = drop_misplaced_answers(examples_from_records(records, where), cfg.qa.max_bad_answer_fraction, where)
    if not cfg.qa.version_2 and any(not e.answers for e in examples):
        n = sum(not e.answers for e in examples)
        raise InputError(f"{where}: {n} questions have no answer; set qa.version_2: true for SQuAD v2-style data.")
    if not examples:
        raise InputError(f"{where}: no usable QA examples; check the data.")
    return examples, records.stats


def split_by_group(examples: list[QAExample], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out whole articles (by title; by context when untitled): windows of one paragraph on both
    sides would measure memory, not reading."""
    keys = sorted({e.title or e.context for e in examples})
    if len(keys) < 2:
        raise InputError("data.train has a single article, which cannot be split into training and validation; "
                         "give data.validation.")
    rng = np.random.default_rng(seed)
    n_val = min(len(keys) - 1, max(1, round(len(keys) * fraction)))
    held = {keys[i] for i in rng.permutation(len(keys))[:n_val]}
    train = [e for e in examples if (e.title or e.context) not in held]
    val = [e for e in examples if (e.title or e.context) in held]
    return train, val


# --------------------------------------------------------------------------------------------------
# Windows and labels


def tokenize_windows(tokenizer, examples: list[QAExample], max_length: int, stride: int):
    """Question + context windows without padding, with offset mappings and the window -> example map.
    Questions are stripped (some SQuAD questions start with spaces that waste tokens)."""
    check_questions_fit(tokenizer, examples, max_length, stride)
    pad_right = tokenizer.padding_side == "right"
    return tokenizer(
        [e.question.strip() for e in examples] if pad_right else [e.context for e in examples],
        [e.context for e in examples] if pad_right else [e.question.strip() for e in examples],
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def check_questions_fit(tokenizer, examples: list[QAExample], max_length: int, stride: int) -> None:
    """Each window must keep more than `stride` context tokens beside the question, or the tokenizer
    cannot slide over the context."""
    special = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(ids) for ids in tokenizer([e.question.strip() for e in examples], add_special_tokens=False)["input_ids"]]
    for example, n in zip(examples, lengths):
        if n + special + stride >= max_length:
            raise InputError(
                f"question {example.id!r} is {n} tokens long, leaving no room for the context in windows of "
                f"qa.max_length {max_length} with qa.stride {stride}; shorten the question or raise qa.max_length.")


def context_mask(encoding, i: int, context_sequence: int = 1) -> np.ndarray:
    return np.array([s == context_sequence for s in encoding.sequence_ids(i)], dtype=bool)


def window_labels(offsets: np.ndarray, in_context: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of the answer's first and last token in a window, or (0, 0) when the answer
    (characters start_char..end_char) is not wholly inside the window's slice of the context."""
    ctx = np.flatnonzero(in_context)
    if len(ctx) == 0 or offsets[ctx[0], 0] > start_char or offsets[ctx[-1], 1] < end_char:
        return 0, 0
    starts, ends = offsets[ctx, 0], offsets[ctx, 1]
    start = ctx[np.flatnonzero(starts <= start_char)[-1]]
    end = ctx[np.flatnonzero(ends >= end_char)[0]]
    return int(start), int(end)


def training_features(tokenizer, examples: list[QAExample], max_length: int, stride: int) -> list[dict]:
    """One feature per window, labelled from the example's first answer (SQuAD train has one)."""
    enc = tokenize_windows(tokenizer, examples, max_length, stride)
    context_sequence = 1 if tokenizer.padding_side == "right" else 0
    features = []
    for i, sample in enumerate(enc["overflow_to_sample_mapping"]):
        example = examples[sample]
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64)
        if example.answers:
            start_char = example.answer_starts[0]
            end_char = start_char + len(example.answers[0])
            start, end = window_labels(offsets, context_mask(enc, i, context_sequence), start_char, end_char)
        else:
            start, end = 0, 0
        feature = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        feature.update(start_positions=start, end_positions=end)
        features.append(feature)
    return features


@dataclass
class EvalFeatures:
    """Windows for evaluation: model inputs plus what post-processing needs to map tokens back to text."""

    inputs: list[dict]  # input_ids, attention_mask (token_type_ids), unpadded
    offsets: np.ndarray  # [n_windows, max_length, 2]; -1 outside the context
    example_index: np.ndarray  # [n_windows] -> examples
    examples: list[QAExample]


def evaluation_features(tokenizer, examples: list[QAExample], max_length: int, stride: int) -> EvalFeatures:
    enc = tokenize_windows(tokenizer, examples, max_length, stride)
    context_sequence = 1 if tokenizer.padding_side == "right" else 0
    n = len(enc["input_ids"])
    offsets = np.full((n, max_length, 2), NO_OFFSET, dtype=np.int64)
    inputs = []
    for i in range(n):
        mask = context_mask(enc, i, context_sequence)
        window = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        offsets[i, : len(window)][mask] = window[mask]
        inputs.append({k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    return EvalFeatures(inputs, offsets, np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64), examples)




# --------------------------------------------------------------------------------------------------
# The task's pieces for the pipeline (run.py)


def prepare(cfg: RecipeConfig) -> Prepared:
    from transformers import DataCollatorWithPadding

    check_pretrained_head(cfg.model, "qa")
    train, stats = load_examples(cfg.data.train, cfg, "data.train")
    log.info(stats.summary("data.train", "records") + f", {len(train):,} questions")
    if cfg.data.validation is not None:
        val, vstats = load_examples(cfg.data.validation, cfg, "data.validation")
        log.info(vstats.summary("data.validation", "records") + f", {len(val):,} questions")
    else:
        train, val = split_by_group(train, cfg.data.validation_fraction, cfg.data.split_seed)
        log.info("held out %d questions of %d articles for validation (seed %d)", len(val),
                 len({e.title or e.context for e in val}), cfg.data.split_seed)
    train = _subset(train, cfg.qa.max_train_examples, cfg.training.seed)
    val = _subset(val, cfg.qa.max_validation_examples, cfg.training.seed)

    tokenizer = get_tokenizer(cfg, _tokenizer_corpus(train) if cfg.tokenizer.train else None)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"tokenizer of '{cfg.model.tokenizer or cfg.model.name_or_path}' is not a fast "
                         "tokenizer; QA needs character offsets, which only fast tokenizers give.")
    q = cfg.qa
    train_features = training_features(tokenizer, train, q.max_length, q.stride)
    eval_features = evaluation_features(tokenizer, val, q.max_length, q.stride)
    outside = sum(f["start_positions"] == 0 for f in train_features)
    info = {
        "train_examples": len(train),
        "train_windows": len(train_features),
        "train_windows_without_answer": outside,
        "validation_examples": len(val),
        "validation_windows": len(eval_features.inputs),
        "validation_articles": len({e.title or e.context for e in val}),
    }
    log.info("QA windows: %d training (%d without the answer) from %d questions; %d for evaluation from %d",
             len(train_features), outside, len(train), len(eval_features.inputs), len(val))
    return Prepared(tokenizer, FeatureDataset(train_features), eval_features, info,
                    collator=DataCollatorWithPadding(tokenizer))


def _subset(examples: list[QAExample], limit: int | None, seed: int) -> list[QAExample]:
    return [examples[i] for i in seeded_subset(np.arange(len(examples)), limit, seed)]


def _tokenizer_corpus(examples: list[QAExample]):
    from lmtune.data.sources import Corpus

    texts = list(dict.fromkeys(e.context for e in examples)) + [e.question for e in examples]
    return Corpus(texts, SourceStats(documents=len(texts)), fingerprint_texts(texts))


def build_model(cfg: RecipeConfig, tokenizer, prepared: Prepared | None = None):
    model = build_or_load(cfg.model, tokenizer, cfg.qa.max_length, cfg.training.seed, "qa")
    check_sequence_fits(model.config, cfg.qa.max_length, "qa.max_length")
    return model


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def window_logits(model, tokenizer, inputs: list[dict], max_length: int, batch_size: int = 32):
    """Start and end logits of every window, [n_windows, max_length] (padding: -inf). With several
    processes each runs its share and all get every window's logits, each window once."""
    return distributed.map_sharded(
        lambda idx: _window_logits(model, tokenizer, [inputs[i] for i in idx], max_length, batch_size), len(inputs))


@torch.no_grad()
def _window_logits(model, tokenizer, inputs: list[dict], max_length: int, batch_size: int):
    """Windows are run in order of length so each batch pads little."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(inputs)
    starts = np.full((n, max_length), -np.inf, dtype=np.float32)
    ends = np.full((n, max_length), -np.inf, dtype=np.float32)
    order = np.argsort([len(f["input_ids"]) for f in inputs], kind="stable")
    for b in progress(range(0, n, batch_size), "evaluating", unit="batches"):
        idx = order[b : b + batch_size]
        batch = tokenizer.pad([inputs[i] for i in idx], return_tensors="pt")
        out = model(**{k: v.to(device) for k, v in batch.items()})
        width = batch["input_ids"].shape[1]
        starts[idx, :width] = out.start_logits.float().cpu().numpy()
        ends[idx, :width] = out.end_logits.float().cpu().numpy()
    model.train(was_training)
    return starts, ends


def answer_examples(model, tokenizer, features: EvalFeatures, q: QAConfig, batch_size: int = 32) -> list[dict]:
    starts, ends = window_logits(model, tokenizer, features.inputs, q.max_length, batch_size)
    return postprocess_predictions(
        starts, ends, features.offsets, features.example_index, [e.context for e in features.examples],
        n_best=q.n_best, max_answer_length=q.max_answer_length,
        null_score_threshold=q.null_score_threshold if q.version_2 else None)


def evaluate(model, tokenizer, features: EvalFeatures, cfg: RecipeConfig, batch_size: int = 32) -> dict:
    answers = answer_examples(model, tokenizer, features, cfg.qa, batch_size)
    gold = {e.id: e.answers for e in features.examples}
    predictions = {e.id: a["text"] for e, a in zip(features.examples, answers)}
    scores = squad_scores(gold, predictions)
    return {"exact_match": scores["exact_match"], "f1": scores["f1"], "questions": scores["total"],
            "windows": len(features.inputs)}


def evaluate_run(model, prepared: Prepared, cfg: RecipeConfig) -> dict:
    return evaluate(model, prepared.tokenizer, prepared.validation, cfg,
                    cfg.training.eval_batch_size or cfg.training.batch_size)


def headline(metrics: dict) -> str:
    return f"exact match {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} on {metrics['questions']} questions"


# --------------------------------------------------------------------------------------------------
# Prediction


def answer_questions(model, tokenizer, pairs: list[dict], q: QAConfig, batch_size: int = 32) -> list[dict]:
    """{question, context} pairs -> {question, answer, score, start, end}; score is start + end logit."""
    examples = []
    for i, pair in enumerate(pairs):
        question, context = pair.get("question"), pair.get("context")
        if not isinstance(question, str) or not question.strip() or not isinstance(context, str) or not context.strip():
            raise InputError(f"input {i + 1} needs a non-empty question and context; got {pair!r}.")
        examples.append(QAExample(str(i), "", context, question, [], []))
    features = evaluation_features(tokenizer, examples, q.max_length, q.stride)
    answers = answer_examples(model, tokenizer, features, q, batch_size)
    return [{"question": p["question"], "answer": a["text"], "score": a["score"], "start": a["start_char"],
             "end": a["end_char"]} for p, a in zip(pairs, answers)]


def samples(model, tokenizer, cfg: RecipeConfig) -> list[dict]:
    pairs = [s.model_dump() for s in cfg.qa.samples]
    return answer_questions(model, tokenizer, pairs, cfg.qa) if pairs else []


def load_for_inference(model_dir: str | Path):
    return load_model_for("qa", model_dir)
