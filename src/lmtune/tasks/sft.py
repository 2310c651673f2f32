"""Instruction tuning (supervised fine-tuning) of a causal LM, the article's second way to fine-tune.

    records -> (prompt, response) pairs: a template with named fields as written in the recipe
               (the article's "Please answer the following question. Q: {question} A: {answer}"),
               Alpaca's instruction/input/output templates, or chat messages through the tokenizer's
               own chat template, or whole dialogues split at the last reply marker (HH-RLHF)
    -> tokens: prompt + response + EOS (so the tuned model learns to stop); labels -100 on the prompt,
       so the loss is on the response only (switchable); optionally packed into max_length sequences
    -> AutoModelForCausalLM through the Trainer
    -> response loss and perplexity on held-out examples before and after; the recipe's sample
       prompts answered before and after (greedy, stopping at EOS).

The tokenization is ours rather than TRL's SFTTrainer's: evaluation before training, `lmtune predict`
and the tests need the very same prompt rendering and label mask that training used, and the
pipeline's Trainer (keytoken loss, logging, resume) serves every task.
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtune import distributed
from lmtune.config import RecipeConfig, SFTConfig
from lmtune.data.sources import load_records, required_field
from lmtune.errors import InputError
from lmtune.progress import progress
from lmtune.training.losses import eval_rows
from lmtune.metrics import perplexity
from lmtune.modeling import build_or_load, check_block_size, check_pretrained_head
from lmtune.tasks.common import FeatureDataset, Prepared, get_tokenizer, load_model_for, seeded_subset

log = logging.getLogger("lmtune")

IGNORE = -100
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# --------------------------------------------------------------------------------------------------
# Records -> (prompt, response)


@dataclass
class Pair:
    """One example: what the model reads (`prompt`) and learns to write (`response`). A conversation
    with several assistant turns learnt keeps them all in `segments`, (text, trained) pieces in order;
    `eos` says whether EOS is added after the response (not where the chat template already ends the
    turn with its own end token)."""

    prompt: str
    response: str
    segments: list[tuple[str, bool]] | None = None
    eos: bool = True

    def pieces(self) -> list[tuple[str, bool]]:
        return self.segments if self.segments is not None else [(self.prompt, False), (self.response, True)]


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def split_template(template: str, response_field: str) -> tuple[str, str]:
    """The prompt part (before the response placeholder) and what follows the response."""
    marker = "{" + response_field + "}"
    if template.count(marker) != 1:
        raise InputError(f"sft.template must contain {marker} exactly once (the response the model learns to write); "
                         f"got {template!r}.")
    prompt, tail = template.split(marker)
    if template_fields(tail):
        raise InputError(f"sft.template: {marker} must be the last field; move {', '.join(template_fields(tail))} "
                         "before it.")
    return prompt, tail


def _value(record: dict, name: str, location: str, where: str, sft: SFTConfig | None = None) -> str:
    value = required_field(record, name, location, where, "the template uses it: fix sft.template or the data")
    if value is None:
        raise InputError(f"{where}: {location} has null in field '{name}', which the template needs as text; fill "
                         "it in or drop the record.")
    if isinstance(value, (dict, list)):
        raise InputError(f"{where}: {location} has a {type(value).__name__} in field '{name}', which the template "
                         "needs as text; point the template at a text field.")
    words = (sft.field_values.get(name) if sft is not None else None) or {}
    if words:
        named = {str(key): word for key, word in words.items()}
        if str(value) not in named:
            raise InputError(f"{where}: {location} has {str(value)[:40]!r} in field '{name}', which "
                             f"sft.field_values.{name} does not name ({', '.join(named)}); add it there.")
        return named[str(value)]
    return str(value)


def shortened(text: str, limit: int | None) -> str:
    """`text` cut to `limit` characters at a word boundary, marked with '…' (sft.max_field_chars)."""
    if limit is None or len(text) <= limit:
        return text
    cut = text[:limit]
    return (cut.rsplit(None, 1)[0] if " " in cut.strip() else cut).rstrip() + "…"


def _prompt_values(record: dict, template: str, sft: SFTConfig, location: str, where: str) -> dict[str, str]:
    return {name: shortened(_value(record, name, location, where, sft), sft.max_field_chars)
            for name in template_fields(template)}


def render_template(record: dict, sft: SFTConfig, location: str, where: str, with_response: bool = True) -> Pair:
    prompt_part, tail = split_template(sft.template, sft.response_field)
    values = _prompt_values(record, prompt_part, sft, location, where)
    prompt = prompt_part.format(**values)
    response = (_value(record, sft.response_field, location, where, sft) + tail) if with_response else ""
    return Pair(prompt, response)


def render_alpaca(record: dict, location: str, where: str, with_response: bool = True) -> Pair:
    instruction = _value(record, "instruction", location, where)
    extra = str(record.get("input") or "")
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    response = _value(record, "output", location, where) if with_response else ""
    return Pair(template.format(instruction=instruction, input=extra), response)


def _chat_messages(record: dict, sft: SFTConfig, location: str, where: str, with_response: bool) -> list[dict]:
    """The record's conversation: its messages, or one user turn from sft.user_template (and the reply
    from sft.response_field); sft.system_prompt first when there is no system message."""
    if sft.messages_field in record or sft.user_template is None:
        messages = record.get(sft.messages_field)
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: {location} needs '{sft.messages_field}', a list of {{role, content}} "
                             "messages (or set sft.user_template to build one from the record's fields).")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InputError(f"{where}: {location}, {sft.messages_field}[{i}] is not a {{role, content}} message "
                                 "with text in both (null or another type found).")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        values = _prompt_values(record, sft.user_template, sft, location, where)
        messages = [{"role": "user", "content": sft.user_template.format(**values)}]
        if with_response:
            messages.append({"role": "assistant",
                             "content": _value(record, sft.response_field, location, where, sft)})
    if sft.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": sft.system_prompt})
    return messages


def render_chat(record: dict, sft: SFTConfig, tokenizer, location: str, where: str,
                with_response: bool = True) -> Pair:
    """The conversation through the tokenizer's chat template. Learnt: the assistant turns (every one,
    or the last with sft.assistant_turns: last), each up to and including the template's end-of-turn
    token, which is then the model's stop signal (no EOS added after it); everything else -- system,
    user turns, the template's role headers -- is read, not learnt. Without the response (samples,
    predict) the prompt is the conversation with the template's generation prompt."""
    from lmtune.chat import end_of_turn_token, render_turn, require_chat_template

    require_chat_template(tokenizer, "sft.format chat")
    messages = _chat_messages(record, sft, location, where, with_response)
    if not with_response:
        return Pair(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), "")
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message in {location} must be the assistant's reply to learn.")
    end = end_of_turn_token(tokenizer)
    learnt = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if sft.assistant_turns == "last":
        learnt = learnt[-1:]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i in learnt:
        before, reply = render_turn(tokenizer, messages[:i], messages[i]["content"], end)
        if not before.startswith(done):
            raise InputError("the tokenizer's chat template renders earlier turns differently once a later turn "
                             "follows, so the replies cannot be told from the rest; set sft.assistant_turns: last "
                             "(or use sft.format template).")
        segments += [(before[len(done):], False), (reply, True)]
        done = before + reply
    prompt = "".join(text for text, _ in segments[:-1])
    return Pair(prompt, segments[-1][0], segments if len(learnt) > 1 else None, eos=end is None)


