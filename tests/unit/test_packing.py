"""Packing against a plain pure-Python reference (hypothesis), tokenizing, caching and streaming, with a
real tokenizer built in the test session."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtune.data.packing import (
    BlockDataset,
    StreamingBlockDataset,
    cache_root,
    pack,
    pack_concatenated,
    pack_overflow,
    prepare_blocks,
    stream_blocks,
    tokenize_texts,
    tokenize_to_arrays,
    tokenizer_fingerprint,
)
from lmtune.data.packing import _batches
from lmtune.data.sources import fingerprint_texts

from ..helpers import WORDS, make_documents

EOS = 0


# --------------------------------------------------------------------------------------------------
# The reference: the tutorials' packing, written as plainly as possible


def reference_concat(docs, block_size, eos):
    """Every document followed by EOS, all concatenated, cut into blocks; the remainder dropped."""
    stream = []
    for doc in docs:
        stream.extend(doc)
        stream.append(eos)
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def reference_overflow(docs, block_size):
    """Each document cut into consecutive chunks on its own; only full-length chunks kept."""
    blocks = []
    for doc in docs:
        for start in range(0, len(doc), block_size):
            chunk = doc[start : start + block_size]
            if len(chunk) == block_size:
                blocks.append(chunk)
    return blocks


def reference(docs, block_size, mode, eos=EOS):
    return reference_concat(docs, block_size, eos) if mode == "concat" else reference_overflow(docs, block_size)


def check_blocks(blocks, block_size, expected):
    assert isinstance(blocks, np.ndarray)
    assert blocks.dtype == np.int32
    assert blocks.ndim == 2 and blocks.shape == (len(expected), block_size)
    assert blocks.tolist() == expected


def test_reference_itself():
    docs = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9]]
    assert reference_concat(docs, 3, 0) == [[1, 2, 3], [0, 0, 4], [5, 6, 7], [8, 0, 9]]  # remainder [0] dropped
    assert reference_overflow(docs, 2) == [[1, 2], [4, 5], [6, 7]]
    assert reference_overflow(docs, 6) == []


# --------------------------------------------------------------------------------------------------
# Packing = reference, on random documents of random lengths (empty ones and ones shorter than a block)


token_ids = st.integers(1, 2**31 - 1)  # any int32 token id; 0 is the EOS here
documents = st.lists(
    st.one_of(st.just([]), st.lists(token_ids, max_size=4), st.lists(token_ids, max_size=80)), max_size=40
)
block_sizes = st.one_of(st.sampled_from([1, 2, 3, 8, 16, 128]), st.integers(1, 40))


@settings(max_examples=200, deadline=None)
@given(docs=documents, block_size=block_sizes, mode=st.sampled_from(["concat", "overflow"]))
def test_pack_equals_reference(docs, block_size, mode):
    check_blocks(pack(docs, block_size, mode, EOS), block_size, reference(docs, block_size, mode))


@settings(max_examples=100, deadline=None)
@given(docs=documents, block_size=block_sizes, eos=st.integers(0, 2**31 - 1))
def test_concat_and_overflow_functions_equal_reference(docs, block_size, eos):
    check_blocks(pack_concatenated(docs, block_size, eos), block_size, reference_concat(docs, block_size, eos))
    check_blocks(pack_overflow(docs, block_size), block_size, reference_overflow(docs, block_size))


@pytest.mark.parametrize("block_size", [1, 7, 64, 128, 1000])
@pytest.mark.parametrize("mode", ["concat", "overflow"])
def test_pack_equals_reference_on_a_large_random_corpus(block_size, mode):
    rng = np.random.default_rng(block_size)
    docs = [rng.integers(1, 50_000, rng.integers(0, 400)).tolist() for _ in range(600)]
    docs += [[], [5] * block_size, [6] * (block_size - 1), [7] * (2 * block_size + 1)]
    blocks = pack(docs, block_size, mode, EOS)
    check_blocks(blocks, block_size, reference(docs, block_size, mode))
    assert len(blocks) > 0


def test_pack_of_nothing():
    for mode in ("concat", "overflow"):
        check_blocks(pack([], 4, mode, EOS), 4, [])
        check_blocks(pack([[], []], 4, mode, EOS), 4, [])
    check_blocks(pack([[1]], 4, "concat", EOS), 4, [])  # 2 tokens < one block
    check_blocks(pack([[1, 2, 3]], 4, "concat", EOS), 4, [[1, 2, 3, EOS]])  # the EOS completes it


def test_pack_refuses_bad_arguments():
    with pytest.raises(ValueError, match="EOS"):
        pack([[1, 2]], 2, "concat", None)
    with pytest.raises(ValueError, match="mode"):
        pack([[1, 2]], 2, "group", EOS)
    with pytest.raises(ValueError, match="block_size"):
        pack([[1, 2]], 0, "overflow", EOS)


# --------------------------------------------------------------------------------------------------
# Tokenizing


TRICKY_TEXTS = [
    "",
    " ",
    "\n\n\t",
    "import numpy as np",
    "  leading and trailing spaces  ",
    "é∑ 漢字 emoji 🙂 mixed",
    "a<|endoftext|>b",  # the EOS token's text inside a document
    "<pad> pad text",
    "x" * 5000,  # longer than the tokenizer's model_max_length of 1024 tokens: never truncated
]


def wrapper_ids(tokenizer, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the wrapper warns about sequences over model_max_length
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.mark.parametrize("batch_size", [1, 4, 1024])
def test_tokenize_texts_equals_the_tokenizer(tiny_tokenizer, batch_size):
    texts = TRICKY_TEXTS + make_documents(30, seed=11, min_words=0)
    got = list(tokenize_texts(tiny_tokenizer, texts, batch_size=batch_size))
    assert got == wrapper_ids(tiny_tokenizer, texts)
    assert got[0] == [] and len(got[len(TRICKY_TEXTS) - 1]) > 1024  # the long text is whole
    assert all(isinstance(i, int) for ids in got for i in ids)


def test_tokenize_texts_ignores_truncation_and_padding_set_on_the_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.enable_truncation(max_length=3)
    tok.backend_tokenizer.enable_padding(pad_id=tok.pad_token_id, pad_token=tok.pad_token, length=50)
    texts = make_documents(10, seed=12)
    assert list(tokenize_texts(tok, texts)) == wrapper_ids(tiny_tokenizer, texts)


def test_tokenize_texts_adds_no_special_tokens(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)  # a tokenizer that adds BOS, as Llama's does
    eos = tok.eos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.eos_token} $A", special_tokens=[(tok.eos_token, eos)]
    )
    texts = make_documents(10, seed=13)
    assert all(ids[0] == eos for ids in tok(texts)["input_ids"])  # the wrapper adds it by default
    got = list(tokenize_texts(tok, texts, batch_size=3))
    assert got == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert all(ids[0] != eos for ids in got)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 50), max_size=30), max_docs=st.integers(1, 8), max_chars=st.integers(1, 120))
def test_batches_keep_order_and_bounds(lengths, max_docs, max_chars):
    texts = ["x" * n for n in lengths]
    batches = list(_batches(texts, max_docs, max_chars))
    assert [t for b in batches for t in b] == texts
    for b in batches:
        assert 1 <= len(b) <= max_docs
        # a batch goes over the character budget only when it is a single long document
        assert sum(map(len, b)) <= max_chars or len(b) == 1


def test_tokenize_to_arrays_with_a_small_character_budget_equals_the_tokenizer(tiny_tokenizer):
    texts = TRICKY_TEXTS + make_documents(30, seed=14, min_words=0)
    got = list(tokenize_texts(tiny_tokenizer, texts, max_batch_chars=200))
    assert got == wrapper_ids(tiny_tokenizer, texts)
    arrays = tokenize_to_arrays(tiny_tokenizer, texts)
    assert all(a.dtype == np.int32 for a in arrays)
    assert [a.tolist() for a in arrays] == got
    # packing arrays and packing lists give the same blocks
    assert np.array_equal(pack(arrays, 16, "concat", EOS), pack(got, 16, "concat", EOS))
    assert np.array_equal(pack(arrays, 16, "overflow", None), pack(got, 16, "overflow", None))


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(max_size=40), max_size=12))
def test_tokenize_texts_equals_the_tokenizer_on_any_text(tiny_tokenizer, texts):
    assert list(tokenize_texts(tiny_tokenizer, texts, batch_size=5)) == wrapper_ids(tiny_tokenizer, texts)


# --------------------------------------------------------------------------------------------------
# Cached preparation


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache of the test's own, so tests see exactly the entries they wrote."""
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "blocks").glob("*")) if (cache / "blocks").is_dir() else []


