"""`lmtune` verbs: train, eval, predict, report, preview, runs, export, tokenizer.

Exit codes: 0 done; 2 the input is wrong (one sentence on stderr, no traceback); 1 a fault of ours
(traceback printed and kept in the run's train.log); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from lmtune.errors import InputError, NonFiniteError, StorageError, StoppedBySignal

log = logging.getLogger("lmtune")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lmtune: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    if not _is_main_process():  # with several processes the main one tells the story (tracebacks still show)
        log.setLevel(logging.CRITICAL + 1)
    # The libraries' own chatter (Hub warnings, "generation flags" notices) is not for the user.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import transformers

    transformers.logging.set_verbosity_error()
    import warnings

    # peft calls a transformers method that transformers 5 has renamed; nothing for the user to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars are noise here
    import datasets

    datasets.logging.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# --------------------------------------------------------------------------------------------------
# Verbs


def cmd_train(args) -> int:
    from lmtune import distributed
    from lmtune.config import is_chain, load_chain, load_recipe, read_recipe_yaml
    from lmtune.run import train, train_chain

    chain = is_chain(read_recipe_yaml(args.recipe))
    if args.nproc > 1 and distributed.world_size() == 1:
        # Reject a bad recipe here, once, before starting processes that would each say so.
        load_chain(args.recipe, args.set, args.output) if chain else load_recipe(args.recipe, args.set)
        from lmtune.launch import launch_train, strip_nproc

        log.info("starting %d processes", args.nproc)
        return launch_train(args.nproc, strip_nproc(args.argv))
    if chain:
        done = train_chain(args.recipe, args.set, args.output, overwrite=args.overwrite, resume=args.resume)
        if distributed.is_main():
            print(json.dumps({"chain": {d.name: str(d) for d in done}}))
        return 0
    cfg = load_recipe(args.recipe, args.set)
    run_dir = Path(args.output) if args.output else Path(cfg.output.dir) / cfg.name
    done = train(cfg, run_dir, overwrite=args.overwrite, resume=args.resume)
    if distributed.is_main():
        metrics = json.loads((done / "metrics.json").read_text())
        print(json.dumps({"run_dir": str(done), "before": metrics["before"], "after": metrics["after"]}))
    return 0


def _model_dir(path: str) -> str:
    from lmtune.hub import run_model_folder

    return run_model_folder(path)


def cmd_eval(args) -> int:
    from lmtune.config import SourceConfig
    from lmtune.data.packing import prepare_blocks
    from lmtune.data.sources import load_corpus
    from lmtune.modeling import check_block_size
    from lmtune.tasks import clm

    try:
        src = SourceConfig(path=args.data, text_field=args.text_field, txt_unit=args.txt_unit)
    except ValueError as exc:
        raise InputError(f"--data: {exc}") from None
    task = task_of(args.model)
    if task not in ("clm", "sft", "dpo", "rl"):
        raise InputError(f"lmtune eval measures a causal LM's perplexity; '{args.model}' is a {task} model -- its "
                         "run's metrics.json holds its own figures.")
    model, tokenizer = clm.load_for_inference(_model_dir(args.model))
    check_block_size(model.config, args.block_size, "--block-size")
    corpus = load_corpus(src, "--data")
    blocks, _ = prepare_blocks(corpus.texts, corpus.fingerprint, tokenizer, args.block_size, args.packing)
    if len(blocks) == 0:
        raise InputError(f"--data yields no full block of {args.block_size} tokens; lower --block-size or add text.")
    if args.max_blocks:
        blocks = blocks[: args.max_blocks]
    print(json.dumps(clm.evaluate(model, blocks, args.batch_size)))
    return 0


def task_of(path: str) -> str:
    """The task of a run dir (its config.yaml) or of a model folder (its architecture)."""
    p = Path(path)
    if (p / "config.yaml").is_file():
        from lmtune.config import load_yaml

        task = (load_yaml((p / "config.yaml").read_text()) or {}).get("task")
        if task:
            return task
    model_config = Path(_model_dir(path)) / "config.json"
    if model_config.is_file():
        architectures = json.loads(model_config.read_text()).get("architectures") or []
        if any(a.endswith("ForMaskedLM") for a in architectures):
            return "mlm"
        if any(a.endswith("ForQuestionAnswering") for a in architectures):
            return "qa"
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return "classify"
    return "clm"


def _read_text_file(name: str, option: str, what: str) -> tuple[Path, str]:
    """The file's path and UTF-8 text, or one sentence on why it cannot be read."""
    from lmtune.data.sources import path_problem, user_path

    path = user_path(name, option)
    problem = path_problem(path)
    if problem:
        raise InputError(f"{option} '{name}' {problem}; give {what}.")
    try:
        return path, path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{option} '{name}' is not UTF-8 text; give {what}.") from None
    except OSError as exc:
        raise InputError(f"{option} '{name}' cannot be read ({exc.strerror}); give {what}.") from None


