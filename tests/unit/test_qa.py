"""QA components: records -> examples, answer_start checks, article split, windows and their labels,
evaluation offsets; with real WordPiece (BERT) and byte-level BPE (RoBERTa) tokenizers trained here."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmtune.config import SourceConfig
from lmtune.data.sources import load_records
from lmtune.errors import InputError
from lmtune.tasks.qa import (
    QAExample,
    drop_misplaced_answers,
    evaluation_features,
    examples_from_records,
    split_by_group,
    training_features,
    window_labels,
)
from lmtune.tokenizer import train_tokenizer

from ..helpers import WORDS


def synthetic_examples(n: int, seed: int, min_words: int = 20, max_words: int = 220) -> list[QAExample]:
    """Random-word contexts (some far longer than a window) with an answer of 1-4 words anywhere."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        a = rng.randrange(len(words))
        b = min(len(words), a + rng.randint(1, 4))
        context = " ".join(words)
        start = len(" ".join(words[:a])) + (1 if a else 0)
        answer = " ".join(words[a:b])
        assert context[start : start + len(answer)] == answer
        out.append(QAExample(f"q{i}", f"t{i % 7}", context, "what " + rng.choice(WORDS) + " ?", [answer], [start]))
    return out


@pytest.fixture(scope="module", params=["bert", "roberta"])
def qa_tokenizer(request):
    texts = [e.context for e in synthetic_examples(200, seed=3)] + ["what is it ?"]
    return train_tokenizer(texts, vocab_size=400, min_frequency=1, style=request.param)


def context_span(enc_offsets: list, in_context: list[bool]) -> tuple[int, int]:
    spans = [o for o, c in zip(enc_offsets, in_context) if c]
    return spans[0][0], spans[-1][1]


def test_every_window_label_decodes_to_the_answer_or_is_zero_exactly_when_outside(qa_tokenizer):
    examples = synthetic_examples(150, seed=5)
    max_length, stride = 48, 12
    features = training_features(qa_tokenizer, examples, max_length, stride)
    enc = qa_tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                       max_length=max_length, stride=stride, return_overflowing_tokens=True,
                       return_offsets_mapping=True)
    assert len(features) == len(enc["input_ids"]) > len(examples)  # long contexts give several windows
    inside = outside = 0
    for i, feature in enumerate(features):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        assert feature["input_ids"] == enc["input_ids"][i] and len(feature["input_ids"]) <= max_length
        offsets = enc["offset_mapping"][i]
        in_context = [s == 1 for s in enc.sequence_ids(i)]
        first, last = context_span(offsets, in_context)
        start_char = example.answer_starts[0]
        end_char = start_char + len(example.answers[0])
        s, e = feature["start_positions"], feature["end_positions"]
        if first <= start_char and end_char <= last:
            inside += 1
            assert in_context[s] and in_context[e] and s <= e
            assert example.context[offsets[s][0] : offsets[e][1]] == example.answers[0]
            decoded = qa_tokenizer.decode(feature["input_ids"][s : e + 1])
            assert decoded.replace(" ", "") == example.answers[0].replace(" ", "")
        else:
            outside += 1
            assert (s, e) == (0, 0)
    assert inside > 50 and outside > 50


def test_window_labels_on_hand_made_offsets():
    # tokens: [CLS] q [SEP] "ab" "cd" "ef" [SEP]; the context is "ab cd ef"
    offsets = np.array([[0, 0], [0, 1], [0, 0], [0, 2], [3, 5], [6, 8], [0, 0]])
    ctx = np.array([0, 0, 0, 1, 1, 1, 0], dtype=bool)
    assert window_labels(offsets, ctx, 3, 5) == (4, 4)
    assert window_labels(offsets, ctx, 0, 8) == (3, 5)
    assert window_labels(offsets, ctx, 4, 5) == (4, 4)  # an answer starting inside a token takes that token
    # a window whose context starts at "cd": an answer at "ab" is outside
    assert window_labels(offsets, np.array([0, 0, 0, 0, 1, 1, 0], dtype=bool), 0, 2) == (0, 0)
    assert window_labels(offsets, np.array([0, 0, 0, 1, 1, 0, 0], dtype=bool), 3, 8) == (0, 0)  # cut at the end
    assert window_labels(offsets, np.zeros(7, dtype=bool), 0, 2) == (0, 0)


def test_evaluation_offsets_are_context_only_and_windows_map_to_examples(qa_tokenizer):
    examples = synthetic_examples(40, seed=7)
    feats = evaluation_features(qa_tokenizer, examples, 48, 12)
    n = len(feats.inputs)
    assert feats.offsets.shape == (n, 48, 2) and feats.example_index.shape == (n,)
    assert sorted(set(feats.example_index.tolist())) == list(range(len(examples)))
    assert np.all(np.diff(feats.example_index) >= 0)
    for i in range(n):
        example = examples[feats.example_index[i]]
        valid = feats.offsets[i, :, 0] >= 0
        assert valid.sum() > 0
        length = len(feats.inputs[i]["input_ids"])
        assert not valid[length:].any()  # beyond the window: never context
        # the question's tokens are not context: the first valid token comes after the question
        assert not valid[0]
        for s, e in feats.offsets[i][valid]:
            assert 0 <= s < e <= len(example.context)


