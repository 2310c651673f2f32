"""Train a tokenizer with the `tokenizers` library and wrap it as a Hugging Face tokenizer.

Three styles, after the models they serve:
- ``gpt2``: byte-level BPE; ``<|endoftext|>`` is bos, eos and unk, ``<pad>`` pads (causal LMs);
- ``roberta``: byte-level BPE with ``<s> ... </s>`` around each text and a ``<mask>`` token (MLM);
- ``bert``: lower-cased WordPiece with ``[CLS] ... [SEP]`` and ``[MASK]`` (MLM).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from lmtune.errors import InputError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
ROBERTA_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "mask_token": "<mask>"}
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}
# 256 byte symbols + the special tokens + at least a handful of merges.
MIN_VOCAB_SIZE = 256 + len(ROBERTA_SPECIALS) + 16
STYLES = ("gpt2", "roberta", "bert")


def _bounded(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    seen = 0
    for text in texts:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(text)
        yield text


def _core_and_trainer(style: str, vocab_size: int, min_frequency: int, show_progress: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if style == "bert":
        core = Tokenizer(models.WordPiece(unk_token=BERT_SPECIALS["unk_token"]))
        core.normalizer = normalizers.BertNormalizer(lowercase=True)
        core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        core.decoder = decoders.WordPiece()
        specials = list(BERT_SPECIALS.values())
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=show_progress)
        return core, trainer, specials
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = list(ROBERTA_SPECIALS.values()) if style == "roberta" else SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    return core, trainer, specials


def _add_template(core, style: str) -> None:
    """`[CLS] text [SEP]` / `<s> text </s>` as the MLM models were trained (ids known only after training)."""
    from tokenizers import processors

    if style == "bert":
        cls, sep = BERT_SPECIALS["cls_token"], BERT_SPECIALS["sep_token"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, core.token_to_id(cls)), (sep, core.token_to_id(sep))])
    elif style == "roberta":
        bos, eos = ROBERTA_SPECIALS["bos_token"], ROBERTA_SPECIALS["eos_token"]
        # trim_offsets: a token's offsets leave out the space byte-level BPE glues to its front.
        core.post_processor = processors.RobertaProcessing((eos, core.token_to_id(eos)), (bos, core.token_to_id(bos)),
                                                           trim_offsets=True, add_prefix_space=False)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    model_max_length: int = 1024,
    show_progress: bool = False,
    style: str = "gpt2",
):
    from transformers import PreTrainedTokenizerFast

    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise InputError(
            f"vocab_size {vocab_size} is too small: a tokenizer needs at least {MIN_VOCAB_SIZE} "
            "(256 bytes + special tokens); use e.g. 8192."
        )
    core, trainer, _ = _core_and_trainer(style, vocab_size, min_frequency, show_progress)
    n_texts = 0

    def counted() -> Iterator[str]:
        nonlocal n_texts
        for text in _bounded(texts, max_bytes):
            n_texts += 1
            yield text

    core.train_from_iterator(counted(), trainer=trainer)
    if n_texts == 0:
        raise InputError("cannot train a tokenizer on an empty corpus; check the data source and its filters.")
    _add_template(core, style)
    if style == "gpt2":
        specials = dict(bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    else:
        specials = BERT_SPECIALS if style == "bert" else ROBERTA_SPECIALS
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=model_max_length, **specials)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, max_bytes: int | None = None,
                        model_max_length: int = 1024, show_progress: bool = False):
    """The GPT-2-style byte-level BPE tokenizer of causal LMs."""
    return train_tokenizer(texts, vocab_size, min_frequency, max_bytes, model_max_length, show_progress, "gpt2")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, new_pad_token: bool = False):
    """AutoTokenizer with a pad token guaranteed (causal LMs such as GPT-2 ship none): EOS pads, or
    with `new_pad_token` a new [PAD] token is added (the model's embeddings must then grow)."""
    from transformers import AutoTokenizer

    from lmtune.hub import from_pretrained_or_explain

    tokenizer = from_pretrained_or_explain(
        AutoTokenizer.from_pretrained, name_or_path, what="tokenizer", trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and new_pad_token:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before every text by itself: BOS for Llama 3 and Gemma (which degrade
    badly without it), none for GPT-2 or SmolLM2. Texts tokenized piecewise (documents to pack, prompts
    to answer) get them in front, as the model saw its training text."""
    marked = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return marked[:start]
    return []


def with_leading_ids(ids: list[int], prefix: list[int]) -> list[int]:
    """`ids` with the tokenizer's leading special ids, unless they already start with them (a chat
    template that writes BOS itself)."""
    return list(ids) if not prefix or list(ids[: len(prefix)]) == prefix else [*prefix, *ids]


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out