def render_transcript(record: dict, sft: SFTConfig, location: str, where: str, with_response: bool = True) -> Pair:
    """A whole dialogue in one text (HH-RLHF's "\n\nHuman: ...\n\nAssistant: ..."): the reply after the
    last response marker is the response, everything up to and including the marker the prompt. Without
    the response (samples, predict) the text is the dialogue so far; the marker is added when missing."""
    text = str(required_field(record, sft.transcript_field, location, where, "sft.format transcript reads the "
                              "dialogue from it: fix sft.transcript_field or the data"))
    if not with_response:
        return Pair(text if text.endswith(sft.response_marker) else text + sft.response_marker, "")
    cut = text.rfind(sft.response_marker)
    if cut < 0:
        raise InputError(f"{where}: {location} has no {sft.response_marker!r} before a reply; set "
                         "sft.response_marker to the text that opens the replies.")
    cut += len(sft.response_marker)
    return Pair(text[:cut], text[cut:])


def to_pair(record: dict, cfg: RecipeConfig, tokenizer, location: str, where: str, with_response: bool = True) -> Pair:
    if cfg.sft.format == "transcript":
        return render_transcript(record, cfg.sft, location, where, with_response)
    if cfg.sft.format == "alpaca":
        return render_alpaca(record, location, where, with_response)
    if cfg.sft.format == "chat":
        return render_chat(record, cfg.sft, tokenizer, location, where, with_response)
    return render_template(record, cfg.sft, location, where, with_response)


