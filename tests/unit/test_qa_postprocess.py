"""The vectorised QA post-processing gives the chapter's loop answers, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtune.tasks.qa_postprocess import (
    _top_k_indices,
    best_spans,
    offsets_to_array,
    postprocess_predictions,
)

from .qa_reference import reference_postprocess

WORDS = "alpha beta gamma delta river stone cloud seven north light paper glass".split()


def make_case(rng: np.random.Generator, n_examples: int, seq_len: int, integer_logits: bool,
              dtype: type = np.float64):
    """Random examples cut into 0-3 shuffled windows: CLS + question tokens first, then a slice of
    the context's words (one token per word), then padding. Some windows push their logits onto
    non-context tokens so that no pair among the top n_best is valid."""
    contexts, offset_lists, fei, start_rows, end_rows = [], [], [], [], []
    for ex in range(n_examples):
        words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 3 * seq_len)))]
        contexts.append(" ".join(words))
        spans, pos = [], 0
        for w in words:
            spans.append((pos, pos + len(w)))
            pos += len(w) + 1
        n_windows = int(rng.choice([0, 1, 1, 2, 3]))
        word_start = 0
        for _ in range(n_windows):
            prefix = int(rng.integers(1, seq_len // 2))
            capacity = int(rng.integers(0, seq_len - prefix + 1))
            window = spans[word_start:word_start + capacity]
            offs: list[tuple[int, int] | None] = [None] * prefix + list(window)
            offs += [None] * (seq_len - len(offs))
            word_start = min(word_start + max(1, capacity // 2), len(spans))
            s = rng.normal(size=seq_len) * 3
            e = rng.normal(size=seq_len) * 3
            if integer_logits:
                s, e = np.round(s), np.round(e)
            if rng.random() < 0.25:  # hostile window: the best logits sit outside the context
                outside = np.array([o is None for o in offs])
                s[outside] += 50
                e[outside] += 50
            if rng.random() < 0.15:  # masked logits, some valid spans scoring -inf
                s[rng.random(seq_len) < 0.4] = -np.inf
                e[rng.random(seq_len) < 0.4] = -np.inf
            offset_lists.append(offs)
            fei.append(ex)
            start_rows.append(s)
            end_rows.append(e)
    perm = rng.permutation(len(fei))
    start = np.array(start_rows, dtype=dtype).reshape(-1, seq_len)[perm]
    end = np.array(end_rows, dtype=dtype).reshape(-1, seq_len)[perm]
    offset_lists = [offset_lists[i] for i in perm]
    fei_arr = np.array(fei, dtype=np.int64)[perm]
    return start, end, offset_lists, fei_arr, contexts


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g["text"], g["start_char"], g["end_char"]) == (w["text"], w["start_char"], w["end_char"]), i
        if w["score"] is None:
            assert g["score"] is None, i
        else:
            assert g["score"] == pytest.approx(w["score"], abs=1e-6), i


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), integer_logits=st.booleans(), n_best=st.integers(1, 25),
       max_answer_length=st.integers(1, 12), float32=st.booleans(),
       threshold=st.one_of(st.none(), st.floats(-6, 6)))
def test_matches_reference_on_random_windows(seed, integer_logits, n_best, max_answer_length, float32,
                                             threshold):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(4, 40))
    start, end, offset_lists, fei, contexts = make_case(
        rng, int(rng.integers(1, 7)), seq_len, integer_logits, np.float32 if float32 else np.float64)
    want = reference_postprocess(start, end, offset_lists, fei, contexts, n_best=n_best,
                                 max_answer_length=max_answer_length, null_score_threshold=threshold)
    got = postprocess_predictions(start, end, offsets_to_array(offset_lists, seq_len), fei, contexts,
                                  n_best=n_best, max_answer_length=max_answer_length,
                                  null_score_threshold=threshold)
    assert_same_answers(got, want)


def test_random_cases_cover_empty_and_multi_window_examples():
    """The generator really produces what the property test claims to cover."""
    rng = np.random.default_rng(0)
    start, end, offset_lists, fei, contexts = make_case(rng, 40, 20, integer_logits=True)
    answers = reference_postprocess(start, end, offset_lists, fei, contexts, n_best=3)
    counts = np.bincount(fei, minlength=len(contexts))
    assert (counts == 0).any() and (counts >= 2).any()
    _, starts, _ = best_spans(start, end, offsets_to_array(offset_lists, 20)[..., 0] >= 0, n_best=3)
    assert (starts < 0).any() and (starts >= 0).any()
    assert any(a["text"] == "" for a in answers) and any(a["text"] for a in answers)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])  # packed and generic paths
def test_top_k_follows_stable_descending_order_on_ties(dtype):
    rng = np.random.default_rng(1)
    logits = rng.integers(-2, 3, size=(50, 17)).astype(dtype)
    logits[:, 3] = -0.0  # equal to +0.0, so ranked by position against it
    logits[5] = -np.inf
    logits[6, ::2] = -np.inf
    logits[7, 4] = np.finfo(dtype).max
    logits[8, 4] = np.finfo(dtype).smallest_subnormal
    logits[9, 4] = -np.finfo(dtype).smallest_subnormal
    for k in (1, 3, 8, 16, 17):
        np.testing.assert_array_equal(_top_k_indices(logits, k),
                                      np.argsort(-logits, axis=1, kind="stable")[:, :k])
    wide = rng.integers(-2, 3, size=(10, 300)).astype(dtype)  # k >= seq_len: the full-sort path
    np.testing.assert_array_equal(_top_k_indices(wide, 300), np.argsort(-wide, axis=1, kind="stable"))
    # Equal values straddling the k-th place: the lowest positions win.
    np.testing.assert_array_equal(_top_k_indices(np.array([[3.0, 5.0, 3.0, 3.0]], dtype), 2), [[1, 0]])


def test_valid_spans_scoring_minus_inf_are_still_answers():
    """With only -inf logits in the context, the first valid pair is kept, as the loops do."""
    start = np.array([[9.0, -np.inf, -np.inf, 0.0]])
    end = np.array([[9.0, -np.inf, -np.inf, 0.0]])
    offsets = offsets_to_array([[None, (0, 3), (4, 7), None]], 4)
    got = postprocess_predictions(start, end, offsets, [0], ["abc def"])
    want = reference_postprocess(start, end, [[None, (0, 3), (4, 7), None]], [0], ["abc def"])
    assert got == want == [{"text": "abc", "score": -np.inf, "start_char": 0, "end_char": 3}]


def one_feature(start: list[float], end: list[float], mask: list[bool] | None = None, **kw):
    mask = [True] * len(start) if mask is None else mask
    scores, starts, ends = best_spans(np.array([start]), np.array([end]), np.array([mask]), **kw)
    return float(scores[0]), int(starts[0]), int(ends[0])


def test_max_answer_length_limits_the_span():
    start = [0, 0, 9, 0, 0, 0, 0, 0, 0, 0]
    end = [0, 0, 0, 0, 0, 0, 0, 0, 9, 0]
    assert one_feature(start, end, max_answer_length=7) == (18.0, 2, 8)  # 8 - 2 + 1 == 7 tokens
    score, s, e = one_feature(start, end, max_answer_length=6)
    assert (s, e) != (2, 8) and e - s + 1 <= 6 and score == 9.0


def test_end_before_start_is_never_chosen():
    start = [0, 0, 0, 0, 0, 0, 9, 0]
    end = [0, 0, 8, 0, 0, 0, 0, 1]
    assert one_feature(start, end) == (10.0, 6, 7)
    # Only backward pairs among the top-1 lists: no span at all.
    assert one_feature(start, end, n_best=1) == (-np.inf, -1, -1)


def test_non_context_tokens_are_never_chosen():
    start = [20, 19, 1, 0, 0]
    end = [20, 19, 0, 2, 30]
    mask = [False, False, True, True, False]
    assert one_feature(start, end, mask) == (3.0, 2, 3)


def test_only_the_n_best_lists_are_candidates():
    """As in the chapter: a valid pair outside the top-n_best lists does not count."""
    start = [9, 8, 1, 0]
    end = [9, 8, 0, 1]
    mask = [False, False, True, True]
    assert one_feature(start, end, mask, n_best=2) == (-np.inf, -1, -1)
    assert one_feature(start, end, mask, n_best=3) == (2.0, 2, 3)
    offsets = offsets_to_array([[None, None, (0, 3), (4, 7)]], 4)
    got = postprocess_predictions(np.array([start]), np.array([end]), offsets, [0], ["abc def"], n_best=2)
    assert got == [{"text": "", "score": None, "start_char": -1, "end_char": -1}]


CONTEXT = "one two three four five six"
#         0   4   8     14   19   24
WINDOW_A = [None, (0, 3), (4, 7), (8, 13), (14, 18), None]
WINDOW_B = [None, (8, 13), (14, 18), (19, 23), (24, 27), None]


def test_best_span_across_windows_takes_the_window_with_the_higher_sum():
    start = np.array([[0, 5, 0, 0, 0, 0], [0, 0, 0, 4, 0, 0]], dtype=np.float64)
    end = np.array([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 3, 0]], dtype=np.float64)
    offsets = offsets_to_array([WINDOW_A, WINDOW_B], 6)
    got = postprocess_predictions(start, end, offsets, [0, 0], [CONTEXT])
    assert got == [{"text": "five six", "score": 7.0, "start_char": 19, "end_char": 27}]
    # Feature order does not matter, only the scores do.
    got = postprocess_predictions(start[::-1], end[::-1], offsets[::-1], [0, 0], [CONTEXT])
    assert got[0]["text"] == "five six"


def test_equal_scores_keep_the_earliest_feature():
    start = np.array([[0, 0, 0, 4, 0, 0], [0, 0, 0, 4, 0, 0]], dtype=np.float64)
    end = np.array([[0, 0, 0, 0, 3, 0], [0, 0, 0, 0, 3, 0]], dtype=np.float64)
    offsets = offsets_to_array([WINDOW_A, WINDOW_B], 6)
    assert postprocess_predictions(start, end, offsets, [0, 0], [CONTEXT])[0]["text"] == "three four"
    assert postprocess_predictions(start[::-1], end[::-1], offsets[::-1], [0, 0], [CONTEXT])[0]["text"] == "five six"


def test_squad_v2_null_threshold():
    """Null score = min over features of start[0] + end[0]; here min(2 + 2, 5 + 5) = 4 against a
    best span of 3 + 3 = 6 (second example has no feature and stays empty)."""
    start = np.array([[2, 0, 3, 0, 0, 0], [5, 0, 0, 0, 0, 0]], dtype=np.float64)
    end = np.array([[2, 0, 3, 0, 0, 0], [5, 0, 0, 0, 0, 0]], dtype=np.float64)
    offsets = offsets_to_array([WINDOW_A, WINDOW_B], 6)
    args = (start, end, offsets, [0, 0], [CONTEXT, "unused"])
    answer = {"text": "two", "score": 6.0, "start_char": 4, "end_char": 7}
    empty = {"text": "", "score": None, "start_char": -1, "end_char": -1}
    assert postprocess_predictions(*args) == [answer, empty]
    assert postprocess_predictions(*args, null_score_threshold=-2.0) == [answer, empty]  # 4-6 == -2, not >
    assert postprocess_predictions(*args, null_score_threshold=-2.5) == [empty, empty]
    assert postprocess_predictions(*args, null_score_threshold=0.0) == [answer, empty]


def test_offsets_to_array_marks_non_context_with_minus_one():
    arr = offsets_to_array([[None, (0, 3), [4, 7]], [(1, 2)]], 4)
    np.testing.assert_array_equal(arr, [[[-1, -1], [0, 3], [4, 7], [-1, -1]],
                                        [[1, 2], [-1, -1], [-1, -1], [-1, -1]]])
    with pytest.raises(ValueError):
        offsets_to_array([[(0, 1)] * 5], 4)


def test_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError):
        best_spans(np.array([[np.nan, 0.0]]), np.zeros((1, 2)), np.ones((1, 2), bool))
    with pytest.raises(ValueError):
        best_spans(np.zeros((1, 3)), np.zeros((1, 2)), np.ones((1, 2), bool))
    with pytest.raises(ValueError):
        postprocess_predictions(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2, 2), int), [3], ["x"])
