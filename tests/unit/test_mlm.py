"""Masked-LM data and masking, with real tokenizers trained in the test (WordPiece for BERT, byte-level
BPE for RoBERTa) and transformers' real DataCollatorForLanguageModeling (through `make_collator`).

Word boundaries are always checked against the tokenizer's own `word_ids()`; chunking against a plain
pure-Python reference."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtune.config import validate_recipe
from lmtune.errors import InputError
from lmtune.tasks.mlm import (
    ChunkDataset,
    FixedMaskedDataset,
    MaskingCollator,
    build_model,
    chunk_stream,
    evaluate,
    fill_mask,
    make_collator,
    mask_once,
    tokenize_with_words,
    with_model_mask,
    word_offsets,
)
from lmtune.tokenizer import train_tokenizer

# --------------------------------------------------------------------------------------------------
# Generated text: made-up long words (a small vocabulary splits them into several tokens), short
# common words and punctuation (its own word for both pre-tokenizers).

SYLLABLES = ["zor", "blax", "ifr", "um", "quin", "tav", "elux", "or", "mep", "tril", "gond", "ash", "vek",
             "yul", "prax", "dorn", "sil", "ith", "ko", "rab"]
SHORT = "a the of and to in is it".split()


def made_up_words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(3, 5))))
    return sorted(words)


LONG_WORDS = made_up_words(300)


def generated_docs(n: int, seed: int, min_words: int = 10, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(min_words, max_words)):
            word = rng.choice(SHORT) if rng.random() < 0.3 else rng.choice(LONG_WORDS)
            if rng.random() < 0.1:
                word += rng.choice([",", ".", "!"])
            words.append(word)
        docs.append(" ".join(words))
    return docs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizers():
    corpus = generated_docs(500, seed=1)
    return {style: train_tokenizer(corpus, 300, min_frequency=1, style=style, model_max_length=32)
            for style in ("bert", "roberta")}


@pytest.fixture(params=["bert", "roberta"])
def tok(request, tokenizers):
    return tokenizers[request.param]


def mlm_config(**mlm):
    return validate_recipe({
        "task": "mlm",
        "name": "unit",
        "data": {"train": {"path": "unused.txt"}, "block_size": 32},
        "tokenizer": {"train": True, "vocab_size": 300},
        "model": {"from_scratch": {"architecture": "bert", "n_layer": 1, "n_head": 2, "n_embd": 32,
                                   "dropout": 0.1}},
        "mlm": mlm,
    })


def mask_chunks(chunks, tokenizer, cfg, seed, batch_size=256):
    """The training path: ChunkDataset items through the task's collator, batch by batch."""
    collator = MaskingCollator(make_collator(tokenizer, cfg, seed=None), seed=seed)
    dataset = ChunkDataset(chunks, cfg.mlm.whole_word_mask, with_index=True)
    out = defaultdict(list)
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for key, value in batch.items():
            out[key].append(value)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# References: the tokenizer's own view of every document


def reference_stream(tokenizer, texts):
    """Per token of the concatenated documents: id, special flag, word start and a global word id
    (document, word) from `tokenizer(text).word_ids()`; None for special tokens."""
    ids, special, starts, words = [], [], [], []
    for d, text in enumerate(texts):
        enc = tokenizer(text, return_special_tokens_mask=True)
        previous = None
        for token, is_special, w in zip(enc["input_ids"], enc["special_tokens_mask"], enc.word_ids(), strict=True):
            ids.append(token)
            special.append(bool(is_special))
            starts.append(w is not None and w != previous)
            words.append(None if w is None else (d, w))
            previous = w
    return ids, special, starts, words


def reference_chunks(values: list, size: int, last_chunk: str, fill) -> list[list]:
    rows = [values[i : i + size] for i in range(0, len(values), size)]
    if rows and len(rows[-1]) < size:
        if last_chunk == "drop":
            rows.pop()
        else:
            rows[-1] = rows[-1] + [fill] * (size - len(rows[-1]))
    return rows


# --------------------------------------------------------------------------------------------------
# Tokenizing with word starts


