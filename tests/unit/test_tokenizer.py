"""Byte-level BPE training: a Hugging Face folder that AutoTokenizer loads, with special tokens."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lmtune.cli import main
from lmtune.errors import InputError
from lmtune.tokenizer import EOS_TOKEN, PAD_TOKEN, train_bpe_tokenizer

from ..helpers import make_documents


def test_trained_tokenizer_round_trips_and_loads(tmp_path):
    docs = make_documents(300, seed=3)
    tok = train_bpe_tokenizer(docs, vocab_size=500, min_frequency=1)
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.bos_token == loaded.eos_token == EOS_TOKEN
    assert loaded.pad_token == PAD_TOKEN and loaded.pad_token_id != loaded.eos_token_id
    assert len(loaded) <= 500
    text = "import pandas as pd\n\tdef fit(x): return 'é ü ∑'"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text  # byte-level: any text, lossless
    # Merges were learned: a frequent word is one token.
    assert len(loaded("tokenizer", add_special_tokens=False)["input_ids"]) == 1


def test_vocab_too_small_and_empty_corpus():
    with pytest.raises(InputError, match="too small"):
        train_bpe_tokenizer(["a b c"], vocab_size=100)
    with pytest.raises(InputError, match="empty corpus"):
        train_bpe_tokenizer([], vocab_size=400)


def test_max_bytes_limits_training_text():
    docs = make_documents(200, seed=4)
    small = train_bpe_tokenizer(docs, vocab_size=2000, min_frequency=1, max_bytes=200)
    large = train_bpe_tokenizer(docs, vocab_size=2000, min_frequency=1)
    assert len(small) < len(large)


def test_cli_tokenizer_train(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"body": d}) for d in make_documents(200, seed=5)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--text-field", "body", "--vocab-size", "400",
                 "--min-frequency", "1", "--out", str(out)]) == 0
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == EOS_TOKEN
    capsys.readouterr()
    # An existing output folder is not replaced without --overwrite.
    before = (out / "tokenizer.json").read_bytes()
    assert main(["tokenizer", "train", "--data", str(data), "--text-field", "body", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == before
