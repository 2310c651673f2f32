"""`lmtune runs [DIR]`: the runs under a folder, one row each.

A finished run dir holds metrics.json; a run in progress, stopped or failed is the `.<name>.partial`
folder beside it, whose status.json says what happened. A "running" run whose process is gone (killed
outright, the machine rebooted) is shown as interrupted: it can be continued with --resume.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import yaml

from lmtune.progress import format_seconds

# The figure that says whether a run worked, per task: (key in metrics, label, higher is better).
KEY_METRIC = {
    "clm": ("perplexity", "perplexity", False),
    "mlm": ("perplexity", "perplexity", False),
    "sft": ("perplexity", "response perplexity", False),
    "qa": ("f1", "F1", True),
    "classify": ("accuracy", "accuracy", True),
    "reward": ("accuracy", "reward accuracy", True),
    "dpo": ("reward_accuracy", "implicit reward accuracy", True),
    "rl": ("mean_reward", "mean reward", True),
}
FALLBACK_METRICS = {"classify": [("f1_micro", "micro-F1", True), ("mse", "MSE", False)],
                    "dpo": [("logp_margin", "log-prob margin", True)]}
SKIPPED = {"model", "checkpoints", "adapter", "tensorboard", ".staging"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _process_alive(status: dict) -> bool:
    pid = status.get("pid")
    if not isinstance(pid, int) or status.get("host") not in (None, socket.gethostname()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process with that id exists
    return True


def run_state(folder: Path) -> str:
    """done / running / failed / interrupted."""
    status = _read_json(folder / "status.json")
    if (folder / "metrics.json").is_file() and not folder.name.endswith(".partial"):
        return "done"
    state = status.get("state")
    if state == "running":
        return "running" if _process_alive(status) else "interrupted"
    if state in ("failed", "interrupted"):
        return state
    return "interrupted"  # a partial folder from before status.json, or one whose status was never written


def key_metric(task: str, before: dict, after: dict) -> tuple[str, float | None, float | None] | None:
    for key, label, _ in [KEY_METRIC.get(task, ("", "", True)), *FALLBACK_METRICS.get(task, [])]:
        if key and (key in before or key in after):
            return label, before.get(key), after.get(key)
    return None


def _model_name(config: dict) -> str:
    model = config.get("model") or {}
    if model.get("name_or_path"):
        name = str(model["name_or_path"])
        # A local folder by its last two parts (runs/x/model -> x/model); a Hub id as it is.
        return "/".join(Path(name).parts[-2:]) if Path(os.path.expanduser(name)).exists() else name
    scratch = model.get("from_scratch") or {}
    if scratch:
        arch = scratch.get("architecture", "gpt2")
        shape = "x".join(str(scratch.get(k, "?")) for k in ("n_layer", "n_head", "n_embd"))
        return f"{arch} {shape} from scratch"
    return "?"


def _last_log(folder: Path) -> dict:
    """The last logged step and seconds of a run (its log.jsonl), read from the end."""
    path = folder / "log.jsonl"
    if not path.is_file():
        return {}
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 65536))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def _steps_so_far(folder: Path, last: dict) -> int | None:
    """An unfinished run's progress: its last logged step or its newest checkpoint, whichever is later."""
    saved = [int(p.name.rsplit("-", 1)[1]) for p in (folder / "checkpoints").glob("checkpoint-*")
             if p.name.rsplit("-", 1)[1].isdigit()]
    steps = [s for s in (last.get("step"), max(saved, default=None)) if s is not None]
    return max(steps) if steps else None


def describe_run(folder: Path) -> dict:
    config = {}
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        pass
    metrics = _read_json(folder / "metrics.json")
    status = _read_json(folder / "status.json")
    name = folder.name.removeprefix(".").removesuffix(".partial")
    task = metrics.get("task") or config.get("task") or "?"
    last = _last_log(folder)
    row = {"name": name, "path": str(folder), "task": task, "model": _model_name(config), "status": run_state(folder),
           "steps": metrics.get("steps", _steps_so_far(folder, last)),
           "wall_s": (metrics.get("timings") or {}).get("total_s", last.get("time_s"))}
    found = key_metric(task, metrics.get("before") or {}, metrics.get("after") or {})
    if found:
        row.update(metric=found[0], before=found[1], after=found[2])
    if status.get("error"):
        row["error"] = status["error"]
    return row


def find_runs(root: Path) -> list[Path]:
    """Run folders (finished or partial) under root: a folder with config.yaml or status.json; chains
    put their steps one level further down."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and ("config.yaml" in filenames or "status.json" in filenames):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED)
    return found


def list_runs(root: Path) -> list[dict]:
    return [describe_run(folder) for folder in find_runs(root)]


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def render_runs_table(rows: list[dict]) -> str:
    if not rows:
        return "no runs found"
    header = ["name", "task", "model", "status", "metric", "before -> after", "steps", "time"]
    table = [header]
    for r in rows:
        change = f"{_number(r.get('before'))} -> {_number(r.get('after'))}" if r.get("metric") else "-"
        table.append([r["name"], r["task"], r["model"], r["status"], r.get("metric", "-"), change,
                      _number(r.get("steps")), format_seconds(r.get("wall_s"))])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
