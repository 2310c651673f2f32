"""The training step's faster forms against the plain ones: the chunked linear cross-entropy
(losses.linear_cross_entropy) against F.cross_entropy over full logits, GPT-2's one-kernel GELU against
`gelu_new`, and whole training runs of the fast path against a plain fp32 path through the real Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmtune.modeling import POSITIONWISE_MLM_HEADS, encoder_of_masked_lm, head_only_at
from lmtune.training import losses
from lmtune.training.engine import PLAIN_OUTPUT_LAYER_MODELS, LmtuneTrainer, fused_loss_modules, training_arguments
from lmtune.training.losses import (
    keytoken_token_weights,
    keytoken_weighted_loss,
    linear_cross_entropy,
    next_token_targets,
    token_weights_for_mean,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_loss(hidden, weight, targets, token_weights):
    token_loss = F.cross_entropy((hidden.double() @ weight.double().t()), targets, reduction="none",
                                 ignore_index=-100)
    return (token_loss * token_weights.double()).sum()


@pytest.mark.parametrize("chunk_elements", [7 * 13, 1 << 24])  # 7 rows a chunk (a ragged last one), or one chunk
def test_linear_cross_entropy_equals_full_logits_loss_and_gradients(monkeypatch, chunk_elements):
    monkeypatch.setattr(losses, "LOGITS_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 16, generator=g, requires_grad=True)
    weight = torch.randn(13, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (30,), generator=g)
    targets[[0, 5, 29]] = -100
    weights = token_weights_for_mean(targets, None)
    got = linear_cross_entropy(hidden, weight, targets, weights)
    (got * 3.0).backward()  # a non-unit upstream gradient, as gradient accumulation gives
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = reference_loss(hidden, weight, targets, weights)
    (want * 3.0).backward()
    assert torch.allclose(got.double(), want, rtol=1e-6)
    assert torch.allclose(got_grads[0], hidden.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got_grads[1], weight.grad, rtol=1e-5, atol=1e-7)
    assert float(weights.sum()) == pytest.approx(1.0) and float(weights[[0, 5, 29]].abs().sum()) == 0


def test_token_weights_reproduce_the_keytoken_loss():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 8, 16, generator=g)
    weight = torch.randn(11, 16, generator=g)
    labels = torch.randint(0, 11, (3, 8), generator=g)
    labels[1, :3] = -100
    key = torch.tensor([2, 5])
    want = keytoken_weighted_loss(hidden @ weight.t(), labels, key, alpha=0.5)
    targets = next_token_targets(labels)
    got = linear_cross_entropy(hidden, weight, targets, keytoken_token_weights(labels, targets, key, 0.5))
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_num_items_is_the_divisor_across_accumulated_batches():
    targets = torch.tensor([[1, 2, -100], [3, -100, -100]])
    got = token_weights_for_mean(targets, torch.tensor(6))
    assert torch.allclose(got, torch.tensor([[1 / 6, 1 / 6, 0], [1 / 6, 0, 0]]))


def test_linear_cross_entropy_under_bf16_autocast_follows_the_autocast_reference():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = (torch.randn(50, 32, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 50, (64,), generator=g)
    weights = token_weights_for_mean(targets, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets, weights)
        want = F.cross_entropy((hidden @ weight.t()).float(), targets)
    got.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-3)


def tiny_causal_lm(model_type: str, tied: bool = True, **changes):
    import transformers

    common = dict(vocab_size=97, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=tied)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, **common)
    # Gemma: grouped-query attention (4 query heads, 1 key/value head) and a sliding-window layer, as Gemma 3.
    gemma = dict(small, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    configs = {
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **common),
        "llama": lambda: transformers.LlamaConfig(**small),
        "mistral": lambda: transformers.MistralConfig(**small),
        "qwen2": lambda: transformers.Qwen2Config(**small),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **small),
        "gemma": lambda: transformers.GemmaConfig(**gemma),
        "gemma2": lambda: transformers.Gemma2Config(**dict(gemma, final_logit_softcapping=None)),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(**dict(gemma, sliding_window=4,
                                                                     layer_types=["sliding_attention",
                                                                                  "full_attention"])),
    }
    config = configs[model_type]()
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("model_type", sorted(PLAIN_OUTPUT_LAYER_MODELS))
def test_every_model_kind_on_the_fused_list_has_logits_from_its_decoder_alone(model_type, tied, tmp_path):
    model = tiny_causal_lm(model_type, tied)
    trainer = LmtuneTrainer(model=model, args=training_arguments_for(tmp_path))
    decoder, head = fused_loss_modules(model, trainer)
    assert (head.weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(1, 97, (2, 12))
    seen = []
    hook = decoder.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    logits = model(input_ids=ids).logits
    hook.remove()
    assert torch.allclose(seen[0] @ head.weight.t(), logits, atol=1e-5)


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("llama", False), ("gemma3_text", True),
                                             ("gemma3_text", False)])
def test_the_fused_loss_equals_the_models_own_loss_and_gradients(model_type, tied, tmp_path):
    """The training loss as LmtuneTrainer computes it (no logits) against the model's own, on a batch
    with padding labels, and the gradients it gives every weight."""
    batch = {"input_ids": torch.randint(1, 97, (3, 10))}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, :4] = -100  # a prompt, as in instruction tuning
    batch["labels"][2, 7:] = -100  # padding
    losses, grads = [], []
    for fused in (True, False):
        model = tiny_causal_lm(model_type, tied)
        model.train()
        trainer = LmtuneTrainer(model=model, args=training_arguments_for(tmp_path), fused_loss=fused)
        assert (trainer.fused_loss_modules is not None) == fused
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], rtol=1e-5), losses
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_gemma_with_logit_soft_capping_keeps_its_own_loss(tmp_path):
    model = tiny_causal_lm("gemma2", final_logit_softcapping=30.0)
    assert fused_loss_modules(model, LmtuneTrainer(model=model, args=training_arguments_for(tmp_path))) is None


def training_arguments_for(folder, **changes):
    from lmtune.config import TrainingConfig

    cfg = TrainingConfig(**{"learning_rate": 2e-2, "batch_size": 4, "max_steps": 12, "logging_steps": 1,
                            "save_strategy": "no", "warmup_steps": 0, "estimate_steps": 0, **changes})
    return training_arguments(cfg, folder, changes.get("precision", "fp32"), has_eval=False)


def train_losses(model, blocks, folder, fused: bool, precision: str = "fp32", keytoken=None, **changes):
    from lmtune.data.packing import BlockDataset
    from transformers import default_data_collator

    args = training_arguments_for(folder, precision=precision, **changes)
    trainer = LmtuneTrainer(model=model, args=args, train_dataset=BlockDataset(blocks),
                            data_collator=default_data_collator, fused_loss=fused,
                            keytoken_ids=keytoken, keytoken_alpha=1.0)
    assert (trainer.fused_loss_modules is not None) == fused
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model


def plain_and_fast_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                       bos_token_id=0, eos_token_id=0, activation_function="gelu_new"))
    fast = GPT2LMHeadModel(GPT2Config(**{**plain.config.to_dict(), "activation_function": "gelu_pytorch_tanh"}))
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def learnable_blocks():
    """Rows counting up from a random start in random steps: structure a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(3)
    starts, steps = torch.randint(0, 96, (48, 1), generator=g), torch.randint(1, 4, (48, 1), generator=g)
    return ((starts + steps * torch.arange(16)) % 96 + 1).numpy()


