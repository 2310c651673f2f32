"""What every text task shares: the prepared bundle, train/validation corpora, the tokenizer."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmtune.config import RecipeConfig
from lmtune.data.packing import cache_root
from lmtune.data.sources import Corpus, SourceStats, fingerprint_texts, load_corpus, split_train_validation
from lmtune.errors import storage_failure
from lmtune.progress import on_terminal
from lmtune.tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger("lmtune")


@dataclass
class Prepared:
    """What a task's `prepare` hands to the pipeline."""

    tokenizer: Any
    train: Any  # a torch Dataset (or IterableDataset) for the Trainer
    validation: Any  # what the task's `evaluate` reads (fixed, so before/after compare the same thing)
    info: dict
    eval_dataset: Any = None  # for the Trainer's periodic evaluation
    # The Trainer's data collator. Left None the Trainer picks DataCollatorWithPadding for a tokenizer,
    # which re-pads blocks that are already equal-length; tasks set it explicitly.
    collator: Any = None
    trainer_kwargs: dict = field(default_factory=dict)
    # A TRL trainer and its TrainingArguments subclass (RewardConfig, DPOConfig...) with their own
    # options; None: the pipeline's Trainer and plain TrainingArguments.
    trainer_class: Any = None
    args_class: Any = None
    args_extra: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # what the task's build_model / evaluate need besides


class FeatureDataset(torch.utils.data.Dataset):
    """Tokenized examples (dicts of lists), with their labels kept beside them when given."""

    def __init__(self, features: list[dict], labels: list | None = None):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        if self.labels is None:
            return self.features[i]
        return {**self.features[i], "labels": self.labels[i]}


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


def tokenizer_style(cfg: RecipeConfig) -> str:
    arch = cfg.model.from_scratch.architecture if cfg.model.from_scratch else "gpt2"
    return {"bert": "bert", "roberta": "roberta"}.get(arch, "gpt2")


def sequence_length(cfg: RecipeConfig) -> int:
    """Tokens per training sequence: a QA window, a classified text, otherwise a block / chunk."""
    if cfg.task == "qa":
        return cfg.qa.max_length
    if cfg.task == "classify" and cfg.classify.max_length:
        return cfg.classify.max_length
    if cfg.task == "sft":
        return cfg.sft.max_length
    if cfg.task in ("reward", "dpo", "rl"):
        return cfg.preference.max_length
    return cfg.data.block_size


def context_length(cfg: RecipeConfig) -> int:
    fs = cfg.model.from_scratch
    return (fs.n_positions if fs and fs.n_positions else None) or sequence_length(cfg)


def cached_tokenizer(key_text: str, train: Callable[[], Any], what: str):
    """The tokenizer cached under `key_text`'s hash, or the one `train()` makes, then cached (written
    aside and renamed into place, so a reader never sees half of it)."""
    from transformers import AutoTokenizer

    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    cached = cache_root() / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        log.info("tokenizer: reusing the one trained earlier on this %s (%s)", what, cached)
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = train()
    tmp = cached.with_name(f"{key}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(str(tmp))
        tmp.replace(cached)
    except Exception as exc:  # the tokenizers library reports a full disk in its own exception type
        # judged before the partial files go, as for checkpoints (engine.py): the room left is part of the evidence
        full = isinstance(exc, OSError) or storage_failure(exc, written_to=tmp) is not None
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        log.warning("tokenizer: not cached (%s); the run goes on", str(exc).splitlines()[0][:120])
    return tokenizer


def trained_tokenizer(cfg: RecipeConfig, corpus: Corpus):
    """Train (or take from the cache) a tokenizer on the training documents."""
    tk = cfg.tokenizer
    style = tokenizer_style(cfg)

    def train():
        kind = "WordPiece" if style == "bert" else "byte-level BPE"
        log.info("tokenizer: training %s, vocab %d, on %d documents", kind, tk.vocab_size, len(corpus.texts))
        return train_tokenizer(corpus.texts, tk.vocab_size, tk.min_frequency, tk.max_training_bytes,
                               model_max_length=context_length(cfg), style=style, show_progress=on_terminal())

    return cached_tokenizer(f"tok2|{style}|{corpus.fingerprint}|{tk.vocab_size}|{tk.min_frequency}|"
                            f"{tk.max_training_bytes}|{context_length(cfg)}", train, "corpus")


def get_tokenizer(cfg: RecipeConfig, train: Corpus | None):
    if cfg.tokenizer.train:
        return trained_tokenizer(cfg, train)
    name = cfg.model.tokenizer or cfg.model.name_or_path
    # Classification follows the LoRA article: a tokenizer without a pad token gets a new one (so does a
    # reward model, whose score is read at the last token that is not padding).
    return load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code, new_pad_token=cfg.task in ("classify", "reward"))


def seeded_subset(rows: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` rows, chosen at random with `seed` (the tutorials' downsampling), in order."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit])
    return rows[keep]


def load_model_for(task: str, model_dir: str | Path):
    """A saved model with the task's head, and its tokenizer (what `lmtune predict` and `eval` load)."""
    import transformers
    from transformers import AutoTokenizer

    from lmtune.hub import from_pretrained_or_explain
    from lmtune.modeling import HEADS

    name = str(model_dir)
    tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, name, what="tokenizer", field="MODEL")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    auto = getattr(transformers, HEADS[task][0])
    model = from_pretrained_or_explain(auto.from_pretrained, name, what="model", field="MODEL")
    return model, tokenizer
