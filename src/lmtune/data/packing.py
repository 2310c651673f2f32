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

Streaming (`positioned_blocks`, `StreamingBlockDataset`): the same packing a batch of documents at a
time, every block knowing the document and token it starts at, shuffled in windows of blocks and
resumable at any block without tokenizing what came before.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.errors import InputError

log = logging.getLogger("lmtune")

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
                   max_batch_chars: int = TOKENIZE_BATCH_CHARS, desc: str | None = None,
                   prefix: Sequence[int] = ()) -> Iterator[list[int]]:
    """Token ids per document, without special tokens but `prefix` (the tokenizer's BOS, where it puts
    one before every text). Calls the Rust tokenizer's batch encoder directly: the Python tokenizer
    wrapper adds per-call overhead and length warnings we don't want. `desc`: show progress
    (documents) under that name."""
    from lmtune.progress import progress

    if prefix:
        for ids in tokenize_texts(tokenizer, texts, batch_size, max_batch_chars, desc):
            yield [*prefix, *ids]
        return
    backend = _fast_backend(tokenizer)
    batches = _batches(texts, batch_size, max_batch_chars)
    if desc:
        batches = progress(batches, desc, total=len(texts), unit="docs", weight=len)
    for batch in batches:
        if backend is not None:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            for enc in encode(batch, add_special_tokens=False):
                yield enc.ids
        else:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def tokenize_to_arrays(tokenizer, texts: Sequence[str], desc: str | None = None,
                       prefix: Sequence[int] = ()) -> list[np.ndarray]:
    """`tokenize_texts` with each document's ids as an int32 array: a Python list of ints costs about
    36 bytes a token, the array 4 (1 GB against 280 MB peak on the demo corpus)."""
    return [np.asarray(ids, dtype=np.int32) for ids in tokenize_texts(tokenizer, texts, desc=desc, prefix=prefix)]


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
    """Blocks of token ids (int32, shape [n, block_size]) and what happened: tokens, dropped, cached.
    Each document starts with the tokenizer's own leading ids (BOS for Llama 3 and Gemma, none for
    GPT-2) and, in concat packing, ends with EOS."""
    from lmtune.tokenizer import leading_special_ids

    prefix = leading_special_ids(tokenizer)
    key = hashlib.sha256(
        "|".join(
            [CACHE_VERSION, corpus_fingerprint, tokenizer_fingerprint(tokenizer), str(block_size), mode,
             str(tokenizer.eos_token_id)] + ([f"prefix{prefix}"] if prefix else [])
        ).encode()
    ).hexdigest()[:32]
    path = cache_root() / "blocks" / f"{key}.npy"
    if use_cache and path.is_file():
        blocks = _load_cached(path, block_size)
        if blocks is not None:
            return blocks, {"cached": True, "blocks": int(blocks.shape[0]), "cache_file": str(path)}
        path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    token_lists = tokenize_to_arrays(tokenizer, texts, desc="tokenizing", prefix=prefix)
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


STREAM_BATCH_DOCS = 256  # documents tokenized together on the streaming path
STREAM_BATCH_CHARS = 4_000_000


