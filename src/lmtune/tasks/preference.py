"""Learning from preferences: InstructGPT's steps after supervised fine-tuning, three tasks in one file.

    records -> preference pairs (prompt, chosen, rejected): an explicit prompt field rendered with a
               template, or -- HH-RLHF's form -- two whole dialogues whose shared start is the prompt;
               pairs whose chosen equals rejected are counted and dropped
    reward: prompt + reply -> a sequence classifier with one output, trained by TRL's RewardTrainer on
            -log sigmoid(r_chosen - r_rejected); metric: how often r_chosen > r_rejected on held-out pairs
    dpo:    Direct Preference Optimisation (TRL's DPOTrainer) against a frozen copy of the starting
            policy (with LoRA: the base with its adapters switched off); metrics: the policy's own
            log-probability margin between chosen and rejected, and DPO's implicit reward accuracy/margin
    rl:     online policy optimisation against a trained reward model: the policy samples
            `num_generations` completions per prompt, the reward model scores the text, and TRL's RLOO
            (REINFORCE, each completion's baseline the mean reward of the others) or GRPO (advantages
            normalised within the group, PPO's clipped ratio) updates it with a KL penalty towards the
            start. The article names PPO; these keep its idea -- raise the reward, stay near the SFT model --
            without PPO's learned value model, which TRL no longer ships. Metric: mean reward of sampled
            completions on held-out prompts.

Tokenisation is ours and TRL receives token ids (its "already processed" path): evaluation before
training, `lmtune predict` and the RL reward function must encode text exactly as training did, and
a reward model's text is truncated from the left (the replies being compared sit at the end) where
TRL would drop the pair. The reward function re-tokenises decoded text with the reward model's own
tokenizer, so the policy and the reward model may use different tokenizers.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtune import distributed
from lmtune.config import RecipeConfig, load_yaml, validate_recipe
from lmtune.data.sources import load_records, required_field
from lmtune.errors import InputError
from lmtune.progress import progress
from lmtune.training.losses import eval_rows
from lmtune.hub import run_model_folder
from lmtune.modeling import build_or_load, check_block_size, check_pretrained_head
from lmtune.tasks.common import Prepared, get_tokenizer, load_model_for, seeded_subset
from lmtune.tasks.sft import template_fields

log = logging.getLogger("lmtune")

DEFAULT_PROMPT_TEMPLATE = "{prompt}"


# --------------------------------------------------------------------------------------------------
# Records -> preference pairs and prompts


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Two whole texts -> (the start they share, cut back to a word boundary; the rest of each). HH-RLHF
    dialogues differ only in the last reply, so the shared start is the dialogue up to that reply."""
    n = len(os.path.commonprefix([chosen, rejected]))
    if n < min(len(chosen), len(rejected)):
        while n > 0 and not chosen[n - 1].isspace():  # back off a word both replies merely begin alike
            n -= 1
        while n > 0 and chosen[n - 1].isspace():  # the space before a word belongs to it (BPE's " word")
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def render_prompt(record: dict, template: str, location: str, where: str) -> str:
    values = {}
    for name in template_fields(template):
        value = required_field(record, name, location, where, "the prompt template uses it: fix "
                               "preference.prompt_template or the data")
        values[name] = _text(value, name, location, where)
    return template.format(**values)


def _text(value, name: str, location: str, where: str) -> str:
    """A field that must hold text: numbers are written out, null and structures refused."""
    if value is None or isinstance(value, (dict, list)):
        kind = "null" if value is None else f"a {type(value).__name__}"
        raise InputError(f"{where}: {location} has {kind} in field '{name}', where text is needed; fix the record "
                         "(conversational records need preference.format: chat).")
    return str(value)


def has_explicit_prompt(record: dict, template: str) -> bool:
    return all(name in record for name in template_fields(template))