def test_tokenize_with_words_equals_the_tokenizer(tok):
    texts = generated_docs(40, seed=2) + ["", "  ", "zorblax, quinum.", "a"]
    stream = tokenize_with_words(tok, texts, batch_size=7)
    ids, special, starts, _ = reference_stream(tok, texts)
    assert stream["input_ids"].tolist() == ids
    assert stream["special_tokens_mask"].tolist() == special
    assert stream["word_start"].tolist() == starts
    # Every document carries its own special tokens: [CLS] ... [SEP] / <s> ... </s>.
    first = tok.cls_token_id if tok.cls_token else tok.bos_token_id
    last = tok.sep_token_id if tok.sep_token else tok.eos_token_id
    assert stream["input_ids"].tolist().count(first) == len(texts)
    assert stream["input_ids"].tolist().count(last) == len(texts)
    assert special.count(True) == 2 * len(texts)


def test_the_generated_text_has_many_multi_token_words(tok):
    """The premise of the whole-word tests: most words are split into several tokens."""
    _, _, _, words = reference_stream(tok, generated_docs(50, seed=3))
    sizes = defaultdict(int)
    for w in words:
        if w is not None:
            sizes[w] += 1
    multi = sum(1 for n in sizes.values() if n > 1)
    assert multi / len(sizes) > 0.5, (multi, len(sizes))


def test_word_offsets_are_contiguous_inside_words_with_gaps_between(tok):
    texts = generated_docs(30, seed=4)
    ids, special, starts, words = reference_stream(tok, texts)
    chunks = chunk_stream(tokenize_with_words(tok, texts), 32, "drop", tok.pad_token_id)
    for r, row in enumerate(chunks["word_start"]):
        offsets = word_offsets(row)
        assert offsets.shape == (32, 2)
        assert (offsets[:, 1] - offsets[:, 0] == 1).all()
        assert (np.diff(offsets[:, 0]) > 0).all()  # strictly increasing
        for i in range(1, 32):
            j = r * 32 + i
            same_word = words[j] is not None and words[j] == words[j - 1]
            contiguous = offsets[i, 0] == offsets[i - 1, 1]
            if not special[j]:
                assert contiguous == same_word, (r, i)
                assert contiguous == (not starts[j])
    # The batched form (what the dataset builds row by row) is the same.
    batched = word_offsets(chunks["word_start"])
    assert all(np.array_equal(batched[r], word_offsets(row)) for r, row in enumerate(chunks["word_start"]))


# --------------------------------------------------------------------------------------------------
# chunk_stream against the reference


def check_chunks(stream, size, last_chunk, pad_id):
    chunks = chunk_stream(stream, size, last_chunk, pad_id)
    fills = {"input_ids": pad_id, "special_tokens_mask": True, "word_start": False}
    for key, fill in fills.items():
        expected = reference_chunks(stream[key].tolist(), size, last_chunk, fill)
        assert chunks[key].dtype == stream[key].dtype, key
        assert chunks[key].shape == (len(expected), size), key
        assert chunks[key].tolist() == expected, key
    total = len(stream["input_ids"])
    padding = (size - total % size) % size if last_chunk == "pad" else 0
    attention = np.ones(chunks["input_ids"].shape, dtype=int)
    if padding:
        attention[-1, size - padding :] = 0
    assert chunks["attention_mask"].shape == chunks["input_ids"].shape
    assert chunks["attention_mask"].tolist() == attention.tolist()
    # The padding is exactly where attention is off, and it is special and never a word start.
    off = chunks["attention_mask"] == 0
    assert off.sum() == padding
    assert (chunks["input_ids"][off] == pad_id).all()
    assert chunks["special_tokens_mask"][off].all() and not chunks["word_start"][off].any()
    return chunks


def synthetic_stream(n, rng):
    return {"input_ids": rng.integers(5, 1000, n).astype(np.int32),
            "special_tokens_mask": rng.random(n) < 0.1,
            "word_start": rng.random(n) < 0.5}


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 300), size=st.one_of(st.sampled_from([1, 2, 32]), st.integers(1, 50)),
       last_chunk=st.sampled_from(["drop", "pad"]), seed=st.integers(0, 2**32 - 1))
def test_chunk_stream_equals_reference(n, size, last_chunk, seed):
    check_chunks(synthetic_stream(n, np.random.default_rng(seed)), size, last_chunk, pad_id=3)


@pytest.mark.parametrize("last_chunk", ["drop", "pad"])
def test_chunk_stream_on_real_tokens(tok, last_chunk):
    stream = tokenize_with_words(tok, generated_docs(50, seed=5))
    total = len(stream["input_ids"])
    size = 32 if total % 32 else 31  # a short last chunk either way
    assert total % size
    chunks = check_chunks(stream, size, last_chunk, tok.pad_token_id)
    assert len(chunks["input_ids"]) == total // size + (last_chunk == "pad")


