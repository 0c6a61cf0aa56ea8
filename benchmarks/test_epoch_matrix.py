"""The end-to-end epoch matrix (``epoch_matrix.py``) in miniature on the CPU: 12 images at 8 px,
batch 8 (L = 2 steps, the last of 4 images), s = 1.5 (I = 3), ResNet-18 narrowed 64x. It runs the script's code path
for every row and checks what each row did, not how fast (a CPU says nothing about GPU speed);
plus the GPU-busy arithmetic on hand-made intervals and a hand-made profiler trace."""

from __future__ import annotations

import json

import epoch_matrix as em
import gpu_busy
import pytest
import torch

MINI = ["--device", "cpu", "--images", "12", "--batch", "8", "--image-size", "8",
        "--interval-rate", "1.5", "--model-kwargs", "downsample_factor=64",
        "--official-batches", "2", "--official-interval", "2", "--official-workers", "0",
        "--profile-steps", "2"]
L = 2  # steps per epoch, ceil(12 / 8); the spaced interval is I = int(2 * 1.5) = 3
# the timed windows, by the rules of the script's docstring: spaced: warm-up W = min(L, I - 1) = 2
# (the first partial batch, key 2, inside), keys 3..5 timed (the replay at key 3); overlap and
# graphs: keys 4..6; online: keys 3..4; the official loop: 2 full batches
WINDOWS = {"spaced": range(3, 6), "second interval": range(4, 7), "online": range(3, 5)}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: at these sizes a second one only waits, and on a shared 2-core
    machine it made the miniature 5x slower (8.4 s vs 1.6 s for the whole matrix)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images_of(keys) -> int:
    return sum(4 if key % L == 0 else 8 for key in keys)


@pytest.mark.parametrize("intervals, covered", [
    ([], 0.0),
    ([(0, 1)], 1.0),
    ([(3, 4), (0, 1), (0.5, 2)], 3.0),  # unsorted; (0, 1) and (0.5, 2) overlap -> [0, 2]
    ([(1, 2), (2, 3)], 2.0),  # touching, counted once
    ([(0, 10), (2, 3), (4, 5)], 10.0),  # nested
    ([(0, 1), (5, 5), (7, 6)], 1.0),  # empty and reversed intervals cover nothing
])
def test_union_length_counts_overlaps_once(intervals, covered):
    assert gpu_busy.union_length(intervals) == pytest.approx(covered)


def test_trace_summary_reads_kernels_and_graph_launches():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1000.0, "dur": 500.0},
        {"ph": "X", "cat": "kernel", "name": "relu", "ts": 1400.0, "dur": 200.0},  # overlaps
        {"ph": "X", "cat": "Kernel", "name": "conv", "ts": 3000.0, "dur": 1000.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 900.0, "dur": 5.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 950.0, "dur": 5.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 5000.0, "dur": 100.0},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 6000.0},
    ]}
    got = gpu_busy.trace_summary(trace)
    assert got["kernels"] == 3 and got["graph_launches"] == 1
    assert got["kernel_s"] == pytest.approx((600 + 1000) * 1e-6)  # [1000, 1600] + [3000, 4000]
    no_api = {"traceEvents": [e for e in trace["traceEvents"] if e["cat"] != "cuda_runtime"]}
    assert gpu_busy.trace_summary(no_api)["graph_launches"] is None  # unknown, not zero


