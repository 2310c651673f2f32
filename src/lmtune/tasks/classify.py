"""Sequence classification: a text (or a text pair) -> one label, several labels, or a number.

    records (text field, optional second text field, label field)
    -> label space (names from the recipe or the training data; integers index it)
    -> seeded (optionally balanced) subsets
    -> tokens, truncated from the right or the left, padded per batch
    -> AutoModelForSequenceClassification (id2label / label2id in its config), trained in one of three
       modes (training.mode, applied by the pipeline): full; head -- base frozen, new head trained;
       lora -- peft adapters plus the new head
    -> accuracy, macro-F1 and the confusion matrix before and after; the recipe's sample texts
       classified before and after.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune import distributed
from lmtune.config import RecipeConfig, SourceConfig
from lmtune.data.sources import load_records, required_field
from lmtune.errors import InputError
from lmtune.progress import progress
from lmtune.modeling import build_or_load, check_pretrained_head, max_positions
from lmtune.tasks.common import FeatureDataset, Prepared, get_tokenizer, load_model_for

log = logging.getLogger("lmtune")

DEFAULT_MAX_LENGTH = 512  # when neither the tokenizer nor the model states a limit


# --------------------------------------------------------------------------------------------------
# Examples and labels


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    raw_labels: list[Any]
    locations: list[str]


def _text(record: dict, field: str, location: str, where: str) -> str:
    value = required_field(record, field, location, where,
                           "set the field name (data.*.text_field, classify.text_pair_field)")
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{field}' in {location} is a {type(value).__name__}, not text.")
    return value


def read_examples(src: SourceConfig, cfg: RecipeConfig, where: str) -> Examples:
    records = load_records(src, where)
    c = cfg.classify
    texts, pairs, labels, locations = [], [] if c.text_pair_field else None, [], []
    for location, record in records.rows:
        texts.append(_text(record, src.text_field, location, where))
        if pairs is not None:
            pairs.append(_text(record, c.text_pair_field, location, where))
        if c.label_field not in record or record[c.label_field] is None:
            raise InputError(f"{where}: {location} has no label (field '{c.label_field}'); label every example or "
                             "set classify.label_field.")
        labels.append(record[c.label_field])
        locations.append(location)
    log.info(records.stats.summary(where, "examples"))
    return Examples(texts, pairs, labels, locations)


@dataclass
class LabelSpace:
    names: list[str]
    problem_type: str  # single_label | multi_label | regression

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.names)

    def head_config(self) -> dict:
        hf_problem = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                      "regression": "regression"}[self.problem_type]
        return {"num_labels": self.num_labels, "id2label": dict(enumerate(self.names)),
                "label2id": {n: i for i, n in enumerate(self.names)}, "problem_type": hf_problem}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_label_kinds(raw: list[Any], locations: list[str], problem_type: str, where: str) -> None:
    """Labels of one kind: names or integer ids (not both: 0/1 beside 'neg'/'pos' would become four
    classes), a list of them per example for multi_label, a number for regression -- never a mapping,
    and no fractions where classes are meant."""
    kinds: dict[str, tuple[Any, str]] = {}
    for value, location in zip(raw, locations):
        items = value if problem_type == "multi_label" and isinstance(value, list) else [value]
        for item in items:
            if problem_type == "regression":
                ok = isinstance(item, (int, float, str)) and not isinstance(item, bool)
                kind = "number"
            elif isinstance(item, float) and not item.is_integer():
                raise InputError(f"{where}: label {item!r} in {location} is a fraction; classes are names or integer "
                                 "ids (set classify.problem_type: regression to predict a number).")
            else:
                ok = isinstance(item, (str, int, float))  # bool is an int: true/false are ids 1/0
                kind = "name" if isinstance(item, str) else "id"
            if not ok:
                shape = "a list" if isinstance(item, list) else f"a {type(item).__name__}"
                raise InputError(f"{where}: label in {location} is {shape} ({str(item)[:60]}); a label is one name or "
                                 f"id{' (a list of them with classify.problem_type: multi_label)' if isinstance(item, list) else ''}.")
            kinds.setdefault(kind, (item, location))
    if {"name", "id"} <= set(kinds):
        (name, at_name), (number, at_id) = kinds["name"], kinds["id"]
        raise InputError(f"{where}: labels mix names and ids ({name!r} in {at_name}, {number!r} in {at_id}), which "
                         "would count as different classes; write every label one way.")


def label_space(raw: list[Any], cfg: RecipeConfig) -> LabelSpace:
    """Names in id order: the recipe's `classify.labels`, else the training data's labels sorted
    (integers 0..K-1 named '0'..'K-1')."""
    c = cfg.classify
    if c.problem_type == "regression":
        return LabelSpace([c.labels[0] if c.labels else "score"], "regression")
    if c.labels:
        return LabelSpace(list(c.labels), c.problem_type)
    values = [v for item in raw for v in (item if c.problem_type == "multi_label" and isinstance(item, list)
                                          else [item])]
    if values and all(_is_int(v) for v in values):
        return LabelSpace([str(i) for i in range(max(values) + 1)], c.problem_type)
    return LabelSpace(sorted({str(v) for v in values}), c.problem_type)


def encode_label(value: Any, space: LabelSpace, location: str, where: str):
    """A label as the model's loss wants it: an id, a multi-hot vector, or a float."""
    if space.problem_type == "regression":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: label {value!r} in {location} is not a number, as regression needs.") from None
        if not math.isfinite(number):
            raise InputError(f"{where}: label {value!r} in {location} is not a finite number.")
        return number
    if space.problem_type == "multi_label":
        items = value if isinstance(value, list) else [value]
        vector = [0.0] * len(space.names)
        for item in items:
            vector[_label_id(item, space, location, where)] = 1.0
        return vector
    return _label_id(value, space, location, where)


