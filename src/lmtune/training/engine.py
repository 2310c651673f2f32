"""Builds the Hugging Face `Trainer` from a recipe's `training` section.

Training goes through `Trainer` (not a loop of our own) so that `accelerate launch` with DDP, FSDP
or DeepSpeed works unchanged. What we add: precision chosen from the hardware, the keytoken loss,
and one JSON line per logging step in the run dir.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from lmtune import distributed
from lmtune.config import TrainingConfig
from lmtune.errors import NonFiniteError, StorageError, storage_failure
from lmtune.modeling import encoder_of_masked_lm, head_only_at
from lmtune.training.checkpoints import PREFIX, prune_checkpoints, publish_checkpoint
from lmtune.training.losses import (
    keytoken_token_weights,
    keytoken_weighted_loss,
    linear_cross_entropy,
    next_token_targets,
    token_weights_for_mean,
)

log = logging.getLogger("lmtune")

STREAM_STATE = "stream_position.json"  # in a checkpoint of a streamed run


def cpu_supports_bf16() -> bool:
    # Without native bf16 instructions (AVX512-BF16 / AMX) autocast emulates bf16 and is slower than fp32.
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(choice: str) -> str:
    """'auto' -> bf16 where the hardware runs it natively (CUDA with bf16, or a bf16-capable CPU),
    fp16 on older CUDA GPUs, else fp32. An explicit choice the hardware can't run falls back, loudly."""
    cuda = torch.cuda.is_available()
    if choice == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if choice == "fp16" and not cuda:
        log.warning("fp16 needs a CUDA GPU; training in fp32 instead")
        return "fp32"
    return choice


def training_arguments(cfg: TrainingConfig, output_dir: Path, precision: str, has_eval: bool,
                       args_class: type[TrainingArguments] = TrainingArguments, **extra) -> TrainingArguments:
    """The recipe's training section as `args_class` (TrainingArguments, or a TRL config such as
    DPOConfig with its own options in `extra`)."""
    eval_strategy = cfg.eval_strategy if has_eval else "no"
    return args_class(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,  # Trainer exempts biases and LayerNorm weights from decay
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        logging_steps=cfg.logging_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        max_grad_norm=cfg.max_grad_norm,
        dataloader_num_workers=cfg.dataloader_num_workers,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        activation_checkpointing=cfg.activation_checkpointing,
        # non-reentrant checkpointing passes gradients to adapters even when the frozen embeddings' output needs none
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.activation_checkpointing else None,
        report_to="none",  # TensorBoard, when asked for, is added by the pipeline (tensorboard_callback)
        include_num_input_tokens_seen="all",  # throughput in tokens/s for the log and the report
        # Every parameter that trains takes part in the loss (frozen ones are skipped by DDP anyway); the
        # search for unused ones costs a graph traversal per step.
        ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # a NaN loss is shown as NaN (and stops the run), never averaged away
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        save_only_model=False,
        load_best_model_at_end=cfg.load_best_model_at_end and eval_strategy != "no",
        metric_for_best_model=cfg.metric_for_best_model if cfg.load_best_model_at_end else None,
        # loss and error metrics: lower is better; accuracy, F1 and the like: higher
        greater_is_better=cfg.metric_for_best_model.removeprefix("eval_") not in {"loss", "mse", "mae"}
        if cfg.load_best_model_at_end else None,
        **extra,
    )


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_callback(choice: str, folder: Path):
    """TensorBoard event files in `folder` (the run dir's tensorboard/) when training.report_to asks for
    them, or is 'auto' and the `tensorboard` extra is installed; None otherwise."""
    if choice == "none" or (choice == "auto" and not tensorboard_installed()):
        return None
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))


class JsonlLogCallback(TrainerCallback):
    """One JSON object per logging step in the run dir's log.jsonl (flushed, so a crash keeps it)."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self.start, 3)}
        record.update({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in logs.items()})
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class PlainProgressCallback(TrainerCallback):
    """Without a terminal (CI, logs) tqdm is off; print a short line at each logging step instead."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
        print(f"[step {state.global_step}/{state.max_steps}] {shown}", file=sys.stderr, flush=True)


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM (Ctrl-C, a scheduler's pre-emption) asks for a checkpoint at the next step
    boundary and a clean stop; a second signal of the same kind acts at once, as it would without us."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))  # a second one is not caught

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        # Every process must stop after the same step, whichever of them was signalled.
        if distributed.any_true(self.signum is not None):
            self.signum = self.signum or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler)
        self.previous.clear()


