"""The keytoken-weighted loss against a direct per-sample computation."""

from __future__ import annotations

import math

import torch

from lmtune.training.losses import keytoken_ids, keytoken_weighted_loss, per_sample_causal_lm_loss


def reference_weighted_loss(logits, labels, key_ids, alpha):
    total = 0.0
    for b in range(logits.shape[0]):
        losses = []
        for t in range(logits.shape[1] - 1):
            log_probs = torch.log_softmax(logits[b, t].double(), dim=-1)
            losses.append(-float(log_probs[labels[b, t + 1]]))
        count = sum(int(x) in key_ids for x in labels[b])
        total += sum(losses) / len(losses) * alpha * (1 + count)
    return total / logits.shape[0]


def test_weighted_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    key = [2, 5]
    got = keytoken_weighted_loss(logits, labels, torch.tensor(key), alpha=0.5)
    assert math.isclose(float(got), reference_weighted_loss(logits, labels, key, 0.5), rel_tol=1e-5)


def test_without_key_tokens_it_is_the_mean_of_sample_losses():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 6, (2, 5))
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    got = keytoken_weighted_loss(logits, labels, torch.tensor([6]), alpha=1.0)
    assert torch.allclose(got, plain, atol=1e-6)


def test_ignored_positions_do_not_count():
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100]])
    per = per_sample_causal_lm_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3])
    assert torch.allclose(per[0], ref, atol=1e-6)


def test_keytoken_ids_keeps_single_tokens_and_reports_the_rest(tiny_tokenizer):
    ids, skipped = keytoken_ids(tiny_tokenizer, ["model", "xqzv", " model"])
    single = tiny_tokenizer("model", add_special_tokens=False)["input_ids"]
    assert single[0] in ids and len(single) == 1
    assert "xqzv" in skipped


def test_evaluation_passes_are_capped_by_the_size_of_their_logits():
    """A big vocabulary splits an evaluation batch into smaller passes; a small one keeps the whole batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtune.training.losses import EVAL_LOGITS_ELEMENTS, eval_rows

    small = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert eval_rows(small, 16, 64) == 16
    big = GPT2LMHeadModel(GPT2Config(vocab_size=262_144, n_embd=8, n_layer=1, n_head=2, n_positions=256))
    rows = eval_rows(big, 4, 256)
    assert rows == 1 and rows * 256 * 262_144 <= EVAL_LOGITS_ELEMENTS
    assert eval_rows(big, 4, 10**6) == 1  # never zero rows
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(big, LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    assert eval_rows(wrapped, 4, 256) == 1  # through peft's wrapper too
