"""The pipeline, the same for every task:

    recipe -> config -> sources -> prepare -> model -> evaluate (before) -> Trainer -> evaluate (after)
    -> run dir (config.yaml, model/, checkpoints/, metrics.json, log.jsonl)

A run is built in a sibling folder `.<name>.partial` and renamed into place only when complete, so
a failed run never leaves a half-written run dir and never touches an existing one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time
import warnings
from pathlib import Path

from lmtune import distributed
from lmtune.atomic import replace_folder
from lmtune.config import RecipeConfig
from lmtune.errors import InputError, NonFiniteError, StorageError, StoppedBySignal, storage_failure
from lmtune.training.checkpoints import newest_complete_checkpoint

log = logging.getLogger("lmtune")


# --------------------------------------------------------------------------------------------------
# Run dir bookkeeping


def partial_dir(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.partial")


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other; choose one.")
    parent = run_dir.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise InputError(f"output '{run_dir}': '{ancestor}' is a file, not a folder; choose another --output.")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise InputError(f"output '{run_dir}': folder '{ancestor}' is not writable; choose another --output.")
            break
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output '{run_dir}' is a file; choose another --output or remove it.")
    if run_dir.is_dir() and (overwrite or resume) and not (is_run_dir(run_dir) or not any(run_dir.iterdir())):
        # --overwrite replaces, and a finished run resumed is replaced by its continuation: only ever a run dir
        raise InputError(f"output '{run_dir}' is a folder lmtune did not write (not a run dir, not empty); lmtune "
                         "replaces only its own run dirs -- choose another --output.")
    if run_dir.exists() and not (overwrite or resume):
        raise InputError(
            f"run dir '{run_dir}' already exists; pass --overwrite to replace it or --resume to continue it."
        )
    if resume and not run_dir.exists() and not partial_dir(run_dir).exists():
        raise InputError(f"--resume: there is nothing to resume at '{run_dir}' (no run dir, no interrupted run); drop "
                         "--resume to start the run.")
    if partial_dir(run_dir).exists() and not (overwrite or resume):
        raise InputError(
            f"an interrupted run is in '{partial_dir(run_dir)}'; pass --resume to continue it or --overwrite "
            "to start over."
        )


def is_run_dir(path: Path) -> bool:
    """A folder lmtune wrote as a run: its status.json (every run since it was introduced), or the
    config.yaml and metrics.json of a finished run written before that."""
    status = path / "status.json"
    if status.is_file():
        try:
            return "state" in json.loads(status.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False
    return (path / "config.yaml").is_file() and (path / "metrics.json").is_file()


def open_work_dir(run_dir: Path, overwrite: bool, resume: bool) -> Path:
    """The folder this run writes into. Resuming reuses an interrupted run's folder, or copies the
    finished run's checkpoints into a fresh one (the finished run stays untouched until the end)."""
    work = partial_dir(run_dir)
    if overwrite and work.exists():
        shutil.rmtree(work)
    if resume and not work.exists() and (run_dir / "checkpoints").is_dir():
        shutil.copytree(run_dir / "checkpoints", work / "checkpoints")
    work.mkdir(parents=True, exist_ok=True)
    return work


def publish(work: Path, run_dir: Path) -> None:
    """Move the finished work dir into place; an existing run dir is replaced only after that."""
    replace_folder(work, run_dir)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM), in MiB; None where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Start a new peak from the current size (Linux: `5` in /proc/self/clear_refs), so each phase of a
    run reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_status(work: Path, state: str, **extra) -> None:
    """status.json, what `lmtune runs` reads: running (with this process's id, so a run whose process
    is gone shows as stopped), done, failed (and why) or interrupted."""
    path = work / "status.json"
    status = {}
    if path.is_file():
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            status = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    status.update(state=state, pid=os.getpid(), host=socket.gethostname(), updated=now, **extra)
    if state == "running":
        status["started"] = now
        status.pop("error", None)
        status.pop("ended", None)
    else:
        status["ended"] = now
    try:
        write_json(path, status)
    except OSError:
        pass  # bookkeeping; the run's own outcome is what matters


