"""Measuring on a small shared machine, for the benchmark scripts: how busy the other processes keep
the CPUs (from /proc/stat), waiting for quiet, and this process's memory from /proc/self/status."""

from __future__ import annotations

import json
import os
import sys
import time


def busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (every CPU together)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def wait_until_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Sleep (at most max_wait seconds) until other processes use less than `threshold` of the CPUs
    over one second; returns the last share seen."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_seconds(), time.monotonic()
        time.sleep(1.0)
        share = (busy_seconds() - b0) / ((time.monotonic() - t0) * os.cpu_count())
        if share < threshold or time.monotonic() >= deadline:
            return share


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM). Not getrusage: on Linux ru_maxrss survives
    exec, so a child started by a big parent would report the parent's size."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_recipe(repo, recipe: str, overrides: list[str]) -> tuple[dict, float, float]:
    """`lmtune train RECIPE --set ...` in a child process, into a temporary run dir: the run's
    metrics.json, its wall seconds and its peak RSS in MiB (from wait4, so each run's own peak, not
    the largest of all children so far)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "lmtune", "train", str(Path(repo) / "recipes" / recipe), "--output", str(run)]
        for item in overrides:
            cmd += ["--set", item]
        start = time.time()
        # the run's own stdout goes to stderr: stdout carries only the benchmark's JSON lines
        proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=sys.stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - start
        code = proc.returncode = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"training failed with exit code {code}")
        metrics = json.loads((run / "metrics.json").read_text())
    return metrics, wall, usage.ru_maxrss / 1024


def add_quiet_options(ap, unit: str = "run") -> None:
    """The options every timing benchmark shares: threads, and re-running a disturbed `unit`."""
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--max-interference", type=float, default=0.1,
                    help=f"re-run a {unit} if other processes used more than this share of the CPUs (default 0.1)")
    ap.add_argument("--retries", type=int, default=2, help=f"re-runs of a disturbed {unit} (default 2)")
    ap.add_argument("--max-wait", type=float, default=120, help="seconds to wait for quiet before a re-run")


def reporters(bench: str):
    """(emit, note) for a benchmark: emit prints one JSON line per figure on stdout, note a progress
    line on stderr."""

    def emit(figure: str, value, unit: str, **extra) -> None:
        print(json.dumps({"bench": bench, "figure": figure, "value": value, "unit": unit, **extra}), flush=True)

    def note(msg: str) -> None:
        print(f"[{bench}] {msg}", file=sys.stderr, flush=True)

    return emit, note


def make_clock(warmup: int, steps: int):
    """A TrainerCallback that marks the end of every step, and the CPU seconds (all processes', and
    this one's) at the end of steps `warmup` and `steps`: what the training benchmarks time."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: dict[int, float] = {}
            self.cpu: dict[int, tuple[float, float]] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.marks[state.global_step] = time.perf_counter()
            if state.global_step in (warmup, steps):
                self.cpu[state.global_step] = (busy_seconds(), own_cpu_seconds())

    return Clock()