def _label_id(value: Any, space: LabelSpace, location: str, where: str) -> int:
    if _is_int(value):
        if 0 <= value < len(space.names):
            return value
        raise InputError(f"{where}: label {value} in {location} is out of range: there are {len(space.names)} labels "
                         f"({', '.join(space.names[:10])}); fix the label or classify.labels.")
    if str(value) in space.names:
        return space.names.index(str(value))
    raise InputError(f"{where}: label {value!r} in {location} is not one of {', '.join(space.names[:10])}; fix the "
                     "label or list it in classify.labels.")


def check_label_variety(label_ids: list, space: LabelSpace, where: str) -> None:
    if space.problem_type != "single_label":
        return
    seen = sorted(set(label_ids))
    if len(seen) < 2:
        name = space.names[seen[0]] if seen else "(none)"
        raise InputError(f"{where}: every example has the label '{name}'; a classifier needs at least two classes "
                         "-- check the label field and any match filter.")


def subset_indices(label_ids: list, limit: int | None, seed: int, balanced: bool) -> np.ndarray:
    """At most `limit` examples chosen at random with `seed`; balanced: the same number from every
    label (as the article's 1,000-review IMDB subsets). Kept in data order."""
    n = len(label_ids)
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if not balanced or not all(isinstance(x, int) for x in label_ids):
        return np.sort(rng.permutation(n)[:limit])
    ids = np.asarray(label_ids)
    classes = np.unique(ids)
    per_class, extra = divmod(limit, len(classes))
    chosen = []
    for k, label in enumerate(classes):
        members = np.flatnonzero(ids == label)
        take = min(len(members), per_class + (1 if k < extra else 0))
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen))


# --------------------------------------------------------------------------------------------------
# Tokens


def resolve_max_length(tokenizer, config, requested: int | None) -> int:
    limits = [v for v in (tokenizer.model_max_length, max_positions(config)) if isinstance(v, int) and 0 < v < 10**6]
    limit = min(limits) if limits else DEFAULT_MAX_LENGTH
    if requested is not None and requested > limit:
        raise InputError(f"classify.max_length {requested} is larger than the model's context of {limit} tokens; set "
                         f"it to {limit} or less.")
    return requested or limit


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, side: str) -> list[dict]:
    """Unpadded token ids per example (padding happens per batch)."""
    tokenizer.truncation_side = side
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]




@dataclass
class Split:
    features: list[dict]
    labels: list  # encoded
    texts: list[str]


# --------------------------------------------------------------------------------------------------
# The task's pieces for the pipeline (run.py)


