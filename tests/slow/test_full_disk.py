"""A real full disk: a small tmpfs mounted for the test (root only), filled by lmtune at each phase that
writes -- the checkpoint, the final model, an export, a tokenizer. Each ends with one sentence and exit
code 1, no traceback, nothing half-written left in the way, and the same command runs once there is
room again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..helpers import make_documents

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")]


@pytest.fixture
def small_disk(tmp_path):
    """A mount point and a function that mounts a tmpfs of N MiB there (and unmounts it at the end)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def mount_mib(size: int) -> Path:
        subprocess.run(["umount", str(mount)], capture_output=True, check=False)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m", "tmpfs", str(mount)], check=True)
        return mount

    yield mount_mib
    subprocess.run(["umount", str(mount)], capture_output=True, check=False)


def lmtune(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMTUNE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "lmtune", *map(str, args)], capture_output=True, text=True, env=env)


def assert_disk_full_sentence(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmtune: error:")]
    assert len(errors) == 1 and "the disk is full" in errors[0], proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def recipe(tmp_path: Path, **training) -> Path:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(300, seed=5)))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "task": "clm", "name": "disk", "data": {"train": {"path": str(data)}, "block_size": 32},
        "tokenizer": {"train": True, "vocab_size": 400, "min_frequency": 1},
        "model": {"from_scratch": {"n_layer": 4, "n_head": 4, "n_embd": 256}},  # ~3.3M parameters, 13 MB a copy
        "training": {"max_steps": 4, "batch_size": 4, "precision": "fp32", "save_steps": 2, "logging_steps": 2,
                     "estimate_steps": 0, **training}}))
    return path


def test_a_full_disk_at_the_first_checkpoint_leaves_nothing_in_the_way(tmp_path, small_disk):
    disk = small_disk(20)  # the checkpoint (weights + Adam's two moments, ~40 MB) does not fit
    cache = tmp_path / "cache"
    proc = lmtune("train", recipe(tmp_path), "--output", disk / "run", cache=cache)
    assert_disk_full_sentence(proc, "saving the checkpoint of step 2")
    assert not (disk / "run").exists() and not (disk / ".run.partial").exists()  # no trap for the re-run
    assert (disk / ".run.failed.log").is_file()  # the log, kept where the message says
    disk = small_disk(200)
    assert lmtune("train", recipe(tmp_path), "--output", disk / "run", cache=cache).returncode == 0


def test_a_full_disk_at_the_final_model_keeps_the_checkpoints_for_resume(tmp_path, small_disk):
    disk = small_disk(48)  # the one checkpoint, at the last step (~40 MB), fits; the final model (13 MB) does not
    cache = tmp_path / "cache"
    proc = lmtune("train", recipe(tmp_path, save_steps=4), "--output", disk / "run", cache=cache)
    message = assert_disk_full_sentence(proc)
    assert "--resume" in message and (disk / ".run.partial" / "checkpoints").is_dir()


def test_a_full_disk_during_export_tokenizer_training_and_report(tmp_path, small_disk):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    assert lmtune("train", recipe(tmp_path, save_strategy="no"), "--output", run, cache=cache).returncode == 0
    disk = small_disk(5)
    proc = lmtune("export", run, "--out", disk / "exported", cache=cache)
    assert_disk_full_sentence(proc)
    assert list(disk.iterdir()) == []  # the partial export was removed
    big = tmp_path / "big.txt"
    big.write_text("\n".join(make_documents(20000, seed=6)))
    disk = small_disk(1)
    (disk / "filler").write_bytes(b"x" * (1024 * 1024 - 4096 * 4))
    proc = lmtune("tokenizer", "train", "--data", big, "--vocab-size", "30000", "--out", disk / "tok", cache=cache)
    assert_disk_full_sentence(proc)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    (disk / "filler").write_bytes(b"x" * (1024 * 1024 - 4096))  # no room for the page
    proc = lmtune("report", run, "--out", disk / "page.html", cache=cache)
    assert_disk_full_sentence(proc)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no half-written page, no temporary file


def test_a_full_cache_disk_costs_speed_not_the_run(tmp_path, small_disk):
    """The caches (packed blocks, trained tokenizers) are an optimisation: with no room for them the run
    still trains, on a second try too."""
    disk = small_disk(1)
    (disk / "filler").write_bytes(b"x" * (1024 * 1024 - 4096 * 2))
    for attempt in ("first", "second"):
        proc = lmtune("train", recipe(tmp_path, save_strategy="no"), "--output", tmp_path / attempt, cache=disk)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
