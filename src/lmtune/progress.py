"""Progress for every long step (reading, tokenizer training, tokenizing, training, evaluation).

On a terminal: a tqdm bar on stderr. Elsewhere (CI, a log file, a scheduler): no bar characters at
all, but a plain `lmtune:` line every PLAIN_EVERY_S seconds while a step runs long, and none for a
step that is over quickly. With several processes only the main one shows anything.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("lmtune")
T = TypeVar("T")
PLAIN_EVERY_S = 30.0


def format_seconds(seconds) -> str:
    """A duration as people read it: 350 ms, 42.0 s, 7.5 min, 2.25 h ("–" when unknown)."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def on_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             weight=None) -> Iterator[T]:
    """`items`, reporting progress as they are consumed. `weight(item)` counts an item as that many
    units (characters of a batch of documents, say); by default each item is one."""
    if on_terminal():
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=f"lmtune: {desc}", unit=unit, unit_scale=True, leave=False,
                  dynamic_ncols=True) as bar:
            for item in items:
                yield item
                bar.update(weight(item) if weight else 1)
        return
    yield from _plain(items, desc, total, unit, weight)


def _plain(items: Iterable[T], desc: str, total: int | None, unit: str, weight) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += weight(item) if weight else 1
        now = time.monotonic()
        if now - last >= PLAIN_EVERY_S and os.environ.get("RANK", "0") == "0":
            last = now
            share = f" of {total:,} ({done / total:.0%})" if total else ""
            rate = done / max(now - start, 1e-9)
            left = f", about {(total - done) / rate:.0f} s left" if total and rate > 0 else ""
            log.info("%s: %s%s %s%s", desc, f"{done:,}", share, unit, left)