def prepare(cfg: RecipeConfig) -> Prepared:
    from transformers import AutoConfig, DataCollatorWithPadding

    from lmtune.hub import from_pretrained_or_explain

    check_pretrained_head(cfg.model, "classify")
    c = cfg.classify
    train = read_examples(cfg.data.train, cfg, "data.train")
    if cfg.data.validation is not None:
        val = read_examples(cfg.data.validation, cfg, "data.validation")
    else:
        from lmtune.data.sources import split_train_validation

        order = list(range(len(train.texts)))
        train_idx, val_idx = split_train_validation(order, cfg.data.validation_fraction, cfg.data.split_seed)
        train, val = _take(train, train_idx), _take(train, val_idx)
    for split, where in ((train, "data.train"), (val, "data.validation")):
        check_label_kinds(split.raw_labels, split.locations, c.problem_type, where)
    space = label_space(train.raw_labels, cfg)
    train_labels = [encode_label(v, space, loc, "data.train") for v, loc in zip(train.raw_labels, train.locations)]
    val_labels = [encode_label(v, space, loc, "data.validation") for v, loc in zip(val.raw_labels, val.locations)]
    check_label_variety(train_labels, space, "data.train")

    keep = subset_indices(train_labels, c.max_train_examples, cfg.data.split_seed, c.balanced)
    train, train_labels = _take(train, keep), [train_labels[i] for i in keep]
    keep = subset_indices(val_labels, c.max_validation_examples, cfg.data.split_seed + 1, c.balanced)
    val, val_labels = _take(val, keep), [val_labels[i] for i in keep]

    tokenizer = get_tokenizer(cfg, _corpus(train.texts + (train.pairs or [])) if cfg.tokenizer.train else None)
    model_config = None  # a model from scratch is sized to max_length; a pretrained one limits it
    if cfg.model.name_or_path is not None:
        model_config = from_pretrained_or_explain(AutoConfig.from_pretrained, cfg.model.name_or_path, what="model")
    max_length = resolve_max_length(tokenizer, model_config, c.max_length)
    train_split = Split(tokenize(tokenizer, train.texts, train.pairs, max_length, c.truncation_side), train_labels,
                        train.texts)
    val_split = Split(tokenize(tokenizer, val.texts, val.pairs, max_length, c.truncation_side), val_labels, val.texts)
    info = {
        "labels": space.names,
        "problem_type": space.problem_type,
        "max_length": max_length,
        "truncation_side": c.truncation_side,
        "train_examples": len(train_labels),
        "validation_examples": len(val_labels),
        "train_label_counts": _counts(train_labels, space),
        "validation_label_counts": _counts(val_labels, space),
        "train_truncated": sum(len(f["input_ids"]) >= max_length for f in train_split.features),
    }
    log.info("labels %s; %d training and %d validation examples, at most %d tokens (truncated from the %s)",
             space.names, len(train_labels), len(val_labels), max_length, c.truncation_side)
    return Prepared(tokenizer, FeatureDataset(train_split.features, train_labels), val_split, info,
                    eval_dataset=FeatureDataset(val_split.features, val_labels),
                    collator=DataCollatorWithPadding(tokenizer),
                    trainer_kwargs={"compute_metrics": _trainer_metrics(space)}, extra={"label_space": space})


def _corpus(texts: list[str]):
    from lmtune.data.sources import Corpus, SourceStats, fingerprint_texts

    return Corpus(texts, SourceStats(documents=len(texts)), fingerprint_texts(texts))


def _take(ex: Examples, idx) -> Examples:
    idx = list(idx)
    return Examples([ex.texts[i] for i in idx], [ex.pairs[i] for i in idx] if ex.pairs is not None else None,
                    [ex.raw_labels[i] for i in idx], [ex.locations[i] for i in idx])


def _counts(labels: list, space: LabelSpace) -> dict | None:
    if space.problem_type == "regression":
        return None
    if space.problem_type == "multi_label":
        return dict(zip(space.names, np.asarray(labels).sum(axis=0).astype(int).tolist()))
    return {space.names[k]: int(v) for k, v in zip(*np.unique(labels, return_counts=True))}


def build_model(cfg: RecipeConfig, tokenizer, prepared: Prepared):
    space: LabelSpace = prepared.extra["label_space"]
    model = build_or_load(cfg.model, tokenizer, prepared.info["max_length"], cfg.training.seed, "classify",
                          **space.head_config())
    if model.config.pad_token_id is None or model.config.pad_token_id != tokenizer.pad_token_id:
        # GPT-2-style classifiers find each text's last token by the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------------
# Metrics


