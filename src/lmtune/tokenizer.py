"""Train a byte-level BPE tokenizer (the `tokenizers` library) and save it as a Hugging Face folder."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from lmtune.errors import InputError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
# 256 byte symbols + the special tokens + at least a handful of merges.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 16


def _bounded(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    seen = 0
    for text in texts:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(text)
        yield text


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    model_max_length: int = 1024,
    show_progress: bool = False,
):
    """A GPT-2-style byte-level BPE tokenizer: `<|endoftext|>` is bos, eos and unk; `<pad>` pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise InputError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE}; use e.g. 8192."
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    n_texts = 0

    def counted() -> Iterator[str]:
        nonlocal n_texts
        for text in _bounded(texts, max_bytes):
            n_texts += 1
            yield text

    core.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise InputError("cannot train a tokenizer on an empty corpus; check the data source and its filters.")
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """AutoTokenizer with a pad token guaranteed (causal LMs such as GPT-2 ship none)."""
    from transformers import AutoTokenizer

    from lmtune.hub import from_pretrained_or_explain

    tokenizer = from_pretrained_or_explain(
        AutoTokenizer.from_pretrained, name_or_path, what="tokenizer", trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out