def test_question_too_long_for_the_window_is_an_input_error(qa_tokenizer):
    example = synthetic_examples(1, seed=1)[0]
    long_q = QAExample("long-q", "", example.context, " ".join(["model"] * 60), example.answers, example.answer_starts)
    with pytest.raises(InputError, match="question 'long-q' is .* tokens long.*qa.max_length 48"):
        training_features(qa_tokenizer, [example, long_q], 48, 12)


# --------------------------------------------------------------------------------------------------
# Records -> examples


SQUAD_NESTED = {
    "version": "1.1",
    "data": [
        {"title": "Denver", "paragraphs": [
            {"context": "Denver Broncos won the game.", "qas": [
                {"id": "a1", "question": "Who won?", "answers": [{"text": "Denver Broncos", "answer_start": 0},
                                                                   {"text": "Broncos", "answer_start": 7}]},
                {"id": "a2", "question": "What was won?", "answers": [{"text": "the game", "answer_start": 19}]}]},
            {"context": "It rained.", "qas": [
                {"id": "a3", "question": "Weather?", "answers": [{"text": "rained", "answer_start": 3}]}]}]},
        {"title": "Other", "paragraphs": [
            {"context": "Nothing here.", "qas": [
                {"id": "v2", "question": "What?", "answers": [], "is_impossible": True}]}]},
    ],
}


def test_official_nested_squad_json_becomes_one_example_per_question(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD_NESTED))
    examples = examples_from_records(load_records(SourceConfig(path=str(path)), "data.train"), "data.train")
    assert [e.id for e in examples] == ["a1", "a2", "a3", "v2"]
    assert examples[0].title == "Denver" and examples[0].answers == ["Denver Broncos", "Broncos"]
    assert examples[0].answer_starts == [0, 7] and examples[2].context == "It rained."
    assert examples[3].answers == [] and examples[3].title == "Other"


def test_flat_rows_in_hf_and_list_forms(tmp_path):
    rows = [
        {"id": "x", "title": "T", "context": "red blue", "question": "which?",
         "answers": {"text": ["blue"], "answer_start": [4]}},
        {"id": 7, "context": "red blue", "question": "which?", "answers": [{"text": "red", "answer_start": 0}]},
    ]
    path = tmp_path / "flat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    examples = examples_from_records(load_records(SourceConfig(path=str(path)), "data.train"), "data.train")
    assert [(e.id, e.answers, e.answer_starts, e.title) for e in examples] == [
        ("x", ["blue"], [4], "T"), ("7", ["red"], [0], "")]


@pytest.mark.parametrize(("row", "words"), [
    ({"id": "1", "context": "abc", "answers": {"text": ["a"], "answer_start": [0]}}, ["line 1", "'question'"]),
    ({"id": "1", "context": "  ", "question": "q", "answers": []}, ["empty context", "id 1"]),
    ({"id": "1", "context": "abc", "question": "q", "answers": "a"}, ["'answers'", "answer_start"]),
    ({"id": "1", "context": "abc", "question": "q", "answers": {"text": ["a", "b"], "answer_start": [0]}},
     ["as many integer answer_start"]),
])
def test_bad_records_are_one_sentence(tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError) as err:
        examples_from_records(load_records(SourceConfig(path=str(path)), "data.train"), "data.train")
    msg = str(err.value)
    assert "data.train" in msg and all(w in msg for w in words) and "\n" not in msg


def test_misplaced_answers_are_skipped_below_the_threshold_and_refused_above():
    good = synthetic_examples(99, seed=2)
    bad = QAExample("off", "", "red blue", "which?", ["blue"], [3])  # the answer starts at 4
    kept = drop_misplaced_answers(good + [bad], 0.02, "data.train")
    assert [e.id for e in kept] == [e.id for e in good]
    with pytest.raises(InputError, match=r"in 1 of 100 examples .*id off.*qa.max_bad_answer_fraction"):
        drop_misplaced_answers(good + [bad], 0.005, "data.train")


def test_article_split_keeps_titles_disjoint_and_is_seeded():
    examples = synthetic_examples(140, seed=4)  # 7 titles
    train, val = split_by_group(examples, 0.3, seed=1)
    assert {e.title for e in train}.isdisjoint({e.title for e in val})
    assert len(train) + len(val) == len(examples) and len({e.title for e in val}) == 2
    assert split_by_group(examples, 0.3, seed=1) == (train, val)
    assert split_by_group(examples, 0.3, seed=2) != (train, val)
    with pytest.raises(InputError, match="single article"):
        split_by_group([e for e in examples if e.title == "t0"], 0.3, seed=1)
