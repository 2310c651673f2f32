"""Causal language modelling, top to bottom.

    sources -> tokenizer (trained or loaded) -> blocks (concat | overflow) -> model (pretrained |
    from scratch) -> perplexity before -> Trainer (cross-entropy | keytoken-weighted) -> perplexity
    after -> completions of the recipe's prompts

Fine-tuning (ELI5 / WikiText chapters) and pretraining from scratch (the code-model chapter) are the
same story with a different model origin.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtune.config import RecipeConfig
from lmtune.data.packing import BlockDataset, StreamingBlockDataset, cache_root, prepare_blocks
from lmtune.data.sources import (
    Corpus,
    SourceStats,
    fingerprint_texts,
    iter_documents,
    load_corpus,
    split_train_validation,
)
from lmtune.errors import InputError
from lmtune.metrics import perplexity
from lmtune.modeling import build_causal_lm, check_block_size, load_causal_lm
from lmtune.tokenizer import load_tokenizer, train_bpe_tokenizer

log = logging.getLogger("lmtune")

# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class Prepared:
    tokenizer: object
    train: torch.utils.data.Dataset
    validation: np.ndarray
    info: dict


def load_splits(cfg: RecipeConfig) -> tuple[Corpus, Corpus]:
    train = load_corpus(cfg.data.train, "data.train")
    log.info(train.stats.summary("data.train"))
    if cfg.data.validation is not None:
        val = load_corpus(cfg.data.validation, "data.validation")
        log.info(val.stats.summary("data.validation"))
        return train, val
    train_texts, val_texts = split_train_validation(train.texts, cfg.data.validation_fraction, cfg.data.split_seed)
    log.info("held out %d of %d documents for validation (seed %d)", len(val_texts), len(train.texts),
             cfg.data.split_seed)
    return (
        Corpus(train_texts, train.stats, fingerprint_texts(train_texts)),
        Corpus(val_texts, SourceStats(documents=len(val_texts)), fingerprint_texts(val_texts)),
    )


def trained_tokenizer(cfg: RecipeConfig, corpus: Corpus):
    """Train (or take from the cache) a byte-level BPE tokenizer on the training documents."""
    from transformers import AutoTokenizer

    tk = cfg.tokenizer
    key = hashlib.sha256(
        f"bpe1|{corpus.fingerprint}|{tk.vocab_size}|{tk.min_frequency}|{tk.max_training_bytes}".encode()
    ).hexdigest()[:24]
    cached = cache_root() / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        log.info("tokenizer: reusing the one trained earlier on this corpus (%s)", cached)
        return AutoTokenizer.from_pretrained(str(cached))
    log.info("tokenizer: training byte-level BPE, vocab %d, on %d documents", tk.vocab_size, len(corpus.texts))
    tokenizer = train_bpe_tokenizer(corpus.texts, tk.vocab_size, tk.min_frequency, tk.max_training_bytes,
                                    model_max_length=_context_length(cfg))
    tmp = cached.with_name(key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(str(tmp))
        tmp.replace(cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # caching is an optimisation; training goes on
    return tokenizer


def _context_length(cfg: RecipeConfig) -> int:
    fs = cfg.model.from_scratch
    return (fs.n_positions if fs and fs.n_positions else None) or cfg.data.block_size


def get_tokenizer(cfg: RecipeConfig, train: Corpus | None):
    if cfg.tokenizer.train:
        return trained_tokenizer(cfg, train)
    name = cfg.model.tokenizer or cfg.model.name_or_path
    tokenizer = load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.eos_token_id is None and cfg.data.packing == "concat":
        raise InputError(f"tokenizer '{name}' has no EOS token, which concat packing puts between documents; "
                         "set data.packing: overflow or use a tokenizer with an EOS token.")
    return tokenizer


def blocks_for(corpus: Corpus, tokenizer, cfg: RecipeConfig, where: str) -> np.ndarray:
    blocks, info = prepare_blocks(corpus.texts, corpus.fingerprint, tokenizer, cfg.data.block_size, cfg.data.packing)
    if info["cached"]:
        log.info("%s: %d blocks of %d tokens (cached, not tokenized again)", where, info["blocks"],
                 cfg.data.block_size)
    else:
        log.info("%s: %d tokens -> %d blocks of %d (%d tokens dropped)", where, info["tokens"], info["blocks"],
                 cfg.data.block_size, info["tokens_dropped"])
    if len(blocks) == 0:
        raise InputError(
            f"{where} yields no full block of {cfg.data.block_size} tokens; lower data.block_size or add text."
        )
    return blocks


def prepare(cfg: RecipeConfig) -> Prepared:
    if cfg.data.train.streaming:
        return prepare_streaming(cfg)
    train, val = load_splits(cfg)
    tokenizer = get_tokenizer(cfg, train)
    train_blocks = blocks_for(train, tokenizer, cfg, "data.train")
    val_blocks = blocks_for(val, tokenizer, cfg, "data.validation")
    if cfg.data.max_validation_blocks is not None:
        val_blocks = val_blocks[: cfg.data.max_validation_blocks]
    info = {
        "train_documents": len(train.texts),
        "validation_documents": len(val.texts),
        "train_blocks": int(len(train_blocks)),
        "validation_blocks": int(len(val_blocks)),
        "block_size": cfg.data.block_size,
        "source": train.stats.summary("data.train"),
    }
    return Prepared(tokenizer, BlockDataset(train_blocks), np.asarray(val_blocks), info)


def prepare_streaming(cfg: RecipeConfig) -> Prepared:
    """Training documents are read, tokenized and packed on the fly; only validation is materialised."""
    if cfg.training.max_steps <= 0:
        raise InputError("data.train.streaming needs training.max_steps (a stream has no known length).")
    if cfg.data.validation is None:
        raise InputError("data.train.streaming needs a data.validation source (a stream cannot be split).")
    if cfg.tokenizer.train:
        raise InputError("data.train.streaming cannot train a tokenizer on the stream; train one first with "
                         "`lmtune tokenizer train` and set model.tokenizer to it.")
    val = load_corpus(cfg.data.validation, "data.validation")
    tokenizer = get_tokenizer(cfg, None)
    val_blocks = blocks_for(val, tokenizer, cfg, "data.validation")[: cfg.data.max_validation_blocks or None]

    def texts():
        return iter_documents(cfg.data.train, "data.train", SourceStats())

    train = StreamingBlockDataset(texts, tokenizer, cfg.data.block_size, cfg.data.packing)
    info = {"streaming": True, "validation_blocks": int(len(val_blocks)), "block_size": cfg.data.block_size}
    return Prepared(tokenizer, train, np.asarray(val_blocks), info)


# --------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: RecipeConfig, tokenizer):
    if cfg.model.from_scratch is not None:
        model = build_causal_lm(cfg.model.from_scratch, tokenizer, cfg.data.block_size, cfg.training.seed)
    else:
        model = load_causal_lm(cfg.model)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    check_block_size(model.config, cfg.data.block_size)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, blocks: np.ndarray, batch_size: int = 16) -> dict:
    """Token-weighted mean next-token cross-entropy over all validation blocks, and its exp.
    Deterministic: eval mode, fixed order, fp32."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss = 0.0
    total_tokens = 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(np.asarray(blocks[start : start + batch_size], dtype=np.int64), device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 reduction="sum")
        total_loss += float(loss)
        total_tokens += targets.numel()
    model.train(was_training)
    mean = total_loss / max(total_tokens, 1)
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": total_tokens}


# --------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, num_return_sequences: int = 1,
             seed: int = 0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> list[list[str]]:
    """Completions (prompt excluded) for a batch of prompts, using the KV cache; left padding so
    every prompt ends where generation starts."""
    if not prompts:
        return []
    torch.manual_seed(seed)
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    n = num_return_sequences
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def load_for_inference(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.hub import from_pretrained_or_explain

    name = str(model_dir)
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, name, what="tokenizer", field="MODEL")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = from_pretrained_or_explain(AutoModelForCausalLM.from_pretrained, name, what="model", field="MODEL")
    return model, tokenizer