@pytest.mark.parametrize("variant", ["plain-loss", "keytoken", "accumulation"])
def test_fast_path_trains_like_the_plain_fp32_path(tmp_path, variant):
    """The fast path (one-kernel GELU, chunked linear cross-entropy) against the plain one (gelu_new,
    the model's own loss over full logits), fp32, same weights and batches: the same losses and weights."""
    plain, fast = plain_and_fast_gpt2()
    blocks = learnable_blocks()
    options = {"keytoken": [5, 7, 11]} if variant == "keytoken" else {}
    if variant == "accumulation":
        options["gradient_accumulation_steps"] = 2
    want, plain = train_losses(plain, blocks, tmp_path / "plain", fused=False, **options)
    got, fast = train_losses(fast, blocks, tmp_path / "fast", fused=True, **options)
    assert len(got) == len(want) == 12
    assert got == pytest.approx(want, rel=1e-4)
    assert want[-1] < want[0] - 0.1  # it learned something, so equal losses say something
    # Adam divides each step by the gradient's running RMS, so rounding-level gradient differences on
    # near-zero entries move a weight by a small fraction of the learning rate (2e-2 here): seen up to 8e-4.
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert float((a - b).abs().max()) < 2e-3, name


def test_fast_bf16_path_stays_within_two_percent_of_plain_fp32(tmp_path):
    plain, fast = plain_and_fast_gpt2()
    blocks = learnable_blocks()
    want, _ = train_losses(plain, blocks, tmp_path / "plain", fused=False)
    got, _ = train_losses(fast, blocks, tmp_path / "fast", fused=True, precision="bf16")
    assert got == pytest.approx(want, rel=0.02)


