"""`lmtune preview RECIPE`: the first prepared examples as the model will see them, and statistics.

The features come from the task's own `prepare(cfg)` -- exactly what `lmtune train` hands the
Trainer -- and this module only reads them, it never tokenizes a training example its own way:

- `preview_rows(cfg, prepared, n)`: the first n examples as plain dicts (token strings, ids, labels,
  flags: the next-token targets of a causal-LM block, the positions a masked-LM collator masked, a QA
  window's answer span, an SFT prompt/response boundary, a classification label's name, a preference
  pair's parts), so tests compare them with the prepared features;
- `preview_stats(cfg, prepared, rows)`: blocks / windows / examples, tokens kept and dropped,
  truncation counts, label distributions, as an ordered dict of human-readable names;
- `render_preview(cfg, n, color)`: both as text. Without colour (`--no-color`, or not a terminal) the
  markers are plain characters: `*` before a masked position, `[[ ... ]]` around an answer span, `||`
  at a prompt/response boundary.

Two figures are not in what `prepare` returns and are counted again here from the same sources with
the task's own functions: the tokens a causal/masked LM's packing drops (corpora up to
`RECOUNT_MAX_CHARS`), and which QA example each shown window belongs to (to print its gold answer
beside the labelled span; shown only when re-tokenizing those examples gives the very same windows).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import textwrap
from collections import Counter
from typing import Any

import numpy as np

from lmtune.config import RecipeConfig
from lmtune.tasks.common import Prepared

log = logging.getLogger("lmtune")

IGNORE = -100
RECOUNT_MAX_CHARS = 50_000_000  # larger corpora: tokens dropped by packing are left to `lmtune train`'s log
TEXT_CHARS = 300  # decoded text shown per example


# --------------------------------------------------------------------------------------------------
# Entry point


def render_preview(cfg: RecipeConfig, n: int = 5, color: bool = False, width: int | None = None) -> str:
    """Prepare the recipe's data as training would, and describe the first `n` examples and the whole."""
    from lmtune.tasks import task_module

    with captured_warnings() as notes:
        prepared = task_module(cfg.task).prepare(cfg)
    rows = preview_rows(cfg, prepared, n)
    stats = preview_stats(cfg, prepared, rows)
    if width is None:
        width = max(60, min(160, shutil.get_terminal_size((100, 24)).columns))
    return render_text(cfg, prepared, rows, stats, notes, color, width)


@contextlib.contextmanager
def captured_warnings():
    """The warnings `prepare` logs (examples skipped, cut, dropped), to repeat them beside the figures."""
    notes: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    handler = Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        yield notes
    finally:
        log.removeHandler(handler)


@contextlib.contextmanager
def quiet():
    """Silence lmtune's log while sources are read a second time (prepare already said it all)."""
    disabled = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = disabled


# --------------------------------------------------------------------------------------------------
# Tokens as text


