"""The cause of issue 22 in isolation: what a second OpenMP pool costs the training thread.

``python benchmarks/omp_pools.py`` times back-to-back small parallel ops (``add_`` on 65,536
floats: above torch's grain size, so each call is one OpenMP parallel region) in the main thread:

- at 1 thread (no region is forked);
- at 2 threads with one libgomp pool (the main thread's);
- at 2 threads while another thread holds a second pool: it ran one parallel op and now waits,
  idle, as the CPU data source's look-ahead thread did between batches before the fix.

libgomp gives every thread that starts a parallel region a pool of its own, and once it manages
more pooled threads than there are CPUs it spins for 1,000 iterations instead of 300,000 before a
waiting thread sleeps (``do_spin`` in libgomp's ``config/linux/wait.h``): with the second pool,
each region wakes a sleeping worker. Rounds alternate the three cases; the minimum over many short
batches approximates a quiet machine even when the machine is loaded.

Measured on the 2-core development machine, load average 4-6 from other work, 2026-12-07, two
runs: min per op 8.4 / 8.3 us (1 thread), 6.7 / 7.4 us (2 threads, one pool), 23.7 / 24.1 us
(2 threads + idle second pool).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch


def per_op(x: torch.Tensor, batches: int, per_batch: int) -> list[float]:
    """Seconds per ``add_``, one value per batch of ``per_batch`` calls."""
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            x.add_(1.0)
        out.append((time.perf_counter() - t0) / per_batch)
    return out


def with_second_pool(fn):
    """``fn()`` while another thread holds a libgomp pool (it forked one region, then waits)."""
    stop, ready = threading.Event(), threading.Event()

    def hold():
        torch.ones(1 << 20).mul_(2)  # one parallel op: this thread now has its own pool
        ready.set()
        stop.wait()

    t = threading.Thread(target=hold, name="second-pool")
    t.start()
    ready.wait()
    try:
        return fn()
    finally:
        stop.set()
        t.join()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the three cases")
    ap.add_argument("--batches", type=int, default=200, help="timed batches per case and round")
    ap.add_argument("--per-batch", type=int, default=50, help="ops per timed batch")
    args = ap.parse_args(argv)
    x = torch.zeros(1 << 16)
    cases = {"1 thread": [], "2 threads, one pool": [], "2 threads + idle second pool": []}
    before = torch.get_num_threads()
    try:
        for _ in range(args.rounds):
            torch.set_num_threads(1)
            cases["1 thread"] += per_op(x, args.batches, args.per_batch)
            torch.set_num_threads(2)
            cases["2 threads, one pool"] += per_op(x, args.batches, args.per_batch)
            cases["2 threads + idle second pool"] += with_second_pool(
                lambda: per_op(x, args.batches, args.per_batch))
    finally:
        torch.set_num_threads(before)
    print(f"torch {torch.__version__}; per add_ of 65,536 floats (one parallel region at 2 threads)")
    for name, times in cases.items():
        print(f"  {name:30s} min {min(times) * 1e6:6.1f} us   median {statistics.median(times) * 1e6:6.1f} us")


if __name__ == "__main__":
    main()
