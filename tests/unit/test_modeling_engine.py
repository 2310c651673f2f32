"""Models sized to a tokenizer, and the Trainer as the engine builds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmtune.config import FromScratchConfig, TrainingConfig
from lmtune.data.packing import BlockDataset
from lmtune.errors import InputError
from lmtune.modeling import build_from_scratch, check_block_size, count_parameters
from lmtune.training.engine import LmtuneTrainer, resolve_precision, training_arguments


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_scratch_model_fits_tokenizer_and_context(arch, tiny_tokenizer):
    model = build_from_scratch(FromScratchConfig(architecture=arch, n_layer=2, n_head=2, n_embd=32), tiny_tokenizer,
                            block_size=24, seed=0)
    cfg = model.config
    assert cfg.vocab_size == len(tiny_tokenizer)
    assert cfg.eos_token_id == tiny_tokenizer.eos_token_id and cfg.bos_token_id == tiny_tokenizer.bos_token_id
    check_block_size(cfg, 24)
    with pytest.raises(InputError, match="larger than the model's context of 24"):
        check_block_size(cfg, 25)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 24))
    assert model(input_ids=ids).logits.shape == (2, 24, len(tiny_tokenizer))


def test_parameter_count_counts_tied_weights_once(tiny_tokenizer):
    model = build_from_scratch(FromScratchConfig(n_layer=1, n_head=2, n_embd=32), tiny_tokenizer, 16, seed=0)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # parameters() dedups tied ones
    assert counts["trainable_percent"] == 100.0
    model.transformer.wte.weight.requires_grad_(False)
    assert count_parameters(model)["trainable"] < counts["total"]


def test_seeded_build_is_reproducible(tiny_tokenizer):
    spec = FromScratchConfig(n_layer=1, n_head=2, n_embd=32)
    a = build_from_scratch(spec, tiny_tokenizer, 16, seed=5).state_dict()
    b = build_from_scratch(spec, tiny_tokenizer, 16, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weight_decay_spares_biases_and_layernorm(tiny_tokenizer, tmp_path):
    model = build_from_scratch(FromScratchConfig(n_layer=1, n_head=2, n_embd=32), tiny_tokenizer, 16, seed=0)
    cfg = TrainingConfig(weight_decay=0.1, max_steps=1, precision="fp32")
    args = training_arguments(cfg, tmp_path, "fp32", has_eval=False)
    blocks = np.random.default_rng(0).integers(0, len(tiny_tokenizer), (8, 16), dtype=np.int32)
    trainer = LmtuneTrainer(model=model, args=args, train_dataset=BlockDataset(blocks))
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        if group["weight_decay"] == 0.0:
            assert all(n.endswith("bias") or ".ln_" in n for n in group_names), group_names
        else:
            assert group["weight_decay"] == 0.1
            assert not any(n.endswith("bias") or ".ln_" in n for n in group_names), group_names


def test_precision_resolution():
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") in {"bf16", "fp32", "fp16"}
    if not torch.cuda.is_available():
        assert resolve_precision("fp16") == "fp32"


def test_training_options_reach_the_trainer_arguments(tmp_path):
    from lmtune.config import TrainingConfig

    cfg = TrainingConfig(group_by_length=True, eval_strategy="epoch", save_strategy="epoch",
                         load_best_model_at_end=True, metric_for_best_model="accuracy")
    args = training_arguments(cfg, tmp_path, "fp32", has_eval=True)
    assert args.train_sampling_strategy == "group_by_length"
    assert args.load_best_model_at_end and args.metric_for_best_model == "accuracy" and args.greater_is_better
    loss = training_arguments(TrainingConfig(eval_strategy="steps", eval_steps=5, save_strategy="steps",
                                             load_best_model_at_end=True), tmp_path, "fp32", has_eval=True)
    assert loss.metric_for_best_model == "loss" and loss.greater_is_better is False
    assert training_arguments(TrainingConfig(), tmp_path, "fp32", has_eval=False).train_sampling_strategy == "random"
