"""Several processes on one run (`accelerate launch`, `torchrun`, `lmtune train --nproc N`).

The Trainer (through Accelerate) already shards training batches and all-reduces gradients. What the
pipeline adds here: which process writes (the main one), a barrier where the others must wait for it,
and evaluation split across processes and gathered in order, so every example (every QA window) is
counted exactly once -- no padded duplicates as a distributed sampler would add.

With one process every function here is a no-op, and nothing initialises torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


_replicated = False


@contextlib.contextmanager
def evaluate_everything():
    """Every process evaluates every example (the same forward calls in the same order). For a model
    sharded by FSDP or DeepSpeed ZeRO-3, whose every forward is a collective: shares of different sizes
    would leave one process waiting for a forward the others never make."""
    global _replicated
    before, _replicated = _replicated, True
    try:
        yield
    finally:
        _replicated = before


def _splitting() -> bool:
    return _active() and not _replicated


def init() -> None:
    """Join the process group the launcher described (env:// variables): Accelerate's state picks the
    backend (NCCL on GPUs, gloo on CPUs) exactly as the Trainer will."""
    if world_size() > 1 and not _active():
        from accelerate import PartialState

        PartialState()


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (it fills the caches), then the others (they read them)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_true(flag: bool) -> bool:
    """True on every process when it is true on one (a stop request, a non-finite loss)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def shard(n: int) -> range:
    """This process's contiguous part of n items (sizes differ by at most one; in order)."""
    world, r = (world_size(), rank()) if _splitting() else (1, 0)
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def gather(part: Any) -> list:
    """Every process's `part`, in rank order."""
    if not _active():
        return [part]
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, part)
    return out


def map_sharded(compute: Callable[[Sequence[int]], Any], n: int) -> Any:
    """`compute(indices)` over all n items, split across processes and put back in order.

    `compute` returns an array (rows per index), a tuple of arrays, or a list; the result is what one
    process computing `compute(range(n))` would return."""
    if not _splitting():
        return compute(range(n))
    parts = gather(compute(shard(n)))
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    return [x for p in parts for x in p]


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sum over processes' shares (float64, so token counts and loss sums stay exact)."""
    if not _splitting():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()