def to_preference_pair(record: dict, cfg: RecipeConfig, location: str, where: str, tokenizer=None) -> PreferencePair:
    if chat_format(cfg):
        return chat_preference_pair(record, cfg, tokenizer, location, where)
    p = cfg.preference
    fix = "set preference.chosen_field / rejected_field to the data's fields"
    chosen = _text(required_field(record, p.chosen_field, location, where, fix), p.chosen_field, location, where)
    rejected = _text(required_field(record, p.rejected_field, location, where, fix), p.rejected_field, location, where)
    template = prompt_template(cfg)
    if has_explicit_prompt(record, template):
        return PreferencePair(render_prompt(record, template, location, where), chosen, rejected)
    if template != DEFAULT_PROMPT_TEMPLATE:
        render_prompt(record, template, location, where)  # names the missing field
    return PreferencePair(*split_shared_prompt(chosen, rejected))


# --------------------------------------------------------------------------------------------------
# The chat format: every prompt through the model's chat template


def chat_format(cfg: RecipeConfig) -> bool:
    return cfg.preference.format == "chat"


def is_conversational(record, cfg: RecipeConfig) -> bool:
    """TRL's conversational form: chosen (and the prompt, when given) are lists of messages."""
    return isinstance(record, dict) and isinstance(record.get(cfg.preference.chosen_field), list)


