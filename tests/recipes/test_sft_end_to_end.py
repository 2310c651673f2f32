"""Instruction tuning: the template as written, labels -100 exactly on prompt tokens, Alpaca and chat
rendering, packing; and a tiny GPT-2 tuned for real through the CLI that answers and stops at EOS."""

from __future__ import annotations

import json

import pytest
import yaml

from lmtune.cli import main
from lmtune.config import validate_recipe
from lmtune.errors import InputError
from lmtune.tasks.sft import (
    IGNORE,
    Pair,
    pack_features,
    render_alpaca,
    render_chat,
    render_template,
    render_transcript,
    tokenize_pairs,
)

from ..helpers import assert_report, fact_rows, save_tiny_gpt2, with_changes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"cat": "red", "dog": "blue", "owl": "green", "fox": "orange", "bear": "brown", "wolf": "grey",
           "horse": "black", "mouse": "white"}
ARTICLE_TEMPLATE = "Please answer the following question.\nQ: {question}\nA: {answer}"


def colour_rows(n: int, seed: int) -> list[dict]:
    return fact_rows(COLOURS, "What is the colour of the {}?", "The {} is {}.", n, seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data and a tiny 'pretrained' GPT-2 (random weights, byte-level BPE trained on the texts)."""
    from lmtune.tokenizer import train_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("sft-e2e")
    rows = colour_rows(400, seed=0)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = [ARTICLE_TEMPLATE.format(**r) for r in rows]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=128)
    save_tiny_gpt2(tmp / "base", tokenizer)
    return tmp, tokenizer


def sft_cfg(**sft):
    return validate_recipe({"task": "sft", "name": "t", "model": {"name_or_path": "x"},
                            "data": {"train": {"path": "x.jsonl"}}, "sft": sft})


def test_the_template_is_applied_as_written():
    pair = render_template({"question": "Why?", "answer": "Because.", "other": 1}, sft_cfg().sft, "line 1", "data.train")
    assert pair == Pair("Please answer the following question.\nQ: Why?\nA: ", "Because.")
    cfg = sft_cfg(template="<{topic}> {q} => {reply} </s>", response_field="reply")
    assert render_template({"topic": "maths", "q": "1+1", "reply": "2"}, cfg.sft, "l", "w") == Pair(
        "<maths> 1+1 => ", "2 </s>")
    with pytest.raises(InputError, match=r"line 3 has no field 'question' \(fields: q, a\); the template uses it"):
        render_template({"q": "x", "a": "y"}, sft_cfg().sft, "line 3", "data.train")
    with pytest.raises(InputError, match="must be the last field"):
        render_template({"a": "1", "b": "2"}, sft_cfg(template="{answer} {b}").sft, "l", "w")


def test_transcripts_split_at_the_last_reply_marker():
    cfg = sft_cfg(format="transcript").sft
    dialogue = "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant: Bye now."
    assert render_transcript({"chosen": dialogue}, cfg, "l", "w") == Pair(
        "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant:", " Bye now.")
    # without the response (samples, predict) the dialogue so far gets the marker the model answers after
    assert render_transcript({"chosen": "\n\nHuman: hi"}, cfg, "l", "w", with_response=False).prompt == (
        "\n\nHuman: hi\n\nAssistant:")
    with pytest.raises(InputError, match="line 2 has no '\\\\n\\\\nAssistant:' before a reply"):
        render_transcript({"chosen": "just text"}, cfg, "line 2", "data.train")


def test_alpaca_and_chat_rendering(world):
    _, tokenizer = world
    with_input = render_alpaca({"instruction": "Add.", "input": "1 and 2", "output": "3"}, "l", "w")
    assert "### Input:\n1 and 2" in with_input.prompt and with_input.prompt.endswith("### Response:\n")
    assert with_input.response == "3"
    assert "### Input" not in render_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"}, "l", "w").prompt
    tok = tokenizer.__class__.from_pretrained(str(world[0] / "base"))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    pair = render_chat({"messages": messages}, sft_cfg(format="chat").sft, tok, "l", "w")
    assert pair.prompt == f"<user>hello{tok.eos_token}<assistant>"
    assert pair.response == f"hi there{tok.eos_token}"


def test_labels_are_minus_100_exactly_on_prompt_tokens(world):
    _, tokenizer = world
    pairs = [Pair(ARTICLE_TEMPLATE.format(**r).removesuffix(r["answer"]), r["answer"]) for r in colour_rows(20, 3)]
    features = tokenize_pairs(tokenizer, pairs, 128, completion_only=True, add_eos=True)
    for pair, f in zip(pairs, features):
        prompt_ids = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(pair.response, add_special_tokens=False)["input_ids"]
        assert f["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert f["labels"] == [IGNORE] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    full = tokenize_pairs(tokenizer, pairs, 128, completion_only=False, add_eos=False)
    assert all(f["labels"] == f["input_ids"] and tokenizer.eos_token_id not in f["input_ids"] for f in full)
    cut = tokenize_pairs(tokenizer, pairs[:1], 10, completion_only=True, add_eos=True)[0]
    assert len(cut["input_ids"]) == len(cut["labels"]) == 10


def test_packing_keeps_labels_aligned(world):
    _, tokenizer = world
    pairs = [Pair("Q: " + r["question"] + "\nA: ", r["answer"]) for r in colour_rows(30, 4)]
    features = tokenize_pairs(tokenizer, pairs, 128, True, True)
    packed = pack_features(features, 64, tokenizer.pad_token_id)
    assert all(len(p["input_ids"]) == len(p["labels"]) == 64 for p in packed)
    flat_ids = [t for p in packed for t, m in zip(p["input_ids"], p["attention_mask"]) if m]
    flat_labels = [t for p in packed for t, m in zip(p["labels"], p["attention_mask"]) if m]
    assert flat_ids == [t for f in features for t in f["input_ids"]]
    assert flat_labels == [t for f in features for t in f["labels"]]
    assert all(label == IGNORE for p in packed for label, m in zip(p["labels"], p["attention_mask"]) if not m)


def recipe(world, **changes):
    tmp, _ = world
    r = {"task": "sft", "name": "sft-tiny",
         "data": {"train": {"path": str(tmp / "train.jsonl")}, "validation_fraction": 0.1},
         "model": {"name_or_path": str(tmp / "base")},
         "sft": {"max_length": 128, "samples": [{"question": "What is the colour of the owl?"},
                                                {"question": "What is the colour of the bear?"}]},
         "generation": {"max_new_tokens": 20},
         "training": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 150, "logging_steps": 50,
                      "warmup_steps": 10, "save_strategy": "no", "precision": "fp32", "seed": 1}}
    path = tmp / "sft.yaml"
    path.write_text(yaml.safe_dump(with_changes(r, changes)))
    return path


@pytest.fixture(scope="module")
def sft_run(world):
    run = world[0] / "runs" / "sft"
    assert main(["train", str(recipe(world)), "--output", str(run)]) == 0
    return run, json.loads((run / "metrics.json").read_text())


def test_tuned_model_answers_and_stops_at_eos(sft_run):
    run, metrics = sft_run
    before, after = metrics["before"], metrics["after"]
    assert after["perplexity"] < 1.5 < 50 < before["perplexity"]
    assert before["response_tokens"] == after["response_tokens"] > 100
    assert not any(s["stopped_at_eos"] for s in before["samples"])
    assert [(s["response"], s["stopped_at_eos"]) for s in after["samples"]] == [
        ("The owl is green.", True), ("The bear is brown.", True)]
    assert metrics["data"]["example"]["prompt"].startswith("Please answer the following question.\nQ: What is")
    page = assert_report(run, ["perplexity", "loss"], "The owl is green.", "The bear is brown.")
    assert "before training · hit the token limit" in page and "after training · stopped at EOS" in page


def test_predict_uses_the_runs_template(sft_run, capsys):
    run, _ = sft_run
    capsys.readouterr()
    assert main(["predict", str(run), "What is the colour of the fox?"]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["prompt"] == "Please answer the following question.\nQ: What is the colour of the fox?\nA: "
    assert line["response"] == "The fox is orange." and line["stopped_at_eos"]


def test_template_fields_missing_from_the_data_stop_with_one_sentence(world, tmp_path, capsys):
    path = recipe(world, **{"sft.template": "Q: {prompt}\nA: {answer}", "training.max_steps": 1})
    capsys.readouterr()
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmtune: error:")]
    assert len(errors) == 1 and "no field 'prompt'" in errors[0] and "the template uses it" in errors[0] and "line 1" in errors[0]
    assert "Traceback" not in err and not (tmp_path / "run").exists()