def test_chunk_stream_drop_and_pad_on_exact_and_short_tails():
    rng = np.random.default_rng(0)
    exact = synthetic_stream(64, rng)
    for last_chunk in ("drop", "pad"):
        chunks = check_chunks(exact, 32, last_chunk, pad_id=0)
        assert chunks["input_ids"].shape == (2, 32) and chunks["attention_mask"].all()
    tail = synthetic_stream(70, rng)
    assert check_chunks(tail, 32, "drop", 0)["input_ids"].shape == (2, 32)
    padded = check_chunks(tail, 32, "pad", 0)
    assert padded["input_ids"].shape == (3, 32)
    assert padded["attention_mask"][-1].tolist() == [1] * 6 + [0] * 26
    short = synthetic_stream(5, rng)
    assert check_chunks(short, 32, "drop", 0)["input_ids"].shape == (0, 32)
    assert check_chunks(short, 32, "pad", 0)["attention_mask"].tolist() == [[1] * 5 + [0] * 27]


# --------------------------------------------------------------------------------------------------
# Token-level masking statistics (no whole words): 15%, then 80 / 10 / 10


def test_masking_rates_on_100k_tokens(tokenizers):
    tok = tokenizers["bert"]
    chunks = chunk_stream(tokenize_with_words(tok, generated_docs(1300, seed=6)), 32, "drop", tok.pad_token_id)
    original = chunks["input_ids"].astype(np.int64)
    special = chunks["special_tokens_mask"]
    assert (~special).sum() >= 100_000
    masked = mask_chunks(chunks, tok, mlm_config(), seed=7)
    inputs, labels = masked["input_ids"], masked["labels"]
    chosen = labels != -100
    assert not chosen[special].any()
    assert (labels[chosen] == original[chosen]).all()
    assert (inputs[~chosen] == original[~chosen]).all()  # nothing outside the chosen tokens changes
    rate = chosen[~special].mean()
    assert abs(rate - 0.15) <= 0.01, rate
    to_mask = (inputs == tok.mask_token_id) & chosen
    kept = (inputs == original) & chosen
    randomised = chosen & ~to_mask & ~kept
    n = chosen.sum()
    assert abs(to_mask.sum() / n - 0.8) <= 0.02, to_mask.sum() / n
    assert abs(randomised.sum() / n - 0.1) <= 0.02, randomised.sum() / n
    assert abs(kept.sum() / n - 0.1) <= 0.02, kept.sum() / n
    assert (inputs[randomised] < len(tok)).all()
    assert masked["attention_mask"].tolist() == chunks["attention_mask"].tolist()


def test_masking_follows_the_configured_shares(tokenizers):
    tok = tokenizers["bert"]
    chunks = chunk_stream(tokenize_with_words(tok, generated_docs(400, seed=8)), 32, "drop", tok.pad_token_id)
    cfg = mlm_config(mlm_probability=0.4, mask_replace_prob=0.5, random_replace_prob=0.0)
    masked = mask_chunks(chunks, tok, cfg, seed=1)
    chosen = masked["labels"] != -100
    assert abs(chosen[~chunks["special_tokens_mask"]].mean() - 0.4) <= 0.015
    share = (masked["input_ids"][chosen] == tok.mask_token_id).mean()
    assert abs(share - 0.5) <= 0.03
    assert (masked["input_ids"][chosen & (masked["input_ids"] != tok.mask_token_id)]
            == chunks["input_ids"][chosen & (masked["input_ids"] != tok.mask_token_id)]).all()


# --------------------------------------------------------------------------------------------------
# Whole-word masking, for WordPiece and byte-level BPE


