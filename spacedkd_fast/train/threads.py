"""How many CPU threads a run gives torch's intra-op work (``--threads``; 0 = auto).

auto is what torch would use alone (``OMP_NUM_THREADS`` when set, else its default: the physical
cores), never more than the cores this process may run on (a container's or ``taskset``'s CPU
set, which torch's default ignores), shared among the processes of a CPU torchrun job. The
number is settled once, written back into the configuration (``config.yaml`` and the checkpoint
record it, so a resume runs with the same count and stays bitwise; a resume with another number
of processes settles it anew, ``resuming.refit_threads``), and printed in the header.

Why auto is not one thread: the 1-thread runs that beat the default on 2 cores did so because
the CPU data source's look-ahead thread then held a second OpenMP pool (see
``spacedkd_fast.data.sources._SourceBase._lookahead``); without it the default uses every core.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def settled_threads(requested: int, device_type: str, world_size: int | None = None) -> int:
    """The thread count of a run: ``requested`` when > 0, else auto (see the module's text)."""
    if requested and requested > 0:
        return int(requested)
    env = _env_threads()
    if env is not None:
        return env
    import torch

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cores = usable_cores()
    if str(device_type).split(":")[0] == "cpu" and world_size > 1:
        return max(1, cores // world_size)
    return max(1, min(torch.get_num_threads(), cores))
