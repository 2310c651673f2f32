"""Load a pretrained model, or build a new one sized to a tokenizer; report its parameters."""

from __future__ import annotations

import logging

import torch

from lmtune.config import FromScratchConfig, ModelConfig
from lmtune.errors import InputError
from lmtune.hub import from_pretrained_or_explain

log = logging.getLogger("lmtune")


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    # Tied weights (GPT-2's embedding and output layer) are counted once.
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "trainable_percent": 100.0 * trainable / max(total, 1)}


def describe_parameters(counts: dict[str, float]) -> str:
    return (
        f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable "
        f"({counts['trainable_percent']:.2f}%)"
    )


def max_positions(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_block_size(config, block_size: int, where: str = "data.block_size") -> None:
    limit = max_positions(config)
    if limit is not None and block_size > limit:
        raise InputError(
            f"{where} {block_size} is larger than the model's context of {limit} positions; "
            f"set {where} to {limit} or less."
        )


def position_offset(config) -> int:
    # RoBERTa-style models spend padding_idx + 1 position slots before the first token.
    return 2 if config.model_type in {"roberta", "xlm-roberta", "camembert"} else 0


def check_sequence_fits(config, length: int, where: str) -> None:
    """`length` tokens must fit the model's positions, less those RoBERTa-style models reserve; the
    message names the setting and the largest value that fits."""
    limit = max_positions(config)
    offset = position_offset(config)
    if limit is None or length + offset <= limit:
        return
    usable = limit - offset
    reserved = f" ({limit} position slots, {offset} reserved by {config.model_type})" if offset else ""
    raise InputError(f"{where} {length} is larger than the model's context of {usable} positions"
                     f"{reserved}; set {where} to {usable} or less.")


def _common_ids(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def model_config_from_scratch(spec: FromScratchConfig, tokenizer, block_size: int):
    """A config whose vocabulary, special ids and context fit the tokenizer and the data."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    positions = spec.n_positions or block_size
    common = _common_ids(tokenizer)
    inner = spec.intermediate_size or 4 * spec.n_embd
    if spec.architecture == "llama":
        return LlamaConfig(hidden_size=spec.n_embd, num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                           num_key_value_heads=spec.n_head, intermediate_size=inner,
                           max_position_embeddings=positions, attention_dropout=spec.dropout,
                           tie_word_embeddings=True, **common)
    if spec.architecture in ("bert", "roberta"):
        cls = BertConfig if spec.architecture == "bert" else RobertaConfig
        # RoBERTa numbers positions from padding_idx + 1, so it needs two more position slots.
        extra = 2 if spec.architecture == "roberta" else 0
        return cls(hidden_size=spec.n_embd, num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                   intermediate_size=inner, max_position_embeddings=positions + extra,
                   hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout, **common)
    return GPT2Config(n_embd=spec.n_embd, n_layer=spec.n_layer, n_head=spec.n_head, n_positions=positions,
                      resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout, **common)


def build_from_scratch(spec: FromScratchConfig, tokenizer, block_size: int, seed: int, task: str = "clm"):
    import transformers
    from transformers import set_seed

    set_seed(seed)
    config = model_config_from_scratch(spec, tokenizer, block_size)
    config._attn_implementation = "sdpa"
    return getattr(transformers, HEADS[task][0]).from_config(config)


HEADS = {
    # task: (auto class name, mapping of model types that have the head, what the head is called)
    "clm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-LM", "a decoder such as gpt2"),
    "mlm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked-LM",
            "an encoder such as bert or roberta"),
    "qa": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering",
           "an encoder such as bert or roberta"),
}


def check_pretrained_head(model_cfg: ModelConfig, task: str) -> None:
    """A pretrained model must be able to carry the task's head; checked first, on its config alone
    (a decoder's folder comes with a tokenizer without a mask token, which would otherwise be blamed)."""
    if model_cfg.name_or_path is None or model_cfg.trust_remote_code:
        return
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    _, mapping_name, head, example = HEADS[task]
    name = model_cfg.name_or_path
    config = from_pretrained_or_explain(AutoConfig.from_pretrained, name, what="model")
    if config.model_type not in getattr(modeling_auto, mapping_name):
        raise InputError(f"model '{name}' ({config.model_type}) has no {head} head; choose {example}.")


def load_pretrained(model_cfg: ModelConfig, task: str = "clm"):
    """A pretrained model with the task's head (a missing head, e.g. MLM on a plain encoder, is created
    new by transformers and trained)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    auto_name, mapping_name, head, example = HEADS[task]
    name = model_cfg.name_or_path
    config = from_pretrained_or_explain(AutoConfig.from_pretrained, name, what="model",
                                        trust_remote_code=model_cfg.trust_remote_code)
    if config.model_type not in getattr(modeling_auto, mapping_name) and not model_cfg.trust_remote_code:
        raise InputError(f"model '{name}' ({config.model_type}) has no {head} head; choose {example}.")
    if model_cfg.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with '%s' will run on this machine", name)
    return from_pretrained_or_explain(getattr(transformers, auto_name).from_pretrained, name, what="model",
                                      trust_remote_code=model_cfg.trust_remote_code)


def build_or_load(model_cfg: ModelConfig, tokenizer, length: int, seed: int, task: str):
    """The task's model: new from `model_cfg.from_scratch` sized to the tokenizer and `length`, or
    pretrained, its embeddings grown when the tokenizer has more tokens (added pad token)."""
    if model_cfg.from_scratch is not None:
        return build_from_scratch(model_cfg.from_scratch, tokenizer, length, seed, task)
    model = load_pretrained(model_cfg, task)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model
