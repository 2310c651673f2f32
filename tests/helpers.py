"""Helpers the test modules share (test modules never import each other): corpora and recipes built in the
session, tiny models, record writers, and the assertions on error sentences and report pages."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import random
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


# The real data of the slow tests: ../shared/data beside the repository, or the folder LMTUNE_SHARED_DATA names.
SHARED_DATA = Path(os.environ.get("LMTUNE_SHARED_DATA") or REPO.parent / "shared" / "data")


WORDS = (
    "the model reads data and trains a small network on text so loss goes down while the tokenizer "
    "splits words into pieces import numpy as np import pandas as pd def fit predict return value"
).split()


def make_documents(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def assert_one_sentence(code, err, *fragments) -> str:
    """Exit code 2, no traceback, exactly one `lmtune: error:` line holding every fragment; returns it."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lmtune: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def fact_rows(facts: dict[str, str], question: str, answer: str, n: int, seed: int) -> list[dict]:
    """n seeded {question, answer} records about `facts` (key -> value): question.format(key) and
    answer.format(key, value), e.g. "What does the cat say?" / "The cat says meow."."""
    rng = random.Random(seed)
    keys = [rng.choice(sorted(facts)) for _ in range(n)]
    return [{"question": question.format(k), "answer": answer.format(k, facts[k])} for k in keys]


def save_tiny_gpt2(folder, tokenizer, n_positions: int = 128) -> None:
    """A tiny 'pretrained' GPT-2 (random weights, seeded) with `tokenizer` in `folder`; EOS doubles as BOS."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=n_positions,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def with_changes(recipe: dict, changes: dict) -> dict:
    """The recipe with dotted keys set: {"training.max_steps": 1} -> recipe["training"]["max_steps"] = 1."""
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return recipe


# SmolLM2's chat template, word for word in structure: ChatML with a default system turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE trained on `texts` with SmolLM2's special tokens: <|im_start|> is BOS,
    <|im_end|> ends a turn and is EOS and pad, <|endoftext|> is unknown; and its chat template."""
    from lmtune.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, min_frequency=1)
    tokenizer.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                                  "unk_token": "<|endoftext|>"})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer, tied: bool = True, seed: int = 0):
    """A tiny Llama (random weights, seeded) with grouped-query attention (4 query heads, 2 key/value
    heads) sized to `tokenizer`, its special ids those of the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def save_tiny_llama_gguf(path, tokenizer, tied: bool = True, seed: int = 0):
    """`tiny_llama` written as a GGUF file at `path` with the gguf package's writer; returns the model."""
    from lmtune.gguf_export import write_llama_gguf

    model = tiny_llama(tokenizer, tied, seed)
    write_llama_gguf(model, tokenizer, path)
    return model


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object per line (UTF-8); returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_text_records(path: Path, texts) -> Path:
    """Documents as {"text": ...} records, one per line: the corpus file most recipes in the tests read."""
    return write_jsonl(path, ({"text": t} for t in texts))


# --------------------------------------------------------------------------------------------------
# Recipes of the end-to-end tests


def tiny_recipe(tmp, data, name="tiny", **changes) -> Path:
    """A tiny causal-LM recipe (GPT-2 from scratch, its own tokenizer, keytoken loss) written to tmp/NAME.yaml."""
    recipe = {
        "task": "clm",
        "name": name,
        "data": {"train": {"path": str(data), "text_field": "text"}, "block_size": 32, "validation_fraction": 0.1},
        "tokenizer": {"train": True, "vocab_size": 400, "min_frequency": 1},
        "model": {"from_scratch": {"n_layer": 2, "n_head": 2, "n_embd": 64}},
        "loss": {"type": "keytoken", "keywords": ["model", " model", "zzzqqq"], "alpha": 1.0},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 60, "logging_steps": 10,
                     "warmup_steps": 5, "save_steps": 30, "precision": "fp32", "seed": 1},
        "generation": {"prompts": ["the model", "import numpy"], "max_new_tokens": 8},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(with_changes(recipe, changes)))
    return path


# Four topics, each a cycle of six words; a document walks one topic's cycle from a random start. A
# masked word is predictable from its context (the topic, then the neighbours), while a model that
# learns only word frequencies stays near perplexity 24.
TOPICS = {
    "greek": "alpha beta gamma delta epsilon zeta".split(),
    "colour": "red green blue yellow purple orange".split(),
    "fruit": "apple banana cherry grape lemon mango".split(),
    "number": "one two three four five six".split(),
}


def topic_documents(n: int, seed: int) -> list[str]:
    """n seeded documents, each walking one of TOPICS' word cycles."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = rng.choice(list(TOPICS.values()))
        start, length = rng.randrange(len(words)), rng.randint(8, 40)
        docs.append(" ".join(words[(start + i) % len(words)] for i in range(length)))
    return docs


def mlm_recipe(data, name="mlm-tiny", **changes) -> dict:
    """A tiny masked-LM recipe (BERT from scratch, a WordPiece tokenizer trained in the run)."""
    recipe = {
        "task": "mlm",
        "name": name,
        "data": {"train": {"path": str(data), "text_field": "text"}, "block_size": 32, "validation_fraction": 0.1},
        "tokenizer": {"train": True, "vocab_size": 300, "min_frequency": 1},
        "model": {"from_scratch": {"architecture": "bert", "n_layer": 2, "n_head": 2, "n_embd": 64}},
        "mlm": {"last_chunk": "pad"},
        "training": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 200, "logging_steps": 20,
                     "warmup_steps": 10, "save_strategy": "no", "precision": "fp32", "seed": 1},
        "generation": {"prompts": ["alpha beta [MASK] delta epsilon"]},
    }
    return with_changes(recipe, changes)


# --------------------------------------------------------------------------------------------------
# report.html


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def assert_valid_pngs(page: str, at_least: int) -> list[tuple[int, int]]:
    from PIL import Image

    images = pngs(page)
    assert len(images) >= at_least, len(images)
    sizes = []
    for data in images:
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes every pixel: a truncated file fails here
            assert im.format == "PNG"
            assert 300 <= im.width <= 2000 and 200 <= im.height <= 2000, im.size
            assert len(set(im.convert("L").getdata())) > 10  # drawn on, not a blank canvas
            sizes.append(im.size)
    return sizes


def assert_metric_rows(page: str, before: dict, after: dict, keys) -> None:
    """The metrics table has a row per key with its before and after values as the page formats them."""
    from lmtune import report

    for key in keys:
        row = re.search(rf"<tr><td>{re.escape(report.metric_label(key))}</td>(.*?)</tr>", page)
        assert row, key
        cells = re.findall(r"<td class=n>(.*?)</td>", row.group(1))
        assert cells[:2] == [report.format_number(before[key]), report.format_number(after[key])], (key, cells)


def assert_report(run, keys, *texts, plots: int = 4) -> str:
    """For the end-to-end tests: the report.html a real run left holds the metrics of its metrics.json
    (before and after), the given texts (escaped as the page shows them) and at least `plots` valid PNGs."""
    page = (run / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert_metric_rows(page, metrics["before"], metrics["after"], keys)
    for text in texts:
        assert html.escape(text) in page, text
    assert_valid_pngs(page, plots)
    assert 'class="badge finished"' in page
    return page