def write_report_quietly(work: Path) -> None:
    """report.html; a page that cannot be drawn costs the page, never the run."""
    try:
        from lmtune.report import write_report

        write_report(work)
    except Exception as exc:  # noqa: BLE001 -- reported, not raised
        log.warning("report.html could not be written (%s: %s)", type(exc).__name__, exc)


class _QuietFileHandler(logging.FileHandler):
    """train.log is bookkeeping: a write that fails (a full disk) is dropped, never printed as a
    traceback of its own, and never replaces the error that ended the run."""

    def handleError(self, record):  # noqa: N802 -- logging's name
        pass

    def close(self):
        try:
            super().close()
        except OSError:
            pass


class _RunLog:
    """Mirror the lmtune logger into the work dir's train.log while a run is active."""

    def __init__(self, path: Path):
        self.handler = _QuietFileHandler(path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self):
        log.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        log.removeHandler(self.handler)
        self.handler.close()


# --------------------------------------------------------------------------------------------------
# The pipeline


def train(cfg: RecipeConfig, run_dir: Path, overwrite: bool = False, resume: bool = False) -> Path:
    from lmtune.modeling import apply_training_mode, count_parameters, describe_parameters
    from lmtune.tasks import task_module
    from lmtune.training.engine import resolve_precision

    distributed.init()
    check_run_dir(run_dir, overwrite, resume)
    distributed.barrier()  # every process has checked the run dir before the main one creates anything
    task = task_module(cfg.task)
    timings: dict[str, float] = {}
    t0 = time.time()

    # Everything that can reject the user's input runs before anything is written. With several
    # processes the main one prepares first and fills the caches; the others read them.
    with distributed.main_first():
        prepared = task.prepare(cfg)
    timings["prepare_s"] = time.time() - t0
    model = task.build_model(cfg, prepared.tokenizer, prepared)
    if cfg.training.activation_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"training.activation_checkpointing: {type(model).__name__} does not support it; "
                         "set it to false.")
    if cfg.training.report_to == "tensorboard":
        from lmtune.training.engine import tensorboard_installed

        if not tensorboard_installed():
            raise InputError("training.report_to: tensorboard is not installed; pip install 'lmtune[tensorboard]' "
                             "(or tensorboard), or set it to auto or none.")
    model = apply_training_mode(model, cfg.training.mode, cfg.lora, cfg.task)
    params = {"mode": cfg.training.mode, **count_parameters(model)}
    log.info(describe_parameters(params))
    precision = resolve_precision(cfg.training.precision)
    timings["prepare_peak_rss_mb"] = peak_rss_mb()

    work = partial_dir(run_dir)
    main = distributed.is_main()
    if main:
        work = open_work_dir(run_dir, overwrite, resume)
        write_status(work, "running", processes=distributed.world_size())
    distributed.barrier()
    with _RunLog(work / "train.log") if main else contextlib.nullcontext():
        try:
            _train_in(work, cfg, task, prepared, model, precision, resume, timings, t0, params)
        except BaseException as exc:
            kept_log = None
            if main:
                interrupted = isinstance(exc, KeyboardInterrupt | StoppedBySignal)
                write_status(work, "interrupted" if interrupted else "failed",
                             error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500])
                if interrupted or resume or newest_complete_checkpoint(work / "checkpoints") is not None:
                    write_report_quietly(work)
                else:
                    kept_log = discard_unfinished_work(work, run_dir)
            _explain_stop(exc, work, kept_log)
    if main:
        write_status(work, "done")
        write_report_quietly(work)
        publish(work, run_dir)
    distributed.barrier()
    return run_dir


def discard_unfinished_work(work: Path, run_dir: Path) -> Path | None:
    """A run that failed before its first checkpoint has nothing to resume: its work dir goes, so that the
    corrected command simply runs again, and its train.log is kept beside the run dir (a rename: it costs
    no space on a full disk). Returns where the log is."""
    kept = run_dir.with_name(f".{run_dir.name}.failed.log")
    try:
        os.replace(work / "train.log", kept)
    except OSError:
        kept = None
    shutil.rmtree(work, ignore_errors=True)
    return kept


