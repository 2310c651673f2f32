"""Masked language modelling (domain adaptation of an encoder), top to bottom.

    sources -> tokenizer (loaded, or trained: WordPiece for BERT, byte-level BPE for RoBERTa)
    -> documents tokenized with their special tokens, concatenated, cut into chunks (the short last
    one dropped or padded) -> the validation chunks masked ONCE with a fixed seed -> model
    (pretrained encoder, or BERT/RoBERTa from scratch) -> perplexity before -> Trainer with
    DataCollatorForLanguageModeling (15% of tokens: 80% mask / 10% random / 10% kept; optionally
    whole words) -> perplexity after, on exactly the same masked positions -> top-k fills

Whole-word masking: transformers' collator finds words from `offset_mapping` (a token continues a
word when it starts where the previous one ended). Real character offsets break that for byte-level
BPE tokenizers that keep the leading space inside a token, so we hand it offsets rebuilt from the
tokenizer's own word ids (its pre-tokenizer: whitespace + punctuation for WordPiece, `Ġ`-words for
byte-level BPE), which mark word boundaries the same way for both kinds.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, default_data_collator

from lmtune import distributed
from lmtune.config import RecipeConfig
from lmtune.data.packing import _fast_backend, cache_root, tokenizer_fingerprint
from lmtune.data.sources import Corpus
from lmtune.errors import InputError
from lmtune.progress import progress
from lmtune.metrics import perplexity
from lmtune.modeling import build_or_load, check_pretrained_head, check_sequence_fits, encoder_of_masked_lm, head_only_at
from lmtune.tasks.common import Prepared, get_tokenizer, load_model_for, load_splits, seeded_subset

log = logging.getLogger("lmtune")
CHUNK_CACHE_VERSION = "1"
ARRAYS = ("input_ids", "attention_mask", "special_tokens_mask", "word_start")

# --------------------------------------------------------------------------------------------------
# Tokenizing and chunking (pure functions over arrays)


def tokenize_with_words(tokenizer, texts: list[str], batch_size: int = 1024) -> dict[str, np.ndarray]:
    """All documents, each with its special tokens ([CLS] ... [SEP] / <s> ... </s>), concatenated:
    token ids, a special-token mask, and where each word starts."""
    backend = _fast_backend(tokenizer)
    ids, special, word_start = [], [], []
    for start in range(0, len(texts), batch_size):
        for enc in backend.encode_batch(list(texts[start : start + batch_size]), add_special_tokens=True):
            words = np.array([-1 if w is None else w for w in enc.word_ids], dtype=np.int64)
            is_special = np.asarray(enc.special_tokens_mask, dtype=bool)
            previous = np.concatenate([[-2], words[:-1]])
            ids.append(np.asarray(enc.ids, dtype=np.int32))
            special.append(is_special)
            word_start.append(~is_special & (words != previous))
    if not ids:
        return {k: np.empty(0, dtype=np.int32 if k == "input_ids" else bool) for k in ARRAYS if k != "attention_mask"}
    return {"input_ids": np.concatenate(ids), "special_tokens_mask": np.concatenate(special),
            "word_start": np.concatenate(word_start)}


def chunk_stream(stream: dict[str, np.ndarray], chunk_size: int, last_chunk: str, pad_id: int) -> dict[str, np.ndarray]:
    """Cut the concatenated stream into [n, chunk_size] rows; the short tail is dropped or padded
    (padding is special, unattended and never a word)."""
    total = len(stream["input_ids"])
    n_full = total // chunk_size
    rest = total - n_full * chunk_size
    pad = chunk_size - rest if last_chunk == "pad" and rest else 0
    keep = n_full * chunk_size + (rest if pad else 0)
    fill = {"input_ids": pad_id, "special_tokens_mask": True, "word_start": False}
    out = {}
    for key, value in stream.items():
        body = value[:keep]
        if pad:
            body = np.concatenate([body, np.full(pad, fill[key], dtype=value.dtype)])
        out[key] = body.reshape(-1, chunk_size)
    attention = np.ones(out["input_ids"].shape, dtype=np.int8)
    if pad:
        attention[-1, chunk_size - pad :] = 0
    out["attention_mask"] = attention
    return out


def word_offsets(word_start: np.ndarray) -> np.ndarray:
    """Offsets that are contiguous inside a word and leave a gap before each new word, which is how
    the library's whole-word masking recognises words (see the module docstring)."""
    position = np.arange(word_start.shape[-1]) + np.cumsum(word_start, axis=-1)
    return np.stack([position, position + 1], axis=-1)