def test_the_test_session_has_its_own_cache():
    root = os.environ.get("LMTUNE_CACHE")
    assert root, "conftest must set LMTUNE_CACHE for the session"
    assert cache_root() == Path(root)
    assert Path(root).is_relative_to(tempfile.gettempdir()) and Path(root).name.startswith("lmtune-test-cache-")
    assert not Path(root).is_relative_to(Path("~/.cache").expanduser())


def test_cache_root_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("LMTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "lmtune"


@pytest.mark.parametrize("mode", ["concat", "overflow"])
def test_prepare_blocks_builds_then_reuses_the_cache(tiny_tokenizer, cache_dir, mode):
    texts = make_documents(60, seed=13) + [""]
    fp = fingerprint_texts(texts)
    ids = wrapper_ids(tiny_tokenizer, texts)
    expected = reference(ids, 16, mode, tiny_tokenizer.eos_token_id)

    first, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, mode)
    check_blocks(first, 16, expected)
    tokens = sum(map(len, ids)) + (len(ids) if mode == "concat" else 0)
    assert info == {"cached": False, "blocks": len(expected), "tokens": tokens,
                    "tokens_dropped": tokens - 16 * len(expected), "cache_file": info["cache_file"]}
    assert cache_files(cache_dir) == [Path(info["cache_file"])]

    second, info2 = prepare_blocks(texts, fp, tiny_tokenizer, 16, mode)
    assert info2["cached"] is True and info2["blocks"] == len(expected)
    assert info2["cache_file"] == info["cache_file"]
    check_blocks(second, 16, expected)
    assert not second.flags.writeable  # memory-mapped read-only: nobody edits the cache through it


