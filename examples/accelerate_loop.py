"""Train a causal-LM recipe with a hand-written 🤗 Accelerate loop instead of the Trainer.

The data, tokenizer, model and keytoken loss are lmtune's own (`lmtune.tasks.clm`,
`lmtune.training.losses`); only the loop is written out here, top to bottom: accelerator, data
loaders, optimizer with weight-decay groups, scheduler, gradient accumulation and clipping, periodic
evaluation gathered across processes, logging, saving.

    python examples/accelerate_loop.py RECIPE --output DIR [--set key=value ...]
    accelerate launch --num_processes 2 examples/accelerate_loop.py RECIPE --output DIR
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py ...   # CPU only: gloo

It reproduces what `lmtune train` (the Trainer) does, down to the order of the training examples, so
in fp32 without dropout the losses it prints match the run dir's log.jsonl
(tests/recipes/test_accelerate_loop.py checks that, with the keytoken loss).
`training.batch_size` is per process, as in `lmtune train`: N processes with batch B see the same
examples per step as one with N x B.

Output: one JSON line per logging step ({"step", "loss", "lr"}) and per evaluation
({"step", "eval_loss", "perplexity"}) on stdout, from the main process; DIR gets the model and
tokenizer (a plain Hugging Face folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, RandomSampler
from transformers import Trainer, get_scheduler

from lmtune.config import load_recipe
from lmtune.metrics import perplexity
from lmtune.tasks import clm
from lmtune.training.engine import resolve_precision
from lmtune.training.losses import keytoken_weighted_loss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a causal-LM recipe (task: clm)")
    parser.add_argument("--output", required=True, help="folder for the trained model and tokenizer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    return parser.parse_args(argv)


def training_loss(model, batch, key_ids, alpha):
    """The recipe's loss: keytoken-weighted (the code-model chapter) or the model's own cross-entropy."""
    if key_ids is None:
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"]).logits
    return keytoken_weighted_loss(logits, batch["labels"], key_ids, alpha)


@torch.no_grad()
def evaluate(model, eval_loader, accelerator):
    """Token-weighted mean cross-entropy over the whole evaluation set and its perplexity. Each process
    scores its share of the batches; per-example sums are gathered, and gather_for_metrics drops the
    examples that were repeated to give every process a full last batch, so each counts once."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for batch in eval_loader:
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none",
                                    ignore_index=-100).view_as(targets)
        example_sums, example_tokens = accelerator.gather_for_metrics(
            (per_token.sum(dim=1), (targets != -100).sum(dim=1)))
        loss_sum += example_sums.double().sum()
        tokens += example_tokens.sum()
    model.train()
    loss = (loss_sum / tokens.clamp(min=1)).item()
    return {"eval_loss": loss, "perplexity": perplexity(loss), "tokens": int(tokens)}


