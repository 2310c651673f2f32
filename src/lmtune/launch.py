"""`lmtune train RECIPE --nproc N`: the same run in N processes on this machine.

The processes are started by torch's elastic launcher, the engine under `torchrun` and `accelerate
launch --multi_gpu`, so a run started here behaves exactly as one started by those commands (one per
GPU with NCCL; on a CPU-only machine N processes over gloo). For several machines, FSDP or DeepSpeed,
use `accelerate launch` with one of the shipped configs (accelerate_configs/).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_process(nproc: int) -> int:
    """Split the cores between the processes (torchrun's default of one thread each wastes them
    when there are more cores than processes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def exit_code(exitcode: int) -> int:
    """A worker killed by signal n reports -n; the shell's convention is 128 + n."""
    return 128 - exitcode if exitcode < 0 else exitcode


def launch_train(nproc: int, argv: list[str]) -> int:
    """Run `lmtune <argv>` in nproc processes and return the exit code of the first that failed (0
    when all succeeded). The workers print their own messages; the main process's are the ones shown."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    # The launcher's own log lines ("Sending process ... closing signal") repeat what the workers said.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "lmtune", *argv)
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        return exit_code(first.exitcode)
    except SignalException as exc:  # the workers were signalled too and saved a checkpoint
        return 128 + int(exc.sigval)
    return 0


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without its --nproc option (the workers are the processes)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out

