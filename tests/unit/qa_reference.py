"""The QA chapter's post-processing written as plain loops: the yardstick the vectorised
`lmtune.tasks.qa_postprocess` is tested and benchmarked against.

Like the chapter, it collects every candidate of an example and takes `max` of them. Ranking and
ties follow the conventions in `lmtune.tasks.qa_postprocess`'s docstring: positions ranked by a
stable argsort of -logits (the chapter's `np.argsort(x)[-1:-n_best-1:-1]` puts equal logits the
other way round), candidates collected start-rank-major then end-rank-minor, features in input
order, and `max` keeps the first of equal scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reference_postprocess(start_logits, end_logits, offsets: Sequence[Sequence[tuple[int, int] | None]],
                          feature_example_index: Sequence[int], contexts: Sequence[str],
                          n_best: int = 20, max_answer_length: int = 30,
                          null_score_threshold: float | None = None) -> list[dict]:
    features_per_example: dict[int, list[int]] = {}
    for feature_index, example_index in enumerate(feature_example_index):
        features_per_example.setdefault(int(example_index), []).append(feature_index)

    predictions = []
    for example_index, context in enumerate(contexts):
        answers = []
        min_null_score = None
        for feature_index in features_per_example.get(example_index, []):
            start_logit = start_logits[feature_index]
            end_logit = end_logits[feature_index]
            feature_offsets = offsets[feature_index]

            null_score = start_logit[0] + end_logit[0]
            if min_null_score is None or null_score < min_null_score:
                min_null_score = null_score

            start_indexes = np.argsort(-start_logit, kind="stable")[:n_best].tolist()
            end_indexes = np.argsort(-end_logit, kind="stable")[:n_best].tolist()
            for start_index in start_indexes:
                for end_index in end_indexes:
                    # Skip answers that are not fully in the context
                    if feature_offsets[start_index] is None or feature_offsets[end_index] is None:
                        continue
                    # Skip answers with a length that is either < 0 or > max_answer_length
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    start_char = feature_offsets[start_index][0]
                    end_char = feature_offsets[end_index][1]
                    answers.append({"text": context[start_char:end_char],
                                    "score": start_logit[start_index] + end_logit[end_index],
                                    "start_char": int(start_char), "end_char": int(end_char)})

        best = max(answers, key=lambda x: x["score"]) if answers else None  # first of equal maxima
        if best is not None and null_score_threshold is not None:
            if float(min_null_score) - float(best["score"]) > null_score_threshold:
                best = None
        if best is None:
            predictions.append({"text": "", "score": None, "start_char": -1, "end_char": -1})
        else:
            predictions.append({**best, "score": float(best["score"])})
    return predictions
