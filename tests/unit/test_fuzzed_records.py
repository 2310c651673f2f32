"""Property-based fuzzing of what the tasks read from records and from predict's options: random JSON
values in every field a task reads either give a result or one InputError, never another exception."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtune.config import validate_recipe
from lmtune.errors import InputError

from ..helpers import chatml_tokenizer, make_documents

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
# Messages as chat records hold them, with their fields now and then of the wrong type.
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | json_values,
                                           "content": st.text(max_size=20) | json_values}), max_size=4)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer(make_documents(100, seed=9))


def cfg(task: str, **section):
    key = {"sft": "sft", "reward": "preference", "classify": "classify", "qa": "qa"}[task]
    return validate_recipe({"task": task, "name": "t", "model": {"name_or_path": "x"},
                            "data": {"train": {"path": "x.jsonl"}}, key: section})


def answers_or_input_error(fn) -> None:
    try:
        fn()
    except InputError:
        pass


@FUZZ
@given(record=st.dictionaries(st.sampled_from(["question", "answer", "instruction", "input", "output", "chosen",
                                               "messages", "label", "text"]) | st.text(max_size=8),
                              json_values | messages, max_size=6),
       form=st.sampled_from([{"format": "template"}, {"format": "alpaca"}, {"format": "transcript"},
                             {"format": "chat"}, {"format": "chat", "user_template": "{question}"},
                             {"format": "chat", "user_template": "Review: {text}", "response_field": "label",
                              "field_values": {"label": {0: "negative", 1: "positive"}}}]),
       with_response=st.booleans())
def test_sft_records_render_or_raise_one_input_error(tokenizer, record, form, with_response):
    from lmtune.tasks.sft import to_pair, tokenize_pairs

    config = cfg("sft", **form)

    def render():
        pair = to_pair(record, config, tokenizer, "line 1", "data.train", with_response)
        tokenize_pairs(tokenizer, [pair], 64, True, True)

    answers_or_input_error(render)


@FUZZ
@given(record=st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "question"]), json_values | messages,
                              max_size=4),
       form=st.sampled_from(["text", "chat"]), template=st.sampled_from([None, "Q: {question}"]))
def test_preference_records_render_or_raise_one_input_error(tokenizer, record, form, template):
    from lmtune.tasks.preference import to_preference_pair, tokenize_preference

    config = cfg("reward", format=form, prompt_template=template)

    def render():
        pair = to_preference_pair(record, config, "line 1", "data.train", tokenizer)
        tokenize_preference(tokenizer, [pair], 64, 32)

    answers_or_input_error(render)


@FUZZ
@given(labels=st.lists(json_values, min_size=2, max_size=6),
       problem=st.sampled_from(["single_label", "multi_label", "regression"]))
def test_classification_labels_encode_or_raise_one_input_error(labels, problem):
    from lmtune.tasks.classify import check_label_kinds, encode_label, label_space

    config = cfg("classify", problem_type=problem)

    def encode():
        locations = [f"line {i + 1}" for i in range(len(labels))]
        check_label_kinds(labels, locations, problem, "data.train")
        space = label_space(labels, config)
        for value, location in zip(labels, locations):
            encode_label(value, space, location, "data.train")

    answers_or_input_error(encode)


@FUZZ
@given(record=st.dictionaries(st.sampled_from(["id", "context", "question", "answers", "title", "paragraphs"]),
                              json_values, max_size=6))
def test_qa_records_read_or_raise_one_input_error(record):
    from lmtune.data.sources import Records, SourceStats
    from lmtune.tasks.qa import examples_from_records

    records = Records([("line 1", record)], SourceStats(), "fuzz")
    answers_or_input_error(lambda: examples_from_records(records, "data.train"))


@FUZZ
@given(temperature=st.floats(-5, 5), top_p=st.floats(-1, 2), top_k=st.none() | st.integers(-5, 100),
       sequences=st.integers(1, 5), penalty=st.floats(-1, 3), ngram=st.integers(-3, 5), greedy=st.booleans(),
       task=st.sampled_from(["clm", "mlm", "qa", "classify", "sft", "dpo", "rl", "reward"]),
       extra=st.sampled_from([[], ["--pair"], ["--chat"], ["--raw"], ["--field", "a=b"], ["--question", "q"],
                              ["--system", "s"], ["--max-new-tokens", "8"]]))
def test_predict_options_are_accepted_or_refused_in_one_sentence(temperature, top_p, top_k, sequences, penalty,
                                                                 ngram, greedy, task, extra):
    from lmtune.cli import build_parser, check_predict_options

    argv = ["predict", "RUN", "x", "--temperature", str(temperature), "--top-p", str(top_p),
            "--num-return-sequences", str(sequences), "--repetition-penalty", str(penalty),
            "--no-repeat-ngram-size", str(ngram), *(["--top-k", str(top_k)] if top_k is not None else []),
            *(["--greedy"] if greedy else []), *extra]

    def check():  # argparse's own refusals (a value it takes for an option) are InputErrors too
        args = build_parser().parse_args(argv)
        assert isinstance(args, argparse.Namespace)
        check_predict_options(args, task)

    answers_or_input_error(check)