def main(argv=None):
    args = parse_args(argv)
    cfg = load_recipe(args.recipe, args.set)
    if cfg.task != "clm":
        raise SystemExit(f"{args.recipe}: this example trains causal-LM recipes (task: clm), not task {cfg.task}")
    tcfg = cfg.training

    # 1. The accelerator. The recipe's precision ('auto': bf16 where the hardware has it) becomes
    # Accelerate's mixed precision. Without CUDA it must be told to use the CPU (as lmtune's Trainer is,
    # use_cpu): only then do several launched processes join one group (gloo) instead of each training
    # alone. The training sampler is seeded with training.seed, as the Trainer's is.
    precision = resolve_precision(tcfg.precision)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tcfg.seed),
    )
    logging.basicConfig(format="%(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)

    def report(record):
        if accelerator.is_main_process:
            print(json.dumps(record), flush=True)

    # 2. Data, tokenizer and model, exactly as `lmtune train` builds them. The main process goes first:
    # it trains the tokenizer and packs the blocks into lmtune's cache, the others then read them.
    with accelerator.main_process_first():
        prepared = clm.prepare(cfg)
    tokenizer = prepared.tokenizer
    model = clm.build_model(cfg, tokenizer, prepared)  # seeded with training.seed
    set_seed(tcfg.seed)  # as Trainer does once the model exists (dropout's random numbers)
    key_ids = None
    if cfg.loss.type == "keytoken":  # prepare() looked the key ids up (clm.keytoken_kwargs) for the Trainer
        key_ids = torch.tensor(prepared.trainer_kwargs["keytoken_ids"], device=accelerator.device)

    # The Trainer's training loader: a RandomSampler (Accelerate swaps in its seedable one) over the
    # blocks, batch_size per process; Accelerate gives process i the batches i, i + N, i + 2N...
    has_length = hasattr(prepared.train, "__len__")
    train_loader = DataLoader(prepared.train, batch_size=tcfg.batch_size,
                              sampler=RandomSampler(prepared.train) if has_length else None,
                              collate_fn=prepared.collator, num_workers=tcfg.dataloader_num_workers)
    eval_loader = DataLoader(prepared.eval_dataset, batch_size=tcfg.eval_batch_size or tcfg.batch_size,
                             collate_fn=prepared.collator)

    # 3. AdamW with the Trainer's defaults and its weight-decay rule: no decay on biases and
    # LayerNorm weights (the Trainer's own get_decay_parameter_names, which needs no Trainer).
    decay = set(Trainer.get_decay_parameter_names(None, model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n in decay], "weight_decay": tcfg.weight_decay},
        {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
    ]
    # fused=True: the Trainer's default optimizer (adamw_torch_fused) on torch >= 2.8
    optimizer = torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)

    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    # 4. Steps and schedule, counted in optimizer steps as the Trainer counts them (len(train_loader) is
    # the number of batches of this process). The scheduler is left out of accelerator.prepare: a
    # prepared scheduler steps once per process per optimizer step.
    ga = tcfg.gradient_accumulation_steps
    if tcfg.max_steps > 0:
        max_steps = tcfg.max_steps
    else:
        max_steps = math.ceil(tcfg.num_epochs * math.ceil(len(train_loader) / ga))
    warmup = int(tcfg.warmup_steps) if tcfg.warmup_steps >= 1 else math.ceil(max_steps * tcfg.warmup_steps)
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)

    # 5. The loop. accelerator.accumulate() skips the gradient all-reduce and makes the prepared
    # optimizer's step and zero_grad no-ops until `ga` batches have been seen (or the epoch ends), and
    # accelerator.backward divides the loss by `ga`. (When an epoch's batch count is not a multiple of
    # `ga` the last, shorter window is still divided by `ga`; the Trainer divides by its length.)
    if accelerator.is_main_process:
        logging.info("training %d steps: %d process(es) x batch %d x accumulation %d", max_steps,
                     accelerator.num_processes, tcfg.batch_size, ga)
    step, epoch = 0, 0
    running = torch.zeros((), device=accelerator.device)  # sum of loss / ga since the last log (Trainer's tr_loss)
    last_logged = 0
    model.train()
    while step < max_steps:
        train_loader.set_epoch(epoch)  # epoch e shuffles with seed training.seed + e, as in the Trainer
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = training_loss(model, batch, key_ids, cfg.loss.alpha)
                running += loss.detach() / ga
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            if not accelerator.optimizer_step_was_skipped:  # fp16: a step with an overflow is skipped
                scheduler.step()
            step += 1
            if step % tcfg.logging_steps == 0:
                # Mean over processes and over the steps since the last log: the Trainer's "loss".
                mean = accelerator.gather(running.reshape(1)).mean().item() / (step - last_logged)
                report({"step": step, "loss": mean, "lr": lr})
                running.zero_()
                last_logged = step
            if tcfg.eval_steps and step % tcfg.eval_steps == 0 and step < max_steps:
                report({"step": step, **evaluate(model, eval_loader, accelerator)})
            if step >= max_steps:
                break
        epoch += 1

    report({"step": step, **evaluate(model, eval_loader, accelerator), "final": True})

    # 6. Save: every process waits for the others; the main one writes a plain Hugging Face folder.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output)
    accelerator.end_training()


if __name__ == "__main__":
    main()