def chunks_for(corpus: Corpus, tokenizer, cfg: RecipeConfig, where: str) -> dict[str, np.ndarray]:
    """Chunks of a corpus, cached by content, tokenizer and chunking settings."""
    key = hashlib.sha256("|".join([
        CHUNK_CACHE_VERSION, corpus.fingerprint, tokenizer_fingerprint(tokenizer), str(cfg.data.block_size),
        cfg.mlm.last_chunk, str(tokenizer.pad_token_id)]).encode()).hexdigest()[:32]
    folder = cache_root() / "mlm-chunks" / key
    try:
        chunks = {k: np.load(folder / f"{k}.npy", allow_pickle=False) for k in ARRAYS}
        if len({v.shape for v in chunks.values()}) == 1 and chunks["input_ids"].shape[1] == cfg.data.block_size:
            log.info("%s: %d chunks of %d tokens (cached)", where, len(chunks["input_ids"]), cfg.data.block_size)
            return chunks
    except (OSError, ValueError, EOFError):
        pass
    stream = tokenize_with_words(tokenizer, corpus.texts)
    chunks = chunk_stream(stream, cfg.data.block_size, cfg.mlm.last_chunk, tokenizer.pad_token_id)
    log.info("%s: %d tokens -> %d chunks of %d (last chunk %s)", where, len(stream["input_ids"]),
             len(chunks["input_ids"]), cfg.data.block_size, cfg.mlm.last_chunk)
    if len(chunks["input_ids"]) == 0:
        raise InputError(f"{where} yields no chunk of {cfg.data.block_size} tokens; lower data.block_size, "
                         "set mlm.last_chunk: pad, or add text.")
    try:
        tmp = folder.with_name(key + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for k, v in chunks.items():
            np.save(tmp / f"{k}.npy", v)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.replace(folder)
    except OSError:
        pass  # caching is an optimisation
    return chunks


# --------------------------------------------------------------------------------------------------
# Datasets and masking


class ChunkDataset(torch.utils.data.Dataset):
    """Unmasked chunks; the training collator masks them afresh every time they are drawn. With
    `with_index` each item carries its index, from which the collator seeds that batch's masks."""

    def __init__(self, chunks: dict[str, np.ndarray], whole_word: bool, with_index: bool = False):
        self.chunks = chunks
        self.whole_word = whole_word
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.chunks["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "input_ids": torch.from_numpy(self.chunks["input_ids"][i].astype(np.int64)),
            "attention_mask": torch.from_numpy(self.chunks["attention_mask"][i].astype(np.int64)),
            "special_tokens_mask": torch.from_numpy(self.chunks["special_tokens_mask"][i].astype(np.int64)),
        }
        if self.whole_word:
            item["offset_mapping"] = torch.from_numpy(word_offsets(self.chunks["word_start"][i]))
        if self.with_index:
            item["index"] = i
        return item


class FixedMaskedDataset(torch.utils.data.Dataset):
    """Chunks masked once; their labels already say what to predict."""

    def __init__(self, masked: dict[str, torch.Tensor]):
        self.masked = masked

    def __len__(self) -> int:
        return len(self.masked["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.masked.items()}


def make_collator(tokenizer, cfg: RecipeConfig, seed: int | None) -> DataCollatorForLanguageModeling:
    m = cfg.mlm
    # With whole words the library masks every chosen token (no random / kept share), as the course's
    # own whole-word collator does; we say so up front instead of letting it warn on every build.
    mask_share, random_share = (1.0, 0.0) if m.whole_word_mask else (m.mask_replace_prob, m.random_replace_prob)
    return DataCollatorForLanguageModeling(
        tokenizer=tokenizer, mlm=True, mlm_probability=m.mlm_probability, mask_replace_prob=mask_share,
        random_replace_prob=random_share, whole_word_mask=m.whole_word_mask, seed=seed,
    )


def batch_mask_seed(seed: int, indices: list[int]) -> int:
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, indices))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class MaskingCollator:
    """Masks unmasked chunks (training); passes through chunks that were masked once (evaluation),
    since the Trainer has one collator for both.

    A training batch's masks come from a generator seeded by the training seed and the batch's chunk
    indices: the same batch is masked the same way whenever it is built -- in particular after a resume,
    where the data loader's prefetching would otherwise have drawn the masks from a different state of a
    shared generator -- while reshuffled batches of later epochs get new masks."""

    def __init__(self, collator: DataCollatorForLanguageModeling, seed: int):
        self.collator = collator
        self.seed = seed

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "labels" in features[0]:
            return default_data_collator(features)
        if "index" in features[0]:
            indices = [int(f["index"]) for f in features]
            self.collator.generator = torch.Generator().manual_seed(batch_mask_seed(self.seed, indices))
            features = [{k: v for k, v in f.items() if k != "index"} for f in features]
        return self.collator(features)


def mask_once(chunks: dict[str, np.ndarray], tokenizer, cfg: RecipeConfig, batch_size: int = 256) -> dict:
    """The evaluation set masked a single time with `mlm.eval_mask_seed`: every evaluation (before,
    after, any later run) scores the same positions."""
    collator = make_collator(tokenizer, cfg, seed=cfg.mlm.eval_mask_seed)
    dataset = ChunkDataset(chunks, cfg.mlm.whole_word_mask)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for key in ("input_ids", "attention_mask", "labels"):
            parts.setdefault(key, []).append(batch[key])
    return {k: torch.cat(v) for k, v in parts.items()}


# --------------------------------------------------------------------------------------------------
# The task's pieces


def get_mlm_tokenizer(cfg: RecipeConfig, train: Corpus | None):
    tokenizer = get_tokenizer(cfg, train)
    name = cfg.model.tokenizer or cfg.model.name_or_path or "the trained tokenizer"
    if tokenizer.mask_token is None:
        raise InputError(f"tokenizer of '{name}' has no mask token, which masked-LM training needs; "
                         "use an encoder such as bert or roberta.")
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise InputError(f"tokenizer of '{name}' is not a fast (Rust) tokenizer; lmtune needs one for word ids.")
    if tokenizer.pad_token_id is None:
        raise InputError(f"tokenizer of '{name}' has no padding token; choose a tokenizer with one.")
    return tokenizer


def prepare(cfg: RecipeConfig) -> Prepared:
    if cfg.data.train.streaming:
        raise InputError("data.train.streaming is for causal-LM pretraining; task mlm reads its corpus in memory.")
    check_pretrained_head(cfg.model, "mlm")
    train, val = load_splits(cfg)
    tokenizer = get_mlm_tokenizer(cfg, train)
    train_chunks = chunks_for(train, tokenizer, cfg, "data.train")
    if cfg.data.max_train_blocks:
        rows = seeded_subset(np.arange(len(train_chunks["input_ids"])), cfg.data.max_train_blocks,
                             cfg.data.split_seed)
        train_chunks = {k: v[rows] for k, v in train_chunks.items()}
    val_chunks = chunks_for(val, tokenizer, cfg, "data.validation")
    if cfg.data.max_validation_blocks:
        val_chunks = {k: v[: cfg.data.max_validation_blocks] for k, v in val_chunks.items()}
    if cfg.mlm.whole_word_mask:
        log.info("whole-word masking: every token of a chosen word becomes %s (no random/kept share)",
                 tokenizer.mask_token)
    masked = mask_once(val_chunks, tokenizer, cfg)
    info = {
        "train_documents": len(train.texts),
        "validation_documents": len(val.texts),
        "train_chunks": len(train_chunks["input_ids"]),
        "validation_chunks": len(val_chunks["input_ids"]),
        "validation_masked_tokens": int((masked["labels"] != -100).sum()),
        "chunk_size": cfg.data.block_size,
        "whole_word_mask": cfg.mlm.whole_word_mask,
        "source": train.stats.summary("data.train"),
    }
    collator = MaskingCollator(make_collator(tokenizer, cfg, seed=None), seed=cfg.training.seed)
    return Prepared(tokenizer, ChunkDataset(train_chunks, cfg.mlm.whole_word_mask, with_index=True), masked, info,
                    eval_dataset=FixedMaskedDataset(masked), collator=collator)


def build_model(cfg: RecipeConfig, tokenizer, prepared: Prepared | None = None):
    model = build_or_load(cfg.model, tokenizer, cfg.data.block_size, cfg.training.seed, "mlm")
    check_sequence_fits(model.config, cfg.data.block_size, "data.block_size")
    return model


@torch.no_grad()
def evaluate(model, masked: dict[str, torch.Tensor], batch_size: int = 32) -> dict:
    """Mean cross-entropy over the masked positions (token-weighted) and its exp; fp32, eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoder = encoder_of_masked_lm(model)
    total, count = 0.0, 0
    mine = distributed.shard(len(masked["input_ids"]))  # each process its share; the sums are added up
    for start in progress(range(mine.start, mine.stop, batch_size), "evaluating", unit="batches"):
        batch = {k: v[start : min(start + batch_size, mine.stop)].to(device) for k, v in masked.items()}
        labels = batch.pop("labels")
        selected = labels != -100
        if encoder is not None:  # the head on the masked positions only: the same sums, faster
            with head_only_at(encoder, selected):
                logits = model(**batch).logits.float()
        else:
            logits = model(**batch).logits.float()[selected]
        loss = torch.nn.functional.cross_entropy(logits, labels[selected], reduction="sum")
        total += float(loss)
        count += int(selected.sum())
    model.train(was_training)
    total, count = distributed.sum_across([total, count])
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": perplexity(mean), "masked_tokens": int(count)}


def evaluate_run(model, prepared: Prepared, cfg: RecipeConfig) -> dict:
    return evaluate(model, prepared.validation, cfg.training.eval_batch_size or cfg.training.batch_size)


def headline(metrics: dict) -> str:
    return (f"masked-LM perplexity {metrics['perplexity']:.2f} (loss {metrics['loss']:.4f}, "
            f"{metrics['masked_tokens']} masked tokens)")


# --------------------------------------------------------------------------------------------------
# Fill-mask


def with_model_mask(text: str, tokenizer) -> str:
    """Accept either common spelling of the mask ([MASK] or <mask>) and use the tokenizer's own."""
    normalised = re.sub(r"\[MASK\]|<mask>", tokenizer.mask_token, text)
    if tokenizer.mask_token not in normalised:
        raise InputError(f"prompt {text!r} has no mask token; write {tokenizer.mask_token} where a word should go.")
    return normalised


def fill_mask(model, tokenizer, texts: list[str], top_k: int = 5) -> list[dict]:
    from transformers import pipeline

    prompts = [with_model_mask(t, tokenizer) for t in texts]
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=top_k, device=model.device)
    results = []
    for original, prompt in zip(texts, prompts):
        out = fill(prompt)
        per_mask = out if out and isinstance(out[0], list) else [out]
        results.append({"prompt": original, "fills": [
            [{"token": r["token_str"].strip(), "score": round(float(r["score"]), 6), "sequence": r["sequence"]}
             for r in candidates] for candidates in per_mask]})
    return results


def samples(model, tokenizer, cfg: RecipeConfig) -> list[dict]:
    return fill_mask(model, tokenizer, cfg.generation.prompts) if cfg.generation.prompts else []


def load_for_inference(model_dir: str | Path):
    return load_model_for("mlm", model_dir)