class NonFiniteGradientGuard(TrainerCallback):
    """Stops training before the optimizer step when a gradient is NaN or infinite (the loss may be
    finite while the backward pass overflows); the weights and the last checkpoint stay as they were."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        # One norm over all gradients (NaN or infinite if any entry is) and one host sync: a finite check
        # per tensor took 34 ms a step of the demo's 0.57 s; this takes 1 ms. Names only when it fails.
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm([g for _, g in grads]))):
            bad = [name for name, g in grads if not bool(torch.isfinite(g).all())]
            raise NonFiniteError(f"the gradient of {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} "
                                 f"became NaN or infinite at step {state.global_step + 1}")


def reliable(trainer_class: type[Trainer]) -> type[Trainer]:
    """`trainer_class` (ours or TRL's) that stops at the first NaN or infinite training loss, before the
    optimizer step that would write it into the weights, and saves crash-safe checkpoints
    (training/checkpoints.py: staged, fsynced, manifest last, renamed into place, then pruned)."""

    class Reliable(trainer_class):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            # All processes stop together, or the healthy ones would wait for the next gradient exchange.
            bad_here = not bool(torch.isfinite(loss).all())
            if distributed.any_true(bad_here):
                value = float(loss.detach().float().mean()) if bad_here else "NaN or infinite in another process"
                raise NonFiniteError(f"the training loss became {value} at step {self.state.global_step + 1}")
            return loss

        def _save_checkpoint(self, model, trial):
            real = Path(self.args.output_dir)
            staging = real / ".staging"
            try:
                self._stage_and_publish(model, trial, real, staging)
            except Exception as exc:  # torch's writer and safetensors wrap the OS error in their own types
                refused = storage_failure(exc, written_to=staging)  # before the partial files are removed
                shutil.rmtree(staging, ignore_errors=True)
                if refused is None:
                    raise
                raise StorageError(f"{refused}: saving the checkpoint of step {self.state.global_step} in {real} "
                                   "failed; the earlier checkpoints are intact; free space (or lower "
                                   "training.save_total_limit) and run again with --resume") from None
            if distributed.is_main():
                prune_checkpoints(real, self.args.save_total_limit, self._best_checkpoint(real))

        def _best_checkpoint(self, real: Path) -> Path | None:
            return real / f"{PREFIX}{self.state.best_global_step}" if self.state.best_global_step else None

        def _stage_and_publish(self, model, trial, real: Path, staging: Path) -> None:
            # With several processes all write into the staging folder (their RNG states; FSDP and
            # DeepSpeed their shards), and the main one publishes it once they all have.
            if distributed.is_main():
                shutil.rmtree(staging, ignore_errors=True)
            distributed.barrier()
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)  # also prunes, but only inside the staging folder
            finally:
                self.args.output_dir = str(real)
            name = f"{PREFIX}{self.state.global_step}"
            best = self._best_checkpoint(real)
            # The Trainer looked for the best checkpoint in the staging folder: point it at the real one.
            if best is not None and (best.exists() or best.name == name):
                self.state.best_model_checkpoint = str(best)
            distributed.barrier()
            if distributed.is_main():
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
                # TrainingArguments as a pickle: nothing reads it back (the run's config.yaml says it all),
                # and a checkpoint should hold no file that loading could turn into code.
                (staging / name / "training_args.bin").unlink(missing_ok=True)
                self._save_extra_state(staging / name)
                publish_checkpoint(staging / name, real / name)
                shutil.rmtree(staging, ignore_errors=True)
            distributed.barrier()

        def _save_extra_state(self, folder: Path) -> None:
            """A streamed training set's position (data/packing.py), so --resume continues the stream
            where this step left it instead of replaying it."""
            position_state = getattr(self.train_dataset, "position_state", None)
            if position_state is None:
                return
            consumed = (self.state.global_step * self.args.per_device_train_batch_size
                        * self.args.gradient_accumulation_steps * self.args.world_size)
            (folder / STREAM_STATE).write_text(json.dumps(position_state(consumed)), encoding="utf-8")

    Reliable.__name__ = Reliable.__qualname__ = trainer_class.__name__
    return Reliable


def _has_head(model, mapping_name: str) -> bool:
    from transformers.models.auto import modeling_auto

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__ in getattr(modeling_auto, mapping_name).values()


def is_masked_lm(model) -> bool:
    return _has_head(model, "MODEL_FOR_MASKED_LM_MAPPING_NAMES")


def is_causal_lm(model) -> bool:
    """Whether the (LoRA-wrapped) model is a causal LM, whose loss honours `num_items_in_batch`."""
    return _has_head(model, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")


# Causal LMs whose logits are just their output layer applied to the last hidden states (no scaling;
# Gemma's soft-capping only where its config sets one, which then rules the fused loss out), checked by
# tests/unit/test_fast_path.py: the fused loss may stand in for theirs.
PLAIN_OUTPUT_LAYER_MODELS = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}


def fused_loss_modules(model, trainer: Trainer):
    """(decoder, output layer) for the fused causal-LM loss: the module whose last hidden states feed
    the output layer, and that layer. None where the model's own loss must run: not a causal LM of a
    checked kind, an output layer with a bias or adapters, or weights sharded by FSDP / DeepSpeed (the
    weight used outside the forward pass would be a shard)."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or not is_causal_lm(model):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (getattr(base.config, "model_type", None) not in PLAIN_OUTPUT_LAYER_MODELS
            or getattr(base.config, "final_logit_softcapping", None) is not None):
        return None
    decoder = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if not isinstance(decoder, torch.nn.Module) or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return decoder, head


