"""A browser check of report.html: write a run's report and render it in headless Chromium, at a desktop
width and a phone width, to PNG screenshots of the whole page.

    .venv/bin/python benchmarks/report_screenshot.py                 # trains a tiny causal-LM run first
    .venv/bin/python benchmarks/report_screenshot.py runs/codeparrot-local --out-dir /tmp/report-shots

Without a run dir it trains a tiny causal LM from scratch (a BPE tokenizer and a 2-layer GPT-2 on
generated text, 60 steps, about 10 s on a CPU) into a temporary folder through `lmtune.cli.main`.
The page is written with `lmtune.report.write_report` (its time is reported), then Chromium
(`apt-get install chromium`; `--chromium PATH` for another binary) takes one screenshot per width.
Chromium's `--screenshot` captures the window, so the window is made tall (`--max-height`) and the
screenshot is cut just below the page's last row that differs from the background colour (Pillow,
which matplotlib brings); `cut_off` says when the page was taller than the window. Prints one JSON
line per screenshot ({"bench", "figure": "screenshot", "path", "width", "height", "bytes", ...,
"scrolls_sideways": whether the page is laid out wider than the window, from a second Chromium pass})
and a summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the model reads data and trains a small network on text so loss goes down while the tokenizer splits "
         "words into pieces import numpy as np import pandas as pd def fit predict return value").split()


def train_tiny_run(folder: Path) -> Path:
    """A tiny causal-LM run (the shape of tests/recipes/test_clm_end_to_end.py's recipe), trained for real."""
    import yaml

    from lmtune.cli import main

    rng = random.Random(7)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(300)]
    data = folder / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    recipe = {
        "task": "clm",
        "name": "tiny",
        "data": {"train": {"path": str(data), "text_field": "text"}, "block_size": 32, "validation_fraction": 0.1},
        "tokenizer": {"train": True, "vocab_size": 400, "min_frequency": 1},
        "model": {"from_scratch": {"n_layer": 2, "n_head": 2, "n_embd": 64}},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 60, "logging_steps": 5, "warmup_steps": 5,
                     "eval_strategy": "steps", "eval_steps": 20, "save_steps": 30, "precision": "fp32", "seed": 1},
        # A prompt with markup: the page must show it as text.
        "generation": {"prompts": ["the model", "import numpy", "<script>alert(1)</script> the"],
                       "max_new_tokens": 8},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    run = folder / "runs" / "tiny"
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only this script's JSON lines
        code = main(["train", str(path), "--output", str(run)])
    if code != 0:
        raise SystemExit(f"training the tiny run failed with exit code {code}")
    return run


def crop_to_page(png: Path, background: tuple[int, int, int]) -> tuple[int, int]:
    """Cut the screenshot below the last row that holds anything but the page background (plus a margin)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))
    differs = np.abs(rgb.astype(int) - np.asarray(background)).sum(axis=2) > 12
    rows = np.flatnonzero(differs.any(axis=1))
    bottom = min(int(rows[-1]) + 24, rgb.shape[0]) if rows.size else rgb.shape[0]
    Image.fromarray(rgb[:bottom]).save(png, optimize=True)
    return rgb.shape[1], bottom


def screenshot(chromium: str, page: Path, out: Path, width: int, height: int, timeout: float) -> float:
    out.unlink(missing_ok=True)
    t = time.time()
    cmd = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", "--disable-extensions", f"--screenshot={out}", f"--window-size={width},{height}",
           "--virtual-time-budget=3000", page.resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed (exit {result.returncode}): {result.stderr.strip()[-800:]}")
    return time.time() - t


def scrolls_sideways(chromium: str, page: Path, width: int, timeout: float) -> bool | None:
    """Whether the page is laid out wider than a window `width` wide (the reader would scroll sideways).
    A copy of the page gets a script that, once loaded, paints a corner square red (wider) or green
    (fits); a small screenshot of that copy is read back. (Chromium's --dump-dom would be simpler, but
    it lays pages out at least 500 pixels wide.)"""
    from PIL import Image

    probe = page.with_name(f".{page.stem}-probe.html")
    marker = ('<div id="lmtune-probe" style="position:fixed;left:0;top:0;width:16px;height:16px;z-index:99999">'
              "</div><script>window.addEventListener('load',function(){var e=document.documentElement;"
              "document.getElementById('lmtune-probe').style.background="
              "e.scrollWidth>window.innerWidth?'#ff0000':'#00ff00';});</script></body>")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", marker), encoding="utf-8")
    shot = probe.with_suffix(".png")
    try:
        screenshot(chromium, probe, shot, width, 400, timeout)
        with Image.open(shot) as im:
            r, g, b = im.convert("RGB").getpixel((4, 4))
    finally:
        probe.unlink(missing_ok=True)
        shot.unlink(missing_ok=True)
    if r > 200 and g < 60 and b < 60:
        return True
    if g > 200 and r < 60 and b < 60:
        return False
    return None  # the script did not run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="a run dir (default: train a tiny causal-LM run into a temporary folder)")
    p.add_argument("--out-dir", default="/tmp/report-shots", help="where the screenshots go")
    p.add_argument("--widths", default="1280,390", help="window widths in CSS pixels (default 1280,390)")
    p.add_argument("--max-height", type=int, default=14000,
                   help="window height; the screenshot is then cut to the page (default 14000)")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                   or shutil.which("google-chrome") or "chromium")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()

    from lmtune.report import write_report

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmtune-report-shot-") as tmp:
        if args.run:
            run = Path(args.run)
        else:
            print("training a tiny causal-LM run ...", file=sys.stderr)
            run = train_tiny_run(Path(tmp))
        page = out_dir / f"{run.name.strip('.')}-report.html"
        t = time.time()
        write_report(run, page)
        report_s = time.time() - t
        shots = []
        for width in (int(w) for w in args.widths.split(",")):
            png = out_dir / f"{page.stem}-{width}.png"
            took = screenshot(args.chromium, page, png, width, args.max_height, args.timeout)
            w, h = crop_to_page(png, (0xF4, 0xF5, 0xF7))
            shot = {"bench": "report_screenshot", "figure": "screenshot", "path": str(png), "width": w, "height": h,
                    "bytes": png.stat().st_size, "chromium_s": round(took, 2), "cut_off": h >= args.max_height - 24,
                    "scrolls_sideways": scrolls_sideways(args.chromium, page, width, args.timeout)}
            shots.append(shot)
            print(json.dumps(shot))
    print(json.dumps({"bench": "report_screenshot", "summary": True, "run": str(run), "report": str(page),
                      "report_bytes": page.stat().st_size, "report_s": round(report_s, 3),
                      "screenshots": [s["path"] for s in shots]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
