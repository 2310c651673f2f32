import math

import pytest

from lmtune.metrics import (
    normalize_answer,
    squad_exact_match,
    squad_f1,
    squad_gold_answers,
    squad_scores,
)

# --- normalisation -------------------------------------------------------------


def test_normalize_lowercases():
    assert normalize_answer("Denver BRONCOS") == "denver broncos"


def test_normalize_removes_punctuation_without_inserting_space():
    assert normalize_answer("U.S.A.!") == "usa"
    assert normalize_answer("rock-n-roll, (1990s)") == "rocknroll 1990s"
    # Characters outside string.punctuation are kept.
    assert normalize_answer("café – ok") == "café – ok"


def test_normalize_removes_articles_only_as_whole_words():
    assert normalize_answer("The cat and a dog an owl") == "cat and dog owl"
    assert normalize_answer("theatre another ant anthem") == "theatre another ant anthem"
    # Punctuation is removed first, so "the," is still an article.
    assert normalize_answer("the, end") == "end"


def test_normalize_collapses_white_space():
    assert normalize_answer("  many \t spaces\n here  ") == "many spaces here"
    assert normalize_answer("the") == ""


# --- per-pair EM / F1 ----------------------------------------------------------


def test_exact_match_after_normalisation():
    assert squad_exact_match("The Denver Broncos!", "denver broncos") == 1.0
    assert squad_exact_match("Denver Broncos team", "Denver Broncos") == 0.0


def test_f1_partial_overlap():
    # pred tokens: denver broncos team (3); gold: denver broncos (2); 2 common.
    # P = 2/3, R = 1, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert math.isclose(squad_f1("the Denver Broncos team", "Denver Broncos"), 0.8)


def test_f1_no_overlap_is_zero():
    assert squad_f1("Carolina Panthers", "Denver Broncos") == 0.0
    assert squad_f1("the", "a") == 0.0  # both normalise to nothing


def test_f1_counts_repeated_tokens_as_multiset():
    # pred: x x x y (4), gold: x y y (3); common = min(3,1) x + min(1,2) y = 2.
    # P = 2/4, R = 2/3, F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4/7
    assert math.isclose(squad_f1("x x x y", "x y y"), 4 / 7)
    # pred: x x (2), gold: x (1); common = 1; P = 1/2, R = 1, F1 = 2/3
    assert math.isclose(squad_f1("x x", "x"), 2 / 3)


# --- dataset-level scores --------------------------------------------------------


def test_scores_take_max_over_gold_answers():
    gold = {"q1": ["Denver Broncos", "Broncos", "the Broncos team"]}
    result = squad_scores(gold, {"q1": "Broncos"})
    assert result["exact_match"] == 100.0
    assert result["f1"] == 100.0

    # pred "Denver" vs "Denver Broncos": P=1, R=1/2 -> 2/3; vs "Broncos": 0;
    # vs "Denver Broncos team": P=1, R=1/3 -> 1/2. Best F1 = 2/3, EM = 0.
    result = squad_scores({"q1": ["Denver Broncos", "Broncos", "Denver Broncos team"]}, {"q1": "Denver"})
    assert result["exact_match"] == 0.0
    assert math.isclose(result["f1"], 100 * 2 / 3)


def test_scores_missing_and_unknown_ids():
    gold = {"q1": ["Denver Broncos"], "q2": ["Santa Clara"], "q3": ["1990s"], "q4": ["gold"]}
    preds = {
        "q1": "Denver Broncos",  # EM 1, F1 1
        "q2": "Santa Clara, California",  # EM 0, P=2/3, R=1 -> F1 0.8
        # q3, q4 missing -> 0
        "x1": "ignored",
        "x2": "also ignored",
        "x3": "ignored too",
    }
    result = squad_scores(gold, preds)
    assert result["total"] == 4
    assert result["missing"] == 2
    assert result["unknown_ids"] == 3
    assert math.isclose(result["exact_match"], 100 * 1 / 4)
    assert math.isclose(result["f1"], 100 * 1.8 / 4)


def test_scores_unanswerable_v2_question():
    gold = {"u1": [], "u2": [], "u3": [], "a1": ["Paris"]}
    preds = {"u1": "", "u2": "The.", "u3": "Paris", "a1": ""}
    # u1: "" -> 1; u2 normalises to "" -> 1; u3 non-empty -> 0; a1 empty vs answer -> 0.
    result = squad_scores(gold, preds)
    assert result["exact_match"] == 50.0
    assert result["f1"] == 50.0
    assert result["missing"] == 0


def test_scores_on_empty_gold_raises():
    with pytest.raises(ValueError):
        squad_scores({}, {"q": "x"})


def test_gold_answers_from_official_json_and_data_list():
    dataset = {
        "version": "1.1",
        "data": [
            {
                "title": "T1",
                "paragraphs": [
                    {
                        "context": "c",
                        "qas": [
                            {
                                "id": "a",
                                "question": "?",
                                "answers": [
                                    {"text": "x", "answer_start": 0},
                                    {"text": "y z", "answer_start": 2},
                                ],
                            },
                            {"id": "b", "question": "?", "answers": []},
                        ],
                    }
                ],
            },
            {
                "title": "T2",
                "paragraphs": [
                    {"context": "d", "qas": [{"id": "c", "question": "?", "answers": [{"text": "w", "answer_start": 0}]}]}
                ],
            },
        ],
    }
    expected = {"a": ["x", "y z"], "b": [], "c": ["w"]}
    assert squad_gold_answers(dataset) == expected
    assert squad_gold_answers(dataset["data"]) == expected