# --------------------------------------------------------------------------------------------------
# Tokens and labels


def tokenize_pairs(tokenizer, pairs: list[Pair], max_length: int, completion_only: bool, add_eos: bool,
                   leading: bool = True) -> list[dict]:
    """input_ids = the example's pieces (prompt, response, and for multi-turn chats every turn) (+ EOS),
    cut to max_length; labels = input_ids with the pieces that are read, not learnt, set to -100 when
    the loss is on the responses only. The pieces are tokenized separately so the boundaries are exact
    whatever the tokenizer merges across them. `leading`: the tokenizer's own leading ids (BOS for
    Llama 3 or Gemma) go first unless the text already starts with them (a chat template writing BOS)."""
    from lmtune.tokenizer import leading_special_ids, with_leading_ids

    pieces = [pair.pieces() for pair in pairs]
    flat = [text for example in pieces for text, _ in example]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    prefix = leading_special_ids(tokenizer) if leading else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    features = []
    for pair, example in zip(pairs, pieces):
        ids: list[int] = []
        labels: list[int] = []
        for _, trained in example:
            piece = list(next(encoded))
            ids += piece
            labels += piece if trained or not completion_only else [IGNORE] * len(piece)
        if with_leading_ids(ids, prefix) != ids:
            ids, labels = prefix + ids, [IGNORE] * len(prefix) + labels
        if pair.eos and eos:
            ids, labels = ids + eos, labels + eos
        features.append({"input_ids": ids[:max_length], "attention_mask": [1] * len(ids[:max_length]),
                         "labels": labels[:max_length]})
    return features


