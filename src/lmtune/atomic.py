"""Outputs written aside and moved into place: a reader (or a later run) never sees half of one, and
what a failed write left behind -- on a full disk, say -- is removed, so the same command can run again."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_folder_aside(out: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a sibling `.<name>.partial` folder, which then replaces `out` (an existing `out`
    only once the new one is complete). On any failure the partial folder is removed and `out` is
    left as it was."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def replace_folder(new: Path, out: Path) -> None:
    """Rename the complete folder `new` to `out`; an existing `out` is moved aside first and removed only
    once `new` is in place (put back if the rename fails)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
