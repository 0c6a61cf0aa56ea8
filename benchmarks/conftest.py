"""Shared benchmark harness: a ``bench`` fixture over pytest-benchmark and ratio tables.

Every benchmark names a ``group`` (one shape / one workload) and a ``provider`` (the
implementation). One provider per group is the baseline; at the end of the run a table per group
prints the median time and the ratio ``baseline_median / provider_median`` (higher is faster), so
the numbers that matter are ratios measured in one run on one machine.

Plain ``pytest benchmarks/`` runs the quick grid (few rounds and shapes; under 10 minutes on two
CPU cores). ``SPACEDKD_BENCH_FULL=1`` runs the full grid. The mode is decided here, once, and
published as ``SPACEDKD_BENCH_QUICK`` for the benchmark modules (they read it at import, which
happens after this file is loaded).
"""

from __future__ import annotations

import os
import platform
from collections import defaultdict

import pytest
import torch

FULL = os.environ.get("SPACEDKD_BENCH_FULL", "0") not in ("", "0")
os.environ["SPACEDKD_BENCH_QUICK"] = "0" if FULL else "1"
QUICK = not FULL


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sync(device: str | torch.device) -> None:
    """Synchronise ``device`` so that a timed function includes its queued work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def bench(benchmark):
    """``bench(fn, group=..., provider=..., baseline=False, device="cpu", rounds=None, **extra)``.

    Runs ``fn`` with warm-up under pytest-benchmark and stores provider, group, device name and
    torch version in ``extra_info``. ``fn`` must synchronise its device itself (use ``sync``).
    ``setup`` (untimed, before each round; returns ``(args, kwargs)`` for ``fn``) and
    ``iterations`` (calls per round, statistics per call) are pytest-benchmark's pedantic ones.
    Returns the median time in seconds.
    """

    def run(fn, *, group: str, provider: str, baseline: bool = False, device: str = "cpu",
            rounds: int | None = None, warmup: int = 1, setup=None, iterations: int = 1,
            **extra):
        benchmark.group = group
        benchmark.extra_info.update(
            provider=provider,
            baseline=baseline,
            device=_device_name(device),
            torch=torch.__version__,
            **extra,
        )
        if rounds is None:
            rounds = 3 if QUICK else 15
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup,
                           iterations=iterations)
        return benchmark.stats.stats.median

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = defaultdict(list)
    for b in session.benchmarks:
        if b.stats is None or not b.stats.data or not b.extra_info.get("provider"):
            continue
        groups[b.group].append(b)
    if not groups:
        return
    tr = terminalreporter
    tr.section("spacedkd_fast ratio tables (baseline median / provider median; >1 is faster)")
    for group, items in groups.items():
        base = next((b for b in items if b.extra_info.get("baseline")), None)
        tr.write_line(f"[{group}]  device: {items[0].extra_info.get('device')}")
        for b in sorted(items, key=lambda b: b.stats.median):
            med = b.stats.median
            ratio = f"{base.stats.median / med:7.2f}x" if base is not None and med > 0 else "      -"
            extra = b.extra_info.get("note", "")
            if "min_bytes" in b.extra_info and med > 0:
                extra += f" {b.extra_info['min_bytes'] / med / 1e9:8.1f} GB/s (3-pass minimum)"
            tag = " (baseline)" if b.extra_info.get("baseline") else ""
            tr.write_line(f"    {b.extra_info['provider']:<34} {med * 1e3:10.3f} ms  {ratio}{tag} {extra}")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Adds achieved GB/s (against the minimum bytes a benchmark declares) to the JSON output."""
    for b in output_json.get("benchmarks", []):
        extra = b.get("extra_info", {})
        if "min_bytes" in extra and b["stats"]["median"] > 0:
            extra["achieved_GBps"] = extra["min_bytes"] / b["stats"]["median"] / 1e9
