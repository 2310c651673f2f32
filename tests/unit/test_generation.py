"""Causal-LM generation as `lmtune predict` and the runs' samples do it: prompts in batches of similar
length (results in the caller's order, equal to one prompt at a time), and new tokens capped where a
model with learned positions would run past its context."""

from __future__ import annotations

import json
import logging

import pytest

from lmtune.cli import main
from lmtune.tasks import clm
from tests.helpers import WORDS, assert_one_sentence, save_tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    save_tiny_gpt2(folder, tiny_tokenizer, n_positions=48)
    return folder


def varied_prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(7 * i + k) % len(WORDS)] for k in range(1 + (5 * i) % 11)) for i in range(n)]


def test_batched_generation_keeps_the_order_and_equals_one_prompt_at_a_time(tiny_model):
    model, tokenizer = clm.load_for_inference(tiny_model)
    prompts = varied_prompts(clm.GENERATION_BATCH + 5)  # two batches, lengths mixed
    together = clm.generate_ids(model, tokenizer, prompts, max_new_tokens=6)
    alone = [clm.generate_ids(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 5


def test_length_batches_cover_every_prompt_once_shortest_first():
    batches = clm._length_batches([5, 1, 9, 3, 7], size=2)
    assert batches == [[1, 3], [0, 4], [2]]


def test_sampled_completions_come_back_per_prompt(tiny_model):
    model, tokenizer = clm.load_for_inference(tiny_model)
    prompts = varied_prompts(clm.GENERATION_BATCH + 1)
    out = clm.generate(model, tokenizer, prompts, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert len(out) == len(prompts) and all(len(c) == 3 for c in out)


def test_new_tokens_are_capped_at_the_models_context(tiny_model, caplog):
    model, tokenizer = clm.load_for_inference(tiny_model)
    prompt = " ".join(WORDS[:20])
    width = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        rows = clm._generate(model, tokenizer, [prompt], 100, do_sample=False, min_new_tokens=100)
    assert rows[0].shape[-1] == 48 - width  # every position used, none past the last
    assert f"generating at most {48 - width} new tokens" in caplog.text


def test_a_prompt_that_fills_the_context_is_refused_in_one_sentence(tiny_model, capsys):
    prompt = " ".join(WORDS * 3)
    assert main(["predict", str(tiny_model), prompt]) == 2
    assert_one_sentence(2, capsys.readouterr().err, "fills the model's context of 48 positions", "shorten the prompt")


def test_predict_over_a_file_of_many_prompts(tiny_model, tmp_path, capsys):
    prompts = varied_prompts(40)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    capsys.readouterr()
    assert main(["predict", str(tiny_model), "--file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "3",
                 "--greedy"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == prompts
    model, tokenizer = clm.load_for_inference(tiny_model)
    assert lines[7]["completions"] == clm.generate(model, tokenizer, [prompts[7]], max_new_tokens=3)[0]