def _prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        _, text = _read_text_file(args.file, "--file", "a text file with one prompt per line")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompt given; pass one or more prompts, e.g. lmtune predict RUN \"import pandas\".")
    empty = [i for i, p in enumerate(prompts, 1) if not p.strip()]
    if empty:
        raise InputError(f"prompt {empty[0]} is empty; give the text to complete, classify or answer.")
    return prompts


# predict's options that are not at their defaults, by the tasks they apply to
PREDICT_OPTIONS = {  # option: (attribute, default, tasks)
    "--temperature": ("temperature", 0.0, {"clm"}), "--top-p": ("top_p", 1.0, {"clm"}),
    "--top-k": ("top_k", None, {"clm", "mlm"}), "--num-return-sequences": ("num_return_sequences", 1, {"clm"}),
    "--repetition-penalty": ("repetition_penalty", 1.0, {"clm"}),
    "--no-repeat-ngram-size": ("no_repeat_ngram_size", 0, {"clm"}), "--greedy": ("greedy", False, {"clm"}),
    "--seed": ("seed", 0, {"clm"}), "--max-new-tokens": ("max_new_tokens", 64, {"clm", "sft", "dpo", "rl"}),
    "--chat": ("chat", False, {"clm"}), "--raw": ("raw", False, {"clm"}), "--system": ("system", None, {"clm"}),
    "--field": ("field", [], {"sft", "dpo", "rl"}), "--pair": ("pair", False, {"reward"}),
    "--prompt": ("prompt", None, {"reward"}), "--question": ("question", None, {"qa"}),
    "--context": ("context", None, {"qa"}),
}


def check_predict_options(args, task: str) -> None:
    """Sampling options in range, and no option the model's task would ignore."""
    if args.temperature < 0:
        raise InputError(f"--temperature must be 0 (greedy) or more, not {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be above 0 and at most 1, not {args.top_p}.")
    if args.top_k is not None and args.top_k < 0:
        raise InputError(f"--top-k must be 0 or more, not {args.top_k}.")
    if args.repetition_penalty <= 0:
        raise InputError(f"--repetition-penalty must be above 0, not {args.repetition_penalty}.")
    if args.no_repeat_ngram_size < 0:
        raise InputError(f"--no-repeat-ngram-size must be 0 or more, not {args.no_repeat_ngram_size}.")
    if args.num_return_sequences > 1 and not (args.temperature > 0 and not args.greedy):
        raise InputError(f"--num-return-sequences {args.num_return_sequences} needs sampling (--temperature above 0, "
                         "no --greedy): greedy decoding returns the same text every time.")
    ignored = [option for option, (name, default, tasks) in PREDICT_OPTIONS.items()
               if getattr(args, name) != default and task not in tasks]
    if ignored:
        how = {"sft": "it answers greedily", "dpo": "it answers greedily", "rl": "it answers greedily"}.get(task)
        raise InputError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to '{args.run}', a "
                         f"{task} model{f' ({how})' if how else ''}; drop {'it' if len(ignored) == 1 else 'them'}.")


