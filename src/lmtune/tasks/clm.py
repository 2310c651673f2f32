"""Causal language modelling, top to bottom.

    sources -> tokenizer (trained or loaded) -> blocks (concat | overflow) -> model (pretrained |
    from scratch) -> perplexity before -> Trainer (cross-entropy | keytoken-weighted) -> perplexity
    after -> completions of the recipe's prompts

Fine-tuning (ELI5 / WikiText chapters) and pretraining from scratch (the code-model chapter) are the
same story with a different model origin.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import default_data_collator

from lmtune import distributed
from lmtune.config import RecipeConfig
from lmtune.data.packing import BlockDataset, StreamingBlockDataset, prepare_blocks
from lmtune.data.sources import Corpus, load_corpus
from lmtune.data.streaming import DocumentStream, first_bytes
from lmtune.errors import InputError
from lmtune.progress import on_terminal, progress
from lmtune.metrics import perplexity
from lmtune.modeling import build_or_load, check_block_size
from lmtune.tasks.common import (
    Prepared,
    cached_tokenizer,
    context_length,
    get_tokenizer,
    load_model_for,
    load_splits,
    seeded_subset,
    tokenizer_style,
)
from lmtune.tokenizer import train_tokenizer
from lmtune.training.losses import eval_rows, keytoken_ids

log = logging.getLogger("lmtune")

# --------------------------------------------------------------------------------------------------
# Data


def get_clm_tokenizer(cfg: RecipeConfig, train: Corpus | None):
    tokenizer = get_tokenizer(cfg, train)
    if tokenizer.eos_token_id is None and cfg.data.packing == "concat":
        raise InputError(f"tokenizer '{cfg.model.tokenizer or cfg.model.name_or_path}' has no EOS token, which "
                         "concat packing puts between documents; set data.packing: overflow or use another tokenizer.")
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
    tokenizer = get_clm_tokenizer(cfg, train)
    train_blocks = seeded_subset(blocks_for(train, tokenizer, cfg, "data.train"), cfg.data.max_train_blocks,
                                 cfg.data.split_seed)
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
    val_blocks = np.asarray(val_blocks)
    return Prepared(tokenizer, BlockDataset(train_blocks), val_blocks, info, eval_dataset=BlockDataset(val_blocks),
                    collator=default_data_collator, trainer_kwargs=keytoken_kwargs(cfg, tokenizer))


STREAM_TOKENIZER_BYTES = 100_000_000  # tokenizer.train on a stream, when tokenizer.max_training_bytes is unset


def prepare_streaming(cfg: RecipeConfig, dataset_factory=None) -> Prepared:
    """Training documents are read, tokenized, packed and shuffled on the fly (see
    `StreamingBlockDataset`); only validation is materialised. A tokenizer to train learns from the
    first `tokenizer.max_training_bytes` of the stream. `dataset_factory` stands in for the Hub
    dataset of a Hub source (tests)."""
    if cfg.training.max_steps <= 0:
        raise InputError("data.train.streaming needs training.max_steps (a stream has no known length).")
    if cfg.data.validation is None:
        raise InputError("data.train.streaming needs a data.validation source (a stream cannot be split).")
    if cfg.training.dataloader_num_workers:
        raise InputError("data.train.streaming reads the stream in the main process (it keeps the resume position "
                         "there); set training.dataloader_num_workers: 0.")
    stream = DocumentStream(cfg.data.train, "data.train", seed=cfg.training.seed,
                            shuffle_files=cfg.data.shuffle_buffer > 0, dataset_factory=dataset_factory)
    stream.files()  # a missing path is reported before anything is read
    val = load_corpus(cfg.data.validation, "data.validation")
    tokenizer = stream_tokenizer(cfg, stream) if cfg.tokenizer.train else get_clm_tokenizer(cfg, None)
    val_blocks = blocks_for(val, tokenizer, cfg, "data.validation")[: cfg.data.max_validation_blocks or None]
    train = StreamingBlockDataset(stream, tokenizer, cfg.data.block_size, cfg.data.packing,
                                  shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.training.seed, epochs=None)
    train.check_not_empty()
    log.info("%s; shuffled in windows of %s blocks", stream.describe(), cfg.data.shuffle_buffer or "no")
    info = {"streaming": True, "validation_blocks": int(len(val_blocks)), "block_size": cfg.data.block_size,
            "shuffle_buffer": cfg.data.shuffle_buffer, "source": stream.describe()}
    val_blocks = np.asarray(val_blocks)
    return Prepared(tokenizer, train, val_blocks, info, eval_dataset=BlockDataset(val_blocks),
                    collator=default_data_collator, trainer_kwargs=keytoken_kwargs(cfg, tokenizer))


def stream_tokenizer(cfg: RecipeConfig, stream: DocumentStream):
    """A tokenizer trained on the first `tokenizer.max_training_bytes` (default 100 MB) of the stream's
    first epoch, or the one trained earlier on the same files (cached by their paths, sizes and
    modification times and the budget: hashing the contents would read the whole corpus)."""
    tk = cfg.tokenizer
    budget = tk.max_training_bytes
    if budget is None:
        budget = STREAM_TOKENIZER_BYTES
        log.info("tokenizer: tokenizer.max_training_bytes is unset; training on the first %d MB of the stream",
                 budget // 1_000_000)
    style = tokenizer_style(cfg)
    order = f"seed {stream.seed}" if stream.shuffle_files else "in order"

    def train():
        kind = "WordPiece" if style == "bert" else "byte-level BPE"
        counts: dict = {}
        tokenizer = train_tokenizer(first_bytes((text for _, text in stream.documents(0)), budget, counts),
                                    tk.vocab_size, tk.min_frequency, None, model_max_length=context_length(cfg),
                                    style=style, show_progress=on_terminal())
        log.info("tokenizer: trained %s, vocab %d, on the first %.1f MB of the stream (%d documents)", kind,
                 tk.vocab_size, counts["bytes"] / 1e6, counts["documents"])
        return tokenizer

    tokenizer = cached_tokenizer(f"tok-stream1|{style}|{stream.signature(mtimes=True)}|{order}|{tk.vocab_size}|"
                                 f"{tk.min_frequency}|{budget}|{context_length(cfg)}", train, "stream")
    if tokenizer.eos_token_id is None and cfg.data.packing == "concat":
        raise InputError("the trained tokenizer has no EOS token, which concat packing puts between documents; set "
                         "data.packing: overflow.")
    return tokenizer


def keytoken_kwargs(cfg: RecipeConfig, tokenizer) -> dict:
    """The keytoken-weighted loss's key ids (single-token keywords only; the rest are reported)."""
    if cfg.loss.type != "keytoken":
        return {}
    ids, skipped = keytoken_ids(tokenizer, cfg.loss.keywords)
    if skipped:
        log.info("keytoken loss: skipped multi-token keywords %s", ", ".join(map(repr, skipped)))
    if not ids:
        raise InputError("loss.keywords: none of the keywords is a single token of this tokenizer; "
                         "choose shorter keywords or set loss.type: cross_entropy.")
    log.info("keytoken loss: %d key token ids, alpha %g", len(ids), cfg.loss.alpha)
    return {"keytoken_ids": ids, "keytoken_alpha": cfg.loss.alpha}


