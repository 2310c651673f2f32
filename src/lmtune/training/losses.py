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


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is label t + 1; the last position has none (-100).

    The labels are shifted rather than the logits: slicing [B, T, V] logits would copy them (and
    their gradient) once more, which costs a third of a training step on a CPU."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def per_sample_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample (positions labelled -100 ignored), shape [batch]."""
    shifted = next_token_targets(labels)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), shifted.reshape(-1), reduction="none", ignore_index=-100
    ).view(shifted.shape)
    valid = (shifted != -100).float()
    return token_loss.sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


def keytoken_sample_weights(labels: torch.Tensor, key_ids: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * (1 + number of key tokens in the sample), shape [batch]."""
    counts = torch.isin(labels, key_ids.to(labels.device)).sum(dim=1).float()
    return alpha * (1.0 + counts)


def keytoken_weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, key_ids: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The code-model chapter's loss: each sample's mean loss weighted by alpha * (1 + number of key
    tokens in it), so samples that use the libraries of interest count more. A per-batch mean."""
    per_sample = per_sample_causal_lm_loss(logits, labels)
    return (per_sample * keytoken_sample_weights(labels, key_ids, alpha)).mean()


# --------------------------------------------------------------------------------------------------
# The causal-LM loss straight from the last hidden states
#
# The model's own path holds a [tokens, vocabulary] logits tensor, its log-softmax and their gradients
# (the demo's batch: 2048 x 8192 floats, several times over) and walks them in separate kernels. Here
# the output layer, the cross-entropy and both their gradients are computed in one pass over chunks of
# rows, in the forward pass (the loss is the last thing computed, so its gradient is known then); the
# backward pass only scales what was kept. Same FLOPs, far less memory traffic: on the demo's model the
# step is 1.045x as fast and training adds 224 MiB less (benchmarks/README.md). Written here because the libraries
# that ship a fused linear cross-entropy (Liger, Apple's cut-cross-entropy) need Triton and a GPU.

LOGITS_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 logits per chunk


def token_weights_for_mean(targets: torch.Tensor, num_items: int | torch.Tensor | None) -> torch.Tensor:
    """Weights that turn the summed token losses into the model's own loss: 1 / num_items per
    predicted token (the Trainer's count across accumulated batches), or 1 / predicted tokens here."""
    valid = (targets != -100).float()
    denominator = num_items if num_items is not None else valid.sum().clamp(min=1.0)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(valid.device, valid.dtype)
    return valid / denominator


def keytoken_token_weights(labels: torch.Tensor, targets: torch.Tensor, key_ids: torch.Tensor,
                           alpha: float) -> torch.Tensor:
    """Weights under which the summed token losses equal `keytoken_weighted_loss`."""
    valid = (targets != -100).float()
    per_sample = keytoken_sample_weights(labels, key_ids, alpha) / valid.sum(dim=1).clamp(min=1.0)
    return valid * per_sample[:, None] / labels.shape[0]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk_rows):
        dtype = _compute_dtype(hidden)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = hidden[rows].to(dtype)
                picked = targets[rows].clamp(min=0)[:, None]
                scale = token_weights[rows][:, None]
                logits = (h @ w.t()).float()
                log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
                total += ((log_norm - logits.gather(1, picked)) * scale).sum()
                # d(loss)/d(logits) = weight * (softmax - one_hot(target)), built in place of the logits
                grad_logits = logits.sub_(log_norm).exp_()
                grad_logits.scatter_add_(1, picked, torch.full_like(scale, -1.0))
                grad_logits = grad_logits.mul_(scale).to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor) -> torch.Tensor:
    """sum_i token_weights[i] * cross_entropy(hidden[i] @ weight.T, targets[i]) over the rows whose
    target is not -100, without materialising the logits of all rows. hidden [..., d], weight [V, d].

    Rows without a target are dropped before the output layer: in instruction tuning the prompt and
    the padding, which the model's own loss projects onto the whole vocabulary and then ignores."""
    d = hidden.shape[-1]
    targets = targets.reshape(-1)
    keep = (targets != -100).nonzero().squeeze(1)
    chunk_rows = max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden.reshape(-1, d).index_select(0, keep), weight, targets[keep],
                                     token_weights.reshape(-1)[keep].float(), chunk_rows)


# Evaluation holds one pass's logits ([rows x length x vocabulary] floats) and as much again for their
# log-softmax. With Gemma 3's 262,144-token vocabulary, 4 rows of 256 tokens are 1 GiB each: the process's
# peak sat in evaluation, 2.8 GB above training's own with the fused loss (benchmarks/README.md,
# gemma3_fused_loss). A pass holds at most this many logits (256 MiB in fp32); small vocabularies and
# short rows keep their whole batch.
EVAL_LOGITS_ELEMENTS = 2**26


def eval_rows(model, batch_size: int, length: int) -> int:
    """Rows per evaluation pass for rows of `length` tokens: `batch_size`, fewer where their logits
    would exceed EVAL_LOGITS_ELEMENTS."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = head.weight.shape[0] if isinstance(head, torch.nn.Linear) else getattr(model.config, "vocab_size", 1)
    return max(1, min(batch_size, EVAL_LOGITS_ELEMENTS // max(1, length * width)))