def test_whole_word_masking_masks_whole_words_only(tok):
    texts = generated_docs(400, seed=9)
    ids, special, starts, words = reference_stream(tok, texts)
    stream = tokenize_with_words(tok, texts)
    assert stream["word_start"].tolist() == starts  # word starts as the tokenizer's word_ids define them
    chunks = chunk_stream(stream, 32, "drop", tok.pad_token_id)
    masked = mask_chunks(chunks, tok, mlm_config(whole_word_mask=True), seed=3, batch_size=64)
    chosen = masked["labels"] != -100
    n_rows = len(chunks["input_ids"])
    row_words = np.array(words[: n_rows * 32], dtype=object).reshape(n_rows, 32)

    groups = defaultdict(list)  # (chunk, word) -> masked flags of its tokens in that chunk
    for r in range(n_rows):
        for i in range(32):
            if row_words[r, i] is not None:
                groups[(r, row_words[r, i])].append(bool(chosen[r, i]))
    partial = [k for k, flags in groups.items() if any(flags) and not all(flags)]
    assert not partial, f"{len(partial)} words partly masked, e.g. {partial[:3]}"
    whole_multi = sum(1 for flags in groups.values() if len(flags) > 1 and all(flags))
    assert whole_multi > 100  # many multi-token words were masked, all of their tokens
    word_rate = np.mean([flags[0] for flags in groups.values()])
    assert abs(word_rate - 0.15) <= 0.02, word_rate  # words, not tokens, are drawn at 15%
    # ... each on its own: the word after a masked one is masked no more often than any other word
    # (were words merged, e.g. everything between two special tokens, it nearly always would be).
    ordered = list(groups.items())  # in chunk order, words in reading order
    after_masked = [flags[0] for (key, flags), (prev_key, prev) in zip(ordered[1:], ordered[:-1], strict=True)
                    if key[0] == prev_key[0] and prev[0]]
    assert len(after_masked) > 200 and np.mean(after_masked) < 0.25, np.mean(after_masked)
    # Chosen words are always replaced by the mask token; specials are never chosen.
    assert (masked["input_ids"][chosen] == tok.mask_token_id).all()
    assert (masked["labels"][chosen] == chunks["input_ids"][chosen]).all()
    assert not chosen[chunks["special_tokens_mask"]].any()
    assert (masked["input_ids"][~chosen] == chunks["input_ids"][~chosen]).all()