def _explain_stop(exc: BaseException, work: Path, kept_log: Path | None = None) -> None:
    """Log why the run stopped, then raise what the CLI turns into an exit code."""
    where = (f"nothing was saved yet, so {work} was removed (its log: {kept_log})" if kept_log else
             f"the checkpoints saved so far are in {work}")
    if isinstance(exc, NonFiniteError):
        good = newest_complete_checkpoint(work / "checkpoints") if work.exists() else None
        message = (f"training stopped: {exc}, and was not applied to the weights; the last good checkpoint is "
                   f"{good if good else 'none (none was saved yet)'}; lower training.learning_rate or set "
                   f"training.max_grad_norm, then run again{' with --resume or --overwrite' if good else ''}")
        log.error("%s", message)
        raise NonFiniteError(message) from None
    refused = None if isinstance(exc, StorageError) else storage_failure(exc)
    if refused is not None:
        message = (f"{refused}: writing the run failed ({_first_line(exc)}); {where}; free space and run again"
                   f"{'' if kept_log else ' with --resume'}")
        log.error("%s", message)
        raise StorageError(message) from None
    if kept_log is not None and isinstance(exc, InputError):
        log.error("run stopped: %s; %s", exc, where)
        raise exc
    log.error("run stopped (%s); %s%s", type(exc).__name__, where, "" if kept_log else "; continue it with --resume",
              exc_info=not isinstance(exc, KeyboardInterrupt | InputError | StoppedBySignal | StorageError))
    raise exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def train_chain(recipe: str | Path, overrides: list[str] | None = None, output: str | Path | None = None,
                overwrite: bool = False, resume: bool = False) -> list[Path]:
    """The steps of a chain recipe in order. A step whose run dir is already finished is kept (so a chain
    stopped midway is continued by running it again), unless overwrite; --resume continues the step that
    was interrupted from its last checkpoint."""
    from lmtune.config import load_chain

    steps = load_chain(recipe, overrides, output)
    done = []
    for i, step in enumerate(steps, 1):
        finished = (step.run_dir / "metrics.json").is_file()
        if finished and not overwrite:
            log.info("chain step %d/%d '%s': finished earlier in %s; kept", i, len(steps), step.name, step.run_dir)
        else:
            log.info("chain step %d/%d '%s' (task %s) -> %s", i, len(steps), step.name, step.config.task,
                     step.run_dir)
            partial = partial_dir(step.run_dir).exists()
            train(step.config, step.run_dir, overwrite=overwrite, resume=resume and partial)
        done.append(step.run_dir)
    return done


