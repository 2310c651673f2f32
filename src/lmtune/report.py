"""report.html: one self-contained page per run dir.

What a run left behind (metrics.json, log.jsonl, config.yaml, estimate.json, status.json, train.log,
checkpoints/) becomes a page with the metrics before and after training, the training curves (loss,
learning rate, throughput, gradient norm, the trainer's other logged figures), the sample outputs,
timings, peak memory and the resolved config. Any of the files may be missing (a run that failed or
was interrupted leaves a `.<name>.partial` folder without metrics.json): the page shows what there is
and says what is not there.

The page needs nothing but the file: plots are PNGs drawn with matplotlib's Agg canvas (no pyplot, so
no global figure state and no display) and embedded as data: URIs; CSS is inline; every text taken
from the run is HTML-escaped. The layout is one column on a phone and a grid on a wide screen.

    read_run(run_dir) -> dict          what exists, parsed (pure reading)
    *_figure(...) -> bytes | None      one PNG each
    render_html(run) -> str            the page
    write_report(run_dir, out) -> Path written atomically (temporary file, then os.replace)
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from lmtune.progress import format_seconds

REPORT_NAME = "report.html"

# The metrics each task's `evaluate` returns, most telling first (see tasks/*.py), and which way is better.
HEADLINE = {
    "clm": ["perplexity", "loss"],
    "mlm": ["perplexity", "loss"],
    "sft": ["perplexity", "loss"],
    "qa": ["exact_match", "f1"],
    "classify": ["accuracy", "f1", "subset_accuracy", "f1_micro", "f1_macro", "mse", "mae", "pearson"],
    "reward": ["accuracy", "margin", "reward_chosen", "reward_rejected"],
    "dpo": ["reward_accuracy", "reward_margin", "logp_accuracy", "logp_margin", "logp_chosen", "logp_rejected"],
    "rl": ["mean_reward", "reward_std"],
}
HIGHER_IS_BETTER = {"accuracy", "f1", "exact_match", "subset_accuracy", "f1_micro", "f1_macro", "pearson", "margin",
                    "reward_accuracy", "reward_margin", "logp_accuracy", "logp_margin", "mean_reward"}
LOWER_IS_BETTER = {"loss", "perplexity", "mse", "mae"}
# What an evaluation was run on: shown as "evaluated on ...", not as a metric that changes.
COUNT_KEYS = {"tokens": "tokens", "masked_tokens": "masked tokens", "response_tokens": "response tokens",
              "examples": "examples", "questions": "questions", "windows": "windows", "pairs": "pairs",
              "prompts": "prompts", "completions": "completions"}
METRIC_NAMES = {"exact_match": "exact match", "f1": "F1", "f1_micro": "micro-F1", "f1_macro": "macro-F1",
                "mse": "MSE", "mae": "MAE", "pearson": "Pearson r", "subset_accuracy": "subset accuracy"}

# Keys of log.jsonl that have a plot of their own, or are bookkeeping rather than a figure to plot.
_PLOTTED = {"loss", "eval_loss", "learning_rate", "grad_norm"}
_BOOKKEEPING = {"step", "epoch", "time_s", "num_input_tokens_seen", "num_tokens", "total_flos", "eval_runtime",
                "eval_samples_per_second", "eval_steps_per_second", "train_runtime", "train_samples_per_second",
                "train_steps_per_second", "train_loss", "step_time", "eval_num_tokens", "train_tokens_per_second"}
TOKEN_KEYS = ("num_input_tokens_seen", "num_tokens")  # the Trainer's count; TRL's own
MAX_EXTRA_PLOTS = 6


# --------------------------------------------------------------------------------------------------
# Reading a run dir


def run_name(run_dir: Path) -> str:
    """`runs/tiny` and its work folder `runs/.tiny.partial` are both the run 'tiny'."""
    name = Path(run_dir).resolve().name
    match = re.fullmatch(r"\.(.+)\.partial", name)
    return match.group(1) if match else name


def _number(value: Any) -> Any:
    """log.jsonl writes non-finite floats as the strings 'nan', 'inf', '-inf'; make them floats again."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def record_kind(record: dict) -> str:
    """final (the Trainer's summary at the end: train_loss, total_flos), eval, or train. Training lines
    may carry train_runtime too (the Trainer adds it when it counts input tokens)."""
    if "train_loss" in record or "total_flos" in record:
        return "final"
    if any(k.startswith("eval_") for k in record):
        return "eval"
    return "train"


def read_log(path: Path) -> tuple[list[dict], int]:
    """The records of log.jsonl (see parse_log), and how many lines could not be read (a crash can cut
    the last one); no file: no records."""
    if not path.is_file():
        return [], 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        return parse_log(fh)


def read_log_lines(items: Iterable[str | dict]) -> list[dict]:
    """parse_log's records for lines or already-parsed objects."""
    return parse_log(items)[0]


def parse_log(items: Iterable[str | dict]) -> tuple[list[dict], int]:
    """The records in order, and how many lines could not be read. A resumed run logs again from its
    checkpoint, with a clock starting again from zero: a training record whose step goes back (or any
    record whose time does) starts a new segment, and the records it replaces are dropped, so the later
    line wins. Each record gets its segment number in `_segment`."""
    kept: list[dict] = []
    bad = 0
    segment = 0
    last_train_step = None
    last_time = None
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                continue
            try:
                item = json.loads(item)
            except ValueError:
                bad += 1
                continue
        if not isinstance(item, dict) or not isinstance(item.get("step"), int | float):
            bad += 1
            continue
        record = {k: _number(v) for k, v in item.items()}
        kind = record_kind(record)
        step, t = record["step"], record.get("time_s")
        went_back = kind == "train" and last_train_step is not None and step < last_train_step
        clock_restarted = isinstance(t, int | float) and last_time is not None and t < last_time
        if went_back or clock_restarted:
            segment += 1
            if went_back or (kind == "train" and step == last_train_step):
                kept = [r for r in kept if r["step"] < step]
            train_steps = [r["step"] for r in kept if record_kind(r) == "train"]
            last_train_step = max(train_steps) if train_steps else None
        record["_segment"] = segment
        kept.append(record)
        if kind == "train":
            last_train_step = step
        if isinstance(t, int | float):
            last_time = t
    return kept, bad


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} could not be read ({type(exc).__name__}: {exc})")
        return None


