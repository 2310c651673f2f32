"""Tokenize documents and pack them into fixed-length blocks for causal-LM training.

Two modes, as in the tutorials:
- ``concat``: every document followed by EOS, all concatenated, cut into ``block_size`` blocks; the
  remainder is dropped (the ELI5 / WikiText chapters' ``group_texts``).
- ``overflow``: each document cut into ``block_size`` chunks on its own, only full-length chunks kept
  (the code-model chapter's ``return_overflowing_tokens``).

Written with numpy rather than ``datasets.map``: the tutorial's ``sum(lists, [])`` is quadratic and a
``map`` pass writes every intermediate list to Arrow; here the token ids go once into one int32 array
and blocks are a reshape (or a single fancy-index) of it. Results are cached as ``.npy`` files keyed
by the corpus content, the tokenizer and the packing settings, and memory-mapped on a re-run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

CACHE_VERSION = "1"
TOKENIZE_BATCH = 1024
TOKENIZE_BATCH_CHARS = 8_000_000


def cache_root() -> Path:
    root = os.environ.get("LMTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lmtune"
    )
    return Path(root)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids. The truncation and padding settings are left out: `tokenize_texts`
    turns them off, and the wrapper changes them on every call, so they must not split the cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------
# Tokenizing


def _fast_backend(tokenizer):
    """The Rust tokenizer with truncation and padding off (a saved tokenizer.json may enable them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return backend


def _batches(texts: Sequence[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Consecutive batches of at most ``max_docs`` documents and about ``max_chars`` characters: a
    batch's Encoding objects (tokens, offsets, masks) cost far more memory than its ids."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        if batch and (len(batch) >= max_docs or chars + len(text) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(text)
        chars += len(text)
    if batch:
        yield batch


def tokenize_texts(tokenizer, texts: Sequence[str], batch_size: int = TOKENIZE_BATCH,
                   max_batch_chars: int = TOKENIZE_BATCH_CHARS) -> Iterator[list[int]]:
    """Token ids per document, without special tokens. Calls the Rust tokenizer's batch encoder
    directly: the Python tokenizer wrapper adds per-call overhead and length warnings we don't want."""
    backend = _fast_backend(tokenizer)
    for batch in _batches(texts, batch_size, max_batch_chars):
        if backend is not None:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            for enc in encode(batch, add_special_tokens=False):
                yield enc.ids
        else:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def tokenize_to_arrays(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """`tokenize_texts` with each document's ids as an int32 array: a Python list of ints costs about
    36 bytes a token, the array 4 (1 GB against 280 MB peak on the demo corpus)."""
    return [np.asarray(ids, dtype=np.int32) for ids in tokenize_texts(tokenizer, texts)]


# --------------------------------------------------------------------------------------------------
# Packing (pure functions over lists of token ids)


def _flatten(token_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    if token_lists and all(isinstance(t, np.ndarray) for t in token_lists):
        flat = np.concatenate(token_lists).astype(np.int32, copy=False)
    else:
        flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def concat_with_eos(token_lists: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """All documents in order, each followed by ``eos_id``, as one int32 array."""
    flat, lengths = _flatten(token_lists)
    out = np.empty(len(flat) + len(lengths), dtype=np.int32)
    eos_at = np.cumsum(lengths + 1) - 1
    is_token = np.ones(len(out), dtype=bool)
    is_token[eos_at] = False
    out[is_token] = flat
    out[eos_at] = eos_id
    return out


def pack_concatenated(token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int) -> np.ndarray:
    stream = concat_with_eos(token_lists, eos_id)
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size)


def pack_overflow(token_lists: Sequence[Sequence[int]], block_size: int) -> np.ndarray:
    """Per document: consecutive ``block_size`` chunks, the short tail of each document dropped."""
    flat, lengths = _flatten(token_lists)
    doc_start = np.cumsum(lengths) - lengths
    chunks = lengths // block_size
    chunk_doc_start = np.repeat(doc_start, chunks)
    first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)
    chunk_in_doc = np.arange(int(chunks.sum())) - first_chunk
    starts = chunk_doc_start + chunk_in_doc * block_size
    return flat[starts[:, None] + np.arange(block_size)]


def pack(token_lists: Sequence[Sequence[int]], block_size: int, mode: str, eos_id: int | None) -> np.ndarray:
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    if mode == "concat":
        if eos_id is None:
            raise ValueError("concat packing needs an EOS token id")
        return pack_concatenated(token_lists, block_size, eos_id)
    if mode == "overflow":
        return pack_overflow(token_lists, block_size)
    raise ValueError(f"unknown packing mode {mode!r}; use 'concat' or 'overflow'")


# --------------------------------------------------------------------------------------------------
# Cached preparation


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, block_size: int) -> np.ndarray | None:
    """The cached blocks, memory-mapped; None when the file is not a whole int32 [n, block_size] array
    (empty, truncated, garbage, or written by something else)."""
    try:
        blocks = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(blocks, np.ndarray) or blocks.dtype != np.int32 or blocks.ndim != 2 or (
        blocks.shape[1] != block_size
    ):
        return None
    return blocks


def prepare_blocks(
    texts: Sequence[str],
    corpus_fingerprint: str,
    tokenizer,
    block_size: int,
    mode: str,
    use_cache: bool = True,
) -> tuple[np.ndarray, dict]:
    """Blocks of token ids (int32, shape [n, block_size]) and what happened: tokens, dropped, cached."""
    key = hashlib.sha256(
        "|".join(
            [CACHE_VERSION, corpus_fingerprint, tokenizer_fingerprint(tokenizer), str(block_size), mode,
             str(tokenizer.eos_token_id)]
        ).encode()
    ).hexdigest()[:32]
    path = cache_root() / "blocks" / f"{key}.npy"
    if use_cache and path.is_file():
        blocks = _load_cached(path, block_size)
        if blocks is not None:
            return blocks, {"cached": True, "blocks": int(blocks.shape[0]), "cache_file": str(path)}
        path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    token_lists = tokenize_to_arrays(tokenizer, texts)
    blocks = pack(token_lists, block_size, mode, tokenizer.eos_token_id)
    n_tokens = int(sum(len(t) for t in token_lists)) + (len(token_lists) if mode == "concat" else 0)
    info = {
        "cached": False,
        "blocks": int(blocks.shape[0]),
        "tokens": n_tokens,
        "tokens_dropped": n_tokens - int(blocks.size),
        "cache_file": str(path),
    }
    if use_cache:
        try:
            _save_atomic(path, blocks)
        except OSError:
            pass  # a read-only or full cache folder costs speed, not correctness
    return blocks, info


def stream_blocks(texts: Iterable[str], tokenizer, block_size: int, mode: str,
                  batch_docs: int = 256) -> Iterator[np.ndarray]:
    """Blocks produced on the fly from a document stream, in bounded memory; the concat mode carries
    the unfinished tail of one batch of documents into the next, so blocks equal the in-memory ones."""
    carry = np.empty(0, dtype=np.int32)
    eos = tokenizer.eos_token_id
    it = iter(texts)
    while True:
        batch = list(itertools.islice(it, batch_docs))
        if not batch:
            return
        token_lists = list(tokenize_texts(tokenizer, batch))
        if mode == "concat":
            stream = np.concatenate([carry, concat_with_eos(token_lists, eos)])
            n_blocks = len(stream) // block_size
            yield from stream[: n_blocks * block_size].reshape(n_blocks, block_size)
            carry = stream[n_blocks * block_size :]
        else:
            yield from pack_overflow(token_lists, block_size)


# --------------------------------------------------------------------------------------------------
# Torch datasets over blocks


class BlockDataset(torch.utils.data.Dataset):
    """Causal-LM examples over an [n, block_size] array: labels are the inputs (the model shifts)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))
        return {"input_ids": ids, "labels": ids}


class StreamingBlockDataset(torch.utils.data.IterableDataset):
    def __init__(self, make_texts, tokenizer, block_size: int, mode: str):
        self.make_texts = make_texts  # a callable, so every epoch re-reads the stream from the start
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.mode = mode

    def __iter__(self):
        for block in stream_blocks(self.make_texts(), self.tokenizer, self.block_size, self.mode):
            ids = torch.from_numpy(block.astype(np.int64))
            yield {"input_ids": ids, "labels": ids}