def test_cpu_miniature_runs_every_row(tmp_path, capsys):
    out = tmp_path / "matrix.json"
    result = em.main([*MINI, "--json", str(out)])
    assert json.loads(out.read_text())["rows"].keys() == result["rows"].keys()
    rows = result["rows"]
    assert list(rows) == em.RUN_ORDER  # every row ran, in the run order
    # rows that need a GPU may say why not (graphs and overlap: a CUDA device)
    for name in ("bf16+cl+graphs", "bf16+cl+graphs+overlap"):
        assert rows[name]["status"] in ("ok", "not available"), rows[name]
        if rows[name]["status"] != "ok":
            assert rows[name]["note"] and "\n" not in rows[name]["note"]
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        if name == em.OFFICIAL:
            steps, images = 2, 16
        else:
            kind = ("online" if name.startswith("online") else "second interval"
                    if "graphs" in name or "overlap" in name else "spaced")
            steps, images = len(WINDOWS[kind]), images_of(WINDOWS[kind])
            assert row["warmup_steps"] == WINDOWS[kind][0] - 1
        # one balanced window: as many student steps as teacher steps
        assert (row["timed_teacher_steps"], row["timed_student_steps"]) == (steps, steps), name
        assert row["images"] == images and row["balanced"]
        assert row["wall_s"] > 0 and row["epoch_s"] == pytest.approx(row["ms_per_step"] * L / 1e3)
        assert row["profile"] is None  # no CUDA profiler on a CPU
        if name != em.OFFICIAL:  # the engine's counters: both networks trained
            assert row["total_teacher_steps"] >= row["warmup_steps"] + steps
            assert row["total_student_steps"] >= steps
    for name in ("fp32", "bf16+cl", "online bf16+cl", em.OFFICIAL):
        assert rows[name]["status"] == "ok", rows[name]
    assert set(result["ratios"]["vs_official"]) >= {"fp32", "bf16+cl", "online bf16+cl"}
    assert set(result["ratios"]["spaced_over_online"]) >= {"fp32", "bf16+cl"}
    printed = capsys.readouterr().out
    assert "CPU MINIATURE" in printed and "target >= 10x" in printed


def test_caps_and_budget_stop_rows_with_a_message(capsys):
    capped = em.main([*MINI, "--variants", f"fp32,{em.OFFICIAL}", "--cap-scale", "1e-9"])["rows"]
    for name in ("fp32", em.OFFICIAL):
        assert capped[name]["status"] == "cap" and "cap" in capped[name]["note"], capped[name]
    skipped = em.main([*MINI, "--variants", "fp32", "--budget", "0"])["rows"]
    assert skipped["fp32"]["status"] == "skipped"


def test_a_row_that_fails_reports_the_error_and_the_matrix_goes_on(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of\nmemory")

    monkeypatch.setattr(em, "trainer_row", broken)
    rows = em.main([*MINI, "--variants", f"fp32,{em.OFFICIAL}"])["rows"]
    assert rows["fp32"] == {"name": "fp32", "status": "error", "row_s": rows["fp32"]["row_s"],
                            "note": "RuntimeError: CUDA error: out of memory"}
    assert rows[em.OFFICIAL]["status"] == "ok"


def test_the_profiled_window_follows_the_timed_one(monkeypatch, capsys):
    """With the profiler stubbed (none on a CPU), the profiled steps run and are counted; a
    profiler that fails leaves the row's timing standing."""
    def fake(device, fn):
        fn()
        return {"busy": 0.5, "kernels": 1, "kernel_s": 0.1, "wall_s": 0.2, "graph_launches": 0}

    monkeypatch.setattr(em, "profiled", fake)
    rows = em.main([*MINI, "--variants", f"fp32,{em.OFFICIAL}"])["rows"]
    # fp32: keys 6..7 after the window 3..5; key 6 = 2I replays the interval's 3 batches
    assert (rows["fp32"]["profile"]["teacher_steps"], rows["fp32"]["profile"]["student_steps"],
            rows["fp32"]["profile"]["busy"]) == (2, 3, 0.5)
    assert rows["fp32"]["total_teacher_steps"] == 7
    assert rows[em.OFFICIAL]["profile"]["teacher_steps"] == 2

    def broken(device, fn):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(em, "profiled", broken)
    row = em.main([*MINI, "--variants", "fp32"])["rows"]["fp32"]
    assert row["status"] == "ok" and row["epoch_s"] > 0 and row["profile"] is None
    assert row["note"] == "profiler failed: RuntimeError: CUPTI unavailable"


def test_an_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        em.main([*MINI, "--variants", "fp16"])
    assert exc.value.code == 2 and "unknown variant" in capsys.readouterr().err