def cmd_predict(args) -> int:
    from lmtune.tasks import clm

    task = task_of(args.run)
    check_predict_options(args, task)
    if task == "mlm":
        return predict_mlm(args)
    if task == "qa":
        return predict_qa(args)
    if task == "classify":
        return predict_classify(args)
    if task == "sft":
        return predict_sft(args)
    if task == "reward":
        return predict_reward(args)
    if task in ("dpo", "rl"):
        return predict_policy(args)

    prompts = _prompts(args)
    model, tokenizer = clm.load_for_inference(_model_dir(args.run))
    inputs = prompts
    if _as_chat(args, tokenizer):
        from lmtune.chat import user_turn_prompt

        inputs = [user_turn_prompt(tokenizer, p, args.system) for p in prompts]
    completions = clm.generate(
        model, tokenizer, inputs, args.max_new_tokens, do_sample=args.temperature > 0 and not args.greedy,
        temperature=args.temperature or 1.0, top_k=50 if args.top_k is None else args.top_k, top_p=args.top_p,
        num_return_sequences=args.num_return_sequences, seed=args.seed,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    for prompt, rendered, outs in zip(prompts, inputs, completions):
        line = {"prompt": prompt, **({"rendered": rendered} if rendered is not prompt else {}), "completions": outs}
        print(json.dumps(line, ensure_ascii=False))
    return 0


def _as_chat(args, tokenizer) -> bool:
    """Causal LM prompts go through the model's chat template when asked (--chat), and by default for a
    chat model given directly (a model folder, .gguf file or package with a chat template); a run's
    causal-LM model (domain fine-tuning) continues text as it was trained to, unless --chat."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat and not has_template:
        raise InputError(f"--chat: the tokenizer of '{args.run}' has no chat template; drop --chat to complete the "
                         "prompts as text.")
    if args.system and not (args.chat or has_template and not args.raw):
        raise InputError("--system is a chat's system message; it needs a model with a chat template (and no --raw).")
    if args.chat:
        return True
    return has_template and not args.raw and not (Path(args.run) / "config.yaml").is_file()


def predict_mlm(args) -> int:
    from lmtune.tasks import mlm

    prompts = _prompts(args)
    model, tokenizer = mlm.load_for_inference(_model_dir(args.run))
    for result in mlm.fill_mask(model, tokenizer, prompts, top_k=args.top_k or 5):
        print(json.dumps(result, ensure_ascii=False))
    return 0


def _qa_pairs(args) -> list[dict]:
    """--question/--context, and/or --file with one JSON object {question, context} per line."""
    pairs = []
    if args.question or args.context:
        if not (args.question and args.context):
            raise InputError("give both --question and --context (or --file with question/context lines).")
        pairs.append({"question": args.question, "context": args.context})
    if args.file:
        path, text = _read_text_file(args.file, "--file", "a JSON Lines file of {question, context} objects")
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--file: line {lineno} of '{path}' is not valid JSON ({exc.msg}); "
                                 "write one {\"question\": ..., \"context\": ...} object per line.") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k].strip()
                                                       for k in ("question", "context")):
                raise InputError(f"--file: line {lineno} of '{path}' needs the fields question and context, both "
                                 "non-empty text.")
            pairs.append(record)
    if args.prompts:
        raise InputError("a question-answering model takes --question and --context (or --file), not prompts.")
    if not pairs:
        raise InputError("no question given; pass --question Q --context C, or --file with question/context lines.")
    return pairs


def predict_qa(args) -> int:
    from lmtune.config import QAConfig
    from lmtune.tasks import qa

    settings = QAConfig()
    run_config = Path(args.run) / "config.yaml"
    if run_config.is_file():  # the windows the model was trained with
        from lmtune.config import load_yaml

        settings = QAConfig(**(load_yaml(run_config.read_text()) or {}).get("qa", {}))
    model, tokenizer = qa.load_for_inference(_model_dir(args.run))
    for result in qa.answer_questions(model, tokenizer, _qa_pairs(args), settings):
        print(json.dumps(result, ensure_ascii=False))
    return 0


def cmd_report(args) -> int:
    from lmtune.report import write_report

    run = Path(args.run)
    if not run.is_dir() or not ((run / "config.yaml").is_file() or (run / "metrics.json").is_file()):
        raise InputError(f"'{run}' is not a run dir (no config.yaml); give a folder under runs/ (or its "
                         ".<name>.partial folder).")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.is_dir():
            raise InputError(f"--out '{out}' is a folder; give the path of the page to write (e.g. report.html).")
        if out.exists() and not is_lmtune_report(out):
            raise InputError(f"--out '{out}' exists and is not a report lmtune wrote; lmtune replaces only its own "
                             "pages -- choose another --out.")
    path = write_report(run, out)
    print(json.dumps({"report": str(path)}))
    return 0


def is_lmtune_report(path: Path) -> bool:
    """A page `lmtune report` wrote: its last lines say so."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 400))
            return b"Written by <code>lmtune report</code>" in fh.read()
    except OSError:
        return False


def cmd_preview(args) -> int:
    from lmtune.config import load_recipe
    from lmtune.preview import render_preview

    cfg = load_recipe(args.recipe, args.set)
    print(render_preview(cfg, args.n, color=sys.stdout.isatty() and not args.no_color))
    return 0


def cmd_runs(args) -> int:
    from lmtune.runs import list_runs, render_runs_table

    root = Path(args.dir)
    if not root.is_dir():
        raise InputError(f"'{root}' is not a folder; give the folder that holds the run dirs (default runs/).")
    rows = list_runs(root)
    print(json.dumps(rows, indent=2) if args.json else render_runs_table(rows))
    return 0


def cmd_export(args) -> int:
    """A run's model as a plain Hugging Face folder; a LoRA run's adapter folded into its base (--merge)."""
    import shutil

    from lmtune.atomic import write_folder_aside
    from lmtune.config import load_yaml

    from lmtune.config import validate_recipe

    run, out = Path(args.run), Path(args.out)
    if not (run / "model" / "config.json").is_file() or not (run / "config.yaml").is_file():
        raise InputError(f"'{run}' is not a finished run dir (no model/ or config.yaml); give a folder under runs/.")
    refuse_output_overlapping_input(out, run, "--out")
    if out.exists() and not args.overwrite:
        raise InputError(f"--out '{out}' already exists; pass --overwrite or choose another folder.")
    if out.exists() and not (out.is_dir() and ((out / "config.json").is_file() or not any(out.iterdir()))):
        raise InputError(f"--out '{out}' is not a model folder (no config.json) nor empty; --overwrite replaces only "
                         "an exported model -- choose another folder.")
    if args.merge and not (run / "adapter").is_dir():
        raise InputError(f"--merge folds a LoRA adapter into its base, and '{run}' was not trained with LoRA (no "
                         "adapter/); drop --merge.")
    if (run / "adapter").is_dir():
        if not args.merge:
            raise InputError(f"'{run}' was trained with LoRA; pass --merge to fold its adapter into the base model.")
        from lmtune.modeling import merge_adapter

        cfg = validate_recipe(load_yaml((run / "config.yaml").read_text()), origin=f"'{run}/config.yaml'")
        model, tokenizer = merge_adapter(run, cfg.model, cfg.task)

        def write(tmp: Path) -> None:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    else:
        def write(tmp: Path) -> None:
            shutil.copytree(run / "model", tmp)
    write_folder_aside(out, write)
    print(json.dumps({"out": str(out), "merged": (run / "adapter").is_dir()}))
    return 0


def predict_sft(args) -> int:
    """Prompts rendered with the template the run was trained with (its config.yaml), then answered."""
    from lmtune.config import load_yaml

    from lmtune.config import validate_recipe
    from lmtune.tasks import sft

    run_config = Path(args.run) / "config.yaml"
    if not run_config.is_file():
        raise InputError(f"'{args.run}' has no config.yaml, so its prompt template is unknown; give a run dir.")
    cfg = validate_recipe(load_yaml(run_config.read_text()), origin=f"'{run_config}'")
    extra = dict(_key_value(item) for item in args.field)
    records = []
    for text in _prompts(args):
        if cfg.sft.format == "alpaca":
            records.append({"instruction": text, **extra})
        elif cfg.sft.format == "chat" and cfg.sft.user_template:  # the text fills the user turn's first field
            records.append({**dict.fromkeys(sft.template_fields(cfg.sft.user_template)[:1], text), **extra})
        elif cfg.sft.format == "chat":
            records.append({cfg.sft.messages_field: [{"role": "user", "content": text}]})
        elif cfg.sft.format == "transcript":  # the dialogue so far; the reply marker is added
            records.append({cfg.sft.transcript_field: text})
        else:
            prompt_part, _ = sft.split_template(cfg.sft.template, cfg.sft.response_field)
            first = sft.template_fields(prompt_part)[:1]
            records.append({**dict.fromkeys(first, text), **extra})
    model, tokenizer = sft.load_for_inference(_model_dir(args.run))
    prompts = [sft.to_pair(r, cfg, tokenizer, f"prompt {i + 1}", "predict", with_response=False).prompt
               for i, r in enumerate(records)]
    for result in sft.answer(model, tokenizer, prompts, args.max_new_tokens):
        print(json.dumps(result, ensure_ascii=False))
    return 0


def _run_config(run: str, what: str):
    from lmtune.config import load_yaml, validate_recipe

    run_config = Path(run) / "config.yaml"
    if not run_config.is_file():
        raise InputError(f"'{run}' has no config.yaml, so its {what} is unknown; give a run dir.")
    return validate_recipe(load_yaml(run_config.read_text()), origin=f"'{run_config}'")


def predict_reward(args) -> int:
    """Each text's reward, encoded as in training; with --pair, the two texts compared (Bradley-Terry:
    the probability that a rater prefers the first is sigmoid(r1 - r2))."""
    import math

    from lmtune.tasks import preference

    texts = _prompts(args)
    if args.pair and len(texts) != 2:
        raise InputError(f"--pair compares exactly two texts; {len(texts)} were given.")
    cfg = _run_config(args.run, "reward model's text length")
    model, tokenizer = preference.load_for_inference(_model_dir(args.run), "reward")
    scorer = preference.RewardScorer(model, tokenizer, cfg.preference.max_length)
    rewards = scorer.score([(args.prompt or "") + t for t in texts])
    if args.pair:
        margin = float(rewards[0] - rewards[1])
        print(json.dumps({"first": texts[0], "second": texts[1], "rewards": [float(r) for r in rewards],
                          "first_preferred_probability": 1 / (1 + math.exp(-margin))}, ensure_ascii=False))
        return 0
    for text, reward in zip(texts, rewards):
        print(json.dumps({"text": text, "reward": float(reward)}, ensure_ascii=False))
    return 0


def predict_policy(args) -> int:
    """dpo / rl runs: prompts rendered with the run's prompt template (and chat template, in the chat
    format), then answered (greedy, to EOS or the end of the turn)."""
    from lmtune.tasks import preference, sft

    cfg = _run_config(args.run, "prompt template")
    template = preference.prompt_template(cfg)
    first = sft.template_fields(template)[:1]
    extra = dict(_key_value(item) for item in args.field)
    records = [{**dict.fromkeys(first, text), **extra} for text in _prompts(args)]
    model, tokenizer = preference.load_for_inference(_model_dir(args.run), cfg.task)
    prompts = preference.policy_prompts(cfg, tokenizer, records, "predict")
    for result in sft.answer(model, tokenizer, prompts, args.max_new_tokens):
        print(json.dumps(result, ensure_ascii=False))
    return 0


def _key_value(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise InputError(f"--field '{item}' is not of the form name=value.")
    key, value = item.split("=", 1)
    return key.strip(), value


def predict_classify(args) -> int:
    from lmtune.tasks import classify

    texts = _prompts(args)
    settings = {}
    run_config = Path(args.run) / "config.yaml"
    if run_config.is_file():  # truncate as in training
        from lmtune.config import load_yaml

        c = (load_yaml(run_config.read_text()) or {}).get("classify", {})
        settings = {"max_length": c.get("max_length"), "truncation_side": c.get("truncation_side", "right")}
    model, tokenizer = classify.load_for_inference(_model_dir(args.run))
    for result in classify.classify_texts(model, tokenizer, texts, **settings):
        print(json.dumps(result, ensure_ascii=False))
    return 0


def refuse_output_overlapping_input(out: Path, source: Path, option: str) -> None:
    """An output that is, holds or lies inside what the command reads would destroy its own input."""
    a, b = Path(os.path.expanduser(out)).resolve(), Path(os.path.expanduser(source)).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise InputError(f"{option} '{out}' overlaps '{source}', which this command reads; write somewhere outside "
                         "it.")


def cmd_tokenizer_train(args) -> int:
    from lmtune.config import SourceConfig
    from lmtune.data.sources import load_corpus
    from lmtune.tokenizer import train_bpe_tokenizer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; a tokenizer is saved as a folder -- choose another --out.")
    if out.exists() and not args.overwrite:
        raise InputError(f"--out '{out}' already exists; pass --overwrite or choose another folder.")
    if out.exists() and any(out.iterdir()) and not (out / "tokenizer.json").is_file():
        raise InputError(f"--out '{out}' is a folder that holds no tokenizer; --overwrite replaces only a tokenizer "
                         "folder -- choose another --out.")
    if args.data != ["python-code"]:
        for data in args.data:
            refuse_output_overlapping_input(out, Path(data), "--out")
    try:
        if args.data == ["python-code"]:
            src = SourceConfig(type="python-code", keywords=args.keywords or [])
        else:
            src = SourceConfig(path=args.data, text_field=args.text_field, txt_unit=args.txt_unit,
                               keywords=args.keywords or [])
    except ValueError as exc:
        raise InputError(f"--data: {exc}") from None
    corpus = load_corpus(src, "--data")
    log.info(corpus.stats.summary("--data"))
    tokenizer = train_bpe_tokenizer(corpus.texts, args.vocab_size, args.min_frequency, args.max_bytes,
                                    show_progress=sys.stderr.isatty())
    from lmtune.atomic import write_folder_aside

    write_folder_aside(out, lambda tmp: tokenizer.save_pretrained(str(tmp)))
    print(json.dumps({"out": str(out), "vocab_size": len(tokenizer)}))
    return 0


# --------------------------------------------------------------------------------------------------
# Parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors are input errors too: exit 2, one line
        raise InputError(f"{self.prog}: {message} (see --help).")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmtune", description="Adapt language models with the Hugging Face stack.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="run a recipe: prepare data, train, evaluate before/after, save")
    t.add_argument("recipe")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    t.add_argument("--output", help="the run dir (default: <output.dir>/<name>)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing run dir (only once this run ends)")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("--nproc", type=int, default=1, help="train in N processes on this machine (one per GPU; "
                   "on CPUs over gloo); the per-device batch is per process")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="perplexity of a run's (or any) model on some text")
    e.add_argument("model", help="a run dir or a model folder / Hub id")
    e.add_argument("--data", nargs="+", required=True)
    e.add_argument("--text-field", default="text")
    e.add_argument("--txt-unit", default="file", choices=["file", "line", "paragraph"])
    e.add_argument("--block-size", type=int, default=128)
    e.add_argument("--packing", default="concat", choices=["concat", "overflow"])
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-blocks", type=int)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="complete prompts (causal LM), fill masks (masked LM), answer questions "
                        "(QA) or classify texts with a run's model")
    pr.add_argument("run", help="a run dir or a model folder")
    pr.add_argument("prompts", nargs="*")
    pr.add_argument("--file", help="more prompts, one per line (QA: JSON Lines of {question, context})")
    pr.add_argument("--question", help="QA: the question")
    pr.add_argument("--context", help="QA: the text that holds the answer")
    pr.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                    help="SFT: another field of the run's prompt template")
    pr.add_argument("--max-new-tokens", type=int, default=64)
    pr.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    pr.add_argument("--top-k", type=int, help="sampling top-k (50); for a masked LM, fills per mask (5)")
    pr.add_argument("--top-p", type=float, default=1.0)
    pr.add_argument("--num-return-sequences", type=int, default=1)
    pr.add_argument("--repetition-penalty", type=float, default=1.0)
    pr.add_argument("--no-repeat-ngram-size", type=int, default=0)
    pr.add_argument("--greedy", action="store_true")
    chat = pr.add_mutually_exclusive_group()
    chat.add_argument("--chat", action="store_true", help="causal LM: render each prompt as a user turn with the "
                      "model's chat template (the default for a chat model given as a folder, .gguf or package)")
    chat.add_argument("--raw", action="store_true", help="causal LM: complete the prompt text as it is")
    pr.add_argument("--system", help="with --chat: a system message before each prompt")
    pr.add_argument("--prompt", help="reward model: text put before each scored text")
    pr.add_argument("--pair", action="store_true", help="reward model: compare the two texts given")
    pr.add_argument("--seed", type=int, default=0)
    pr.set_defaults(func=cmd_predict)

    rp = sub.add_parser("report", help="write a run's report.html (plots, metrics before/after, samples, config)")
    rp.add_argument("run", help="a run dir (finished, or the .<name>.partial folder of one that stopped)")
    rp.add_argument("--out", help="where to write the page (default: RUN/report.html)")
    rp.set_defaults(func=cmd_report)

    pv = sub.add_parser("preview", help="the first prepared examples as the model will see them, and data statistics")
    pv.add_argument("recipe")
    pv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    pv.add_argument("--n", type=int, default=5, help="examples to show (default 5)")
    pv.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    pv.set_defaults(func=cmd_preview)

    rs = sub.add_parser("runs", help="a table of the runs in a folder: task, model, status, key metric, steps, time")
    rs.add_argument("dir", nargs="?", default="runs")
    rs.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    rs.set_defaults(func=cmd_runs)

    ex = sub.add_parser("export", help="write a run's model as a plain Hugging Face folder (LoRA: --merge)")
    ex.add_argument("run", help="a finished run dir")
    ex.add_argument("--out", required=True, help="the folder to write")
    ex.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the base weights")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(func=cmd_export)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tks = tk.add_subparsers(dest="tokenizer_verb", required=True, parser_class=_Parser)
    tt = tks.add_parser("train", help="train a byte-level BPE tokenizer")
    tt.add_argument("--data", nargs="+", required=True, help="files/folders/globs, or 'python-code'")
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--txt-unit", default="file", choices=["file", "line", "paragraph"])
    tt.add_argument("--keywords", nargs="*")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.add_argument("--max-bytes", type=int)
    tt.add_argument("--out", required=True)
    tt.add_argument("--overwrite", action="store_true")
    tt.set_defaults(func=cmd_tokenizer_train)
    return p