def test_the_fused_loss_is_skipped_where_it_does_not_apply(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    assert fused_loss_modules(BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32)),
                              LmtuneTrainer(model=copy.deepcopy(tiny_causal_lm("gpt2")),
                                            args=training_arguments_for(tmp_path))) is None


def test_fused_activation_is_gelu_new_in_one_kernel(tmp_path):
    from transformers import AutoConfig

    from lmtune.modeling import fused_activation

    plain, fast = plain_and_fast_gpt2()
    ids = torch.randint(1, 97, (3, 16))
    assert torch.allclose(plain.eval()(input_ids=ids).logits, fast.eval()(input_ids=ids).logits, atol=1e-6)
    plain.save_pretrained(tmp_path)
    assert fused_activation(AutoConfig.from_pretrained(tmp_path)) == {"activation_function": "gelu_pytorch_tanh"}


# --------------------------------------------------------------------------------------------------
# Masked LMs: the head on the masked positions only


def tiny_masked_lm(model_type: str):
    import transformers

    common = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=40, pad_token_id=1)
    configs = {
        "bert": lambda: transformers.BertConfig(**common),
        "roberta": lambda: transformers.RobertaConfig(**common),
        "xlm-roberta": lambda: transformers.XLMRobertaConfig(**common),
        "camembert": lambda: transformers.CamembertConfig(**common),
        "distilbert": lambda: transformers.DistilBertConfig(vocab_size=61, dim=32, n_layers=2, n_heads=2,
                                                            hidden_dim=64, max_position_embeddings=40, pad_token_id=1),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForMaskedLM.from_config(configs[model_type]())


def masked_batches(n: int = 32, length: int = 16, seed: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts, steps = torch.randint(0, 56, (n, 1), generator=g), torch.randint(1, 3, (n, 1), generator=g)
    ids = (starts + steps * torch.arange(length)) % 56 + 5  # counting up: a masked token follows from its neighbours
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(n, length, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    ids[chosen] = 4  # the mask token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("model_type", sorted(POSITIONWISE_MLM_HEADS))
def test_every_masked_lm_on_the_list_predicts_the_same_at_the_selected_positions(model_type):
    model = tiny_masked_lm(model_type).eval()
    batch = masked_batches(4)
    selected = batch["labels"] != -100
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with head_only_at(encoder_of_masked_lm(model), selected):
        only = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert only.shape == (int(selected.sum()), 61)
    assert torch.allclose(only, full[selected], atol=1e-5)


class MaskedChunks(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_masked_lm_training_with_the_head_on_masked_positions_equals_the_models_own_loss(tmp_path, accumulation):
    from transformers import default_data_collator

    runs = {}
    for fused in (False, True):
        model = tiny_masked_lm("bert")
        args = training_arguments_for(tmp_path / str(fused), gradient_accumulation_steps=accumulation)
        trainer = LmtuneTrainer(model=model, args=args, train_dataset=MaskedChunks(masked_batches(96)),
                                data_collator=default_data_collator, fused_loss=fused)
        assert (trainer.masked_lm_encoder is not None) == fused
        trainer.train()
        runs[fused] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], model
    (want, plain), (got, fast) = runs[False], runs[True]
    assert len(got) == 12 and got == pytest.approx(want, rel=1e-4)
    initial = tiny_masked_lm("bert").state_dict()
    moved = max(float((p - initial[name]).abs().max()) for name, p in plain.named_parameters())
    assert moved > 0.05  # it trained, so equal losses and weights say something
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert float((a - b).abs().max()) < 2e-3, name


def test_masked_lm_evaluation_equals_the_full_logits_sum():
    from lmtune.tasks.mlm import evaluate

    model = tiny_masked_lm("distilbert")
    batch = masked_batches(40)
    got = evaluate(model, batch, batch_size=16)
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = F.cross_entropy(logits.view(-1, 61), batch["labels"].view(-1), ignore_index=-100)
    assert got["masked_tokens"] == int((batch["labels"] != -100).sum())
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
