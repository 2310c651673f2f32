"""Task-independent metrics."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

# math.exp overflows a float above ~709.78.
_MAX_EXP_ARG = 709.0


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy), infinity instead of an overflow error for a hopeless model."""
    if math.isnan(mean_loss):
        return float("nan")
    return math.exp(mean_loss) if mean_loss < _MAX_EXP_ARG else float("inf")


# --- SQuAD exact match / F1 -------------------------------------------------
# Same arithmetic as the official SQuAD v1.1 evaluation script (evaluate-v1.1.py).

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop string.punctuation, drop whole-word a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token F1 over normalised white-space tokens (multiset overlap); 0.0 with no common token."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_over_golds(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(EM, F1) maximised over the gold answers.

    An empty gold list marks a SQuAD v2 unanswerable question; as in the official v2
    script it scores EM = F1 = 1.0 exactly when the prediction normalises to "", else 0.0.
    """
    if not golds:
        score = float(normalize_answer(prediction) == "")
        return score, score
    em = max(squad_exact_match(prediction, g) for g in golds)
    f1 = max(squad_f1(prediction, g) for g in golds)
    return em, f1


def squad_gold_answers(dataset: dict | list) -> dict[str, list[str]]:
    """Map question id -> gold answer texts, from the official SQuAD JSON object or its "data" list."""
    articles = dataset["data"] if isinstance(dataset, dict) else dataset
    gold: dict[str, list[str]] = {}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                gold[qa["id"]] = [answer["text"] for answer in qa["answers"]]
    return gold


def squad_scores(gold: dict[str, list[str]], predictions: dict[str, str]) -> dict:
    """Official-style SQuAD scores over all gold questions.

    Returns {"exact_match", "f1"} as percentages (100 * sum / number of gold questions,
    unrounded) plus "total" (gold questions), "missing" (gold questions without a
    prediction, scored 0) and "unknown_ids" (prediction ids not in gold, ignored).
    """
    if not gold:
        raise ValueError("squad_scores needs at least one gold question")
    em_sum = f1_sum = 0.0
    missing = 0
    for qid, golds in gold.items():
        if qid not in predictions:
            missing += 1
            continue
        em, f1 = _best_over_golds(predictions[qid], golds)
        em_sum += em
        f1_sum += f1
    total = len(gold)
    return {
        "exact_match": 100.0 * em_sum / total,
        "f1": 100.0 * f1_sum / total,
        "total": total,
        "missing": missing,
        "unknown_ids": sum(1 for qid in predictions if qid not in gold),
    }
