"""GPU busy fraction of a window of work: the union of the CUDA kernel intervals that
``torch.profiler`` recorded, over the window's wall time (synchronised at both ends).

Only the CUDA activity is recorded (CUPTI: kernels, memory copies, runtime calls such as
``cudaGraphLaunch``), not the host's operator events, whose recording would slow a host-bound
training step and so lower the very fraction being measured. Kernels that overlap (two streams)
count once; memory copies are not counted as busy.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch


def union_length(intervals) -> float:
    """Total length covered by ``(start, end)`` intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def trace_summary(trace: dict) -> dict:
    """Busy kernel time (seconds, the union), the kernel count and the graph launches of a chrome
    trace written by torch.profiler (``ts`` / ``dur`` in microseconds). ``graph_launches`` is None
    when the trace holds no CUDA runtime or driver calls at all (nothing to count them from)."""
    kernels, graph_launches, api_calls = [], 0, 0
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X":
            continue
        cat = ev.get("cat", "").lower()
        if cat == "kernel":
            kernels.append((ev["ts"] * 1e-6, (ev["ts"] + ev.get("dur", 0)) * 1e-6))
        elif cat in ("cuda_runtime", "cuda_driver"):
            api_calls += 1
            graph_launches += "GraphLaunch" in ev.get("name", "")
    return {"kernel_s": union_length(kernels), "kernels": len(kernels),
            "graph_launches": graph_launches if api_calls else None}


def profiled(device: torch.device, fn) -> dict | None:
    """Run ``fn`` under the profiler (CUDA activity) and return busy fraction and counts."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        summary = trace_summary(json.loads(path.read_text()))
    summary.update(wall_s=wall, busy=summary["kernel_s"] / wall if wall > 0 else None)
    return summary