# --------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: RecipeConfig, tokenizer, prepared: Prepared | None = None):
    model = build_or_load(cfg.model, tokenizer, cfg.data.block_size, cfg.training.seed, "clm")
    check_block_size(model.config, cfg.data.block_size)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_run(model, prepared: Prepared, cfg: RecipeConfig) -> dict:
    """Validation perplexity, and the recipe's prompts completed (so before and after can be compared)."""
    metrics = evaluate(model, prepared.validation, cfg.training.eval_batch_size or cfg.training.batch_size)
    if cfg.generation.prompts:
        metrics["samples"] = samples(model, prepared.tokenizer, cfg)
        for i, sample in enumerate(metrics["samples"], 1):
            log.info("prompt %d completed: %r", i, sample["completions"][0][:200])
    return metrics


def headline(metrics: dict) -> str:
    return f"validation perplexity {metrics['perplexity']:.2f} (loss {metrics['loss']:.4f})"


@torch.no_grad()
def evaluate(model, blocks: np.ndarray, batch_size: int = 16) -> dict:
    """Token-weighted mean next-token cross-entropy over all validation blocks, and its exp.
    Deterministic: eval mode, fixed order, fp32. With several processes each takes its share of the
    blocks and the sums are added up."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss = 0.0
    total_tokens = 0
    mine = distributed.shard(len(blocks))
    batch_size = eval_rows(model, batch_size, blocks.shape[1])
    for start in progress(range(mine.start, mine.stop, batch_size), "evaluating", unit="batches"):
        ids = torch.as_tensor(np.asarray(blocks[start : min(start + batch_size, mine.stop)], dtype=np.int64),
                              device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 reduction="sum")
        total_loss += float(loss)
        total_tokens += targets.numel()
    model.train(was_training)
    total_loss, total_tokens = distributed.sum_across([total_loss, total_tokens])
    mean = total_loss / max(total_tokens, 1)
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": int(total_tokens)}


# --------------------------------------------------------------------------------------------------
# Generation


GENERATION_BATCH = 16  # prompts per generate call, grouped by length so that a batch pads little


def new_tokens_that_fit(model, prompt_lengths: list[int], max_new_tokens: int) -> int:
    """A model with learned positions (GPT-2) cannot go past its last one (generation would fail deep
    inside the model): the new tokens are capped so that the longest prompt plus them fit, with a
    warning; a prompt that leaves no room at all is refused."""
    limit = getattr(model.config, "n_positions", None)
    longest = max(prompt_lengths, default=0)
    if not isinstance(limit, int) or longest + max_new_tokens <= limit:
        return max_new_tokens
    if longest >= limit:
        raise InputError(f"a prompt of {longest} tokens fills the model's context of {limit} positions and leaves "
                         "no room for new tokens; shorten the prompt.")
    log.warning("the model has %d positions: generating at most %d new tokens after a prompt of %d (asked for %d)",
                limit, limit - longest, longest, max_new_tokens)
    return limit - longest


def _length_batches(lengths: list[int], size: int = GENERATION_BATCH) -> list[list[int]]:
    """Prompt indices in batches of `size`, shortest prompts first."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + size] for i in range(0, len(order), size)]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids as the model saw text in training: the tokenizer's leading ids (BOS for Llama 3 or
    Gemma) first unless the prompt already starts with them (a rendered chat), no other special ids."""
    from lmtune.tokenizer import leading_special_ids, with_leading_ids

    prefix = leading_special_ids(tokenizer)
    return [with_leading_ids(ids, prefix) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a reply: EOS, the chat template's end-of-turn token (`<|im_end|>`,
    `<end_of_turn>`, `<|eot_id|>`), and those the model's generation config names."""
    from lmtune.chat import end_of_turn_token

    ids = [tokenizer.eos_token_id]
    end = end_of_turn_token(tokenizer)
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return [i for i in dict.fromkeys(ids) if isinstance(i, int) and i >= 0]


