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


def causal_lm_config(spec: FromScratchConfig, tokenizer, block_size: int):
    """A GPT-2 (or Llama) config whose vocabulary, special ids and context fit the tokenizer and data."""
    from transformers import GPT2Config, LlamaConfig

    positions = spec.n_positions or block_size
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.architecture == "llama":
        return LlamaConfig(
            hidden_size=spec.n_embd,
            num_hidden_layers=spec.n_layer,
            num_attention_heads=spec.n_head,
            num_key_value_heads=spec.n_head,
            intermediate_size=spec.intermediate_size or 4 * spec.n_embd,
            max_position_embeddings=positions,
            attention_dropout=spec.dropout,
            tie_word_embeddings=True,
            **common,
        )
    return GPT2Config(
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_positions=positions,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        **common,
    )


def build_causal_lm(spec: FromScratchConfig, tokenizer, block_size: int, seed: int):
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(seed)
    config = causal_lm_config(spec, tokenizer, block_size)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config)


def load_causal_lm(model_cfg: ModelConfig):
    from transformers import AutoConfig, AutoModelForCausalLM

    name = model_cfg.name_or_path
    config = from_pretrained_or_explain(AutoConfig.from_pretrained, name, what="model",
                                        trust_remote_code=model_cfg.trust_remote_code)
    if config.model_type not in _causal_mapping() and not model_cfg.trust_remote_code:
        raise InputError(
            f"model '{name}' ({config.model_type}) has no causal-LM head; choose a decoder model such as gpt2."
        )
    if model_cfg.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with '%s' will run on this machine", name)
    return from_pretrained_or_explain(AutoModelForCausalLM.from_pretrained, name, what="model",
                                      trust_remote_code=model_cfg.trust_remote_code)


def _causal_mapping():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
