"""Crash-safe checkpoints: a checkpoint is complete, or it is not there.

The Trainer writes each checkpoint into a staging folder beside the real ones (same filesystem); then
every file is fsynced, a manifest (file names, sizes, sha256) is written last, and the folder is
renamed into place. Old checkpoints are pruned only after that. Resuming takes the newest checkpoint
whose manifest matches its files; one without a manifest (killed mid-save) or with a changed file is
reported and skipped, never loaded. transformers writes checkpoints in place and prunes right after,
so a kill at the wrong moment leaves a half-written "latest" checkpoint -- hence this layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("lmtune")

MANIFEST = "manifest.json"
PREFIX = "checkpoint-"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict:
    """fsync every file of `folder`, then write its manifest (atomically, itself fsynced) last."""
    entries = []
    for path in checkpoint_files(folder):
        _fsync(path)
        entries.append({"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size,
                        "sha256": file_sha256(path)})
    manifest = {"files": entries}
    tmp = folder / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(folder / MANIFEST)
    _fsync(folder)
    return manifest


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when its files match its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["files"]
    except FileNotFoundError:
        return "it has no manifest (the save did not finish)"
    except (ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    for entry in entries:
        path = folder / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        if path.stat().st_size != entry["size"] or file_sha256(path) != entry["sha256"]:
            return f"{entry['path']} differs from what was saved"
    return None


def step_of(folder: Path) -> int | None:
    suffix = folder.name[len(PREFIX):] if folder.name.startswith(PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def newest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; the newer broken ones are reported."""
    if not checkpoints.is_dir():
        return None
    found = sorted((p for p in checkpoints.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of,
                   reverse=True)
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("checkpoint %s is skipped: %s", folder, problem)
    return None


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Manifest last, then one rename into place (a same-step checkpoint is replaced only after)."""
    write_manifest(staged)
    old = final.with_name(f".{final.name}.replaced")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staged.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(checkpoints: Path, keep: int | None, protected: Path | None = None) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never the newest, nor `protected` -- the
    best one); folders that are not complete checkpoints are left for the user to inspect."""
    if not keep:
        return
    complete = sorted((p for p in checkpoints.iterdir() if p.is_dir() and step_of(p) is not None
                       and (p / MANIFEST).is_file()), key=step_of)
    removable = [p for p in complete[:-1] if protected is None or p.resolve() != protected.resolve()]
    excess = len(complete) - max(keep, len(complete) - len(removable))
    for folder in removable[:max(excess, 0)]:
        shutil.rmtree(folder, ignore_errors=True)