def _doc_batches(docs: Iterable[tuple[Any, str]], max_docs: int, max_chars: int) -> Iterator[list[tuple[Any, str]]]:
    batch: list[tuple[Any, str]] = []
    chars = 0
    for item in docs:
        batch.append(item)
        chars += len(item[1])
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def positioned_blocks(docs: Iterable[tuple[Any, str]], tokenizer, block_size: int, mode: str, skip_tokens: int = 0,
                      batch_docs: int = STREAM_BATCH_DOCS, batch_chars: int = STREAM_BATCH_CHARS
                      ) -> Iterator[tuple[np.ndarray, Callable[[int], tuple[Any, int] | None]]]:
    """Blocks from a stream of ``(position, text)`` documents, tokenized a batch at a time, each block
    knowing where it starts. Yields, per batch, ``(blocks, where)``: ``blocks`` an int32
    ``[m, block_size]`` array (``m`` may be 0) and ``where(i)`` the start of block ``i`` as
    ``(position of its document, token offset in that document)``, the offset counting the
    document's ids (and, in concat mode, its EOS); ``where(m)`` is the next block's start when its
    first token is already read, else None.

    ``skip_tokens`` drops that many tokens from the first document, so that restarting at a block's
    ``where`` continues exactly as the uninterrupted stream. Blocks equal the in-memory `pack` of
    the same documents (concat carries the unfinished tail from one batch to the next)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    if mode not in ("concat", "overflow"):
        raise ValueError(f"unknown packing mode {mode!r}; use 'concat' or 'overflow'")
    eos = tokenizer.eos_token_id
    if mode == "concat" and eos is None:
        raise ValueError("concat packing needs an EOS token id")
    from lmtune.tokenizer import leading_special_ids

    prefix = leading_special_ids(tokenizer)  # each document starts with it, as in `prepare_blocks`
    size = block_size
    carry = np.empty(0, dtype=np.int32)
    carry_pos: list = []  # positions of the documents the carried tokens come from
    carry_start = np.empty(0, dtype=np.int64)  # where each starts, relative to the carry (<= 0 for the first)
    skip = int(skip_tokens)
    for batch in _doc_batches(docs, batch_docs, batch_chars):
        positions = [pos for pos, _ in batch]
        ids = list(tokenize_texts(tokenizer, [text for _, text in batch], prefix=prefix))
        if mode == "overflow":
            if skip:
                ids[0] = ids[0][skip:]
            chunks = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) // size
            ends = np.cumsum(chunks)
            base = np.zeros(len(ids), dtype=np.int64)
            base[0], skip = skip, 0

            def where(i, positions=positions, chunks=chunks, ends=ends, base=base):
                if i >= ends[-1]:
                    return None
                j = int(np.searchsorted(ends, i, side="right"))
                return positions[j], int(base[j] + (i - (ends[j] - chunks[j])) * size)

            yield pack_overflow(ids, size), where
            continue
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        joined = concat_with_eos(ids, eos)
        starts = np.cumsum(lengths) - lengths - skip + len(carry)
        if skip:
            joined, skip = joined[skip:], 0
        stream = np.concatenate([carry, joined]) if len(carry) else joined
        doc_pos = carry_pos + positions
        doc_start = np.concatenate([carry_start, starts])
        n_blocks = len(stream) // size

        def where(i, doc_pos=doc_pos, doc_start=doc_start, total=len(stream)):
            t = i * size
            if t >= total:
                return None
            j = int(np.searchsorted(doc_start, t, side="right")) - 1
            return doc_pos[j], int(t - doc_start[j])

        yield stream[: n_blocks * size].reshape(n_blocks, size), where
        cut = n_blocks * size
        carry = stream[cut:].copy()
        if len(carry):
            first = int(np.searchsorted(doc_start, cut, side="right")) - 1
            carry_pos, carry_start = doc_pos[first:], doc_start[first:] - cut
        else:
            carry_pos, carry_start = [], np.empty(0, dtype=np.int64)


def stream_blocks(texts: Iterable[str], tokenizer, block_size: int, mode: str,
                  batch_docs: int = STREAM_BATCH_DOCS) -> Iterator[np.ndarray]:
    """Blocks produced on the fly from a document stream, in bounded memory; the concat mode carries
    the unfinished tail of one batch of documents into the next, so blocks equal the in-memory ones."""
    docs = ((None, text) for text in texts)
    for blocks, _ in positioned_blocks(docs, tokenizer, block_size, mode, batch_docs=batch_docs):
        yield from blocks

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


DEFAULT_SHUFFLE_BUFFER = 8192
INDEX_EVERY = 1024  # blocks between two resume points when the stream is not shuffled
MAX_INDEX_ENTRIES = 4096  # resume points kept (the oldest are dropped): a few hundred bytes each
STATE_FORMAT = "lmtune-stream/1"


class StreamingBlockDataset(torch.utils.data.IterableDataset):
    """Causal-LM blocks made on the fly from a document stream: read, tokenized and packed a batch at
    a time, shuffled in windows, repeated epoch after epoch, and resumable at any block.

    ``stream`` is a `lmtune.data.streaming.DocumentStream` (files or a Hub stream, seekable), or a
    callable returning an iterable of texts (each call reads from the start; resuming replays it).

    Order. Epoch ``e`` packs the stream's documents (concat: the carried tail is dropped at the end of
    the epoch, as in memory) and cuts the blocks into windows of ``shuffle_buffer`` blocks; window
    ``w`` is emitted in the order of a permutation drawn from ``(seed, e, w)``. ``shuffle_buffer`` 0
    keeps the stream's order. ``epochs`` None repeats forever (the Trainer's ``max_steps`` ends it).
    Memory: one window (``shuffle_buffer x block_size`` int32) and one batch of documents, whatever
    the corpus size.

    Resuming. Blocks are counted from the start of the stream (epoch 0, block 0) across epochs.
    Whenever a window starts, its first block's position (epoch, window, the document it starts in
    and the token offset there) goes into a small index. `position_state(k)` returns the entry of the
    window holding block ``k`` and ``k`` minus its first block; `resume_from(state)` makes the next
    iteration re-read from that window's start (one window of tokenizing, not the prefix), rebuild
    its permutation and skip the blocks already trained on. `position_state` depends only on ``k``,
    not on how far the iterator has read ahead.

    Read it in the main process: with DataLoader workers each would read the whole stream and the
    index would live in a worker, so iterating inside a worker raises (``num_workers`` must be 0; the
    Rust tokenizer already uses several threads)."""

    def __init__(self, stream, tokenizer, block_size: int, mode: str, *, shuffle_buffer: int = 0, seed: int = 0,
                 epochs: int | None = 1):
        from lmtune.data.streaming import TextStream

        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be 0 or more, not {shuffle_buffer}")
        self.stream = stream if hasattr(stream, "documents") else TextStream(stream)
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.mode = mode
        self.shuffle = shuffle_buffer > 0
        self.window = shuffle_buffer if shuffle_buffer > 0 else INDEX_EVERY
        self.seed = seed
        self.epochs = epochs
        self.documents_tokenized = 0  # over this object's life (for tests and benchmarks)
        self.blocks_read = 0
        self._signature: str | None = None
        self._set_start({"block": 0, "epoch": 0, "window": 0, "doc": None, "skip": 0}, 0)

    # ----------------------------------------------------------------------------------------------
    # The engine's API

    def position_state(self, blocks_consumed: int) -> dict:
        """What resumes the stream after ``blocks_consumed`` blocks were trained on (counted from the
        start of the stream): small and JSON-serialisable. Call it in the process that iterates."""
        k = int(blocks_consumed)
        if k < 0:
            raise ValueError(f"blocks_consumed must be 0 or more, not {k}")
        i = bisect.bisect_right(self._keys, k) - 1
        if i < 0:
            raise ValueError(f"no resume point at or before block {k}; the earliest known is block {self._keys[0]}")
        entry = self._index[self._keys[i]]
        return {"format": STATE_FORMAT, "blocks": k, "skip_blocks": k - entry["block"], "entry": copy.deepcopy(entry),
                "signature": self.signature()}

    def resume_from(self, state: dict) -> None:
        """The next iteration starts at the block `state` (from `position_state`) names."""
        where = getattr(self.stream, "where", "data.train")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "entry" not in state:
            raise InputError(f"{where}: the checkpoint's stream position is not one this version of lmtune "
                             "wrote; start over with --overwrite.")
        if state.get("signature") != self.signature():
            raise InputError(f"{where}: the checkpoint's stream position was saved for other data or settings "
                             "(the files, their sizes, the tokenizer, data.block_size, data.packing, "
                             "data.shuffle_buffer or training.seed changed); resume with the same recipe and data, "
                             "or start over with --overwrite.")
        self._set_start(copy.deepcopy(state["entry"]), int(state["skip_blocks"]))

    def signature(self) -> str:
        """What decides the blocks and their order; a saved position only fits an equal signature."""
        if self._signature is None:
            parts = [STATE_FORMAT, self.stream.signature(), tokenizer_fingerprint(self.tokenizer),
                     str(self.tokenizer.eos_token_id), str(self.block_size), self.mode, str(self.window),
                     str(self.shuffle), str(self.seed if self.shuffle or self.stream.shuffle_files else 0)]
            self._signature = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
        return self._signature

    # ----------------------------------------------------------------------------------------------
    # Iterating

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("StreamingBlockDataset is read in the main process (it keeps the stream's resume "
                               "index there); use DataLoader num_workers=0 (training.dataloader_num_workers: 0).")
        entry, skip = self._start
        for epoch, window, blocks in self._windows(entry):
            n = len(blocks)
            if skip >= n:
                skip -= n
                continue
            for j in self._order(epoch, window, n)[skip:]:
                ids = torch.from_numpy(blocks[j].astype(np.int64))
                yield {"input_ids": ids, "labels": ids}
            skip = 0

    def check_not_empty(self) -> None:
        """Raise the usual sentence when the stream holds no full block (reads until the first one)."""
        for blocks, _ in positioned_blocks(self.stream.documents(0), self.tokenizer, self.block_size, self.mode):
            if len(blocks):
                return
        where = getattr(self.stream, "where", "data.train")
        raise InputError(f"{where} yields no full block of {self.block_size} tokens; lower data.block_size or add "
                         "text (or check the path, the text field and the keywords).")

    def _order(self, epoch: int, window: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed % 2**32, epoch, window]).permutation(n)

    def _set_start(self, entry: dict, skip: int) -> None:
        self._start = (entry, skip)
        self._index = {entry["block"]: entry}
        self._keys = [entry["block"]]

    def _record(self, block: int, epoch: int, window: int, doc: dict | None, skip: int) -> None:
        if block in self._index:
            return  # entries are a function of the stream: the one already there is as good
        self._index[block] = {"block": int(block), "epoch": int(epoch), "window": int(window), "doc": doc,
                              "skip": int(skip)}
        bisect.insort(self._keys, block)
        if len(self._keys) > MAX_INDEX_ENTRIES:
            del self._index[self._keys.pop(0)]

    def _record_start(self, block: int, epoch: int, window: int, start) -> None:
        if block not in self._index:
            pos, skip = start
            self._record(block, epoch, window, self.stream.position(pos), skip)

    def _counted(self, docs):
        for item in docs:
            self.documents_tokenized += 1
            yield item

    def _windows(self, entry: dict) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, window, blocks in stream order) from the window `entry` starts on. A window is handed
        out once the next one's first block position is in the index, so that `position_state` finds
        the exact window for any block handed out."""
        size, epoch, window, block = self.window, int(entry["epoch"]), int(entry["window"]), int(entry["block"])
        doc, skip = entry["doc"], int(entry["skip"])
        where = getattr(self.stream, "where", "data.train")
        while self.epochs is None or epoch < self.epochs:
            fresh = doc is None
            parts: list[np.ndarray] = []
            n = produced = 0
            full = None  # a complete window waiting for the next one's start
            docs = self._counted(self.stream.documents(epoch, doc))
            for blocks, start_of in positioned_blocks(docs, self.tokenizer, self.block_size, self.mode, skip):
                i, m = 0, len(blocks)
                produced += m
                self.blocks_read += m
                while i < m:
                    if n == 0:
                        self._record_start(block, epoch, window, start_of(i))
                        if full is not None:
                            yield full
                            full = None
                    take = min(size - n, m - i)
                    parts.append(blocks[i : i + take])
                    n += take
                    i += take
                    if n == size:
                        full = (epoch, window, _stack(parts))
                        parts, n = [], 0
                        block += size
                        window += 1
                        following = start_of(i)
                        if following is not None:
                            self._record_start(block, epoch, window, following)
                            yield full
                            full = None
            tail = (epoch, window, _stack(parts)) if n else None
            block += n
            self._record(block, epoch + 1, 0, None, 0)  # the next epoch starts at its beginning
            if full is not None:
                yield full
            if tail is not None:
                yield tail
            if fresh:
                if produced == 0:
                    raise InputError(f"{where} yields no full block of {self.block_size} tokens; lower "
                                     "data.block_size or add text (or check the path, the text field and the "
                                     "keywords).")
                stats = self.stream.stats
                log.info("%s: epoch %d of the stream read: %s; %d blocks of %d tokens", where, epoch,
                         stats.summary(where), produced, self.block_size)
                self.stream.warn_undecodable()
            epoch, window, doc, skip = epoch + 1, 0, None, 0


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