def test_without_whole_words_words_are_split(tokenizers):
    """The check above can fail: token-level masking leaves many words partly masked."""
    tok = tokenizers["roberta"]
    texts = generated_docs(100, seed=10)
    _, _, _, words = reference_stream(tok, texts)
    chunks = chunk_stream(tokenize_with_words(tok, texts), 32, "drop", tok.pad_token_id)
    chosen = mask_chunks(chunks, tok, mlm_config(), seed=3)["labels"] != -100
    groups = defaultdict(list)
    for j, w in enumerate(words[: chosen.size]):
        if w is not None:
            groups[(j // 32, w)].append(bool(chosen.flat[j]))
    assert sum(1 for flags in groups.values() if any(flags) and not all(flags)) > 50


# --------------------------------------------------------------------------------------------------
# Special tokens and padding are never masked


def padded_chunks(tok, texts, size=32):
    """Each document chunked on its own with a padded tail: many rows with padding and specials,
    plus the concatenated stream with [SEP][CLS] / </s><s> inside chunks."""
    parts = [chunk_stream(tokenize_with_words(tok, [t]), size, "pad", tok.pad_token_id) for t in texts]
    parts.append(chunk_stream(tokenize_with_words(tok, texts), size, "pad", tok.pad_token_id))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("whole_word", [False, True])
@pytest.mark.parametrize("probability", [0.15, 0.6])
def test_special_tokens_and_padding_are_never_masked(tok, whole_word, probability):
    chunks = padded_chunks(tok, generated_docs(120, seed=11, min_words=1, max_words=25))
    special = chunks["special_tokens_mask"]
    padding = chunks["attention_mask"] == 0
    assert padding.sum() > 1000 and (special & ~padding).sum() > 200
    cfg = mlm_config(mlm_probability=probability, whole_word_mask=whole_word, last_chunk="pad")
    original = chunks["input_ids"].astype(np.int64)
    for round_ in range(25):  # many batches, each masked afresh
        masked = mask_chunks(chunks, tok, cfg, seed=round_, batch_size=48)
        assert (masked["labels"][special] == -100).all()
        assert (masked["input_ids"][special] == original[special]).all()
        assert (masked["input_ids"][padding] == tok.pad_token_id).all()
        assert (masked["attention_mask"] == chunks["attention_mask"]).all()
        rate = (masked["labels"][~special] != -100).mean()
        assert rate > probability / 3  # the other tokens are masked, so the check has teeth


# --------------------------------------------------------------------------------------------------
# Deterministic evaluation


@pytest.fixture(scope="module")
def eval_chunks(tokenizers):
    tok = tokenizers["bert"]
    return tok, chunk_stream(tokenize_with_words(tok, generated_docs(60, seed=12)), 32, "pad", tok.pad_token_id)


@pytest.mark.parametrize("whole_word", [False, True])
def test_mask_once_is_deterministic_and_seeded(eval_chunks, whole_word):
    tok, chunks = eval_chunks
    cfg = mlm_config(whole_word_mask=whole_word, last_chunk="pad")
    torch.manual_seed(0)
    first = mask_once(chunks, tok, cfg, batch_size=16)
    torch.manual_seed(99)  # the global RNG plays no part
    np.random.seed(99)
    second = mask_once(chunks, tok, cfg, batch_size=16)
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    for key in first:
        assert first[key].dtype == torch.int64
        assert torch.equal(first[key], second[key]), key
    chosen = first["labels"] != -100
    assert chosen.sum() > 50
    as_mask = first["input_ids"][chosen] == tok.mask_token_id
    # Whole words: every chosen token is the mask token; otherwise about 80% of them.
    assert as_mask.all() if whole_word else 0.6 < as_mask.float().mean() < 0.95
    other = mask_once(chunks, tok, mlm_config(whole_word_mask=whole_word, last_chunk="pad", eval_mask_seed=7),
                      batch_size=16)
    assert not torch.equal(first["labels"] != -100, other["labels"] != -100)
    # The dataset hands out exactly these tensors; the collator passes them through unmasked again.
    dataset = FixedMaskedDataset(first)
    collator = MaskingCollator(make_collator(tok, cfg, seed=None), seed=0)
    batch = collator([dataset[i] for i in range(len(dataset))])
    for key in first:
        assert torch.equal(batch[key], first[key]), key


def test_evaluate_is_exact_and_token_weighted(eval_chunks):
    tok, chunks = eval_chunks
    cfg = mlm_config(last_chunk="pad")
    masked = mask_once(chunks, tok, cfg)
    model = build_model(cfg, tok)  # dropout 0.1: evaluation must switch it off
    model.train()
    first = evaluate(model, masked, batch_size=5)
    second = evaluate(model, masked, batch_size=5)
    assert first == second  # exact equality, perplexity included
    assert model.training  # the caller's mode is restored
    count = int((masked["labels"] != -100).sum())
    assert first["masked_tokens"] == count > 0
    assert first["perplexity"] == pytest.approx(np.exp(first["loss"]))
    model.eval()
    with torch.no_grad():
        reference = model(**masked).loss.item()  # one batch: the mean over all masked tokens
    assert first["loss"] == pytest.approx(reference, rel=1e-5)
    assert evaluate(model, masked, batch_size=len(masked["input_ids"]))["loss"] == pytest.approx(reference, rel=1e-5)
    assert first["perplexity"] > 50  # an untrained model is close to uniform over ~300 tokens


# --------------------------------------------------------------------------------------------------
# Fill-mask prompts


def test_with_model_mask_accepts_both_spellings(tokenizers):
    bert, roberta = tokenizers["bert"], tokenizers["roberta"]
    assert with_model_mask("the [MASK] is", bert) == "the [MASK] is"
    assert with_model_mask("the <mask> is <mask>", bert) == "the [MASK] is [MASK]"
    assert with_model_mask("the [MASK] is", roberta) == "the <mask> is"
    assert with_model_mask("the <mask> is", roberta) == "the <mask> is"
    for tok in (bert, roberta):
        with pytest.raises(InputError, match="has no mask token"):
            with_model_mask("no mask here", tok)


def test_fill_mask_gives_top_k_per_mask(eval_chunks):
    tok, _ = eval_chunks
    model = build_model(mlm_config(), tok)
    [one] = fill_mask(model, tok, ["the [MASK] of it"], top_k=3)
    assert one["prompt"] == "the [MASK] of it"
    assert len(one["fills"]) == 1 and len(one["fills"][0]) == 3
    assert all({"token", "score", "sequence"} <= set(f) for f in one["fills"][0])
    [two] = fill_mask(model, tok, ["the <mask> of <mask>"], top_k=2)
    assert len(two["fills"]) == 2 and all(len(f) == 2 for f in two["fills"])
    with pytest.raises(InputError):
        fill_mask(model, tok, ["no mask"], top_k=2)