def test_prepare_blocks_uses_the_session_cache(tiny_tokenizer):
    texts = make_documents(20, seed=14)
    fp = fingerprint_texts(texts, salt="session-cache-test")
    _, info = prepare_blocks(texts, fp, tiny_tokenizer, 8, "concat")
    assert Path(info["cache_file"]).is_relative_to(cache_root() / "blocks")
    assert Path(info["cache_file"]).is_file()
    assert prepare_blocks(texts, fp, tiny_tokenizer, 8, "concat")[1]["cached"]


def test_prepare_blocks_cache_key(tiny_tokenizer, cache_dir):
    texts = make_documents(40, seed=15)
    fp = fingerprint_texts(texts)
    base, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    files = {info["cache_file"]}

    def miss(texts, fp, tokenizer, block_size, mode):
        blocks, info = prepare_blocks(texts, fp, tokenizer, block_size, mode)
        assert info["cached"] is False and info["cache_file"] not in files
        files.add(info["cache_file"])
        expected = reference(wrapper_ids(tokenizer, texts), block_size, mode, tokenizer.eos_token_id)
        check_blocks(blocks, block_size, expected)

    changed = texts[:-1] + [texts[-1] + " more"]
    miss(changed, fingerprint_texts(changed), tiny_tokenizer, 16, "concat")  # another corpus
    miss(texts, fp, tiny_tokenizer, 8, "concat")  # another block size
    miss(texts, fp, tiny_tokenizer, 16, "overflow")  # another packing
    grown = copy.deepcopy(tiny_tokenizer)
    grown.add_tokens(["import numpy"])
    assert tokenizer_fingerprint(grown) != tokenizer_fingerprint(tiny_tokenizer)
    miss(texts, fp, grown, 16, "concat")  # another tokenizer
    assert len(cache_files(cache_dir)) == 5
    # ... and the first entry is still there, untouched.
    again, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    assert info["cached"] and np.array_equal(again, base)


