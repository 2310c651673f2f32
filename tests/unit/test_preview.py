"""`lmtune preview`: for every task family the rows shown are the prepared features themselves (ids,
labels, the collator's masks, the labelled QA span, the SFT boundary, the label names), the figures
are those of `prepare`, and the command prints them and exits 0 (2 with one sentence on bad input).

Real tokenizers and models (tiny, built here), real `prepare`, real collators."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmtune.cli import main
from lmtune.config import load_recipe
from lmtune.preview import IGNORE, preview_rows, preview_stats, render_text, visible
from lmtune.tasks import task_module

from ..helpers import assert_one_sentence, make_documents, save_tiny_gpt2, with_changes, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = make_documents(120, seed=11)
ANSI = re.compile(r"\033\[[0-9;]*m")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT (WordPiece), a one-output BERT reward model, a tiny GPT-2 (byte-level BPE), and data
    for every task."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from lmtune.tokenizer import train_bpe_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("preview")
    wordpiece = train_tokenizer(DOCS, vocab_size=300, min_frequency=1, style="bert", model_max_length=64)
    bert = BertConfig(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(bert).save_pretrained(str(root / "bert"))
    wordpiece.save_pretrained(str(root / "bert"))
    BertForSequenceClassification(BertConfig(**{**bert.to_dict(), "num_labels": 1})).save_pretrained(
        str(root / "reward-bert"))
    wordpiece.save_pretrained(str(root / "reward-bert"))
    save_tiny_gpt2(root / "gpt2", train_bpe_tokenizer(DOCS, vocab_size=300, min_frequency=1, model_max_length=64),
                   n_positions=64)

    write_jsonl(root / "text.jsonl", [{"text": d} for d in DOCS])
    write_jsonl(root / "labelled.jsonl", [{"text": d, "label": int("model" in d.split())} for d in DOCS])
    squad = []
    for i, d in enumerate(DOCS):
        words = d.split()
        answer = " ".join(words[len(words) // 2 : len(words) // 2 + 2])
        squad.append({"id": f"q{i}", "title": f"article {i % 9}", "context": d, "question": f"which words follow {i}?",
                      "answers": {"text": [answer], "answer_start": [d.index(answer)]}})
    write_jsonl(root / "squad.jsonl", squad)
    write_jsonl(root / "qa.jsonl", [{"question": f"what follows {d.split()[0]}?", "answer": " ".join(d.split()[1:3])}
                                    for d in DOCS])
    write_jsonl(root / "pairs.jsonl", [{"prompt": f"Q: {d.split()[0]}?\nA:", "chosen": " " + " ".join(d.split()[1:4]),
                                        "rejected": " no idea"} for d in DOCS])
    return root


def recipe(world: Path, task: str, **changes) -> Path:
    model = {"mlm": "bert", "qa": "bert", "classify": "bert", "sft": "gpt2", "reward": "gpt2", "dpo": "gpt2",
             "rl": "gpt2"}
    data = {"clm": "text", "mlm": "text", "qa": "squad", "classify": "labelled", "sft": "qa", "reward": "pairs",
            "dpo": "pairs", "rl": "pairs"}
    r: dict = {"task": task, "name": f"preview-{task}",
               "data": {"train": {"path": str(world / f"{data[task]}.jsonl")}, "validation_fraction": 0.2},
               "training": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "seed": 5}}
    if task == "clm":
        r["tokenizer"] = {"train": True, "vocab_size": 300, "min_frequency": 1}
        r["model"] = {"from_scratch": {"n_layer": 1, "n_head": 2, "n_embd": 32}}
        r["data"]["block_size"] = 24
    else:
        r["model"] = {"name_or_path": str(world / model[task])}
    if task == "mlm":
        r["data"]["block_size"] = 32
    if task == "qa":
        r["qa"] = {"max_length": 40, "stride": 12}
    if task == "classify":
        r["classify"] = {"labels": ["no_model", "mentions_model"], "max_length": 24}
    if task == "sft":
        r["sft"] = {"max_length": 64, "template": "Q: {question}\nA: {answer}"}
    if task in ("reward", "dpo", "rl"):
        r["preference"] = {"prompt_template": "{prompt}", "max_length": 48, "max_prompt_length": 6}
    if task == "rl":
        r["rl"] = {"reward_model": str(world / "reward-bert"), "num_generations": 2, "max_completion_length": 6}
    path = world / f"{task}-{abs(hash(json.dumps(changes, sort_keys=True))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(with_changes(r, changes)))
    return path


def prepared_for(world: Path, task: str, **changes):
    cfg = load_recipe(recipe(world, task, **changes), [])
    return cfg, task_module(cfg.task).prepare(cfg)


# --------------------------------------------------------------------------------------------------
# Rows equal the prepared features


def test_visible_tokens_show_whitespace_and_keep_subword_marks():
    assert visible("Ġthe") == "Ġthe" and visible("##ing") == "##ing" and visible("▁a") == "▁a"
    assert visible(" a\n\t") == "␣a\\n\\t" and visible("\x00") == "\\x00"


def test_clm_blocks_with_their_next_token_targets(world):
    cfg, prepared = prepared_for(world, "clm")
    tok = prepared.tokenizer
    rows = preview_rows(cfg, prepared, 3)
    assert len(rows) == 3
    for i, row in enumerate(rows):
        block = np.asarray(prepared.train.blocks[i]).tolist()
        assert row["input_ids"] == block and row["labels"] == block
        assert row["targets"] == block[1:] + [None]  # the model shifts: position p learns token p + 1
        assert row["tokens"] == tok.convert_ids_to_tokens(block)
        assert row["target_tokens"][:-1] == row["tokens"][1:] and row["target_tokens"][-1] is None

    stats = preview_stats(cfg, prepared, rows)
    assert stats["training blocks"] == prepared.info["train_blocks"]
    assert stats["validation blocks"] == prepared.info["validation_blocks"]
    # Reference count: every training document's tokens plus its EOS (concat packing), directly.
    from lmtune.tasks.common import load_splits

    train, _ = load_splits(cfg)
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in train.texts)
    assert stats["training tokens"] == tokens
    assert stats["training tokens kept (in blocks)"] == prepared.info["train_blocks"] * cfg.data.block_size
    assert stats["training tokens dropped (short tails)"] == tokens % cfg.data.block_size

    text = render_text(cfg, prepared, rows, stats, [], color=False, width=100)
    assert f"  {1:>4} {row['tokens'][1]} [{row['input_ids'][1]}] -> {row['tokens'][2]}" in text
    assert "-> (end)" in text and "\033" not in text


def test_clm_stream_shows_its_first_blocks(world):
    cfg, prepared = prepared_for(world, "clm", **{"data.train.streaming": True,
                                                  "data.validation": {"path": str(world / "text.jsonl")}})
    rows = preview_rows(cfg, prepared, 2)
    first = [item["input_ids"].tolist() for item, _ in zip(iter(prepared.train), range(2))]
    assert [r["input_ids"] for r in rows] == first
    assert "a stream" in preview_stats(cfg, prepared, rows)["training data"]


@pytest.mark.parametrize("whole_word", [False, True])
def test_mlm_masks_are_the_training_collators(world, whole_word):
    cfg, prepared = prepared_for(world, "mlm", **{"mlm.whole_word_mask": whole_word, "mlm.mlm_probability": 0.3})
    tok = prepared.tokenizer
    n = 4
    rows = preview_rows(cfg, prepared, n)
    items = [prepared.train[i] for i in range(n)]
    batch = prepared.collator(items)  # seeded by the training seed and the chunk indices: same masks again
    for i, row in enumerate(rows):
        labels = batch["labels"][i].tolist()
        assert row["input_ids"] == batch["input_ids"][i].tolist() and row["labels"] == labels
        assert row["original_ids"] == items[i]["input_ids"].tolist()
        assert row["masked_positions"] == [p for p, lab in enumerate(labels) if lab != IGNORE]
        for p, kind in enumerate(row["kinds"]):
            if kind is None:
                assert row["input_ids"][p] == row["original_ids"][p]
            else:
                assert labels[p] == row["original_ids"][p]
                assert (kind == "mask") == (row["input_ids"][p] == tok.mask_token_id)
    masked = sum(len(r["masked_positions"]) for r in rows)
    assert masked > 0
    if whole_word:  # every chosen token becomes the mask
        assert all(k == "mask" for r in rows for k in r["kinds"] if k is not None)

    stats = preview_stats(cfg, prepared, rows)
    assert stats["training chunks"] == prepared.info["train_chunks"]
    assert stats["training tokens kept (in chunks)"] == prepared.info["train_chunks"] * cfg.data.block_size
    assert 0 <= stats["training tokens dropped (short last chunk)"] < cfg.data.block_size
    assert stats["masked in the shown batch"].startswith(f"{masked:,} of ")
    assert stats["validation masks (fixed, mlm.eval_mask_seed)"].startswith(
        f"{prepared.info['validation_masked_tokens']:,} of ")

    text = render_text(cfg, prepared, rows, stats, [], color=False, width=100)
    p = rows[0]["masked_positions"][0] if rows[0]["masked_positions"] else None
    if p is not None:
        assert f"*{'M' if rows[0]['kinds'][p] == 'mask' else rows[0]['kinds'][p][0].upper()} {rows[0]['tokens'][p]} " \
               f"<- {rows[0]['original_tokens'][p]}" in text


def test_qa_span_is_the_labelled_tokens_and_the_gold_answer(world):
    cfg, prepared = prepared_for(world, "qa")
    tok = prepared.tokenizer
    n = 12
    rows = preview_rows(cfg, prepared, n)
    with_answer = [r for r in rows if r["has_answer"]]
    assert with_answer and any(not r["has_answer"] for r in rows)  # both kinds among the first windows
    for i, row in enumerate(rows):
        feature = prepared.train[i]
        assert row["input_ids"] == list(feature["input_ids"])
        assert (row["start"], row["end"]) == (feature["start_positions"], feature["end_positions"])
        assert row["example_id"] is not None  # the windows were matched to their examples
        question = [t for t, role in zip(row["input_ids"], row["roles"]) if role == "question"]
        assert tok.decode(question) == tok.decode(tok(row["question"], add_special_tokens=False)["input_ids"])
        if row["has_answer"]:
            assert row["span_tokens"] == tok.convert_ids_to_tokens(row["input_ids"][row["start"] : row["end"] + 1])
            assert set(row["roles"][row["start"] : row["end"] + 1]) == {"context"}
            assert row["span_text"] == row["gold"]  # the labelled tokens are exactly the answer's characters
        else:
            assert row["span_tokens"] == [] and row["start"] == row["end"] == 0

    stats = preview_stats(cfg, prepared, rows)
    assert stats["training windows"] == prepared.info["train_windows"]
    assert stats["windows without the answer (CLS)"].startswith(
        f"{prepared.info['train_windows_without_answer']:,} of {prepared.info['train_windows']:,}")
    text = render_text(cfg, prepared, rows, stats, [], color=False, width=100)
    span = " ".join(with_answer[0]["span_tokens"])
    assert f"[[ {span} ]]" in text and "(match)" in text and "no answer in this window (CLS)" in text


def test_classify_label_names_and_truncation(world):
    cfg, prepared = prepared_for(world, "classify")
    rows = preview_rows(cfg, prepared, 6)
    names = ["no_model", "mentions_model"]
    for i, row in enumerate(rows):
        item = prepared.train[i]
        assert row["input_ids"] == item["input_ids"] and row["label"] == item["labels"]
        assert row["label_name"] == names[item["labels"]]
        assert row["truncated"] == (len(item["input_ids"]) == 24)
    stats = preview_stats(cfg, prepared, rows)
    counts = prepared.info["train_label_counts"]
    assert sum(counts.values()) == prepared.info["train_examples"]
    for name, count in counts.items():
        assert f"{name} {count:,} (" in stats["training label distribution"]
    assert stats["training examples truncated"].startswith(f"{prepared.info['train_truncated']:,} of ")
    assert prepared.info["train_truncated"] > 0
    text = render_text(cfg, prepared, rows, stats, [], color=False, width=100)
    assert f"label {rows[0]['label']} = '{rows[0]['label_name']}'" in text


@pytest.mark.parametrize("packing", [False, True])
def test_sft_boundary_is_the_first_trained_token(world, packing):
    cfg, prepared = prepared_for(world, "sft", **{"sft.packing": packing})
    tok = prepared.tokenizer
    rows = preview_rows(cfg, prepared, 3)
    for i, row in enumerate(rows):
        feature = prepared.train[i]
        assert row["input_ids"] == list(feature["input_ids"]) and row["labels"] == list(feature["labels"])
        trained = [p for p, lab in enumerate(feature["labels"]) if lab != IGNORE]
        assert row["boundary"] == trained[0] and row["trained_tokens"] == len(trained)
        starts = [p for p in trained if p == 0 or feature["labels"][p - 1] == IGNORE]
        assert row["boundaries"] == starts
    first = rows[0]
    if not packing:  # one example: the prompt, then the response and EOS
        example = prepared.info["example"]
        assert tok.decode(first["input_ids"][: first["boundary"]]) == example["prompt"]
        assert first["eos_positions"] == [len(first["input_ids"]) - 1] or first["cut"]
        if not first["cut"]:
            assert tok.decode(first["input_ids"][first["boundary"] : -1]) == example["response"]
    else:  # several examples to a sequence: several boundaries
        assert any(len(r["boundaries"]) > 1 for r in rows)
        assert all(len(r["eos_positions"]) >= len(r["boundaries"]) - 1 for r in rows)
    stats = preview_stats(cfg, prepared, rows)
    assert stats["training examples"] == prepared.info["train_examples"]
    text = render_text(cfg, prepared, rows, stats, [], color=False, width=100)
    assert f"boundary at token {first['boundary']}" in text and "|| response" in text


def test_dpo_reward_and_rl_rows_are_the_prepared_token_ids(world):
    cfg, prepared = prepared_for(world, "dpo")
    tok = prepared.tokenizer
    rows = preview_rows(cfg, prepared, 3)
    for i, row in enumerate(rows):
        item = prepared.train[i]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert row[key] == item[key]
        assert row["chosen_tokens"][-1] == tok.eos_token and not row["chosen_cut"]
        assert row["prompt_at_limit"] == (len(item["prompt_ids"]) == 6)
    example = prepared.info["example"]
    assert tok.decode(rows[0]["prompt_ids"]) == tok.decode(tok(example["prompt"])["input_ids"][-6:])
    stats = preview_stats(cfg, prepared, rows)
    assert stats["training pairs"] == prepared.info["train_pairs"]
    assert "pair 0" in render_text(cfg, prepared, rows, stats, [], color=False, width=100)

    cfg, prepared = prepared_for(world, "reward")
    rows = preview_rows(cfg, prepared, 3)
    for i, row in enumerate(rows):
        item = prepared.train[i]
        assert row["chosen_ids"] == item["chosen_ids"] and row["rejected_ids"] == item["rejected_ids"]
        shared = row["shared"]
        assert item["chosen_ids"][:shared] == item["rejected_ids"][:shared]
        assert item["chosen_ids"][shared] != item["rejected_ids"][shared]
    example = prepared.info["example"]
    assert prepared.tokenizer.decode(rows[0]["chosen_ids"]) == (
        example["prompt"] + example["chosen"] + prepared.tokenizer.eos_token)

    cfg, prepared = prepared_for(world, "rl")
    rows = preview_rows(cfg, prepared, 2)
    assert [r["prompt"] for r in rows] == list(prepared.train["prompt"][:2])
    assert prepared.tokenizer.decode(rows[0]["prompt_ids"]) == rows[0]["prompt"]
    assert preview_stats(cfg, prepared, rows)["training prompts"] == prepared.info["train_prompts"]


# --------------------------------------------------------------------------------------------------
# The command


@pytest.mark.parametrize("task, figure", [
    ("clm", "training tokens dropped"), ("mlm", "validation masks"), ("qa", "windows per example"),
    ("classify", "training label distribution"), ("sft", "prompt | response boundary"), ("dpo", "training pairs"),
])
def test_preview_command_prints_examples_and_statistics(world, capsys, task, figure):
    assert main(["preview", str(recipe(world, task)), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"lmtune preview: preview-{task} (task {task})")
    assert "statistics" in out and figure in out
    assert "training" in out.split("statistics", 1)[1]
    assert "\033" not in out  # captured output is not a terminal: plain text


def test_color_only_adds_emphasis(world):
    cfg, prepared = prepared_for(world, "qa")
    rows = preview_rows(cfg, prepared, 3)
    stats = preview_stats(cfg, prepared, rows)
    plain = render_text(cfg, prepared, rows, stats, [], color=False, width=100)
    colored = render_text(cfg, prepared, rows, stats, [], color=True, width=100)
    assert "\033[" in colored and ANSI.sub("", colored) == plain


def test_bad_recipe_and_bad_data_are_one_sentence(world, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(recipe(world, "clm").read_text()), "trainng": {}}))
    code = main(["preview", str(bad)])
    assert_one_sentence(code, capsys.readouterr().err, "trainng")

    missing = recipe(world, "sft", **{"data.train.path": str(tmp_path / "nowhere.jsonl")})
    code = main(["preview", str(missing), "--n", "2"])
    assert_one_sentence(code, capsys.readouterr().err, "nowhere.jsonl")

    code = main(["preview", str(recipe(world, "clm")), "--n", "0"])
    assert_one_sentence(code, capsys.readouterr().err, "--n")
