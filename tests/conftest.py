"""Shared fixtures: tiny tokenizers and corpora built in the test session itself; never the Hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test session gets its own lmtune cache (set before any fixture runs), so tests never read or
# write a developer's cache.
os.environ["LMTUNE_CACHE"] = __import__("tempfile").mkdtemp(prefix="lmtune-test-cache-")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = (
    "the model reads data and trains a small network on text so loss goes down while the tokenizer "
    "splits words into pieces import numpy as np import pandas as pd def fit predict return value"
).split()


def make_documents(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread; on a busy two-core machine two OpenMP threads can be many
    times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from lmtune.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(make_documents(400, seed=1), vocab_size=400, min_frequency=1)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(out))
    return tok


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