class LmtuneTrainer(Trainer):
    """`Trainer` with an optional keytoken-weighted training loss, and with `fused_loss` a training loss
    computed where it is needed: causal LMs from the last hidden states in chunks
    (losses.linear_cross_entropy) rather than from the full logits, masked LMs with their head on the
    masked positions only (modeling.head_only_at); `fused_loss=False` keeps the model's own.

    Evaluation keeps the model's plain cross-entropy so that eval loss stays a perplexity."""

    def __init__(self, *args, keytoken_ids: list[int] | None = None, keytoken_alpha: float = 1.0,
                 fused_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if not is_causal_lm(self.model):
            # Transformers 5 sees `**kwargs` in every model's forward and so assumes the loss is summed over
            # `num_items_in_batch`: it then skips the division by gradient-accumulation steps and multiplies
            # by the number of processes. The classification, QA and masked-LM heads ignore it and return a
            # per-batch mean, so their loss (and gradient) came out accumulation-steps x processes too big.
            self.model_accepts_loss_kwargs = False
        elif not getattr(self.model.config, "is_encoder_decoder", False):
            # A causal LM predicts T - 1 tokens of a T-token row. Transformers counts the targets that way
            # only when the model names its loss type; a GPT-2 built from a config has none, so the loss it
            # logged (and scaled the gradient with) was (T - 1) / T of the mean, 31/32 at block size 32.
            self._loss_shifts_labels = True
        self.keytoken_ids = torch.tensor(keytoken_ids or [], dtype=torch.long)
        self.keytoken_alpha = keytoken_alpha
        if keytoken_ids:
            # The weighted loss is a per-batch mean: Trainer must divide it by the accumulation steps.
            self.loss_is_scaled_for_ga = False
        self.fused_loss_modules = fused_loss_modules(self.model, self) if fused_loss else None
        self.masked_lm_encoder = encoder_of_masked_lm(self.model) if fused_loss and is_masked_lm(self.model) else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keytoken = len(self.keytoken_ids) > 0
        if model.training and self.fused_loss_modules is not None and not return_outputs:
            return self._fused_causal_lm_loss(model, inputs, num_items_in_batch, keytoken)
        if model.training and self.masked_lm_encoder is not None and not return_outputs:
            return self._masked_positions_loss(model, inputs)
        if not (model.training and keytoken):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        loss = keytoken_weighted_loss(outputs.logits, labels, self.keytoken_ids, self.keytoken_alpha)
        return (loss, outputs) if return_outputs else loss

    def _fused_causal_lm_loss(self, model, inputs, num_items_in_batch, keytoken: bool):
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        decoder, output_layer = self.fused_loss_modules
        # The model computes no logits (an empty list of positions to keep); its decoder's last hidden
        # states are taken on their way to the output layer. The call goes through the model (and its
        # DDP wrapper, which must see every forward pass).
        hidden = []
        hook = decoder.register_forward_hook(lambda module, args, output: hidden.append(output[0]))
        try:
            model(**features, logits_to_keep=torch.empty(0, dtype=torch.long, device=labels.device), use_cache=False)
        finally:
            hook.remove()
        targets = next_token_targets(labels)
        if keytoken:
            weights = keytoken_token_weights(labels, targets, self.keytoken_ids, self.keytoken_alpha)
        else:
            weights = token_weights_for_mean(targets, num_items_in_batch)
        loss = linear_cross_entropy(hidden[-1], output_layer.weight, targets, weights)
        if (not keytoken and num_items_in_batch is not None and self.model_accepts_loss_kwargs
                and self.args.average_tokens_across_devices):
            # As Trainer.compute_loss: num_items counts every process's tokens, and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return loss

    def _masked_positions_loss(self, model, inputs):
        """The masked LM's cross-entropy (the mean over the batch's masked tokens, as the model's own) with
        its head run on the masked positions only (modeling.head_only_at)."""
        labels = inputs["labels"]
        selected = labels != -100
        with head_only_at(self.masked_lm_encoder, selected):
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        # A batch without a masked token (unlikely at 15 %) contributes 0, not the NaN of an empty mean.
        return F.cross_entropy(logits.float(), labels[selected], reduction="sum") / selected.sum().clamp(min=1)