def confusion_matrix(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Rows: the true label; columns: the predicted one."""
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def f1_per_class(matrix: np.ndarray) -> np.ndarray:
    tp = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    denom = predicted + actual
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def classification_metrics(logits: np.ndarray, labels: list, space: LabelSpace) -> dict:
    if space.problem_type == "regression":
        pred, true = logits.reshape(-1), np.asarray(labels, dtype=float)
        err = pred - true
        pearson = float(np.corrcoef(pred, true)[0, 1]) if len(true) > 1 and pred.std() > 0 and true.std() > 0 else 0.0
        return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err))), "pearson": pearson}
    if space.problem_type == "multi_label":
        true = np.asarray(labels) > 0.5
        pred = logits > 0  # sigmoid > 0.5
        tp, fp, fn = (pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)
        per_label = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=(2 * tp + fp + fn) > 0)
        micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
        return {"subset_accuracy": float(np.mean((pred == true).all(axis=1))),
                "f1_micro": float(2 * tp.sum() / micro_denom) if micro_denom else 0.0,
                "f1_macro": float(per_label.mean())}
    true = np.asarray(labels, dtype=np.int64)
    pred = logits.argmax(axis=1)
    matrix = confusion_matrix(true, pred, len(space.names))
    return {"accuracy": float(np.mean(pred == true)), "f1": float(f1_per_class(matrix).mean()),
            "confusion_matrix": matrix.tolist()}


def _trainer_metrics(space: LabelSpace):
    """compute_metrics for the Trainer's periodic evaluation (and load_best_model_at_end)."""

    def compute(eval_prediction) -> dict:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        scores = classification_metrics(np.asarray(logits, dtype=np.float32), eval_prediction.label_ids.tolist(), space)
        return {k: v for k, v in scores.items() if not isinstance(v, list)}

    return compute


@torch.no_grad()
def example_logits(model, tokenizer, features: list[dict], batch_size: int = 32) -> np.ndarray:
    """Logits per example, [n, num_labels]. With several processes each runs its share and all get
    every example's logits, each once."""
    return distributed.map_sharded(
        lambda idx: _example_logits(model, tokenizer, [features[i] for i in idx], batch_size), len(features))


@torch.no_grad()
def _example_logits(model, tokenizer, features: list[dict], batch_size: int) -> np.ndarray:
    """Batches of similar length so little is padded."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(features), model.config.num_labels), dtype=np.float32)
    order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")
    for b in progress(range(0, len(order), batch_size), "evaluating", unit="batches"):
        idx = order[b : b + batch_size]
        batch = tokenizer.pad([features[i] for i in idx], return_tensors="pt")
        out[idx] = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def evaluate(model, tokenizer, split: Split, space: LabelSpace, batch_size: int = 32) -> dict:
    return {**classification_metrics(example_logits(model, tokenizer, split.features, batch_size), split.labels, space),
            "examples": len(split.labels)}


def evaluate_run(model, prepared: Prepared, cfg: RecipeConfig) -> dict:
    batch = cfg.training.eval_batch_size or cfg.training.batch_size
    metrics = evaluate(model, prepared.tokenizer, prepared.validation, prepared.extra["label_space"], batch)
    if cfg.classify.samples:
        metrics["samples"] = samples(model, prepared.tokenizer, cfg)
    return metrics


def headline(metrics: dict) -> str:
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['f1']:.4f} on {metrics['examples']} examples"
    if "f1_micro" in metrics:
        return (f"subset accuracy {metrics['subset_accuracy']:.4f}, micro-F1 {metrics['f1_micro']:.4f} on "
                f"{metrics['examples']} examples")
    return f"MSE {metrics['mse']:.4f}, Pearson {metrics['pearson']:.4f} on {metrics['examples']} examples"


# --------------------------------------------------------------------------------------------------
# Prediction


def classify_texts(model, tokenizer, texts: list[str], pairs: list[str] | None = None,
                   max_length: int | None = None, truncation_side: str = "right") -> list[dict]:
    """Label and probability per text (multi-label: every label over 0.5; regression: the value)."""
    if not texts:
        return []
    length = max_length or resolve_max_length(tokenizer, model.config, None)
    logits = example_logits(model, tokenizer, tokenize(tokenizer, texts, pairs, length, truncation_side))
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    problem = model.config.problem_type
    results = []
    for text, row in zip(texts, logits):
        if problem == "regression":
            results.append({"text": text, "value": float(row[0])})
        elif problem == "multi_label_classification":
            probs = 1 / (1 + np.exp(-row.astype(np.float64)))
            results.append({"text": text, "labels": [n for n, p in zip(names, probs) if p > 0.5],
                            "scores": {n: round(float(p), 6) for n, p in zip(names, probs)}})
        else:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            best = int(probs.argmax())
            results.append({"text": text, "label": names[best], "score": round(float(probs[best]), 6),
                            "scores": {n: round(float(p), 6) for n, p in zip(names, probs)}})
    return results


def samples(model, tokenizer, cfg: RecipeConfig) -> list[dict]:
    return classify_texts(model, tokenizer, cfg.classify.samples, max_length=cfg.classify.max_length,
                          truncation_side=cfg.classify.truncation_side)


def load_for_inference(model_dir: str | Path):
    return load_model_for("classify", model_dir)