def read_run(run_dir: Path) -> dict:
    """Everything the page shows, read from the run dir; a missing file gives None (or an empty list)
    and its name in `missing`."""
    import yaml

    run_dir = Path(run_dir)
    problems: list[str] = []
    run: dict[str, Any] = {"dir": run_dir, "name": run_name(run_dir), "problems": problems}
    run["metrics"] = _read_json(run_dir / "metrics.json", problems)
    run["status"] = _read_json(run_dir / "status.json", problems)
    run["estimate"] = _read_json(run_dir / "estimate.json", problems)
    config_path = run_dir / "config.yaml"
    run["config_text"] = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else None
    run["config"] = None
    if run["config_text"] is not None:
        try:
            loaded = yaml.safe_load(run["config_text"])
            run["config"] = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as exc:
            problems.append(f"config.yaml could not be parsed ({exc.__class__.__name__})")
    run["log"], run["log_bad_lines"] = read_log(run_dir / "log.jsonl")
    train_log = run_dir / "train.log"
    run["train_log_tail"] = (train_log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
                             if train_log.is_file() else None)
    checkpoints = run_dir / "checkpoints"
    run["checkpoints"] = sorted((p.name for p in checkpoints.glob("checkpoint-*") if p.is_dir()),
                                key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else -1
                                ) if checkpoints.is_dir() else []
    run["has_model"] = (run_dir / "model" / "config.json").is_file()
    for m in ("metrics", "status", "estimate"):
        if run[m] is not None and not isinstance(run[m], dict):
            problems.append(f"{m}.json does not hold a JSON object")
            run[m] = None
    run["missing"] = [name for name, present in (
        ("config.yaml", run["config_text"] is not None), ("metrics.json", run["metrics"] is not None),
        ("log.jsonl", (run_dir / "log.jsonl").is_file()), ("model/", run["has_model"])) if not present]
    run["task"] = ((run["metrics"] or {}).get("task") or (run["config"] or {}).get("task") or "unknown")
    run["state"] = run_state(run)
    return run


def run_state(run: dict) -> str:
    """finished / running / failed / interrupted / unfinished. metrics.json is written last, so a run
    with it has finished whatever status.json said when the page was drawn."""
    state = (run.get("status") or {}).get("state")
    if run.get("metrics") is not None:
        return "finished"
    if state in ("running", "failed", "interrupted"):
        return state
    return "unfinished"


