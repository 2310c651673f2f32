"""A tiny masked-LM recipe, run for real through the CLI: a BERT from scratch with a WordPiece tokenizer
trained in the run (and a RoBERTa with byte-level BPE and whole-word masking), then fill-mask with
plain `transformers.pipeline` and `lmtune predict`; and bad input that must stop with one sentence."""

from __future__ import annotations

import json

import pytest
import yaml

from lmtune.cli import main

from ..helpers import (TOPICS, assert_one_sentence, assert_report, mlm_recipe, topic_documents,
                       write_text_records)

TOPIC_OF = {word: topic for topic, words in TOPICS.items() for word in words}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_recipe(tmp, name, recipe):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlm-e2e")
    data = tmp / "docs.jsonl"
    write_text_records(data, topic_documents(400, seed=5))
    return tmp, data


@pytest.fixture(scope="module")
def bert_run(corpus):
    tmp, data = corpus
    recipe = write_recipe(tmp, "bert", mlm_recipe(data))
    run = tmp / "runs" / "bert"
    assert main(["train", str(recipe), "--output", str(run)]) == 0
    return run


def test_perplexity_falls_and_the_run_dir_is_complete(bert_run):
    metrics = json.loads((bert_run / "metrics.json").read_text())
    assert metrics["task"] == "mlm"
    before, after = metrics["before"], metrics["after"]
    assert before["perplexity"] > 50  # an untrained model is near-uniform over the WordPiece vocabulary
    assert after["perplexity"] < before["perplexity"] / 5, (before, after)
    assert after["perplexity"] < 16  # word frequencies alone give about 24: the model uses the context
    # Both measured on exactly the same masked positions.
    assert before["masked_tokens"] == after["masked_tokens"] == metrics["data"]["validation_masked_tokens"] > 20
    assert metrics["data"]["whole_word_mask"] is False and metrics["data"]["chunk_size"] == 32
    assert metrics["steps"] == 200
    logged = [json.loads(line) for line in (bert_run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.0
    for name in ("config.yaml", "metrics.json", "log.jsonl", "train.log", "model/model.safetensors",
                 "model/config.json", "model/tokenizer.json"):
        assert (bert_run / name).is_file(), name
    assert not (bert_run.parent / ".bert.partial").exists()
    config = json.loads((bert_run / "model" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    [sample] = metrics["samples"]
    assert sample["prompt"] == "alpha beta [MASK] delta epsilon" and len(sample["fills"][0]) == 5
    assert TOPIC_OF.get(sample["fills"][0][0]["token"]) == "greek", sample
    assert_report(bert_run, ["perplexity", "loss"], "alpha beta [MASK] delta epsilon",
                  sample["fills"][0][0]["sequence"])


def test_plain_pipeline_fills_the_mask(bert_run):
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(bert_run / "model"))
    assert fill.tokenizer.mask_token == "[MASK]"
    out = fill(f"red green {fill.tokenizer.mask_token} yellow purple", top_k=5)
    assert len(out) == 5 and all({"token_str", "score", "sequence"} <= set(r) for r in out)
    assert [TOPIC_OF.get(r["token_str"].strip()) for r in out[:3]] == ["colour"] * 3, out


def test_predict_prints_top_k_fills(bert_run, capsys):
    capsys.readouterr()
    prompts = ["one two [MASK] four five", "apple banana <mask> grape lemon"]
    assert main(["predict", str(bert_run), *prompts, "--top-k", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == prompts
    for line, topic in zip(lines, ["number", "fruit"], strict=True):
        [fills] = line["fills"]
        assert len(fills) == 3 and all({"token", "score", "sequence"} <= set(f) for f in fills)
        assert [TOPIC_OF.get(f["token"]) for f in fills] == [topic] * 3, fills
        assert "[MASK]" not in fills[0]["sequence"] and "<mask>" not in fills[0]["sequence"]
        assert fills[0]["score"] >= fills[1]["score"] >= fills[2]["score"]
    # The model folder works as well as the run dir; --top-k defaults to 5.
    assert main(["predict", str(bert_run / "model"), "alpha [MASK] gamma delta"]) == 0
    assert len(json.loads(capsys.readouterr().out)["fills"][0]) == 5


def test_predict_without_a_mask_is_an_input_error(bert_run, capsys):
    capsys.readouterr()
    assert main(["predict", str(bert_run), "alpha beta gamma"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("lmtune: error:")]
    assert len(errors) == 1 and "no mask token" in errors[0] and "[MASK]" in errors[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_roberta_with_whole_word_masking_trains(corpus, capsys):
    tmp, data = corpus
    recipe = write_recipe(tmp, "roberta", mlm_recipe(
        data, name="roberta", **{"model.from_scratch.architecture": "roberta", "mlm.whole_word_mask": True,
                                 "training.max_steps": 80, "generation.prompts": []}))
    run = tmp / "runs" / "roberta"
    assert main(["train", str(recipe), "--output", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["whole_word_mask"] is True
    assert metrics["before"]["masked_tokens"] == metrics["after"]["masked_tokens"] > 20
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"] / 3, metrics
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["model_type"] == "roberta"
    capsys.readouterr()
    assert main(["predict", str(run), "alpha beta [MASK] delta"]) == 0  # [MASK] becomes <mask>
    [fills] = json.loads(capsys.readouterr().out)["fills"]
    assert len(fills) == 5 and "<mask>" not in fills[0]["sequence"]
    assert fills[0]["sequence"].startswith("alpha beta") and fills[0]["sequence"].endswith("delta")


# --------------------------------------------------------------------------------------------------
# Bad input: exit 2, one sentence, no traceback, no run dir


@pytest.fixture(scope="module")
def saved(corpus):
    """Tiny models and tokenizers saved in the test: what a user might point a recipe at."""
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, RobertaConfig,
                              RobertaForMaskedLM)

    from lmtune.tokenizer import train_tokenizer

    tmp, _ = corpus
    docs = topic_documents(100, seed=6)
    out = {}
    bert_tok = train_tokenizer(docs, 300, 1, style="bert", model_max_length=32)
    roberta_tok = train_tokenizer(docs, 300, 1, style="roberta", model_max_length=32)
    gpt2_tok = train_tokenizer(docs, 300, 1, style="gpt2")
    small = dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=32, intermediate_size=64)
    models = {
        # 32 positions; the recipes below ask for blocks of 64.
        "bert32": (BertForMaskedLM(BertConfig(vocab_size=len(bert_tok), max_position_embeddings=32,
                                              pad_token_id=bert_tok.pad_token_id, **small)), bert_tok),
        # RoBERTa spends two position slots before the first token: 34 slots hold 32 tokens.
        "roberta34": (RobertaForMaskedLM(RobertaConfig(vocab_size=len(roberta_tok), max_position_embeddings=34,
                                                       pad_token_id=roberta_tok.pad_token_id, **small)),
                      roberta_tok),
        # A decoder with its own (mask-less) tokenizer, as a GPT-2 folder comes.
        "gpt2": (GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tok), n_positions=64, n_layer=1, n_head=2,
                                            n_embd=32, bos_token_id=0, eos_token_id=0)), gpt2_tok),
    }
    for name, (model, tok) in models.items():
        model.save_pretrained(str(tmp / name))
        tok.save_pretrained(str(tmp / name))
        out[name] = tmp / name
    gpt2_tok.save_pretrained(str(tmp / "gpt2-tokenizer"))
    out["gpt2-tokenizer"] = tmp / "gpt2-tokenizer"
    bert_tok.save_pretrained(str(tmp / "bert-tokenizer"))
    out["bert-tokenizer"] = tmp / "bert-tokenizer"
    return out


def run_bad(tmp_path, capsys, recipe, *fragments, extra=()):
    recipe["name"] = "bad"
    path = write_recipe(tmp_path, "bad", recipe)
    out = tmp_path / "runs" / "bad"
    capsys.readouterr()
    code = main(["train", str(path), "--output", str(out), *extra])
    line = assert_one_sentence(code, capsys.readouterr().err, *fragments)
    assert not out.exists() and not (out.parent / ".bad.partial").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    return line


def pretrained(data, model, **changes):
    recipe = mlm_recipe(data, **changes)
    recipe["model"] = {"name_or_path": str(model)}
    del recipe["tokenizer"]
    return recipe


def test_block_size_beyond_the_model_positions(corpus, saved, tmp_path, capsys):
    _, data = corpus
    run_bad(tmp_path, capsys, pretrained(data, saved["bert32"], **{"data.block_size": 64}),
            "data.block_size 64 is larger than the model's context of 32 positions", "32 or less")


def test_block_size_beyond_roberta_positions_counts_its_offset(corpus, saved, tmp_path, capsys):
    _, data = corpus
    recipe = pretrained(data, saved["roberta34"], **{"data.block_size": 64})
    run_bad(tmp_path, capsys, recipe, "data.block_size 64 is larger than", "32 or less")
    run_bad(tmp_path, capsys, recipe, "data.block_size 33 is larger than", "32 or less",
            extra=["--set", "data.block_size=33"])
    # ... and the 32 it names does fit.
    path = write_recipe(tmp_path, "fits", pretrained(data, saved["roberta34"], name="fits",
                                                      **{"training.max_steps": 1}))
    assert main(["train", str(path), "--output", str(tmp_path / "fits")]) == 0


@pytest.mark.parametrize("own_tokenizer", [True, False])
def test_a_model_without_a_masked_lm_head(corpus, saved, tmp_path, capsys, own_tokenizer):
    _, data = corpus
    recipe = pretrained(data, saved["gpt2"])
    if not own_tokenizer:
        recipe["model"]["tokenizer"] = str(saved["bert-tokenizer"])
    run_bad(tmp_path, capsys, recipe, f"'{saved['gpt2']}'", "has no masked-LM head")


def test_a_tokenizer_without_a_mask_token(corpus, saved, tmp_path, capsys):
    _, data = corpus
    recipe = mlm_recipe(data)
    recipe["model"]["tokenizer"] = str(saved["gpt2-tokenizer"])
    del recipe["tokenizer"]
    run_bad(tmp_path, capsys, recipe, "has no mask token")


BAD_RECIPES = {
    "empty after keyword filtering": ({"data.train.keywords": ["zzqqxx"]}, ["empty after the keyword filter"]),
    "keytoken loss with task mlm": ({"loss.type": "keytoken"}, ["keytoken", "causal-LM loss"]),
    "gpt2 architecture with task mlm": ({"model.from_scratch.architecture": "gpt2"},
                                        ["task mlm needs model.from_scratch.architecture in bert, roberta"]),
    "streaming with task mlm": ({"data.train.streaming": True}, ["streaming"]),
    "mask shares above one": ({"mlm.mask_replace_prob": 0.95, "mlm.random_replace_prob": 0.1},
                              ["mask_replace_prob + random_replace_prob"]),
    "no chunk at all": ({"data.block_size": 100000, "model.from_scratch.n_positions": 100000},
                        ["no chunk of 100000 tokens", "mlm.last_chunk: pad"]),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe(case, corpus, tmp_path, capsys):
    _, data = corpus
    changes, fragments = BAD_RECIPES[case]
    recipe = mlm_recipe(data, **{"mlm.last_chunk": "drop", **changes})
    run_bad(tmp_path, capsys, recipe, *fragments)