def test_tokenizer_fingerprint_ignores_truncation_and_padding(tiny_tokenizer, cache_dir):
    texts = make_documents(30, seed=16)
    fp = fingerprint_texts(texts)
    blocks, _ = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.enable_truncation(max_length=4)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tiny_tokenizer)
    cached, info = prepare_blocks(texts, fp, tok, 16, "concat")
    assert info["cached"] and np.array_equal(cached, blocks)


def test_prepare_blocks_without_cache(tiny_tokenizer, cache_dir):
    texts = make_documents(30, seed=17)
    fp = fingerprint_texts(texts)
    blocks, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat", use_cache=False)
    assert info["cached"] is False and cache_files(cache_dir) == []
    prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    again, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat", use_cache=False)
    assert info["cached"] is False and np.array_equal(again, blocks)


def _corrupt(path: Path, how: str) -> None:
    good = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"garbage" * 10)
    elif how == "truncated-body":
        path.write_bytes(good[: len(good) - 10])
    elif how == "truncated-header":
        path.write_bytes(good[:20])
    elif how == "wrong-dtype":
        np.save(path, np.load(path).astype(np.float64))
    elif how == "wrong-width":
        np.save(path, np.zeros((3, 5), dtype=np.int32))
    elif how == "one-dimensional":
        np.save(path, np.load(path).reshape(-1))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["empty", "garbage", "truncated-body", "truncated-header", "wrong-dtype", "wrong-width", "one-dimensional"]
)
def test_a_damaged_cache_file_is_rebuilt_not_trusted(tiny_tokenizer, cache_dir, how):
    texts = make_documents(40, seed=18)
    fp = fingerprint_texts(texts)
    good, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    good = np.array(good)
    path = Path(info["cache_file"])
    _corrupt(path, how)
    rebuilt, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    assert info["cached"] is False
    assert rebuilt.dtype == np.int32 and np.array_equal(rebuilt, good)
    # The entry was written again, whole: the next call uses it.
    cached, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    assert info["cached"] is True and cached.dtype == np.int32 and np.array_equal(cached, good)