# --------------------------------------------------------------------------------------------------
# Series from the log


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged key, in step order; at a repeated step the later value wins."""
    by_step: dict[float, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def samples_per_step(config: dict | None, processes: int | None) -> int | None:
    t = (config or {}).get("training") or {}
    batch, accumulation = t.get("batch_size"), t.get("gradient_accumulation_steps") or 1
    if not isinstance(batch, int):
        return None
    return batch * int(accumulation) * max(int(processes or 1), 1)


def throughput(records: list[dict], per_step: int | None = None) -> tuple[list[float], list[float], str] | None:
    """Training throughput between consecutive logged training steps: tokens/s from the logged token
    count when there is one, else samples/s (steps x `per_step`), else steps/s. The clock is the
    Trainer's own train_runtime where the line has it (it starts with training), else the log's time_s;
    the time spent evaluating in between (eval_runtime) is left out. Returns (steps, values, unit)."""
    train = [r for r in records if record_kind(r) == "train"]
    if not train:
        return None
    token_key = next((k for k in TOKEN_KEYS if any(isinstance(r.get(k), int | float) for r in train)), None)
    unit = "tokens/s" if token_key else "samples/s" if per_step else "steps/s"

    def clock(r):
        for key in ("train_runtime", "time_s"):
            if isinstance(r.get(key), int | float):
                return key, float(r[key])
        return None, None

    steps, values = [], []
    prev = None  # (step, clock name, time, tokens) of the last training record in this segment
    segment = 0
    evaluating = 0.0
    for r in records:
        if r.get("_segment", 0) != segment:
            segment, prev, evaluating = r.get("_segment", 0), None, 0.0
        kind = record_kind(r)
        if kind == "eval":
            evaluating += float(r.get("eval_runtime") or 0.0)
            continue
        name, now = clock(r)
        if kind != "train" or now is None:
            continue
        tokens = r.get(token_key) if token_key else None
        tokens = float(tokens) if isinstance(tokens, int | float) else None
        if prev is None and segment == 0:
            prev = (0, name, 0.0, 0.0)  # both clocks start with training
        if prev is not None and prev[1] == name:
            dt = now - prev[2] - evaluating
            ds = r["step"] - prev[0]
            if dt > 0 and ds > 0:
                if token_key:
                    if tokens is not None and prev[3] is not None:
                        steps.append(r["step"])
                        values.append((tokens - prev[3]) / dt)
                else:
                    steps.append(r["step"])
                    values.append(ds * (per_step or 1) / dt)
        prev = (r["step"], name, now, tokens)
        evaluating = 0.0
    return (steps, values, unit) if steps else None


def extra_groups(records: list[dict]) -> list[tuple[str, list[str]]]:
    """The other numeric figures the trainer logged (TRL's rewards and margins, eval accuracy...), as
    (title, keys) groups drawn in one plot each: `X/chosen` with `X/rejected`, `min_X` / `mean_X` /
    `max_X` together. Evaluation and task-telling figures first; at most MAX_EXTRA_PLOTS groups."""
    keys: dict[str, None] = {}
    for r in records:
        if record_kind(r) == "final":
            continue
        for k, v in r.items():
            if (k.startswith("_") or k in _PLOTTED or k in _BOOKKEEPING or isinstance(v, bool)
                    or not isinstance(v, int | float)):
                continue
            keys.setdefault(k)
    groups: dict[str, list[str]] = {}
    for k in keys:
        title = re.sub(r"^(min|mean|max)_", "", re.sub(r"[/_](chosen|rejected)$", "", k))
        groups.setdefault(title, []).append(k)
    telling = ("accuracy", "reward", "margin", "f1", "exact", "perplexity")

    def rank(title: str) -> tuple:
        return (not title.startswith("eval_"), not any(t in title for t in telling), title)

    named = {(t if len(ks) > 1 else ks[0]): ks for t, ks in groups.items()}
    return [(t, named[t]) for t in sorted(named, key=rank)[:MAX_EXTRA_PLOTS]]


def non_finite(records: list[dict]) -> list[tuple[str, float]]:
    """(key, step) of every non-finite loss or gradient norm in the log."""
    out = []
    for r in records:
        for k in ("loss", "grad_norm", "eval_loss"):
            v = r.get(k)
            if isinstance(v, float) and not math.isfinite(v):
                out.append((k, r["step"]))
    return out


# --------------------------------------------------------------------------------------------------
# Figures: each returns PNG bytes (or None when there is nothing to draw)

_STYLE = {
    "font.size": 12, "axes.titlesize": 13, "axes.titleweight": "bold", "axes.labelsize": 12, "legend.fontsize": 11,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "figure.facecolor": "white", "axes.facecolor": "white", "savefig.facecolor": "white",
}
FIGSIZE = (5.6, 3.4)
DPI = 130
COLORS = {"train": "#1f77b4", "eval": "#d62728", "ref": "#2ca02c", "other": "#9467bd", "lr": "#ff7f0e"}


def _new_figure(figsize=FIGSIZE, margins: dict | None = None):
    """A figure on its own Agg canvas: no pyplot, so nothing global is created or left open. Fixed
    margins rather than a layout engine: that engine measures every label and doubles the drawing time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(**(margins or {"left": 0.15, "right": 0.97, "bottom": 0.16, "top": 0.89}))
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    return buf.getvalue()


def _styled(draw):
    """Run a drawing function under the report's style (rc_context: nothing leaks to the caller)."""
    import matplotlib

    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return draw(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = draw.__name__, draw.__doc__
    return wrapper


def _finite(steps, values):
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _log_scale_if_wide(ax, values):
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
        return True
    return False


def _resume_marks(ax, records):
    starts = sorted({min(r["step"] for r in records if r.get("_segment") == s)
                     for s in {r.get("_segment", 0) for r in records} if s > 0})
    for i, step in enumerate(starts):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="resumed" if i == 0 else None)


def _short_ticks(ax):
    """Whole steps on the x axis; y tick labels in a scientific notation past 1e4 or below 1e-3, so the
    left margin fits."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=7, integer=True, steps=[1, 2, 2.5, 5, 10]))
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)


@_styled
def loss_figure(records: list[dict], before: float | None = None, after: float | None = None,
                last_step: int | None = None) -> bytes | None:
    """Training loss and the Trainer's evaluation loss by step; the pipeline's own validation loss
    before and after training as two points, where the task has one."""
    train_steps, train_loss = _finite(*series([r for r in records if record_kind(r) == "train"], "loss"))
    eval_steps, eval_loss = _finite(*series(records, "eval_loss"))
    if not train_steps and not eval_steps:
        return None
    fig = _new_figure()
    ax = fig.subplots()
    shown = []
    if train_steps:
        ax.plot(train_steps, train_loss, color=COLORS["train"], linewidth=1.6,
                marker="o" if len(train_steps) <= 30 else None, markersize=3 if len(train_steps) > 3 else 6,
                label="training loss")
        shown += train_loss
    if eval_steps:
        ax.plot(eval_steps, eval_loss, color=COLORS["eval"], linewidth=1.6, marker="s", markersize=4,
                label="evaluation loss")
        shown += eval_loss
    reference = [(0, before), (last_step, after)]
    reference = [(s, v) for s, v in reference if s is not None and isinstance(v, int | float) and math.isfinite(v)]
    if reference:
        ax.scatter([s for s, _ in reference], [v for _, v in reference], color=COLORS["ref"], marker="D", s=36,
                   zorder=3, label="validation loss before / after")
        shown += [v for _, v in reference]
    _resume_marks(ax, records)
    _log_scale_if_wide(ax, shown)
    _short_ticks(ax)
    ax.set_title("Loss")
    ax.set_xlabel("step")
    ax.legend(loc="best", frameon=False)
    return _png(fig)


@_styled
def lines_figure(lines: list[tuple[str, list[float], list[float]]], title: str, ylabel: str = "",
                 color: str | None = None, log_scale: bool = False) -> bytes | None:
    """Logged series by step, (label, steps, values) each (learning rate, gradient norm, throughput,
    a group of TRL's figures); one line takes `color`, several get a legend."""
    lines = [(label, *_finite(steps, values)) for label, steps, values in lines]
    lines = [line for line in lines if line[1]]
    if not lines:
        return None
    fig = _new_figure()
    ax = fig.subplots()
    shown = []
    for i, (label, steps, values) in enumerate(lines):
        ax.plot(steps, values, color=color if len(lines) == 1 and color else f"C{i}", linewidth=1.6,
                marker="o" if len(steps) <= 30 else None, markersize=3 if len(steps) > 3 else 6,
                label=label if len(lines) > 1 else None)
        shown += values
    if log_scale:
        _log_scale_if_wide(ax, shown)
    _short_ticks(ax)
    if len(lines) > 1:  # short names (what differs between the keys), in a row above the plot, title on the left
        labels = _distinct_parts([label for label, _, _ in lines])
        for line, label in zip(ax.get_lines(), labels):
            line.set_label(label)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(lines), frameon=False, fontsize=10,
                  handlelength=1.2, columnspacing=0.8, borderaxespad=0.1)
        ax.set_title(title, loc="left")
    else:
        ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    return _png(fig)


def _distinct_parts(labels: list[str]) -> list[str]:
    """'rewards/chosen', 'rewards/rejected' -> 'chosen', 'rejected'; 'min_reward', 'max_reward' -> 'min', 'max'."""
    split = [re.split(r"[/_]", label) for label in labels]
    common = set.intersection(*(set(parts) for parts in split)) if split else set()
    short = ["_".join(p for p in parts if p not in common) or label for parts, label in zip(split, labels)]
    return short if len(set(short)) == len(short) else labels


def line_figure(steps: list[float], values: list[float], title: str, ylabel: str = "", **options) -> bytes | None:
    """One logged series by step."""
    return lines_figure([(title, steps, values)], title, ylabel, **options)


@_styled
def confusion_figure(matrix: list[list[int]], labels: list[str], title: str) -> bytes | None:
    """A confusion matrix as a heatmap, counts written in the cells (rows: true label, columns: predicted)."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0:
        return None
    k = m.shape[0]
    size = min(3.2 + 0.35 * k, 9.0)
    fig = _new_figure((size + 1.2, size + 0.4), {"left": 0.22, "right": 0.97, "bottom": 0.2, "top": 0.9})
    ax = fig.subplots()
    ax.grid(False)
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=max(m.max(), 1))
    fig.colorbar(image, ax=ax, shrink=0.8)
    names = [_short(str(n), 14) for n in labels]
    ax.set_xticks(range(k), names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 15:
        top = m.max() or 1
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if m[i, j] > top * 0.55
                        else "black", fontsize=15 if k <= 4 else 11 if k <= 8 else 8)
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# Formatting


def format_number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1e4:
            return f"{value:,.0f}"
        if a >= 1e-4:
            return f"{value:.4g}"
        return f"{value:.3g}"
    return str(value)


def format_mb(mb: Any) -> str:
    if not isinstance(mb, int | float):
        return "–"
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:,.0f} MiB"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def metric_label(key: str) -> str:
    return METRIC_NAMES.get(key, key.replace("_", " "))


def change(key: str, before: Any, after: Any) -> tuple[str, str]:
    """The change from before to after, and 'better' / 'worse' / '' for colouring."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (before, after)):
        return "", ""
    delta = after - before
    text = ("+" if delta > 0 else "−" if delta < 0 else "±") + format_number(abs(float(delta)))
    if before != 0 and key in LOWER_IS_BETTER:  # bounded scores (accuracy, F1) change in points, not percent
        text += f" ({(after - before) / abs(before):+.1%})".replace("-", "−")
    verdict = ""
    if delta and key in HIGHER_IS_BETTER:
        verdict = "better" if delta > 0 else "worse"
    elif delta and key in LOWER_IS_BETTER:
        verdict = "better" if delta < 0 else "worse"
    return text, verdict


# --------------------------------------------------------------------------------------------------
# HTML pieces

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:#1d2330;background:#f4f5f7}
main{max-width:1160px;margin:0 auto;padding:16px}
header{background:#1d2330;color:#fff;padding:16px}
header .inner{max-width:1160px;margin:0 auto}
header h1{margin:0 0 4px;font-size:1.5em;word-break:break-word}
header .sub{color:#c8cdd8;font-size:.92em;word-break:break-all}
nav{margin-top:10px;display:flex;flex-wrap:wrap;gap:4px 14px;font-size:.92em}
nav a{color:#9cc3ff;text-decoration:none}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:14px 16px;margin:0 0 16px}
h2{font-size:1.2em;margin:0 0 10px}
h3{font-size:1em;margin:14px 0 6px}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:.8em;font-weight:600;vertical-align:middle;
 margin-left:6px;background:#e1e4ea;color:#1d2330}
.badge.finished{background:#d3f3dc;color:#0d5b22}.badge.failed{background:#fde0e0;color:#8a1212}
.badge.interrupted,.badge.unfinished,.badge.running{background:#fff0c9;color:#6b4a00}
.notice{border-left:4px solid #e0a800;background:#fff8e1;padding:10px 14px;border-radius:6px;margin:0 0 16px}
.notice.failed{border-color:#c62828;background:#fdecec}
.notice p{margin:4px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,170px),1fr));gap:10px}
.card{border:1px solid #e1e4ea;border-radius:8px;padding:8px 12px;background:#fafbfc;min-width:0}
.card .k{font-size:.8em;color:#5b6475;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:1.25em;font-weight:600;overflow-wrap:anywhere}
.card .d{font-size:.85em;color:#5b6475;overflow-wrap:anywhere}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;font-size:.93em;min-width:50%}
th,td{padding:5px 10px;border-bottom:1px solid #e8eaef;text-align:left;vertical-align:top}
th{background:#f6f7f9;font-weight:600;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#0d7a2c;font-weight:600}.worse{color:#b3261e;font-weight:600}
.muted{color:#5b6475;font-size:.9em}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,460px),1fr));gap:12px}
figure{margin:0;min-width:0}
figure img{width:100%;height:auto;display:block;border:1px solid #eceef2;border-radius:6px}
figcaption{font-size:.85em;color:#5b6475;margin-top:3px}
.sample{border:1px solid #e1e4ea;border-radius:8px;padding:10px 12px;margin:0 0 10px;min-width:0}
.sample .label{font-size:.78em;color:#5b6475;text-transform:uppercase;letter-spacing:.03em;margin-top:6px}
.text{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 font-size:.88em;background:#f6f7f9;border-radius:5px;padding:6px 8px;margin:2px 0}
.gen{background:#dcebff;border-radius:3px}
.ans{background:#ffe98a;border-radius:3px;font-weight:600}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,320px),1fr));gap:10px}
.bar{display:inline-block;height:.7em;background:#7aa7e0;border-radius:2px;vertical-align:middle;margin-right:6px}
pre.config{white-space:pre-wrap;overflow-wrap:anywhere;font-size:.82em;background:#f6f7f9;padding:10px;
 border-radius:6px;max-height:70vh;overflow:auto}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
.ok{color:#0d7a2c}.no{color:#b3261e}
@media (max-width:600px){body{font-size:14px}main{padding:8px}section{padding:10px}th,td{padding:4px 6px}}
"""


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(png: bytes | None, alt: str, caption: str = "") -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{e(alt)}">{cap}</figure>'


def _table(head: list[str] | None, rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are HTML already (escape before); `numeric` columns are right-aligned; no head: None."""
    ths = "".join(f'<th{" class=n" if i in numeric else ""}>{h}</th>' for i, h in enumerate(head or []))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    thead = f"<thead><tr>{ths}</tr></thead>" if head else ""
    return f'<div class="scroll"><table>{thead}<tbody>{body}</tbody></table></div>'


def _card(key: str, value: str, detail: str = "") -> str:
    d = f'<div class="d">{detail}</div>' if detail else ""
    return f'<div class="card"><div class="k">{e(key)}</div><div class="v">{value}</div>{d}</div>'


def _scalars(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def metric_keys(task: str, before: dict | None, after: dict | None) -> list[str]:
    """The metrics to tabulate: the task's headline ones first, then any other scalar (not counts)."""
    present = {**_scalars(before), **_scalars(after)}
    order = [k for k in HEADLINE.get(task, []) if k in present]
    return order + [k for k in present if k not in order and k not in COUNT_KEYS]


def headline_metric(run: dict) -> tuple[str, Any, Any] | None:
    m = run.get("metrics") or {}
    keys = metric_keys(run["task"], m.get("before"), m.get("after"))
    if not keys:
        return None
    return keys[0], (m.get("before") or {}).get(keys[0]), (m.get("after") or {}).get(keys[0])


# --------------------------------------------------------------------------------------------------
# Sections


def _header(run: dict, nav: list[tuple[str, str]]) -> str:
    state = run["state"]
    labels = {"finished": "finished", "running": "running", "failed": "failed", "interrupted": "interrupted",
              "unfinished": "did not finish"}
    links = "".join(f'<a href="#{a}">{e(t)}</a>' for a, t in nav)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f'<header><div class="inner"><h1>{e(run["name"])} <span class="badge {e(state)}">{e(labels[state])}'
            f'</span></h1><div class="sub">task {e(run["task"])} · {e(shown_dir(run))} · report written '
            f'{e(generated)}</div><nav>{links}</nav></div></header>')


def shown_dir(run: dict) -> Path:
    """Where the run is: a finished run's page is drawn in its `.<name>.partial` work folder just before
    that folder is renamed to `<name>`, so that is the name to show."""
    folder = run["dir"].resolve()
    if run["state"] == "finished" and folder.name == f".{run['name']}.partial":
        return folder.with_name(run["name"])
    return folder


def _notices(run: dict) -> str:
    parts = []
    status = run.get("status") or {}
    state = run["state"]
    if state != "finished":
        what = {"running": "is still running (or its process died without saying so)",
                "failed": "failed", "interrupted": "was interrupted",
                "unfinished": "did not finish"}[state]
        steps = [r["step"] for r in run["log"]]
        told = [f"This run {what}: there is no metrics.json, so the metrics before and after training and the "
                "sample outputs are missing."]
        if steps:
            told.append(f"Shown below is what it logged, up to step {format_number(max(steps))}.")
        if run["checkpoints"]:
            told.append(f"Newest checkpoint: {run['checkpoints'][-1]} (continue with "
                        "<code>lmtune train RECIPE --resume</code>).")
        paragraphs = [f"<p>{e(told[0])}</p>"] + [f"<p>{t if '<code>' in t else e(t)}</p>" for t in told[1:]]
        if status.get("error"):
            paragraphs.append(f"<p><b>Error:</b> {e(status['error'])}</p>")
        cls = "notice failed" if state == "failed" else "notice"
        parts.append(f'<div class="{cls}">{"".join(paragraphs)}</div>')
    missing = [m for m in run["missing"] if not (m == "metrics.json" and state != "finished")]
    if state != "finished":
        missing = [m for m in missing if m != "model/"]  # the model is saved at the end
    notes = []
    if missing:
        notes.append(f"Not in the run dir: {', '.join(missing)}.")
    if run["log_bad_lines"]:
        notes.append(f"log.jsonl: {run['log_bad_lines']} line(s) could not be read and were skipped.")
    bad = non_finite(run["log"])
    if bad:
        shown = ", ".join(f"{k} at step {format_number(s)}" for k, s in bad[:5])
        notes.append(f"Non-finite values in the log: {shown}{' …' if len(bad) > 5 else ''}.")
    notes += run["problems"]
    if notes:
        parts.append('<div class="notice">' + "".join(f"<p>{e(n)}</p>" for n in notes) + "</div>")
    return "".join(parts)


def _summary(run: dict) -> str:
    m = run.get("metrics") or {}
    cards = []
    head = headline_metric(run)
    if head:
        key, before, after = head
        text, verdict = change(key, before, after)
        cards.append(_card(metric_label(key), f"{e(format_number(before))} → {e(format_number(after))}",
                           f'<span class="{verdict}">{e(text)}</span>' if text else ""))
    steps = m.get("steps")
    if steps is None:
        logged = [r["step"] for r in run["log"]]
        steps = max(logged) if logged else None
    if steps is not None:
        epoch = (m.get("train") or {}).get("epoch")
        if epoch is None:
            epochs = [r["epoch"] for r in run["log"] if isinstance(r.get("epoch"), int | float)]
            epoch = max(epochs) if epochs else None
        cards.append(_card("steps", e(format_number(steps)),
                           e(f"{epoch:.2f} epochs") if isinstance(epoch, int | float) else ""))
    timings = m.get("timings") or {}
    train_s = timings.get("train_s") or (m.get("train") or {}).get("train_runtime")
    if train_s is None:
        final = [r for r in run["log"] if record_kind(r) == "final"]
        times = [r["time_s"] for r in run["log"] if isinstance(r.get("time_s"), int | float)]
        train_s = final[-1].get("train_runtime") if final else (max(times) if times else None)
    if train_s is not None:
        total = timings.get("total_s")
        resumed = any(r.get("_segment", 0) for r in run["log"])
        detail = "the session after resuming" if resumed else f"{format_seconds(total)} in all" if total else ""
        cards.append(_card("training time", e(format_seconds(train_s)), e(detail)))
    speed = _average_speed(run)
    if speed:
        cards.append(_card("throughput", e(speed[0]), e(speed[1])))
    memory = m.get("memory") or {}
    peaks = [v for v in memory.values() if isinstance(v, int | float)]
    if peaks:
        cards.append(_card("peak memory", e(format_mb(max(peaks))), "process RSS"))
    params = m.get("parameters") or ((run.get("estimate") or {}).get("parameters"))
    if isinstance(params, dict) and isinstance(params.get("total"), int | float):
        trainable = params.get("trainable")
        share = f"{trainable / params['total']:.1%} trainable" if isinstance(trainable, int | float) and params[
            "total"] else ""
        cards.append(_card("parameters", e(format_number(params["total"])),
                           e(", ".join(x for x in (params.get("mode"), share) if x))))
    if m.get("precision"):
        procs = m.get("processes")
        cards.append(_card("precision", e(m["precision"]), e(f"{procs} processes") if procs and procs > 1 else ""))
    if not cards:
        return ""
    return f'<section id="summary"><h2>At a glance</h2><div class="cards">{"".join(cards)}</div></section>'


def _average_speed(run: dict) -> tuple[str, str] | None:
    """Tokens per second over the whole training (a run trained in one go), else the Trainer's samples/s."""
    m = run.get("metrics") or {}
    train = m.get("train") or {}
    runtime = train.get("train_runtime")
    one_go = all(r.get("_segment", 0) == 0 for r in run["log"])
    for key in TOKEN_KEYS:
        counts = [r[key] for r in run["log"] if isinstance(r.get(key), int | float)]
        if counts and isinstance(runtime, int | float) and runtime > 0 and one_go:
            return f"{format_number(float(max(counts) / runtime))} tokens/s", "average over training"
    if isinstance(train.get("train_samples_per_second"), int | float):
        return f"{format_number(float(train['train_samples_per_second']))} samples/s", "average over training"
    return None


def _metrics_section(run: dict) -> str:
    m = run.get("metrics")
    if not m:
        return ('<section id="metrics"><h2>Metrics before and after training</h2><p class="muted">None: the run '
                'wrote no metrics.json.</p></section>')
    before, after = m.get("before") or {}, m.get("after") or {}
    rows = []
    for key in metric_keys(run["task"], before, after):
        text, verdict = change(key, before.get(key), after.get(key))
        rows.append([e(metric_label(key)), e(format_number(before.get(key))) if key in before else "–",
                     e(format_number(after.get(key))) if key in after else "–",
                     f'<span class="{verdict}">{e(text)}</span>'])
    parts = ['<section id="metrics"><h2>Metrics before and after training</h2>']
    if rows:
        parts.append(_table(["metric", "before", "after", "change"], rows, numeric={1, 2, 3}))
    else:
        parts.append('<p class="muted">metrics.json holds no numeric metrics.</p>')
    counts = [f"{format_number(v)} {label}" for k, label in COUNT_KEYS.items()
              for v in [after.get(k, before.get(k))] if isinstance(v, int | float)]
    if counts:
        parts.append(f'<p class="muted">Evaluated on {e(", ".join(counts))} of held-out data.</p>')
    parts.append(_confusion(run))
    parts.append(_rl_examples(before, after))
    parts.append("</section>")
    return "".join(parts)


def class_names(run: dict, k: int) -> list[str]:
    data = (run.get("metrics") or {}).get("data") or {}
    labels = data.get("labels") or ((run.get("config") or {}).get("classify") or {}).get("labels")
    if isinstance(labels, list) and len(labels) == k:
        return [str(x) for x in labels]
    return [str(i) for i in range(k)]


def _confusion(run: dict) -> str:
    m = run.get("metrics") or {}
    figures, tables = [], []
    for when in ("before", "after"):
        matrix = (m.get(when) or {}).get("confusion_matrix")
        if not (isinstance(matrix, list) and matrix and all(isinstance(r, list) and len(r) == len(matrix)
                                                               for r in matrix)):
            continue
        names = class_names(run, len(matrix))
        figures.append(_img(confusion_figure(matrix, names, f"Confusion matrix {when} training"),
                            f"confusion matrix {when} training"))
        rows = []
        for name, row in zip(names, matrix):
            total = sum(row) or 1
            rows.append([f"<b>{e(name)}</b>"] + [e(format_number(int(c))) for c in row]
                        + [e(f"{row[names.index(name)] / total:.1%}")])
        tables.append(f"<h3>{e(when.capitalize())} training (rows: true label, columns: predicted)</h3>"
                      + _table(["true \\ predicted", *map(e, names), "recall"], rows,
                               numeric=set(range(1, len(names) + 2))))
    if not figures:
        return ""
    return (f'<h3>Confusion matrix</h3><div class="plots">{"".join(figures)}</div>'
            f'<details><summary>As tables</summary>{"".join(tables)}</details>')


def _rl_examples(before: dict, after: dict) -> str:
    """The RL evaluation keeps one sampled completion and its reward."""
    cells = []
    for when, metrics in (("before", before), ("after", after)):
        ex = metrics.get("example")
        if isinstance(ex, dict) and "completion" in ex:
            cells.append(f'<div class="sample"><div class="label">{e(when)} training · reward '
                         f'{e(format_number(ex.get("reward")))}</div><div class="text">{e(ex.get("prompt"))}'
                         f'<span class="gen">{e(ex.get("completion"))}</span></div></div>')
    if not cells:
        return ""
    return f'<h3>A completion sampled during evaluation</h3><div class="pair">{"".join(cells)}</div>'


def _curves_section(run: dict) -> str:
    records = run["log"]
    if not records:
        why = "log.jsonl is missing" if "log.jsonl" in run["missing"] else "log.jsonl holds no records"
        return f'<section id="curves"><h2>Training curves</h2><p class="muted">None: {e(why)}.</p></section>'
    m = run.get("metrics") or {}
    before, after = (m.get("before") or {}).get("loss"), (m.get("after") or {}).get("loss")
    last = m.get("steps")
    if run["task"] not in ("clm", "mlm", "sft"):
        before = after = None  # another measure than the training loss; it is in the metrics table
    caption = ["Training loss (each point: the mean over the steps since the previous one)"]
    if any("eval_loss" in r for r in records):
        caption.append("the Trainer's evaluation loss")
    if before is not None or after is not None:
        caption.append("lmtune's validation loss before and after training (the metrics table's loss)")
    caption = (", ".join(caption[:-1]) + " and " + caption[-1] if len(caption) > 1 else caption[0]) + "."
    figures = [_img(loss_figure(records, before, after, last), "loss by step", caption)]
    lr = series(records, "learning_rate")
    figures.append(_img(line_figure(*lr, "Learning rate", color=COLORS["lr"]), "learning rate by step"))
    per_step = samples_per_step(run.get("config"), m.get("processes") or (run.get("status") or {}).get("processes"))
    speed = throughput(records, per_step)
    if speed:
        steps, values, unit = speed
        note = {"tokens/s": "Tokens per second of training between logged steps (evaluation time left out).",
                "samples/s": f"Samples per second between logged steps ({per_step} samples per optimizer step: "
                             "batch size × gradient accumulation × processes; evaluation time left out).",
                "steps/s": "Optimizer steps per second between logged steps (evaluation time left out)."}[unit]
        figures.append(_img(line_figure(steps, values, f"Throughput ({unit})", unit, color=COLORS["ref"]),
                            f"throughput in {unit} by step", note))
    gn = series([r for r in records if record_kind(r) == "train"], "grad_norm")
    figures.append(_img(line_figure(*gn, "Gradient norm", "before clipping", color=COLORS["other"],
                                    log_scale=True), "gradient norm by step"))
    extras = []
    for title, keys in extra_groups(records):
        if all(v == 0 for k in keys for v in series(records, k)[1]):
            continue  # a figure that stayed at zero (TRL's clip ratios, say) tells nothing
        lines = [(k, *series(records, k)) for k in keys]
        color = COLORS["eval" if title.startswith("eval_") else "train"]
        extras.append(_img(lines_figure(lines, title, color=color), f"{title} by step"))
    body = f'<div class="plots">{"".join(figures)}</div>'
    if any(extras):
        body += (f'<h3>Other figures the trainer logged</h3><div class="plots">{"".join(extras)}</div>')
    return f'<section id="curves"><h2>Training curves</h2>{body}</section>'


# ---- samples, one renderer per shape the tasks produce


def _text(label: str, body: str, cls: str = "text") -> str:
    return f'<div class="label">{e(label)}</div><div class="{cls}">{body}</div>'


def _completion_sample(s: dict, before: dict | None = None) -> str:  # clm: {"prompt", "completions": [...]}
    out = []
    for when, sample in (("before training · ", before), ("after training · " if before else "", s)):
        completions = (sample or {}).get("completions") or []
        for i, c in enumerate(completions):
            label = when + ("completion" if len(completions) == 1 else f"completion {i + 1}")
            out.append(_text(label, f'{e(sample.get("prompt"))}<span class="gen">{e(c)}</span>'))
    return "".join(out) or _text("prompt", e(s.get("prompt")))


def _fill_sample(s: dict) -> str:  # mlm: {"prompt", "fills": [[{token, score, sequence}, ...] per mask]}
    out = [_text("prompt", e(s.get("prompt")))]
    fills = s.get("fills") or []
    for i, candidates in enumerate(fills):
        rows = []
        for c in candidates or []:
            score = c.get("score") if isinstance(c, dict) else None
            width = max(1, round(100 * score)) if isinstance(score, int | float) else 0
            rows.append([e(c.get("token") if isinstance(c, dict) else c),
                         f'<span class="bar" style="width:{width}px"></span>{e(format_number(score))}',
                         e(c.get("sequence") if isinstance(c, dict) else "")])
        label = "fills" if len(fills) == 1 else f"fills for mask {i + 1}"
        out.append(f'<div class="label">{e(label)}</div>' + _table(["token", "score", "sequence"], rows))
    return "".join(out)


def _qa_sample(s: dict, contexts: dict[str, str]) -> str:  # {"question", "answer", "score", "start", "end"}
    out = [_text("question", e(s.get("question")))]
    context = contexts.get(s.get("question"))
    start, end = s.get("start"), s.get("end")
    if isinstance(context, str) and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(
            context):
        out.append(_text("context, the answer marked", f'{e(context[:start])}<span class="ans">{e(context[start:end])}'
                                                       f'</span>{e(context[end:])}'))
    out.append(_text(f"answer · score {format_number(s.get('score'))}", e(s.get("answer")) or "<i>(no answer)</i>"))
    return "".join(out)


def _classify_rows(samples: list[dict], before: list[dict] | None) -> str:
    rows = []
    for i, s in enumerate(samples):
        b = before[i] if before and i < len(before) and isinstance(before[i], dict) else None

        def verdict(x):
            if x is None:
                return "–"
            if "label" in x:
                return f"<b>{e(x['label'])}</b> {e(format_number(x.get('score')))}"
            if "labels" in x:
                return e(", ".join(map(str, x["labels"])) or "(none)")
            return e(format_number(x.get("value")))

        rows.append([f'<div class="text">{e(s.get("text"))}</div>'] + ([verdict(b)] if before else [])
                    + [verdict(s)])
    head = ["text"] + (["before training"] if before else []) + ["after training" if before else "prediction"]
    return _table(head, rows)


def _response_sample(s: dict, b: dict | None) -> str:  # sft / dpo / rl: {"prompt", "response", "stopped_at_eos"}
    def resp(x):
        how = "stopped at EOS" if x.get("stopped_at_eos") else "hit the token limit"
        return f'<span class="gen">{e(x.get("response"))}</span>', how

    out = [_text("prompt", e(s.get("prompt")))]
    if b is not None:
        body_b, how_b = resp(b)
        body_a, how_a = resp(s)
        out.append(f'<div class="pair"><div>{_text(f"before training · {how_b}", body_b)}</div>'
                   f'<div>{_text(f"after training · {how_a}", body_a)}</div></div>')
    else:
        body, how = resp(s)
        out.append(_text(f"response · {how}", body))
    return "".join(out)


def _reward_sample(s: dict, b: dict | None) -> str:  # {"prompt","chosen","rejected","reward_chosen","reward_rejected"}
    def scores(x, when):
        c, r = x.get("reward_chosen"), x.get("reward_rejected")
        ok = isinstance(c, int | float) and isinstance(r, int | float) and c > r
        mark = '<span class="ok">prefers chosen ✓</span>' if ok else '<span class="no">prefers rejected ✗</span>'
        return (f"<tr><td>{e(when)}</td><td class=n>{e(format_number(c))}</td><td class=n>{e(format_number(r))}"
                f"</td><td>{mark}</td></tr>")

    out = [_text("prompt", e(s.get("prompt"))),
           f'<div class="pair"><div>{_text("chosen", e(s.get("chosen")))}</div>'
           f'<div>{_text("rejected", e(s.get("rejected")))}</div></div>']
    rows = (scores(b, "before training") if b else "") + scores(s, "after training" if b else "reward")
    out.append('<div class="scroll"><table><thead><tr><th></th><th class=n>reward of chosen</th>'
               f'<th class=n>reward of rejected</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>')
    return "".join(out)


def sample_kind(s: Any) -> str:
    if not isinstance(s, dict):
        return "other"
    if "completions" in s:
        return "completion"
    if "fills" in s:
        return "fill"
    if "question" in s and "answer" in s:
        return "qa"
    if "reward_chosen" in s:
        return "reward"
    if "response" in s:
        return "response"
    if "text" in s and ("label" in s or "labels" in s or "value" in s):
        return "classify"
    return "other"


def _samples_section(run: dict) -> str:
    m = run.get("metrics")
    title = '<section id="samples"><h2>Sample outputs</h2>'
    if not m:
        return title + '<p class="muted">None: the run wrote no metrics.json.</p></section>'
    after = (m.get("after") or {}).get("samples") or m.get("samples") or []
    before = (m.get("before") or {}).get("samples")
    if not isinstance(after, list) or not after:
        return title + ('<p class="muted">None: the recipe names no sample inputs (generation.prompts, '
                        'classify.samples, qa.samples, sft.samples or preference.samples).</p></section>')
    before = before if isinstance(before, list) and before else None
    kind = sample_kind(after[0])
    where = ("the recipe's sample inputs, answered by the model before and after training" if before else
             "the recipe's sample inputs, answered by the trained model")
    parts = [title, f'<p class="muted">{e(where.capitalize())}.</p>']
    if kind == "classify":
        parts.append(_classify_rows(after, before))
        return "".join(parts) + "</section>"
    contexts = {}
    for q in ((run.get("config") or {}).get("qa") or {}).get("samples") or []:
        if isinstance(q, dict) and isinstance(q.get("question"), str):
            contexts[q["question"]] = q.get("context")
    for i, s in enumerate(after):
        b = before[i] if before and i < len(before) and isinstance(before[i], dict) else None
        if kind == "completion":
            body = _completion_sample(s, b)
        elif kind == "fill":
            body = _fill_sample(s)
        elif kind == "qa":
            body = _qa_sample(s, contexts)
        elif kind == "response":
            body = _response_sample(s, b)
        elif kind == "reward":
            body = _reward_sample(s, b)
        else:
            body = _text("sample", e(json.dumps(s, indent=2, ensure_ascii=False, default=str)))
        parts.append(f'<div class="sample">{body}</div>')
    return "".join(parts) + "</section>"


def _timings_section(run: dict) -> str:
    m = run.get("metrics") or {}
    timings = m.get("timings") or {}
    memory = m.get("memory") or {}
    estimate = run.get("estimate") or {}
    status = run.get("status") or {}
    parts = []
    names = {"prepare_s": "preparing data and model", "eval_before_s": "evaluating before training",
             "train_s": "training", "eval_after_s": "evaluating after training", "total_s": "in all"}
    total = timings.get("total_s")
    rows = []
    for key in [*names, *[k for k in timings if k not in names]]:
        v = timings.get(key)
        if not isinstance(v, int | float):
            continue
        share = (f"{v / total:.0%}" if v / total >= 0.005 else "<1%") if total and key != "total_s" else ""
        rows.append([e(names.get(key, key)), e(format_seconds(v)), e(share)])
    if rows:
        parts.append("<h3>Timings</h3>" + _table(["phase", "time", "share"], rows, numeric={1, 2}))
    mem_names = {"prepare_peak_rss_mb": "preparing (peak RSS)", "train_peak_rss_mb": "training (peak RSS)"}
    rows = [[e(mem_names.get(k, k)), e(format_mb(v))] for k, v in memory.items() if isinstance(v, int | float)]
    if rows:
        parts.append("<h3>Peak memory</h3>" + _table(["phase", "memory"], rows, numeric={1}))
    if estimate:
        steps = m.get("steps")
        measured_step = (timings.get("train_s") / steps) if isinstance(timings.get("train_s"), int | float) and steps \
            else None
        rows = []

        def row(what, est, measured, fmt):
            if est is None and measured is None:
                return
            rows.append([e(what), e(fmt(est)) if est is not None else "–", e(fmt(measured)) if measured is not None
                         else "–"])

        row("time per step", estimate.get("step_time_s"), estimate.get("measured_step_time_s") or measured_step,
            lambda s: f"{s:.3g} s")
        finals = [r.get("train_runtime") for r in run["log"] if record_kind(r) == "final"]
        measured_s = timings.get("train_s") or (finals[-1] if finals else None)
        row("training time", estimate.get("estimated_train_s"), measured_s, format_seconds)
        row("peak memory", estimate.get("estimated_peak_memory_mb"), memory.get("train_peak_rss_mb"), format_mb)
        row("steps", estimate.get("total_steps"), steps, format_number)
        if rows:
            note = []
            if estimate.get("timed_passes") is not None:
                note.append(f"from {estimate['timed_passes']} timed forward/backward passes before training")
            if estimate.get("memory_basis"):
                note.append(f"memory: {estimate['memory_basis']}")
            if estimate.get("measured_after_steps"):
                note.append(f"measured time per step: over the first {estimate['measured_after_steps']} steps")
            parts.append("<h3>Estimate before training, and what was measured</h3>"
                         + _table(["", "estimated", "measured"], rows, numeric={1, 2})
                         + (f'<p class="muted">{e("; ".join(note))}.</p>' if note else ""))
    if status:
        rows = [[e(k), e(status[k])] for k in ("state", "started", "ended", "error", "processes", "host", "pid")
                if status.get(k) not in (None, "")]
        if run["state"] == "finished" and status.get("state") == "running":
            rows[0][1] = 'done <span class="muted">(status.json said "running" when this page was written, just ' \
                         "before the run was closed; metrics.json is written last)</span>"
        parts.append("<h3>Status (status.json)</h3>" + _table(None, rows))
    if not parts:
        return ""
    return f'<section id="timings"><h2>Time and memory</h2>{"".join(parts)}</section>'


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        if all(isinstance(v, int | float | str | bool) or v is None for v in value.values()) and len(value) <= 12:
            return ", ".join(f"{k}: {format_number(v) if isinstance(v, int | float) else v}" for k, v in value.items())
        return _short(json.dumps(value, ensure_ascii=False, default=str), 400)
    if isinstance(value, list):
        return _short(", ".join(map(str, value)), 400)
    return format_number(value) if isinstance(value, int | float) else str(value)


def _data_section(run: dict) -> str:
    m = run.get("metrics") or {}
    rows = []
    params = m.get("parameters") or {}
    for k, v in params.items():
        rows.append([e(f"parameters: {k.replace('_', ' ')}"), e(_flat(v))])
    for k, v in (m.get("data") or {}).items():
        if k == "example" and isinstance(v, dict):  # the first training example, field by field
            cell = "".join(_text(str(field), e(text)) for field, text in v.items())
        else:
            cell = e(_flat(v))
        rows.append([e(k.replace("_", " ")), cell])
    if not rows:
        return ""
    return f'<section id="data"><h2>Data and model</h2>{_table(None, rows)}</section>'


def key_settings(config: dict) -> list[tuple[str, str]]:
    """The settings a reader looks for first, from the resolved config."""
    out = [("task", config.get("task"))]
    model = config.get("model") or {}
    scratch = model.get("from_scratch")
    if model.get("name_or_path"):
        out.append(("model", model["name_or_path"]))
    elif isinstance(scratch, dict):
        shape = ", ".join(f"{k} {v}" for k, v in scratch.items() if v is not None and k != "dropout")
        out.append(("model", f"from scratch ({shape})"))
    t = config.get("training") or {}
    for key in ("mode", "learning_rate", "lr_scheduler", "warmup_steps", "batch_size", "gradient_accumulation_steps",
                "max_steps", "num_epochs", "precision", "seed"):
        if t.get(key) is not None and not (key == "max_steps" and t.get(key) in (-1, 0)):
            out.append((key.replace("_", " "), t[key]))
    if t.get("mode") == "lora":
        lora = config.get("lora") or {}
        out.append(("LoRA", ", ".join(f"{k} {v}" for k, v in lora.items() if v is not None)))
    data = config.get("data") or {}
    train = data.get("train") or {}
    if isinstance(train, dict) and (train.get("path") or train.get("type")):
        out.append(("training data", train.get("path") or train.get("type")))
    return [(k, v) for k, v in out if v not in (None, "")]


def _config_section(run: dict) -> str:
    if run["config_text"] is None:
        return ('<section id="config"><h2>Config</h2><p class="muted">None: config.yaml is missing.</p></section>')
    rows = [[e(k), e(_flat(v))] for k, v in key_settings(run.get("config") or {})]
    table = _table(["setting", "value"], rows) if rows else ""
    return (f'<section id="config"><h2>Config</h2>{table}<details><summary>The resolved recipe (config.yaml)'
            f'</summary><pre class="config">{e(run["config_text"])}</pre></details></section>')


def _files_section(run: dict) -> str:
    parts = []
    if run["checkpoints"]:
        parts.append(f'<p>Checkpoints: {e(", ".join(run["checkpoints"]))}.</p>')
    parts.append(f'<p>model/: {"present" if run["has_model"] else "not written"}.</p>')
    if run["train_log_tail"] is not None:
        open_ = " open" if run["state"] != "finished" else ""
        parts.append(f'<details{open_}><summary>The end of train.log</summary><pre class="config">'
                     f'{e(chr(10).join(run["train_log_tail"]))}</pre></details>')
    return f'<section id="files"><h2>Files and log</h2>{"".join(parts)}</section>'


def render_html(run: dict) -> str:
    """The whole page for a run read by read_run."""
    sections = [
        ("summary", "At a glance", _summary(run)),
        ("metrics", "Metrics", _metrics_section(run)),
        ("curves", "Curves", _curves_section(run)),
        ("samples", "Samples", _samples_section(run)),
        ("timings", "Time and memory", _timings_section(run)),
        ("data", "Data", _data_section(run)),
        ("config", "Config", _config_section(run)),
        ("files", "Files", _files_section(run)),
    ]
    nav = [(anchor, title) for anchor, title, body in sections if body]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(run['name'])} · lmtune report</title><style>{_CSS}</style></head><body>"
            f"{_header(run, nav)}<main>{_notices(run)}{''.join(body for _, _, body in sections)}"
            '<p class="muted">Written by <code>lmtune report</code>; the page is self-contained (no network).</p>'
            "</main></body></html>\n")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write `out` (default RUN_DIR/report.html) for the run dir, atomically; returns its path."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / REPORT_NAME
    page = render_html(read_run(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
