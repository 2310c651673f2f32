"""Loss variants beyond the model's own cross-entropy."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("lmtune")


def keytoken_ids(tokenizer, keywords: list[str]) -> tuple[list[int], list[str]]:
    """Ids of keywords that are a single token; multi-token keywords are returned as skipped."""
    ids: list[int] = []
    skipped: list[str] = []
    for word in keywords:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) == 1:
            if tokens[0] not in ids:
                ids.append(tokens[0])
        else:
            skipped.append(word)
    return ids, skipped


def per_sample_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample (positions labelled -100 ignored), shape [batch].

    The labels are shifted rather than the logits: slicing [B, T, V] logits would copy them (and
    their gradient) once more, which costs a third of a training step on a CPU."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), shifted.reshape(-1), reduction="none", ignore_index=-100
    ).view(shifted.shape)
    valid = (shifted != -100).float()
    return token_loss.sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def keytoken_weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, key_ids: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The code-model chapter's loss: each sample's mean loss weighted by alpha * (1 + number of key
    tokens in it), so samples that use the libraries of interest count more. A per-batch mean."""
    per_sample = per_sample_causal_lm_loss(logits, labels)
    counts = torch.isin(labels, key_ids.to(labels.device)).sum(dim=1).float()
    weights = alpha * (1.0 + counts)
    return (per_sample * weights).mean()