def _check_paths(args) -> None:
    """An output named as an empty string would silently become the default (or the current folder)."""
    for option in ("output", "out"):
        value = getattr(args, option, None)
        if value is not None and not value.strip():
            raise InputError(f"--{option} is empty; give a folder to write to.")


def _check_numbers(args) -> None:
    for name in ("block_size", "batch_size", "max_new_tokens", "num_return_sequences", "vocab_size", "max_blocks",
                 "nproc", "n"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive (got {value}).")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        _check_numbers(args)
        _check_paths(args)
        _setup_logging(args.verbose)
        return args.func(args)
    except InputError as exc:
        if _is_main_process():  # every process finds the same fault; one says it
            print(f"lmtune: error: {exc}", file=sys.stderr)
        return 2
    except StoppedBySignal as exc:
        if _is_main_process():
            print(f"lmtune: {exc}.", file=sys.stderr)
        return 128 + exc.signum
    except (NonFiniteError, StorageError) as exc:  # not the input's fault, nor a bug of ours
        if _is_main_process():
            print(f"lmtune: error: {exc}.", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `lmtune runs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("lmtune: interrupted; continue a training run with `lmtune train RECIPE --resume`.", file=sys.stderr)
        return 130
    except Exception as exc:  # a fault of ours -- or the disk's, whatever library met it
        from lmtune.errors import storage_failure

        refused = storage_failure(exc)
        if refused is not None:
            if _is_main_process():
                print(f"lmtune: error: {refused}: {_first_line(exc)}; free space (or choose another place to write) "
                      "and run the command again.", file=sys.stderr)
            return 1
        traceback.print_exc()
        print("lmtune: internal error (the traceback above is also in the run's train.log); please report it.",
              file=sys.stderr)
        return 1