def _left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, **options) -> list[torch.Tensor]:
    """New token ids for each prompt (num_return_sequences rows each), using the KV cache, in batches
    of prompts of similar length; left padding so every prompt ends where generation starts. Generation
    stops at any of `stop_token_ids`."""
    model.eval()
    encoded = encode_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in encoded]
    max_new_tokens = new_tokens_that_fit(model, lengths, max_new_tokens)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(model, tokenizer)
    new_ids: list[torch.Tensor | None] = [None] * len(prompts)
    for batch in _length_batches(lengths):
        enc = _left_padded([encoded[i] for i in batch], pad_id, device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=stops or None, **options)
        rows = out[:, enc["input_ids"].shape[1]:].view(len(batch), -1, out.shape[1] - enc["input_ids"].shape[1])
        for i, ids in zip(batch, rows):
            new_ids[i] = ids
    return new_ids


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, num_return_sequences: int = 1,
             seed: int = 0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> list[list[str]]:
    """Completions (prompt excluded) for a batch of prompts, num_return_sequences each."""
    if not prompts:
        return []
    torch.manual_seed(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    new_ids = _generate(model, tokenizer, prompts, max_new_tokens, do_sample=do_sample,
                        num_return_sequences=num_return_sequences, repetition_penalty=repetition_penalty,
                        no_repeat_ngram_size=no_repeat_ngram_size, **sampling)
    return [tokenizer.batch_decode(ids, skip_special_tokens=True) for ids in new_ids]


def generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy new token ids per prompt, cut after the first stop token (`stop_token_ids`) when the model
    produced one (the padding after it dropped)."""
    if not prompts:
        return []
    stops = set(stop_token_ids(model, tokenizer))
    results = []
    for ids in _generate(model, tokenizer, prompts, max_new_tokens, do_sample=False):
        row = ids[0].tolist()
        end = next((k for k, t in enumerate(row) if t in stops), None)
        results.append(row if end is None else row[: end + 1])
    return results


def samples(model, tokenizer, cfg: RecipeConfig) -> list[dict]:
    """Completions of the recipe's prompts, stored in metrics.json."""
    g = cfg.generation
    if not g.prompts:
        return []
    completions = generate(model, tokenizer, g.prompts, g.max_new_tokens, g.do_sample, g.temperature, g.top_k,
                           g.top_p, g.num_return_sequences, seed=cfg.training.seed,
                           repetition_penalty=g.repetition_penalty, no_repeat_ngram_size=g.no_repeat_ngram_size)
    return [{"prompt": p, "completions": c} for p, c in zip(g.prompts, completions)]


def load_for_inference(model_dir: str | Path):
    return load_model_for("clm", model_dir)
