"""Packing against a plain reference, tokenizing, caching and streaming."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtune.data.packing import (
    BlockDataset,
    cache_root,
    pack_concatenated,
    pack_overflow,
    prepare_blocks,
    stream_blocks,
    tokenize_texts,
)
from lmtune.data.sources import fingerprint_texts

from ..conftest import make_documents

EOS = 0


def reference_concat(docs, block_size, eos):
    stream = []
    for doc in docs:
        stream.extend(doc)
        stream.append(eos)
    n = len(stream) // block_size
    return [stream[i * block_size : (i + 1) * block_size] for i in range(n)]


def reference_overflow(docs, block_size):
    blocks = []
    for doc in docs:
        for start in range(0, len(doc), block_size):
            chunk = doc[start : start + block_size]
            if len(chunk) == block_size:
                blocks.append(chunk)
    return blocks


documents = st.lists(st.lists(st.integers(1, 5000), min_size=0, max_size=70), min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(docs=documents, block_size=st.integers(1, 33))
def test_concat_equals_reference(docs, block_size):
    blocks = pack_concatenated(docs, block_size, EOS)
    assert blocks.dtype == np.int32 and blocks.shape[1:] == (block_size,)
    assert blocks.tolist() == reference_concat(docs, block_size, EOS)


@settings(max_examples=150, deadline=None)
@given(docs=documents, block_size=st.integers(1, 33))
def test_overflow_equals_reference(docs, block_size):
    blocks = pack_overflow(docs, block_size)
    assert blocks.dtype == np.int32 and blocks.shape[1:] == (block_size,)
    assert blocks.tolist() == reference_overflow(docs, block_size)


def test_random_documents_both_modes():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 9000, rng.integers(0, 400)).tolist() for _ in range(500)]
    for bs in (7, 64, 128):
        assert pack_concatenated(docs, bs, EOS).tolist() == reference_concat(docs, bs, EOS)
        assert pack_overflow(docs, bs).tolist() == reference_overflow(docs, bs)


def test_tokenize_texts_matches_the_tokenizer(tiny_tokenizer):
    texts = make_documents(50, seed=11) + ["", "  ", "é∑ unknown-ish words"]
    got = list(tokenize_texts(tiny_tokenizer, texts, batch_size=7))
    want = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert got == want


@pytest.mark.parametrize("mode", ["concat", "overflow"])
def test_stream_equals_in_memory(tiny_tokenizer, mode):
    texts = make_documents(120, seed=12, max_words=120)
    lists = list(tokenize_texts(tiny_tokenizer, texts))
    expected = pack_concatenated(lists, 16, tiny_tokenizer.eos_token_id) if mode == "concat" else pack_overflow(
        lists, 16)
    streamed = np.array(list(stream_blocks(iter(texts), tiny_tokenizer, 16, mode, batch_docs=13)))
    assert streamed.tolist() == expected.tolist()


def test_prepare_blocks_caches_and_rebuilds(tiny_tokenizer):
    texts = make_documents(80, seed=13)
    fp = fingerprint_texts(texts)
    first, info1 = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    assert not info1["cached"] and info1["tokens"] - info1["tokens_dropped"] == first.size
    assert str(cache_root()) in info1["cache_file"] and "lmtune-test-cache" in info1["cache_file"]
    second, info2 = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    assert info2["cached"] and np.array_equal(first, second)
    # Another block size or another corpus is another entry.
    assert not prepare_blocks(texts, fp, tiny_tokenizer, 8, "concat")[1]["cached"]
    other = texts[:-1]
    assert not prepare_blocks(other, fingerprint_texts(other), tiny_tokenizer, 16, "concat")[1]["cached"]
    # A damaged cache file is rebuilt, not trusted.
    with open(info1["cache_file"], "wb") as fh:
        fh.write(b"garbage")
    third, info3 = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    assert not info3["cached"] and np.array_equal(first, third)


def test_block_dataset_items():
    blocks = np.arange(12, dtype=np.int32).reshape(3, 4)
    ds = BlockDataset(blocks)
    item = ds[1]
    assert len(ds) == 3 and item["input_ids"].dtype.is_floating_point is False
    assert item["input_ids"].tolist() == [4, 5, 6, 7] and item["labels"].tolist() == [4, 5, 6, 7]
    assert str(item["input_ids"].dtype) == "torch.int64"