def visible(token: str | None) -> str:
    """A token string with whitespace and control characters made visible (Ġ, ▁, ## are kept as the
    tokenizer writes them)."""
    if token is None:
        return "?"
    out = []
    for ch in token:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def token_strings(tokenizer, ids) -> list[str]:
    return [visible(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def decoded(tokenizer, ids) -> str:
    """The ids as text, special tokens kept, line breaks shown as \\n."""
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _ints(values) -> list[int]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [int(v) for v in values]


def _first_items(dataset, n: int) -> list[dict]:
    """The first n items of a map-style dataset, or of an iterable one (a stream) in its order."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return [dataset[i] for i in range(min(n, len(dataset)))]
    items = []
    for item in dataset:
        items.append(item)
        if len(items) >= n:
            break
    return items


# --------------------------------------------------------------------------------------------------
# Rows: the first examples, per task


def preview_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    builders = {"clm": clm_rows, "mlm": mlm_rows, "qa": qa_rows, "classify": classify_rows, "sft": sft_rows,
                "reward": reward_rows, "dpo": dpo_rows, "rl": rl_rows}
    return builders[cfg.task](cfg, prepared, n)


def clm_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    """Blocks as the Trainer gets them. The labels equal the inputs and the model shifts them: the
    token trained at position i is the label at i + 1 (none for a block's last position)."""
    tok = prepared.tokenizer
    rows = []
    for i, item in enumerate(_first_items(prepared.train, n)):
        ids, labels = _ints(item["input_ids"]), _ints(item["labels"])
        targets = labels[1:] + [None]
        rows.append({"split": "train", "index": i, "input_ids": ids, "tokens": token_strings(tok, ids),
                     "labels": labels, "targets": targets,
                     "target_tokens": [None if t is None or t == IGNORE else visible(tok.convert_ids_to_tokens(t))
                                       for t in targets],
                     "text": decoded(tok, ids)})
    return rows


def _mask_kinds(inputs: list[int], labels: list[int], mask_id: int) -> list[str | None]:
    """Per position: None (not chosen), 'mask' (input is the mask token), 'kept' (input is the original
    token) or 'random' (another token)."""
    kinds: list[str | None] = []
    for got, label in zip(inputs, labels):
        if label == IGNORE:
            kinds.append(None)
        elif got == mask_id:
            kinds.append("mask")
        elif got == label:
            kinds.append("kept")
        else:
            kinds.append("random")
    return kinds


def mlm_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    """The first n chunks masked by the training collator, as one batch (its masks are seeded by the
    training seed and the batch's chunk indices, so the same batch is always masked the same way)."""
    tok = prepared.tokenizer
    items = _first_items(prepared.train, n)
    if not items:
        return []
    batch = prepared.collator(items)
    rows = []
    for i, item in enumerate(items):
        original = _ints(item["input_ids"])
        ids, labels = _ints(batch["input_ids"][i]), _ints(batch["labels"][i])
        attention = _ints(batch["attention_mask"][i])
        kinds = _mask_kinds(ids, labels, tok.mask_token_id)
        rows.append({"split": "train", "index": i, "input_ids": ids, "tokens": token_strings(tok, ids),
                     "labels": labels, "original_ids": original, "original_tokens": token_strings(tok, original),
                     "attention_mask": attention,
                     "masked_positions": [p for p, k in enumerate(kinds) if k is not None], "kinds": kinds,
                     "text": decoded(tok, [t for t, a in zip(original, attention) if a])})
    return rows


def _qa_train_examples(cfg: RecipeConfig):
    """The training examples in the order `qa.prepare` windows them (read again, quietly)."""
    from lmtune.tasks import qa

    with quiet():
        train, _ = qa.load_examples(cfg.data.train, cfg, "data.train")
        if cfg.data.validation is None:
            train, _ = qa.split_by_group(train, cfg.data.validation_fraction, cfg.data.split_seed)
        return qa._subset(train, cfg.qa.max_train_examples, cfg.training.seed)


def _qa_windows_source(cfg: RecipeConfig, prepared: Prepared, features: list[dict]):
    """For the shown windows: the encoding they came from and their examples, or None when
    re-tokenizing the first examples does not give exactly the prepared windows."""
    from lmtune.tasks import qa

    try:
        examples = _qa_train_examples(cfg)[: len(features)]
        enc = qa.tokenize_windows(prepared.tokenizer, examples, cfg.qa.max_length, cfg.qa.stride)
    except Exception:  # only the gold answers are lost: the windows themselves come from prepare
        log.debug("preview: could not match QA windows to their examples", exc_info=True)
        return None
    if len(enc["input_ids"]) < len(features) or any(
            list(enc["input_ids"][j]) != _ints(f["input_ids"]) for j, f in enumerate(features)):
        return None
    return enc, examples


def qa_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    """Windows with their labelled span (start_positions..end_positions; 0..0 is the CLS token: the
    answer is not wholly inside this window)."""
    tok = prepared.tokenizer
    features = _first_items(prepared.train, n)
    source = _qa_windows_source(cfg, prepared, features)
    context_sequence = 1 if tok.padding_side == "right" else 0
    rows = []
    for i, feature in enumerate(features):
        ids = _ints(feature["input_ids"])
        start, end = int(feature["start_positions"]), int(feature["end_positions"])
        has_answer = not (start == 0 and end == 0)
        row = {"split": "train", "index": i, "input_ids": ids, "tokens": token_strings(tok, ids),
               "start": start, "end": end, "has_answer": has_answer,
               "span_tokens": token_strings(tok, ids[start : end + 1]) if has_answer else [],
               "span_decoded": decoded(tok, ids[start : end + 1]) if has_answer else "",
               "roles": None, "example_id": None, "gold": None, "span_text": None, "window_of_example": None}
        if source is not None:
            enc, examples = source
            mapping = list(enc["overflow_to_sample_mapping"])
            e = mapping[i]
            example = examples[e]
            sequence = enc.sequence_ids(i)
            row["roles"] = ["special" if s is None else "context" if s == context_sequence else "question"
                            for s in sequence]
            row["example_id"] = example.id
            row["question"] = example.question.strip()
            row["gold"] = example.answers[0] if example.answers else ""
            row["window_of_example"] = (mapping[: i + 1].count(e), mapping.count(e))
            if has_answer:
                offsets = enc["offset_mapping"][i]
                row["span_text"] = example.context[offsets[start][0] : offsets[end][1]]
        elif "token_type_ids" in feature:
            types = _ints(feature["token_type_ids"])
            special = set(tok.all_special_ids)
            row["roles"] = ["special" if t in special else "context" if s == 1 else "question"
                            for t, s in zip(ids, types)]
        rows.append(row)
    return rows


def _label_name(label, space) -> str:
    if space is None:
        return str(label)
    if space.problem_type == "regression":
        return f"{space.names[0]} = {float(label):g}"
    if space.problem_type == "multi_label":
        return ", ".join(name for name, on in zip(space.names, label) if on) or "(none)"
    return space.names[int(label)]


def classify_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    tok = prepared.tokenizer
    space = prepared.extra.get("label_space")
    max_length = prepared.info["max_length"]
    rows = []
    for i, item in enumerate(_first_items(prepared.train, n)):
        ids = _ints(item["input_ids"])
        label = item["labels"]
        rows.append({"split": "train", "index": i, "input_ids": ids, "tokens": token_strings(tok, ids),
                     "label": label, "label_name": _label_name(label, space), "num_tokens": len(ids),
                     "truncated": len(ids) >= max_length, "text": decoded(tok, ids)})
    return rows


def _segments(labels: list[int], attention: list[int]) -> list[tuple[str, int, int]]:
    """Runs of (role, start, end exclusive): 'prompt' (label -100), 'response' (trained), 'pad'."""
    roles = ["pad" if a == 0 else "prompt" if lab == IGNORE else "response" for lab, a in zip(labels, attention)]
    out: list[tuple[str, int, int]] = []
    for p, role in enumerate(roles):
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1], p + 1)
        else:
            out.append((role, p, p + 1))
    return out


def sft_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    """Sequences with their labels: -100 on the prompt (with completion-only loss), the response and EOS
    trained. `boundary` is the first trained position; packed sequences hold several examples."""
    tok = prepared.tokenizer
    eos = tok.eos_token_id
    rows = []
    for i, item in enumerate(_first_items(prepared.train, n)):
        ids, labels = _ints(item["input_ids"]), _ints(item["labels"])
        attention = _ints(item.get("attention_mask", [1] * len(ids)))
        trained = [p for p, lab in enumerate(labels) if lab != IGNORE]
        segments = _segments(labels, attention)
        rows.append({"split": "train", "index": i, "input_ids": ids, "tokens": token_strings(tok, ids),
                     "labels": labels, "attention_mask": attention,
                     "boundary": trained[0] if trained else None,
                     "boundaries": [s for role, s, _ in segments if role == "response"],
                     "segments": segments, "trained_tokens": len(trained),
                     "eos_positions": [p for p, t in enumerate(ids) if eos is not None and t == eos and attention[p]],
                     "cut": len(ids) >= cfg.sft.max_length and not cfg.sft.packing})
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def reward_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    """Pairs as the reward trainer gets them: prompt + reply, each a whole text cut from the left to
    preference.max_length. The start both share is the prompt (and any reply words they share)."""
    tok = prepared.tokenizer
    rows = []
    for i, item in enumerate(_first_items(prepared.train, n)):
        chosen, rejected = _ints(item["chosen_ids"]), _ints(item["rejected_ids"])
        shared = _common_prefix(chosen, rejected)
        rows.append({"split": "train", "index": i, "chosen_ids": chosen, "rejected_ids": rejected, "shared": shared,
                     "shared_tokens": token_strings(tok, chosen[:shared]),
                     "chosen_tokens": token_strings(tok, chosen[shared:]),
                     "rejected_tokens": token_strings(tok, rejected[shared:]),
                     "chosen_cut": len(chosen) >= cfg.preference.max_length,
                     "rejected_cut": len(rejected) >= cfg.preference.max_length})
    return rows


def dpo_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    """prompt_ids / chosen_ids / rejected_ids as DPO reads them; a reply not ending in EOS was cut."""
    tok = prepared.tokenizer
    eos = tok.eos_token_id
    rows = []
    for i, item in enumerate(_first_items(prepared.train, n)):
        prompt, chosen, rejected = (_ints(item[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        rows.append({"split": "train", "index": i, "prompt_ids": prompt, "chosen_ids": chosen,
                     "rejected_ids": rejected, "prompt_tokens": token_strings(tok, prompt),
                     "chosen_tokens": token_strings(tok, chosen), "rejected_tokens": token_strings(tok, rejected),
                     "prompt_at_limit": len(prompt) >= cfg.preference.max_prompt_length,
                     "chosen_cut": not chosen or chosen[-1] != eos,
                     "rejected_cut": not rejected or rejected[-1] != eos})
    return rows


def rl_rows(cfg: RecipeConfig, prepared: Prepared, n: int) -> list[dict]:
    """Prompts the policy completes during training (TRL tokenizes them with the policy's tokenizer,
    without special tokens, as shown)."""
    tok = prepared.tokenizer
    rows = []
    for i, item in enumerate(_first_items(prepared.train, n)):
        prompt = item["prompt"]
        ids = _ints(tok(prompt, add_special_tokens=False)["input_ids"])
        rows.append({"split": "train", "index": i, "prompt": prompt, "prompt_ids": ids,
                     "prompt_tokens": token_strings(tok, ids)})
    return rows


# --------------------------------------------------------------------------------------------------
# Statistics


def _share(part: int, whole: int) -> str:
    return f"{part:,} of {whole:,} ({part / whole:.1%})" if whole else f"{part:,}"


def _distribution(counts: dict | None) -> str:
    if not counts:
        return "-"
    total = sum(counts.values())
    return ", ".join(f"{name} {c:,} ({c / total:.0%})" for name, c in counts.items())


def _corpus_chars(corpus) -> int:
    return sum(len(t) for t in corpus.texts)


def _recount_train(cfg: RecipeConfig):
    """The training corpus read again as `load_splits` reads it; None when it is too large to recount."""
    from lmtune.tasks.common import load_splits

    with quiet():
        train, _ = load_splits(cfg)
    return train if _corpus_chars(train) <= RECOUNT_MAX_CHARS else None


def clm_stats(cfg: RecipeConfig, prepared: Prepared) -> dict:
    info = prepared.info
    stats: dict[str, Any] = {}
    if info.get("streaming"):
        stats["training data"] = f"a stream ({info.get('source', '')}); blocks are made while training, " \
                                 "so the first ones are shown and none are counted"
        stats["shuffle buffer (blocks)"] = info.get("shuffle_buffer")
    else:
        stats["training documents"] = info["train_documents"]
        stats["validation documents"] = info["validation_documents"]
        stats["packing"] = cfg.data.packing
        recount = info.get("tokens_dropped")
        if recount is None:
            from lmtune.data.packing import prepare_blocks

            train = _recount_train(cfg)
            if train is not None:
                blocks, counted = prepare_blocks(train.texts, train.fingerprint, prepared.tokenizer,
                                                 cfg.data.block_size, cfg.data.packing, use_cache=False)
                stats["training tokens"] = counted["tokens"]
                stats["training tokens kept (in blocks)"] = int(blocks.size)
                stats["training tokens dropped (short tails)"] = counted["tokens_dropped"]
                if len(blocks) != info["train_blocks"]:
                    stats["training blocks made"] = int(len(blocks))
            else:
                stats["training tokens dropped"] = f"not counted (over {RECOUNT_MAX_CHARS // 1_000_000} MB of " \
                                                   "text; `lmtune train` logs it)"
        else:
            stats["training tokens dropped (short tails)"] = recount
        stats["training blocks"] = info["train_blocks"]
        if cfg.data.max_train_blocks:
            stats["training blocks"] = f"{info['train_blocks']:,} (a seeded subset: data.max_train_blocks " \
                                       f"{cfg.data.max_train_blocks})"
    stats["validation blocks"] = info["validation_blocks"]
    stats["block size"] = info["block_size"]
    return stats


def mlm_stats(cfg: RecipeConfig, prepared: Prepared, rows: list[dict]) -> dict:
    from lmtune.tasks import mlm

    info = prepared.info
    tok = prepared.tokenizer
    stats: dict[str, Any] = {"training documents": info["train_documents"],
                             "validation documents": info["validation_documents"]}
    train = _recount_train(cfg)
    if train is not None:
        stream = mlm.tokenize_with_words(tok, train.texts)
        chunks = mlm.chunk_stream(stream, cfg.data.block_size, cfg.mlm.last_chunk, tok.pad_token_id)
        total = len(stream["input_ids"])
        kept = int(chunks["attention_mask"].sum())
        stats["training tokens"] = total
        stats["training tokens kept (in chunks)"] = kept
        stats["training tokens dropped (short last chunk)"] = total - kept
        padding = int(chunks["attention_mask"].size) - kept
        if padding:
            stats["padding tokens (last chunk, mlm.last_chunk: pad)"] = padding
        if len(chunks["input_ids"]) != info["train_chunks"]:
            stats["training chunks made"] = int(len(chunks["input_ids"]))
    stats["training chunks"] = info["train_chunks"]
    if cfg.data.max_train_blocks:
        stats["training chunks"] = f"{info['train_chunks']:,} (a seeded subset: data.max_train_blocks " \
                                   f"{cfg.data.max_train_blocks})"
    stats["validation chunks"] = info["validation_chunks"]
    stats["chunk size"] = info["chunk_size"]
    m = cfg.mlm
    stats["masking"] = (f"{m.mlm_probability:.0%} of tokens; " + (
        "whole words, every token of a chosen word becomes the mask" if m.whole_word_mask else
        f"of those {m.mask_replace_prob:.0%} [MASK], {m.random_replace_prob:.0%} random, "
        f"{max(0.0, 1 - m.mask_replace_prob - m.random_replace_prob):.0%} kept"))
    shown = Counter(k for r in rows for k in r["kinds"] if k is not None)
    attended = sum(sum(r["attention_mask"]) for r in rows)
    stats["masked in the shown batch"] = _mask_summary(shown, attended)
    val = prepared.validation
    val_kinds = Counter()
    for ids, labels in zip(val["input_ids"].tolist(), val["labels"].tolist()):
        val_kinds.update(k for k in _mask_kinds(ids, labels, tok.mask_token_id) if k is not None)
    stats["validation masks (fixed, mlm.eval_mask_seed)"] = _mask_summary(val_kinds, int(val["attention_mask"].sum()))
    return stats


def _mask_summary(kinds: Counter, tokens: int) -> str:
    chosen = sum(kinds.values())
    return (f"{_share(chosen, tokens)} tokens: {kinds.get('mask', 0):,} [MASK], {kinds.get('random', 0):,} random, "
            f"{kinds.get('kept', 0):,} kept")


def qa_stats(cfg: RecipeConfig, prepared: Prepared) -> dict:
    info = prepared.info
    examples, windows = info["train_examples"], info["train_windows"]
    return {
        "training examples (questions)": examples,
        "training windows": windows,
        "windows per example": f"{windows / examples:.2f}" if examples else "-",
        "windows without the answer (CLS)": _share(info["train_windows_without_answer"], windows),
        "validation examples": info["validation_examples"],
        "validation windows": info["validation_windows"],
        "validation articles": info["validation_articles"],
        "window": f"qa.max_length {cfg.qa.max_length} tokens (question + context + special), consecutive windows "
                  f"share qa.stride {cfg.qa.stride} tokens; only the context is truncated",
    }


def classify_stats(cfg: RecipeConfig, prepared: Prepared) -> dict:
    info = prepared.info
    max_length = info["max_length"]
    val_truncated = sum(len(f["input_ids"]) >= max_length for f in prepared.validation.features)
    return {
        "labels": ", ".join(info["labels"]) + f" ({info['problem_type']})",
        "training examples": info["train_examples"],
        "validation examples": info["validation_examples"],
        "training label distribution": _distribution(info.get("train_label_counts")),
        "validation label distribution": _distribution(info.get("validation_label_counts")),
        "max length": f"{max_length} tokens, truncated from the {info['truncation_side']}",
        "training examples truncated": _share(info["train_truncated"], info["train_examples"]),
        "validation examples truncated": _share(val_truncated, info["validation_examples"]),
    }


def sft_stats(cfg: RecipeConfig, prepared: Prepared) -> dict:
    info = prepared.info
    lengths = [len(f["input_ids"]) for f in prepared.train.features]
    trained = sum(lab != IGNORE for f in prepared.train.features for lab in f["labels"])
    attended = sum(sum(f.get("attention_mask", [1] * len(f["input_ids"]))) for f in prepared.train.features)
    return {
        "format": info["format"],
        "training examples": info["train_examples"],
        "training sequences": info["train_sequences"] if not info["packing"] else
        f"{info['train_sequences']:,} (examples packed into sft.max_length {cfg.sft.max_length})",
        "validation examples": info["validation_examples"],
        "training examples cut to sft.max_length": _share(info["train_cut"], info["train_examples"]),
        "loss on": "the response and EOS only (prompt labels -100)" if info["completion_only_loss"] else
        "every token (sft.completion_only_loss: false)",
        "training tokens trained on": _share(trained, attended),
        "sequence length": f"mean {np.mean(lengths):.1f}, max {max(lengths)}" if lengths else "-",
    }


def preference_stats(cfg: RecipeConfig, prepared: Prepared) -> dict:
    info = prepared.info
    p = cfg.preference
    if cfg.task == "rl":
        prompts = list(prepared.train["prompt"])
        lengths = [len(ids) for ids in prepared.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        return {"training prompts": info["train_prompts"], "validation prompts": info["validation_prompts"],
                "algorithm": info["algorithm"], "reward model": info["reward_model"],
                "completions per prompt": cfg.rl.num_generations,
                "completion length (max tokens)": cfg.rl.max_completion_length,
                "prompts at preference.max_prompt_length (kept their end)":
                    _share(sum(n >= p.max_prompt_length for n in lengths), len(lengths))}
    stats: dict[str, Any] = {"training pairs": info["train_pairs"], "validation pairs": info["validation_pairs"]}
    data = prepared.train
    if cfg.task == "reward":
        chosen = [len(x) for x in data["chosen_ids"]]
        rejected = [len(x) for x in data["rejected_ids"]]
        stats["max length (prompt + reply)"] = f"{p.max_length} tokens; longer texts lose their start"
        stats["chosen texts cut"] = _share(sum(c >= p.max_length for c in chosen), len(chosen))
        stats["rejected texts cut"] = _share(sum(r >= p.max_length for r in rejected), len(rejected))
    else:
        eos = prepared.tokenizer.eos_token_id
        prompts = list(data["prompt_ids"])
        stats["max length"] = f"prompt {p.max_prompt_length} tokens (keeps its end), prompt + reply {p.max_length}"
        stats["prompts at the prompt limit"] = _share(sum(len(x) >= p.max_prompt_length for x in prompts),
                                                      len(prompts))
        for key in ("chosen", "rejected"):
            replies = list(data[f"{key}_ids"])
            stats[f"{key} replies cut (no EOS)"] = _share(sum(not r or r[-1] != eos for r in replies), len(replies))
    return stats


def preview_stats(cfg: RecipeConfig, prepared: Prepared, rows: list[dict] | None = None) -> dict:
    if cfg.task == "clm":
        return clm_stats(cfg, prepared)
    if cfg.task == "mlm":
        return mlm_stats(cfg, prepared, rows if rows is not None else mlm_rows(cfg, prepared, 5))
    if cfg.task == "qa":
        return qa_stats(cfg, prepared)
    if cfg.task == "classify":
        return classify_stats(cfg, prepared)
    if cfg.task == "sft":
        return sft_stats(cfg, prepared)
    return preference_stats(cfg, prepared)


# --------------------------------------------------------------------------------------------------
# Text


class Paint:
    """ANSI emphasis on a terminal; plain text otherwise (the markers carry the meaning)."""

    CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35",
             "cyan": "36"}

    def __init__(self, color: bool):
        self.color = color

    def __call__(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        return f"\033[{';'.join(self.CODES[s] for s in styles)}m{text}\033[0m"


def _cut(text: str, limit: int = TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit:,} more characters)"


def _wrap(text: str, width: int, indent: str) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [indent]


def _wrap_tokens(pieces: list[tuple[str, tuple[str, ...]]], width: int, indent: str, paint: Paint) -> list[str]:
    """Tokens (plain text, styles) joined by spaces and wrapped to width; styles applied after wrapping."""
    lines, line, used = [], [], len(indent)
    for text, styles in pieces:
        if line and used + 1 + len(text) > width:
            lines.append(indent + " ".join(line))
            line, used = [], len(indent)
        line.append(paint(text, *styles))
        used += len(text) + (1 if len(line) > 1 else 0)
    if line:
        lines.append(indent + " ".join(line))
    return lines


def _grid(cells: list[tuple[str, tuple[str, ...]]], width: int, indent: str, paint: Paint) -> list[str]:
    """Equal-width cells, as many to a line as fit, read left to right then down."""
    if not cells:
        return []
    cell = min(max(len(c) for c, _ in cells), width - len(indent))
    per_line = max(1, (width - len(indent) + 2) // (cell + 2))
    lines = []
    for start in range(0, len(cells), per_line):
        chunk = cells[start : start + per_line]
        lines.append((indent + "  ".join(paint(text.ljust(cell), *styles) for text, styles in chunk)).rstrip())
    return lines


def render_text(cfg: RecipeConfig, prepared: Prepared, rows: list[dict], stats: dict, notes: list[str],
                color: bool = False, width: int = 100) -> str:
    paint = Paint(color)
    out = [paint(f"lmtune preview: {cfg.name} (task {cfg.task})", "bold"), "", paint("statistics", "bold")]
    key_width = max((len(k) for k in stats), default=0)
    for key, value in stats.items():
        value = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        lines = textwrap.wrap(value, width=max(20, width - key_width - 4)) or [""]
        out.append(f"  {key.ljust(key_width)}  {lines[0]}")
        out += [" " * (key_width + 4) + line for line in lines[1:]]
    for note in notes:
        out.append(f"  note (from prepare): {note}")
    out.append("")
    if rows:
        out.append(paint(f"the first {len(rows)} training examples, as the Trainer gets them", "bold"))
        out += _wrap(LEGENDS[cfg.task], width, "  ")
        out.append("")
    renderer = {"clm": _render_clm, "mlm": _render_mlm, "qa": _render_qa, "classify": _render_classify,
                "sft": _render_sft, "reward": _render_reward, "dpo": _render_dpo, "rl": _render_rl}[cfg.task]
    if not rows:
        out.append("no training examples to show")
    for row in rows:
        out += renderer(row, cfg, prepared, paint, width)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


LEGENDS = {
    "clm": "position token [id] -> target: the token the model learns to predict at that position. The labels "
           "equal the inputs and the model shifts them by one, so the target is the next token; the last position "
           "has none (end); 'masked' marks a label of -100.",
    "mlm": "*M: the input is the mask token, *R: a random token, *K: the original token kept; <- the label (the "
           "original token). Unmarked positions have label -100 (not predicted). Masked by the training collator "
           "as one batch of these chunks (seeded by training.seed and the chunk indices; training batches are "
           "masked afresh each epoch).",
    "qa": "The question's tokens, | where it ends, then the window's slice of the context; [[ ]] the labelled "
          "answer span (start_positions..end_positions). A window that does not hold the whole answer is "
          "labelled 0..0, the CLS token.",
    "classify": "The label's id and name, the token count, and the tokens decoded (special tokens kept).",
    "sft": "Each sequence in segments: the prompt (labels -100, not trained), then after || the response and EOS "
           "(trained), then any padding.",
    "reward": "Each side is prompt + reply (+ EOS) as one text, cut from the left to preference.max_length; shown: "
              "the start both share (the prompt), then each side's rest.",
    "dpo": "prompt_ids, chosen_ids and rejected_ids as DPO reads them; a reply that does not end with EOS was cut "
           "to fit preference.max_length.",
    "rl": "The prompts the policy completes while training, tokenized with its tokenizer as TRL does (no special "
          "tokens).",
}


def _render_clm(row, cfg, prepared, paint, width) -> list[str]:
    out = [paint(f"training block {row['index']} ({len(row['input_ids'])} tokens)", "bold")]
    out += _wrap("text: " + _cut(row["text"]), width, "  ")
    cells = []
    for p, (token, tid, target) in enumerate(zip(row["tokens"], row["input_ids"], row["target_tokens"])):
        if row["targets"][p] is None:
            cells.append((f"{p:>4} {token} [{tid}] -> (end)", ("dim",)))
        elif row["targets"][p] == IGNORE:
            cells.append((f"{p:>4} {token} [{tid}] -> masked (-100)", ("dim",)))
        else:
            cells.append((f"{p:>4} {token} [{tid}] -> {target}", ()))
    return out + _grid(cells, width, "  ", paint)


MASK_MARK = {"mask": ("M", ("bold", "red")), "random": ("R", ("bold", "magenta")), "kept": ("K", ("bold", "yellow"))}


def _render_mlm(row, cfg, prepared, paint, width) -> list[str]:
    kinds = Counter(k for k in row["kinds"] if k is not None)
    out = [paint(f"training chunk {row['index']} ({sum(row['attention_mask'])} tokens, "
                 f"{len(row['masked_positions'])} to predict: {kinds.get('mask', 0)} [MASK], "
                 f"{kinds.get('random', 0)} random, {kinds.get('kept', 0)} kept)", "bold")]
    out += _wrap("text: " + _cut(row["text"]), width, "  ")
    cells = []
    for p, (token, kind, original, att) in enumerate(zip(row["tokens"], row["kinds"], row["original_tokens"],
                                                         row["attention_mask"])):
        if not att:
            continue
        if kind is None:
            cells.append((f"{p:>4}    {token}", ()))
        else:
            mark, styles = MASK_MARK[kind]
            cells.append((f"{p:>4} *{mark} {token} <- {original}", styles))
    return out + _grid(cells, width, "  ", paint)


def _render_qa(row, cfg, prepared, paint, width) -> list[str]:
    head = f"training window {row['index']} ({len(row['input_ids'])} tokens"
    if row["example_id"] is not None:
        k, m = row["window_of_example"]
        head += f"; example {row['example_id']!r}, window {k} of {m}"
    out = [paint(head + ")", "bold")]
    start, end, roles = row["start"], row["end"], row["roles"]
    pieces = []
    for p, token in enumerate(row["tokens"]):
        styles: tuple[str, ...] = ()
        if roles is not None:
            styles = {"question": ("cyan",), "special": ("dim",), "context": ()}[roles[p]]
        if row["has_answer"] and p == start:
            pieces.append(("[[", ("bold", "green")))
        pieces.append((token, ("bold", "green") if row["has_answer"] and start <= p <= end else styles))
        if row["has_answer"] and p == end:
            pieces.append(("]]", ("bold", "green")))
        if roles is not None and p + 1 < len(roles) and roles[p] == "question" and roles[p + 1] != "question":
            pieces.append(("|", ("dim",)))  # where the question ends
    out += _wrap_tokens(pieces, width, "  ", paint)
    if not row["has_answer"]:
        line = "  no answer in this window (CLS): start_positions = end_positions = 0"
        if row["gold"] is not None:
            line += f"; the example's answer {row['gold']!r} lies outside it" if row["gold"] else \
                "; the example has no answer"
        out += [paint(part, "yellow") for part in _wrap(line.strip(), width, "  ")]
        return out
    line = f"  answer span: tokens {start}..{end} decode to {row['span_decoded']!r}"
    if row["span_text"] is not None:
        same = row["span_text"] == row["gold"]
        line += f"; context characters {row['span_text']!r}, gold answer {row['gold']!r} " + (
            "(match)" if same else "(DIFFER)")
        out += [paint(part, "green" if same else "red") for part in _wrap(line.strip(), width, "  ")]
    else:
        out += _wrap(line.strip(), width, "  ")
    return out


def _render_classify(row, cfg, prepared, paint, width) -> list[str]:
    label = row["label"]
    shown = f"{float(label):g}" if isinstance(label, float) else str(label)
    head = (f"training example {row['index']}: label {shown} = {row['label_name']!r}, {row['num_tokens']} tokens"
            + (", truncated at max length" if row["truncated"] else ""))
    return [paint(head, "bold")] + _wrap(_cut(row["text"]), width, "  ")


def _render_sft(row, cfg, prepared, paint, width) -> list[str]:
    attended = sum(row["attention_mask"])
    head = f"training sequence {row['index']} ({attended} tokens, {row['trained_tokens']} trained on"
    if row["boundary"] is not None and cfg.sft.completion_only_loss:
        head += f"; prompt | response boundary at token {row['boundary']}"
    if row["cut"]:
        head += "; cut to sft.max_length"
    out = [paint(head + ")", "bold")]
    if not cfg.sft.completion_only_loss:
        out.append("  loss on every token (sft.completion_only_loss: false), so prompt and response look alike here")
    eos = set(row["eos_positions"])
    for role, s, e in row["segments"]:
        if role == "pad":
            out.append(paint(f"  pad       {s}..{e - 1}  ({e - s} padding tokens, labels -100)", "dim"))
            continue
        tag = "prompt" if role == "prompt" else "|| response" if s > 0 else "response"
        label = "labels -100" if role == "prompt" else "trained"
        out.append(paint(f"  {tag:<12}{s}..{e - 1} ({label})", "dim" if role == "prompt" else "bold"))
        pieces = [(t + (" [EOS]" if p in eos else ""), ("dim",) if role == "prompt" else ("green",) if p in eos
                   else ()) for p, t in zip(range(s, e), row["tokens"][s:e])]
        out += _wrap_tokens(pieces, width, "    ", paint)
    return out


def _render_reward(row, cfg, prepared, paint, width) -> list[str]:
    out = [paint(f"training pair {row['index']} (chosen {len(row['chosen_ids'])} tokens"
                 + (", cut from the left" if row["chosen_cut"] else "")
                 + f"; rejected {len(row['rejected_ids'])} tokens"
                 + (", cut from the left" if row["rejected_cut"] else "") + ")", "bold")]
    out.append(paint(f"  shared start (the prompt), {row['shared']} tokens:", "dim"))
    out += _wrap_tokens([(t, ("dim",)) for t in row["shared_tokens"]], width, "    ", paint)
    for key, styles in (("chosen", ("green",)), ("rejected", ("red",))):
        out.append(f"  {key} reply, {len(row[f'{key}_tokens'])} tokens (the reward is read at the last):")
        out += _wrap_tokens([(t, styles) for t in row[f"{key}_tokens"]], width, "    ", paint)
    return out


def _render_dpo(row, cfg, prepared, paint, width) -> list[str]:
    out = [paint(f"training pair {row['index']}", "bold")]
    parts = (("prompt", "prompt_tokens", ("dim",), " (at preference.max_prompt_length: kept its end)"
              if row["prompt_at_limit"] else ""),
             ("chosen", "chosen_tokens", ("green",), " (cut: no EOS)" if row["chosen_cut"] else ""),
             ("rejected", "rejected_tokens", ("red",), " (cut: no EOS)" if row["rejected_cut"] else ""))
    for name, key, styles, flag in parts:
        out.append(f"  {name}, {len(row[key])} tokens{flag}:")
        out += _wrap_tokens([(t, styles) for t in row[key]], width, "    ", paint)
    return out


def _render_rl(row, cfg, prepared, paint, width) -> list[str]:
    out = [paint(f"training prompt {row['index']} ({len(row['prompt_ids'])} tokens; the policy samples "
                 f"{cfg.rl.num_generations} completions of up to {cfg.rl.max_completion_length} tokens)", "bold")]
    return out + _wrap_tokens([(t, ()) for t in row["prompt_tokens"]], width, "    ", paint)