def _messages(value, name: str, location: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise InputError(f"{where}: {location}, field '{name}' is not a list of {{role, content}} messages with text "
                         "in both.")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _conversation(record: dict, cfg: RecipeConfig, location: str, where: str) -> tuple[list[dict], str, str]:
    """(the messages before the replies, the chosen reply, the rejected reply) of a record in any of the
    chat format's forms: TRL's conversational records (explicit or implicit prompt), a text prompt with
    text replies, or two dialogues written as text."""
    p = cfg.preference
    fix = "set preference.chosen_field / rejected_field to the data's fields"
    chosen = required_field(record, p.chosen_field, location, where, fix)
    rejected = required_field(record, p.rejected_field, location, where, fix)
    template = prompt_template(cfg)
    prompt_value = record.get(p.prompt_field)
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen = _messages(chosen, p.chosen_field, location, where)
        rejected = _messages(rejected, p.rejected_field, location, where)
        if isinstance(prompt_value, list):
            history = _messages(prompt_value, p.prompt_field, location, where)
        elif has_explicit_prompt(record, template):
            history = [{"role": "user", "content": render_prompt(record, template, location, where)}]
        else:  # an implicit prompt: the conversations share everything but the last reply
            history = chosen[:-1]
            if rejected[:-1] != history:
                raise InputError(f"{where}: {location}: chosen and rejected differ before their last reply and there "
                                 "is no prompt field; give the shared prompt in its own field.")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise InputError(f"{where}: {location}: the last message of chosen and of rejected must be the "
                             "assistant's reply.")
        return history, chosen[-1]["content"], rejected[-1]["content"]
    chosen = _text(chosen, p.chosen_field, location, where)
    rejected = _text(rejected, p.rejected_field, location, where)
    if isinstance(prompt_value, list):
        return _messages(prompt_value, p.prompt_field, location, where), chosen.strip(), rejected.strip()
    if has_explicit_prompt(record, template):
        user = render_prompt(record, template, location, where)
        return [{"role": "user", "content": user}], chosen.strip(), rejected.strip()
    from lmtune.chat import transcript_messages

    good = transcript_messages(chosen, p.transcript_roles, f"{where}: {location}")
    bad = transcript_messages(rejected, p.transcript_roles, f"{where}: {location}")
    if good[-1]["role"] != "assistant" or bad[-1]["role"] != "assistant":
        raise InputError(f"{where}: {location}: the dialogues must end with the assistant's reply.")
    return good[:-1], good[-1]["content"], bad[-1]["content"]


def _with_system(history: list[dict], cfg: RecipeConfig) -> list[dict]:
    system = cfg.preference.system_prompt
    if system is None or (history and history[0]["role"] == "system"):
        return history
    return [{"role": "system", "content": system}, *history]


def chat_preference_pair(record: dict, cfg: RecipeConfig, tokenizer, location: str, where: str) -> PreferencePair:
    """The prompt as the chat template renders the conversation so far (with its generation prompt), each
    reply as the template writes an assistant turn, up to its end-of-turn token."""
    from lmtune.chat import end_of_turn_token, render_turn, require_chat_template

    require_chat_template(tokenizer, "preference.format chat")
    history, chosen, rejected = _conversation(record, cfg, location, where)
    history = _with_system(history, cfg)
    end = end_of_turn_token(tokenizer)
    prompt, chosen_text = render_turn(tokenizer, history, chosen, end)
    _, rejected_text = render_turn(tokenizer, history, rejected, end)
    return PreferencePair(prompt, chosen_text, rejected_text)


def chat_prompt(tokenizer, cfg: RecipeConfig, user_text: str) -> str:
    """A user's text as a chat prompt (samples, `lmtune predict` of a chat-format dpo/rl run)."""
    from lmtune.chat import require_chat_template, user_turn_prompt

    require_chat_template(tokenizer, "preference.format chat")
    return user_turn_prompt(tokenizer, user_text, cfg.preference.system_prompt)


def resolve_format(cfg: RecipeConfig, first_record) -> None:
    """format auto -> chat for conversational records or a policy that is a chat-format lmtune run, else
    text; the resolved format goes into the run's config.yaml, which `lmtune predict` reads."""
    if cfg.preference.format != "auto":
        return
    chat = is_conversational(first_record, cfg)
    policy = Path(os.path.expanduser(cfg.model.name_or_path or "")) / "config.yaml"
    if not chat and cfg.task in ("dpo", "rl") and policy.is_file():
        run = validate_recipe(load_yaml(policy.read_text(encoding="utf-8")), origin=f"'{policy}'")
        chat = (run.task == "sft" and run.sft.format == "chat") or (
            run.task in ("dpo", "rl") and run.preference.format == "chat")
    cfg.preference.format = "chat" if chat else "text"
    if chat:
        log.info("preference.format: chat (prompts and replies through the model's chat template)")


def read_pairs(src, cfg: RecipeConfig, where: str, tokenizer=None) -> list[PreferencePair]:
    records = load_records(src, where)
    log.info(records.stats.summary(where, "pairs"))
    resolve_format(cfg, records.rows[0][1] if records.rows else None)
    pairs = [to_preference_pair(record, cfg, location, where, tokenizer) for location, record in records.rows]
    same = sum(pair.chosen == pair.rejected for pair in pairs)
    if same == len(pairs):
        raise InputError(f"{where}: in every pair the chosen reply equals the rejected one, so there is no "
                         "preference to learn; check preference.chosen_field / rejected_field.")
    if same:
        log.warning("%s: dropped %d of %d pairs whose chosen reply equals the rejected one", where, same,
                    len(pairs))
    return [pair for pair in pairs if pair.chosen != pair.rejected]


def read_prompts(src, cfg: RecipeConfig, where: str, tokenizer=None) -> list[str]:
    """Task rl: prompts rendered with the template, or the shared start of a chosen/rejected pair (in the
    chat format, through the chat template)."""
    records = load_records(src, where)
    log.info(records.stats.summary(where, "prompts"))
    resolve_format(cfg, records.rows[0][1] if records.rows else None)
    template = prompt_template(cfg)
    prompts = []
    for location, record in records.rows:
        explicit = has_explicit_prompt(record, template) or cfg.preference.chosen_field not in record
        if not explicit or chat_format(cfg) and cfg.preference.chosen_field in record:
            prompts.append(to_preference_pair(record, cfg, location, where, tokenizer).prompt)
        elif chat_format(cfg):
            prompts.append(chat_prompt(tokenizer, cfg, render_prompt(record, template, location, where)))
        else:
            prompts.append(render_prompt(record, template, location, where))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InputError(f"{where}: no non-empty prompt; check preference.prompt_field / prompt_template.")
    return prompts


def sft_prompt_template(run_dir: Path) -> str | None:
    """The prompt part of the template an lmtune SFT run was trained with (template format), else None."""
    from lmtune.tasks.sft import split_template

    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    cfg = validate_recipe(load_yaml(config.read_text(encoding="utf-8")), origin=f"'{config}'")
    if cfg.task == "sft" and cfg.sft.format == "template":
        return split_template(cfg.sft.template, cfg.sft.response_field)[0]
    if cfg.task in ("dpo", "rl") and cfg.preference.prompt_template:
        return cfg.preference.prompt_template
    return None


def prompt_template(cfg: RecipeConfig) -> str:
    return cfg.preference.prompt_template or DEFAULT_PROMPT_TEMPLATE


def inherit_prompt_template(cfg: RecipeConfig) -> None:
    """A policy that is an lmtune SFT (or dpo/rl) run keeps answering prompts rendered as it learned them;
    the resolved template goes into the run's config.yaml, which `lmtune predict` reads."""
    if cfg.preference.prompt_template is not None or cfg.task not in ("dpo", "rl"):
        return
    inherited = sft_prompt_template(Path(os.path.expanduser(cfg.model.name_or_path)))
    if inherited is not None:
        cfg.preference.prompt_template = inherited
        log.info("prompt template from the policy's run: %r", inherited)


# --------------------------------------------------------------------------------------------------
# Reward model: encoding and scoring


def ends_with_special_token(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[-1] in tokenizer.all_special_ids


def encode_for_reward(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of whole texts, cut from the left to max_length (the reply being judged is at the end).
    Tokenizers that close a text with a special token (BERT's [SEP]) keep it; others get EOS appended,
    as TRL's RewardTrainer does, so a decoder's score is read at a fixed end-of-text token."""
    closed = ends_with_special_token(tokenizer)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        ids = tokenizer(texts, truncation=True, max_length=max_length if closed else max_length - 1)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    eos = tokenizer.eos_token_id
    # A chat reply that the template already closed with EOS (SmolLM2's <|im_end|>) does not get a second.
    return ids if closed else [row if row and row[-1] == eos else row + [eos] for row in ids]


@torch.no_grad()
def score_ids(model, ids: list[list[int]], pad_id: int, batch_size: int = 16) -> np.ndarray:
    """The reward model's scalar for each text (right-padded batches, sorted by length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = np.zeros(len(ids), dtype=np.float64)
    order = np.argsort([len(row) for row in ids], kind="stable")
    for b in progress(range(0, len(order), batch_size), "scoring", unit="batches"):
        rows = [ids[i] for i in order[b : b + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        scores[order[b : b + batch_size]] = logits[:, 0].float().cpu().numpy()
    model.train(was_training)
    return scores


class RewardScorer:
    """Text -> reward, with the reward model's own tokenizer. Also a TRL reward function: called with
    the prompts and decoded completions, it returns one reward per completion."""

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, max_length: int, batch_size: int = 16):
        self.model, self.tokenizer, self.max_length, self.batch_size = model, tokenizer, max_length, batch_size

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        ids = encode_for_reward(self.tokenizer, texts, self.max_length)
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        return self.score([p + c for p, c in zip(prompts, completions)]).tolist()


def load_reward_scorer(path: str, default_max_length: int) -> RewardScorer:
    """A reward run dir (its max_length from config.yaml) or a reward model folder."""
    folder = Path(run_model_folder(path))
    if not (folder / "config.json").is_file():
        raise InputError(f"rl.reward_model '{path}' is not a reward run dir or model folder; train one with task "
                         "reward and give its run dir.")
    model, tokenizer = load_model_for("reward", folder)
    if getattr(model.config, "num_labels", None) != 1:
        raise InputError(f"rl.reward_model '{path}' has {model.config.num_labels} outputs; a reward model has one "
                         "(train it with task reward).")
    max_length = default_max_length
    config = Path(os.path.expanduser(path)) / "config.yaml"
    if config.is_file():
        max_length = (load_yaml(config.read_text()) or {}).get("preference", {}).get("max_length", max_length)
    if torch.cuda.is_available():
        model.to("cuda")
    return RewardScorer(model, tokenizer, max_length)


def evaluate_reward(scorer: RewardScorer, pairs: list[PreferencePair]) -> dict:
    # Sharded here, not in score(): as TRL's reward function each process scores its own completions.
    chosen, rejected = distributed.map_sharded(
        lambda idx: (scorer.score([pairs[i].prompt + pairs[i].chosen for i in idx]),
                     scorer.score([pairs[i].prompt + pairs[i].rejected for i in idx])), len(pairs))
    margin = chosen - rejected
    return {"accuracy": float((margin > 0).mean()), "margin": float(margin.mean()),
            "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()), "pairs": len(pairs)}


# --------------------------------------------------------------------------------------------------
# DPO: prompt / reply token ids and their log-probabilities


def tokenize_preference(tokenizer, pairs: list[PreferencePair], max_length: int, max_prompt_length: int) -> list[dict]:
    """prompt_ids (its last max_prompt_length tokens) and each reply's ids + EOS, cut so prompt + reply
    fits max_length -- the fields TRL's DPO collator reads."""
    from lmtune.chat import end_of_turn_token
    from lmtune.tokenizer import leading_special_ids, with_leading_ids

    eos = tokenizer.eos_token_id
    end = end_of_turn_token(tokenizer)
    closing = {eos, tokenizer.convert_tokens_to_ids(end) if end else eos}
    prefix = leading_special_ids(tokenizer)  # BOS for Llama 3 or Gemma, unless a chat template wrote it

    def closed(reply: list[int]) -> list[int]:  # a reply the chat template ended needs no EOS after it
        return reply if reply and reply[-1] in closing else reply + [eos]

    prompts = tokenizer([p.prompt for p in pairs], add_special_tokens=False)["input_ids"]
    chosen = tokenizer([p.chosen for p in pairs], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([p.rejected for p in pairs], add_special_tokens=False)["input_ids"]
    features = []
    for prompt, good, bad in zip(prompts, chosen, rejected):
        prompt = with_leading_ids(prompt, prefix)
        prompt = prompt[-max_prompt_length:]
        room = max(max_length - len(prompt), 1)
        features.append({"prompt_ids": prompt, "chosen_ids": closed(good)[:room], "rejected_ids": closed(bad)[:room]})
    return features


@torch.no_grad()
def reply_logps(model, features: list[dict], key: str, pad_id: int, batch_size: int = 16) -> np.ndarray:
    """Sum of log p(reply token | prompt, earlier reply tokens) for each feature's `key` reply."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(len(features))
    order = np.argsort([len(f["prompt_ids"]) + len(f[key]) for f in features], kind="stable")
    batch_size = eval_rows(model, batch_size, max((len(f["prompt_ids"]) + len(f[key]) for f in features), default=1))
    for b in progress(range(0, len(order), batch_size), "scoring", unit="batches"):
        idx = order[b : b + batch_size]
        rows = [features[i]["prompt_ids"] + features[i][key] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        reply = torch.zeros_like(ids, dtype=torch.bool)
        for i, j in enumerate(idx):
            n_prompt, n = len(features[j]["prompt_ids"]), len(rows[i])
            ids[i, :n] = torch.tensor(rows[i])
            mask[i, :n] = 1
            reply[i, n_prompt:n] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        out[idx] = (token_logps * reply[:, 1:].to(device)).sum(-1).cpu().numpy()
    model.train(was_training)
    return out


def dpo_metrics(chosen: np.ndarray, rejected: np.ndarray, beta: float, reference: dict | None) -> dict:
    """The policy's own preference (log p(chosen) - log p(rejected)) and, against the reference
    log-probabilities, DPO's implicit rewards beta * (log pi - log pi_ref): zero for the reference itself."""
    margin = chosen - rejected
    metrics = {"logp_accuracy": float((margin > 0).mean()), "logp_margin": float(margin.mean()),
               "logp_chosen": float(chosen.mean()), "logp_rejected": float(rejected.mean()), "pairs": len(chosen)}
    if reference is not None:
        rewards = beta * ((chosen - reference["chosen"]) - (rejected - reference["rejected"]))
        metrics.update(reward_accuracy=float((rewards > 0).mean()), reward_margin=float(rewards.mean()))
    return metrics


# --------------------------------------------------------------------------------------------------
# RL: sampled completions and their mean reward


def cut_prompts(tokenizer, prompts: list[str], max_prompt_length: int) -> list[str]:
    """Prompts longer than max_prompt_length tokens keep their end (where the question to answer is)."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [p if len(row) <= max_prompt_length else tokenizer.decode(row[-max_prompt_length:])
            for p, row in zip(prompts, ids)]


def sample_completions(model, tokenizer, prompts: list[str], cfg: RecipeConfig, batch_size: int = 16) -> list[list[str]]:
    from lmtune.tasks.clm import generate

    r = cfg.rl
    starts = range(0, len(prompts), batch_size)

    def batches(idx) -> list[list[str]]:  # seeded per batch, so several processes sample what one would
        out: list[list[str]] = []
        for b in (starts[i] for i in idx):
            out += generate(model, tokenizer, prompts[b : b + batch_size], r.max_completion_length, do_sample=True,
                            temperature=r.temperature, top_k=0, num_return_sequences=r.eval_generations,
                            seed=cfg.training.seed + b)
        return out

    return distributed.map_sharded(batches, len(starts))


def evaluate_rl(model, tokenizer, prompts: list[str], scorer: RewardScorer, cfg: RecipeConfig) -> dict:
    completions = sample_completions(model, tokenizer, prompts, cfg)
    flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
    rewards = np.asarray(scorer(flat_prompts, [c for cs in completions for c in cs]))
    return {"mean_reward": float(rewards.mean()), "reward_std": float(rewards.std()), "prompts": len(prompts),
            "completions": int(rewards.size),
            "example": {"prompt": prompts[0], "completion": completions[0][0], "reward": float(rewards[0])}}


# --------------------------------------------------------------------------------------------------
# The task's pieces for the pipeline (run.py)


def _split(cfg: RecipeConfig, reader, tokenizer):
    from lmtune.data.sources import split_train_validation

    train = reader(cfg.data.train, cfg, "data.train", tokenizer)
    if cfg.data.validation is not None:
        val = reader(cfg.data.validation, cfg, "data.validation", tokenizer)
    else:
        train, val = split_train_validation(train, cfg.data.validation_fraction, cfg.data.split_seed)
    p = cfg.preference
    train = [train[i] for i in seeded_subset(np.arange(len(train)), p.max_train_examples, cfg.training.seed)]
    val = [val[i] for i in seeded_subset(np.arange(len(val)), p.max_validation_examples, cfg.training.seed)]
    if not train or not val:
        raise InputError("data: no training or no validation examples left; give more data or a validation source.")
    return train, val


def prepare(cfg: RecipeConfig) -> Prepared:
    import datasets

    check_pretrained_head(cfg.model, cfg.task)
    if cfg.tokenizer.train:
        raise InputError(f"task {cfg.task} tunes a pretrained model with its own tokenizer; drop tokenizer.train.")
    inherit_prompt_template(cfg)
    tokenizer = get_tokenizer(cfg, None)
    p = cfg.preference
    if cfg.task == "rl":
        return _prepare_rl(cfg, tokenizer, datasets)
    train, val = _split(cfg, read_pairs, tokenizer)
    info = {"train_pairs": len(train), "validation_pairs": len(val),
            "example": {"prompt": train[0].prompt, "chosen": train[0].chosen, "rejected": train[0].rejected}}
    log.info("%s: %d training and %d validation pairs; first prompt ends %r", cfg.task, len(train), len(val),
             train[0].prompt[-80:])
    if cfg.task == "reward":
        from trl import RewardConfig, RewardTrainer

        chosen = encode_for_reward(tokenizer, [x.prompt + x.chosen for x in train], p.max_length)
        rejected = encode_for_reward(tokenizer, [x.prompt + x.rejected for x in train], p.max_length)
        dataset = datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
        return Prepared(tokenizer, dataset, val, info, trainer_class=RewardTrainer, args_class=RewardConfig,
                        args_extra={"max_length": None, "disable_dropout": True})
    from trl import DPOConfig

    features = tokenize_preference(tokenizer, train, p.max_length, p.max_prompt_length)
    dataset = datasets.Dataset.from_list(features)
    val_features = tokenize_preference(tokenizer, val, p.max_length, p.max_prompt_length)
    return Prepared(tokenizer, dataset, val_features, info, trainer_class=pretokenized_dpo_trainer(), args_class=DPOConfig,
                    args_extra={"beta": p.beta, "max_length": None, "precompute_ref_log_probs": False})


def pretokenized_dpo_trainer():
    """TRL's DPOTrainer, taking our token ids as they are: unlike its RewardTrainer it has no path for
    data that is already tokenized and would look for text columns."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def _prepare_rl(cfg: RecipeConfig, tokenizer, datasets) -> Prepared:
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    r, p = cfg.rl, cfg.preference
    scorer = load_reward_scorer(r.reward_model, p.max_length)
    if type(scorer.tokenizer) is not type(tokenizer) or scorer.tokenizer.get_vocab() != tokenizer.get_vocab():
        log.info("the reward model's tokenizer differs from the policy's: completions are decoded to text and "
                 "re-tokenised for scoring")
    train, val = _split(cfg, read_prompts, tokenizer)
    train = cut_prompts(tokenizer, train, p.max_prompt_length)
    val = cut_prompts(tokenizer, val, p.max_prompt_length)
    info = {"train_prompts": len(train), "validation_prompts": len(val), "algorithm": r.algorithm,
            "reward_model": r.reward_model, "example": {"prompt": train[0]}}
    log.info("rl (%s): %d training and %d validation prompts, %d completions each", r.algorithm, len(train),
             len(val), r.num_generations)
    trainer_class, args_class = (RLOOTrainer, RLOOConfig) if r.algorithm == "rloo" else (GRPOTrainer, GRPOConfig)
    extra = {"num_generations": r.num_generations, "max_completion_length": r.max_completion_length,
             "temperature": r.temperature, "beta": r.beta, "top_k": 0,
             # With dropout the policy's training log-probabilities are noisy copies of those it sampled
             # with, and the importance ratio drifts: RLOO then lowered the reward it should raise.
             "disable_dropout": True}
    return Prepared(tokenizer, datasets.Dataset.from_dict({"prompt": train}), val, info,
                    trainer_kwargs={"reward_funcs": scorer, "reward_processing_classes": None},
                    trainer_class=trainer_class, args_class=args_class, args_extra=extra,
                    extra={"scorer": scorer})


def build_model(cfg: RecipeConfig, tokenizer, prepared: Prepared):
    p = cfg.preference
    if cfg.task == "reward":
        model = build_or_load(cfg.model, tokenizer, p.max_length, cfg.training.seed, "reward", num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder's score is read before the padding
        check_block_size(model.config, p.max_length, "preference.max_length")
        return model
    model = build_or_load(cfg.model, tokenizer, p.max_length, cfg.training.seed, cfg.task)
    check_block_size(model.config, p.max_length, "preference.max_length")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.task == "dpo" and cfg.training.mode == "full":
        # The frozen reference is the starting policy; with LoRA it is the base with adapters off.
        prepared.trainer_kwargs["ref_model"] = copy.deepcopy(model).eval().requires_grad_(False)
    return model


def evaluate_run(model, prepared: Prepared, cfg: RecipeConfig) -> dict:
    batch = cfg.training.eval_batch_size or cfg.training.batch_size
    if cfg.task == "reward":
        metrics = evaluate_reward(RewardScorer(model, prepared.tokenizer, cfg.preference.max_length, batch),
                                  prepared.validation)
    elif cfg.task == "dpo":
        pad = prepared.tokenizer.pad_token_id
        pairs = prepared.validation
        chosen, rejected = distributed.map_sharded(lambda idx: tuple(
            reply_logps(model, [pairs[i] for i in idx], f"{key}_ids", pad, batch) for key in ("chosen", "rejected")),
            len(pairs))
        logps = {"chosen": chosen, "rejected": rejected}
        # The first evaluation is of the starting policy, which is DPO's reference.
        reference = prepared.extra.setdefault("reference", logps)
        metrics = dpo_metrics(logps["chosen"], logps["rejected"], cfg.preference.beta, reference)
    else:
        metrics = evaluate_rl(model, prepared.tokenizer, prepared.validation, prepared.extra["scorer"], cfg)
    if cfg.preference.samples:
        metrics["samples"] = samples(model, prepared.tokenizer, cfg)
    return metrics


def headline(metrics: dict) -> str:
    if "mean_reward" in metrics:
        return (f"mean reward {metrics['mean_reward']:.4f} over {metrics['completions']} sampled completions of "
                f"{metrics['prompts']} prompts")
    if "logp_margin" in metrics:
        return (f"log-prob margin {metrics['logp_margin']:.4f} (chosen preferred in {metrics['logp_accuracy']:.1%}), "
                f"implicit reward margin {metrics['reward_margin']:.4f} (accuracy {metrics['reward_accuracy']:.1%}) "
                f"on {metrics['pairs']} pairs")
    return (f"reward accuracy {metrics['accuracy']:.4f}, margin {metrics['margin']:.4f} on {metrics['pairs']} "
            "held-out pairs")


def samples(model, tokenizer, cfg: RecipeConfig) -> list[dict]:
    records = cfg.preference.samples
    if not records:
        return []
    if cfg.task == "reward":
        pairs = [to_preference_pair(r, cfg, f"preference.samples[{i}]", "preference.samples", tokenizer)
                 for i, r in enumerate(records)]
        scorer = RewardScorer(model, tokenizer, cfg.preference.max_length)
        chosen, rejected = scorer.score([p.prompt + p.chosen for p in pairs]), scorer.score(
            [p.prompt + p.rejected for p in pairs])
        return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "reward_chosen": float(c),
                 "reward_rejected": float(r)} for p, c, r in zip(pairs, chosen, rejected)]
    from lmtune.tasks.sft import answer

    prompts = policy_prompts(cfg, tokenizer, records, "preference.samples")
    return answer(model, tokenizer, prompts, cfg.rl.max_completion_length if cfg.task == "rl"
                  else cfg.generation.max_new_tokens)


def policy_prompts(cfg: RecipeConfig, tokenizer, records: list[dict], where: str) -> list[str]:
    """Records rendered as the policy's prompts: with the prompt template, then (chat format) as the user's
    turn through the chat template."""
    template = prompt_template(cfg)
    prompts = [render_prompt(r, template, f"prompt {i + 1}" if where == "predict" else f"{where}[{i}]", where)
               for i, r in enumerate(records)]
    return [chat_prompt(tokenizer, cfg, p) for p in prompts] if chat_format(cfg) else prompts


def load_for_inference(model_dir: str | Path, task: str = "dpo"):
    return load_model_for(task, model_dir)