def save_model(model, tokenizer, work: Path, trainer=None):
    """model/: a plain Hugging Face folder. A LoRA run also keeps its adapter in adapter/, and model/
    holds the adapters merged into the base weights, so plain transformers loads it without peft.
    With several processes the main one writes; under FSDP or DeepSpeed ZeRO-3, whose processes each
    hold a shard, all of them first gather the whole state dict (not tested here: it needs GPUs)."""
    from lmtune.modeling import is_peft_model

    sharded = trainer is not None and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
    if sharded:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if distributed.is_main():
            model.save_pretrained(str(work / "model"), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(work / "model"))
        return model
    if not distributed.is_main():
        return model
    if is_peft_model(model):
        # With grown embeddings (an added pad token) peft keeps them in the adapter, as it should.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")
            model.save_pretrained(str(work / "adapter"))
        tokenizer.save_pretrained(str(work / "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(str(work / "model"), safe_serialization=True)
    tokenizer.save_pretrained(str(work / "model"))
    return model


def continue_stream(dataset, checkpoint: Path, trainer) -> None:
    """A streamed training set continues where the checkpoint's step left it (its saved position),
    rather than the Trainer replaying and discarding every batch read before."""
    from lmtune.training.engine import STREAM_STATE

    state = checkpoint / STREAM_STATE
    if not state.is_file():
        log.warning("%s holds no stream position; the stream is read again from its start up to that step",
                    checkpoint)
        return
    dataset.resume_from(json.loads(state.read_text(encoding="utf-8")))
    trainer.args.ignore_data_skip = True


def _train_in(work: Path, cfg: RecipeConfig, task, prepared, model, precision, resume, timings, t0, params):
    """Evaluate, train, evaluate, save: everything that writes into the work dir."""
    from transformers.trainer_callback import PrinterCallback

    from lmtune.training.engine import (
        JsonlLogCallback,
        LmtuneTrainer,
        NonFiniteGradientGuard,
        PlainProgressCallback,
        StopOnSignal,
        reliable,
        tensorboard_callback,
        training_arguments,
    )

    main = distributed.is_main()
    if main:
        (work / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    log.info("precision: %s; run dir in progress: %s%s", precision, work,
             f"; {distributed.world_size()} processes" if distributed.world_size() > 1 else "")

    t = time.time()
    before = task.evaluate_run(model, prepared, cfg)
    timings["eval_before_s"] = time.time() - t
    log.info("before training: %s", task.headline(before))

    args = training_arguments(cfg.training, work / "checkpoints", precision,
                              has_eval=prepared.eval_dataset is not None,
                              **({"args_class": prepared.args_class} if prepared.args_class else {}),
                              **prepared.args_extra)
    optional = {"eval_dataset": prepared.eval_dataset, "data_collator": prepared.collator}
    stop_on_signal = StopOnSignal()
    trainer = reliable(prepared.trainer_class or LmtuneTrainer)(
        model=model,
        args=args,
        train_dataset=prepared.train,
        processing_class=prepared.tokenizer,
        callbacks=[JsonlLogCallback(work / "log.jsonl"), NonFiniteGradientGuard(), stop_on_signal]
        + ([PlainProgressCallback()] if args.disable_tqdm else []),
        **{k: v for k, v in optional.items() if v is not None},
        **prepared.trainer_kwargs,
        **({} if prepared.trainer_class else {"fused_loss": cfg.training.fused_loss}),
    )
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)  # ours prints the same, one readable line per step
    board = tensorboard_callback(cfg.training.report_to, work / "tensorboard") if main else None
    if board is not None:
        trainer.add_callback(board)
    checkpoint = newest_complete_checkpoint(work / "checkpoints") if resume else None
    if resume:
        log.info("resuming from %s", checkpoint if checkpoint else "the start (no complete checkpoint found)")
    if checkpoint is not None and hasattr(prepared.train, "resume_from"):
        continue_stream(prepared.train, checkpoint, trainer)
    from lmtune.estimate import PaceCallback, estimate_before_training

    # Timed passes only on a fresh start: a resumed run's model already differs from its first batches' story.
    estimate = estimate_before_training(trainer, params, cfg.training.estimate_steps if checkpoint is None else 0)
    if main:
        write_json(work / "estimate.json", estimate)
    trainer.add_callback(PaceCallback(work / "estimate.json", estimate))
    t = time.time()
    reset_peak_rss()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    timings["train_s"] = time.time() - t
    timings["train_peak_rss_mb"] = peak_rss_mb()
    if stop_on_signal.signum is not None:
        name = signal.Signals(stop_on_signal.signum).name
        saved = newest_complete_checkpoint(work / "checkpoints")
        raise StoppedBySignal(f"stopped by {name} after step {trainer.state.global_step}; the checkpoint {saved} "
                              "holds it; continue with `lmtune train RECIPE --resume` (same --output)",
                              stop_on_signal.signum)
    model = trainer.model
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled

    t = time.time()
    with distributed.evaluate_everything() if sharded else contextlib.nullcontext():
        after = task.evaluate_run(model, prepared, cfg)
    timings["eval_after_s"] = time.time() - t
    log.info("after training: %s", task.headline(after))

    model = save_model(model, prepared.tokenizer, work, trainer)
    if sharded:  # every process takes part in each forward of a sharded model
        with distributed.evaluate_everything():
            samples = task.samples(model, prepared.tokenizer, cfg)
    if not main:
        return
    if not sharded:
        samples = task.samples(model, prepared.tokenizer, cfg)
    timings["total_s"] = time.time() - t0
    metrics = {
        "task": cfg.task,
        "before": before,
        "after": after,
        "parameters": params,
        "precision": precision,
        "data": prepared.info,
        "train": dict(result.metrics),
        "steps": trainer.state.global_step,
        "processes": distributed.world_size(),
        "samples": samples,
        "memory": {k: timings.pop(k) for k in list(timings) if k.endswith("_rss_mb")},
        "timings": timings,
    }
    write_json(work / "metrics.json", metrics)