def pack_features(features: list[dict], max_length: int, pad_id: int) -> list[dict]:
    """Examples concatenated and cut into max_length sequences, labels kept aligned (the prompt mask
    survives); the last short sequence is padded with labels -100."""
    ids = np.fromiter((t for f in features for t in f["input_ids"]), dtype=np.int64)
    labels = np.fromiter((t for f in features for t in f["labels"]), dtype=np.int64)
    n = -(-len(ids) // max_length)
    padded_ids = np.full(n * max_length, pad_id, dtype=np.int64)
    padded_labels = np.full(n * max_length, IGNORE, dtype=np.int64)
    padded_ids[: len(ids)], padded_labels[: len(labels)] = ids, labels
    mask = np.zeros(n * max_length, dtype=np.int64)
    mask[: len(ids)] = 1
    return [{"input_ids": padded_ids[i : i + max_length].tolist(), "labels": padded_labels[i : i + max_length].tolist(),
             "attention_mask": mask[i : i + max_length].tolist()} for i in range(0, n * max_length, max_length)]


class PadCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the batch's longest."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", IGNORE)):
            out[key] = torch.tensor([list(f[key]) + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
        return out




# --------------------------------------------------------------------------------------------------
# The task's pieces for the pipeline (run.py)


def read_pairs(src, cfg: RecipeConfig, tokenizer, where: str) -> list[Pair]:
    records = load_records(src, where)
    log.info(records.stats.summary(where, "examples"))
    pairs = [to_pair(record, cfg, tokenizer, location, where) for location, record in records.rows]
    empty = sum(not p.response.strip() for p in pairs)
    if empty == len(pairs):
        raise InputError(f"{where}: every response is empty; check sft.response_field / the data.")
    if empty:
        log.warning("%s: dropped %d examples with an empty response", where, empty)
    return [p for p in pairs if p.response.strip()]


def prepare(cfg: RecipeConfig) -> Prepared:
    from lmtune.data.sources import split_train_validation

    check_pretrained_head(cfg.model, "sft")
    s = cfg.sft
    if s.format == "template":
        split_template(s.template, s.response_field)  # a bad template is reported before any data is read
    if cfg.tokenizer.train:
        raise InputError("task sft tunes a pretrained model with its own tokenizer; drop tokenizer.train (a model "
                         "from scratch names one with model.tokenizer).")
    tokenizer = get_tokenizer(cfg, None)
    train = read_pairs(cfg.data.train, cfg, tokenizer, "data.train")
    if cfg.data.validation is not None:
        val = read_pairs(cfg.data.validation, cfg, tokenizer, "data.validation")
    else:
        train, val = split_train_validation(train, cfg.data.validation_fraction, cfg.data.split_seed)
    train = [train[i] for i in seeded_subset(np.arange(len(train)), s.max_train_examples, cfg.training.seed)]
    val = [val[i] for i in seeded_subset(np.arange(len(val)), s.max_validation_examples, cfg.training.seed)]
    # A chat template decides itself whether the conversation starts with BOS.
    leading = s.format != "chat"
    train_features = tokenize_pairs(tokenizer, train, s.max_length, s.completion_only_loss, s.add_eos, leading)
    val_features = tokenize_pairs(tokenizer, val, s.max_length, True, s.add_eos, leading)  # evaluated on responses
    for where, features in (("data.train", train_features), ("data.validation", val_features)):
        if not any(label != IGNORE for f in features for label in f["labels"]):
            raise InputError(f"{where}: sft.max_length {s.max_length} cuts away every response (the prompts fill "
                             "it); raise sft.max_length or shorten the template.")
    cut = sum(len(f["input_ids"]) >= s.max_length for f in train_features)
    if cut:
        log.warning("data.train: %d of %d examples were cut to sft.max_length %d", cut, len(train_features),
                    s.max_length)
    if s.packing:
        train_features = pack_features(train_features, s.max_length, tokenizer.pad_token_id)
    info = {"train_examples": len(train), "validation_examples": len(val), "train_sequences": len(train_features),
            "train_cut": cut, "format": s.format, "completion_only_loss": s.completion_only_loss,
            "packing": s.packing, "example": {"prompt": train[0].prompt, "response": train[0].response}}
    log.info("SFT: %d training and %d validation examples; first prompt: %r", len(train), len(val), train[0].prompt)
    collator = PadCollator(tokenizer.pad_token_id)
    return Prepared(tokenizer, FeatureDataset(train_features), val_features, info,
                    eval_dataset=FeatureDataset(val_features), collator=collator, extra={"validation_pairs": val})


def build_model(cfg: RecipeConfig, tokenizer, prepared: Prepared | None = None):
    model = build_or_load(cfg.model, tokenizer, cfg.sft.max_length, cfg.training.seed, "sft")
    check_block_size(model.config, cfg.sft.max_length, "sft.max_length")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------------
# Evaluation and generation


@torch.no_grad()
def evaluate(model, features: list[dict], pad_id: int, batch_size: int = 16) -> dict:
    """Token-weighted next-token cross-entropy over the response tokens (labels != -100) and its exp."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = PadCollator(pad_id)
    total, count = 0.0, 0
    order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")
    mine = distributed.shard(len(order))  # each process its share of the (length-sorted) examples
    order = order[mine.start : mine.stop]
    batch_size = eval_rows(model, batch_size, max((len(f["input_ids"]) for f in features), default=1))
    for b in progress(range(0, len(order), batch_size), "evaluating", unit="batches"):
        batch = {k: v.to(device) for k, v in collate([features[i] for i in order[b : b + batch_size]]).items()}
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                         ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    total, count = distributed.sum_across([total, count])
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": perplexity(mean), "response_tokens": int(count)}


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[dict]:
    """Greedy completions of rendered prompts; `stopped_at_eos` says whether the model ended its reply
    itself (EOS or the chat template's end-of-turn token)."""
    from lmtune.tasks.clm import generate_ids, stop_token_ids

    stops = set(stop_token_ids(model, tokenizer))
    results = []
    for prompt, ids in zip(prompts, generate_ids(model, tokenizer, prompts, max_new_tokens)):
        stopped = bool(ids) and ids[-1] in stops
        if stopped:
            ids = ids[:-1]
        results.append({"prompt": prompt, "response": tokenizer.decode(ids, skip_special_tokens=True),
                        "stopped_at_eos": stopped})
    return results


def sample_prompts(cfg: RecipeConfig, tokenizer) -> list[str]:
    return [to_pair(record, cfg, tokenizer, f"sft.samples[{i}]", "sft.samples", with_response=False).prompt
            for i, record in enumerate(cfg.sft.samples)]


def final_answer(text: str, pattern: re.Pattern) -> str | None:
    """The first group of the pattern's first match, normalised (case, spaces, thousands commas, a
    closing full stop), or None where the text has none."""
    match = pattern.search(text)
    if match is None or match.group(1) is None:
        return None
    answer = " ".join(match.group(1).split()).lower().rstrip(".")
    return answer.replace(",", "") if re.fullmatch(r"[-+$]?[\d,]*\.?\d+", answer) else answer


def answer_accuracy(model, tokenizer, pairs: list[Pair], sft: SFTConfig) -> dict:
    """Held-out prompts answered greedily; the share whose final answer (sft.answer_pattern) equals the
    reference's. `answers_found`: the share of generations that state an answer at all."""
    pattern = re.compile(sft.answer_pattern, re.IGNORECASE)
    specials = [t for t in tokenizer.all_special_tokens if t]

    def reference(pair: Pair) -> str | None:  # the reply as text, without the template's end token
        text = pair.response
        for token in specials:
            text = text.replace(token, "")
        return final_answer(text, pattern)

    pairs = [p for p in pairs if reference(p) is not None][: sft.answer_examples]
    mine = distributed.shard(len(pairs))
    correct = found = 0
    for batch_start in range(mine.start, mine.stop, 16):
        batch = pairs[batch_start : min(batch_start + 16, mine.stop)]
        for pair, result in zip(batch, answer(model, tokenizer, [p.prompt for p in batch], sft.answer_max_new_tokens)):
            said = final_answer(result["response"], pattern)
            found += said is not None
            correct += said is not None and said == reference(pair)
    correct, found = distributed.sum_across([correct, found])
    n = max(len(pairs), 1)
    return {"answer_accuracy": correct / n, "answers_found": found / n, "answer_examples": len(pairs)}


def evaluate_run(model, prepared: Prepared, cfg: RecipeConfig) -> dict:
    metrics = evaluate(model, prepared.validation, prepared.tokenizer.pad_token_id,
                       cfg.training.eval_batch_size or cfg.training.batch_size)
    if cfg.sft.answer_pattern:
        metrics.update(answer_accuracy(model, prepared.tokenizer, prepared.extra["validation_pairs"], cfg.sft))
    if cfg.sft.samples:
        metrics["samples"] = samples(model, prepared.tokenizer, cfg)
    return metrics


def headline(metrics: dict) -> str:
    text = (f"response perplexity {metrics['perplexity']:.2f} (loss {metrics['loss']:.4f}, "
            f"{metrics['response_tokens']} tokens)")
    if "answer_accuracy" in metrics:
        text += (f", answer accuracy {metrics['answer_accuracy']:.1%} of {metrics['answer_examples']} "
                 f"({metrics['answers_found']:.0%} stated an answer)")
    return text


def samples(model, tokenizer, cfg: RecipeConfig) -> list[dict]:
    prompts = sample_prompts(cfg, tokenizer)
    return answer(model, tokenizer, prompts, cfg.generation.max_new_tokens) if prompts else []


def load_for_inference(model_dir: str | Path):
    return load_model_for("sft", model_dir)