def test_an_unwritable_cache_costs_speed_not_correctness(tiny_tokenizer, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LMTUNE_CACHE", str(blocker))
    texts = make_documents(20, seed=19)
    blocks, info = prepare_blocks(texts, fingerprint_texts(texts), tiny_tokenizer, 8, "overflow")
    assert info["cached"] is False
    check_blocks(blocks, 8, reference_overflow(wrapper_ids(tiny_tokenizer, texts), 8))


# --------------------------------------------------------------------------------------------------
# Streaming: the same blocks as in memory


@pytest.mark.parametrize("mode", ["concat", "overflow"])
@pytest.mark.parametrize(("block_size", "batch_docs"), [(16, 7), (48, 3), (5, 1), (16, 1000)])
def test_stream_blocks_equal_the_in_memory_blocks(tiny_tokenizer, mode, block_size, batch_docs):
    texts = make_documents(50, seed=20, min_words=0, max_words=120)
    in_memory, _ = prepare_blocks(texts, fingerprint_texts(texts), tiny_tokenizer, block_size, mode, use_cache=False)
    streamed = list(stream_blocks((t for t in texts), tiny_tokenizer, block_size, mode, batch_docs=batch_docs))
    assert all(b.dtype == np.int32 and b.shape == (block_size,) for b in streamed)
    assert len(streamed) == len(in_memory) > 0
    assert np.array_equal(np.stack(streamed), in_memory)


@settings(max_examples=30, deadline=None)
@given(
    docs=st.lists(st.lists(st.sampled_from(WORDS), max_size=30).map(" ".join), max_size=25),
    block_size=st.integers(2, 24),
    batch_docs=st.integers(1, 6),
    mode=st.sampled_from(["concat", "overflow"]),
)
def test_stream_blocks_property(tiny_tokenizer, docs, block_size, batch_docs, mode):
    expected = reference(wrapper_ids(tiny_tokenizer, docs), block_size, mode, tiny_tokenizer.eos_token_id)
    streamed = [b.tolist() for b in stream_blocks(iter(docs), tiny_tokenizer, block_size, mode, batch_docs)]
    assert streamed == expected


def test_stream_blocks_reads_lazily(tiny_tokenizer):
    read = []

    def texts():
        for i, text in enumerate(make_documents(1000, seed=21)):
            read.append(i)
            yield text

    blocks = stream_blocks(texts(), tiny_tokenizer, 8, "concat", batch_docs=10)
    next(blocks)
    assert len(read) <= 10


def test_streaming_dataset_items(tiny_tokenizer):
    texts = make_documents(30, seed=22)
    expected, _ = prepare_blocks(texts, fingerprint_texts(texts), tiny_tokenizer, 16, "concat", use_cache=False)
    ds = StreamingBlockDataset(lambda: iter(texts), tiny_tokenizer, 16, "concat")
    for _epoch in range(2):  # every epoch reads the stream from the start
        items = list(ds)
        assert len(items) == len(expected)
        for item, block in zip(items, expected, strict=True):
            assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
            assert item["input_ids"].tolist() == item["labels"].tolist() == block.tolist()


# --------------------------------------------------------------------------------------------------
# Torch datasets


def test_block_dataset_items():
    blocks = np.arange(12, dtype=np.int32).reshape(3, 4)
    ds = BlockDataset(blocks)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
        assert item["input_ids"].shape == (4,)
        assert torch.equal(item["input_ids"], item["labels"])
        assert item["input_ids"].tolist() == blocks[i].tolist()


def test_block_dataset_over_cached_memory_mapped_blocks(tiny_tokenizer, cache_dir):
    texts = make_documents(30, seed=23)
    fp = fingerprint_texts(texts)
    built, _ = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    cached, info = prepare_blocks(texts, fp, tiny_tokenizer, 16, "concat")
    assert info["cached"]
    ds = BlockDataset(cached)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable arrays
        batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"].tolist() == batch["labels"].tolist() == built.tolist()


def test_documents_start_with_the_tokenizers_own_bos_where_it_adds_one(tmp_path, monkeypatch):
    """Llama 3 and Gemma put BOS before every text; packed documents, generation prompts and SFT prompts
    get it too (a GPT-2-style tokenizer adds nothing, and gets nothing)."""
    from tokenizers import processors

    from lmtune.tasks.clm import encode_prompts
    from lmtune.tasks.sft import Pair, tokenize_pairs
    from lmtune.tokenizer import leading_special_ids, train_bpe_tokenizer

    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path))
    docs = ["alpha beta gamma delta", "beta gamma", "gamma delta alpha beta gamma"]
    tokenizer = train_bpe_tokenizer(docs * 20, vocab_size=300, min_frequency=1)
    assert leading_special_ids(tokenizer) == []
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert leading_special_ids(tokenizer) == [bos]
    plain = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    blocks, _ = prepare_blocks(docs, "bos-test", tokenizer, 4, "concat")
    eos = tokenizer.eos_token_id
    expected = [t for ids in plain for t in [bos, *ids, eos]]
    assert blocks.reshape(-1).tolist() == expected[: len(blocks) * 4]
    assert encode_prompts(tokenizer, ["beta gamma", "<bos>beta gamma"]) == [[bos, *plain[1]], [bos, *plain[1]]]
    [feature] = tokenize_pairs(tokenizer, [Pair("beta", " gamma")], 32, completion_only=True, add_eos=True)
    assert feature["input_ids"][0] == bos and feature["labels"][0] == -100
