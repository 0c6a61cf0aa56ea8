"""End-to-end epoch matrix: the trainer's own epoch under each speed setting, the official loop,
and online KD, on synthetic CIFAR-100-shaped data (random ``uint8`` images: timing only).

    python benchmarks/epoch_matrix.py [--device cuda] [--images 50000] [--json OUT.json]

Trainer rows build their run with ``spacedkd_fast.train.build.build_run`` from a configuration
made by ``build_config`` (the CLI's own settings and checks; ``amp`` and ``channels_last`` given
explicitly as on/off words) on a data bundle holding the images on the device (the gpu-resident
keyed pipeline on CUDA), and drive it as ``train/loop.py`` does: keyed batches into
``distiller.step``, the loss accumulators read every ``log_every`` steps. No evaluation, no
checkpoints.

What is timed, so that every row does the same work per image. Every warm-up takes in the first
partial batch (key ``L``: 50,000 = 390 x 128 + 80), whose new shape cuDNN's autotuner meets
once per process, not once per epoch:
- spaced rows (interval ``I = int(L * s)`` steps, 586 at s = 1.5): a window of ``I`` consecutive
  keys that holds exactly one replay, so ``I`` teacher steps and ``I`` student steps (the work of
  1.5 average epochs). Without overlap and graphs: ``W = min(L, I - 1)`` teacher steps of
  warm-up (one epoch at s = 1.5), then keys ``W+1..W+I`` (the replay at key ``I`` inside). With
  overlap (the replay of an interval runs beside the teacher's next one) or graphs (captured at
  the first replay): the first interval as the warm-up, then keys ``I+1..2I``;
- the online row: one epoch of warm-up, then one epoch (``L`` steps) timed;
- the official loop (``official_loop.py``: per-sample torchvision transforms in a DataLoader with
  ``--official-workers`` workers, float32 host copies, unfused loss; fp32 NCHW, the same
  networks and SGD): ``--official-interval`` batches of warm-up, then ``--official-batches``
  batches with a replay every ``--official-interval`` batches (every batch is replayed once
  whatever the interval, so the per-image cost does not depend on it). The loader's iterator
  starts in the warm-up and is kept: worker start-up, which the official code pays once per
  epoch, is left out (over 60 batches it would weigh 6.5x what it weighs in a 391-batch epoch).

Per row: ``ms per step`` = wall / teacher steps (one step = a batch for the teacher plus its replay
by the student), ``epoch s`` = that times ``L``, ``images/s`` = teacher images / wall. Each window
starts and ends with a device synchronise. ``GPU busy`` = union of the CUDA kernel intervals /
wall over ``--profile-steps`` further steps under ``torch.profiler`` (CUDA activity only, so that
host-side op recording does not slow the host-bound step); for spaced rows without overlap those
steps are teacher steps only. Graph launches counted there (``cudaGraphLaunch``) show whether the
graphs row replayed graphs. Each row has its own time cap and the whole matrix a budget: a row
that reaches its cap stops and says so, rows that no longer fit are skipped.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from epoch_matrix_report import TARGETS, ratios, report, row_line
from gpu_busy import profiled

BASE_SPACED = {"mode": "spaced", "overlap": "off", "cuda_graphs": "off", "finite_check_every": 1}
BF16_CL = {"amp": "bf16", "channels_last": "on"}
# name -> TrainConfig settings; the official loop is the row "official loop"
VARIANTS: dict[str, dict] = {
    "fp32": {**BASE_SPACED, "amp": "off", "channels_last": "off"},
    "bf16+cl": {**BASE_SPACED, **BF16_CL},
    # graphs and overlap need the deferred finite check to pay (a host read every step stalls)
    "bf16+cl+graphs": {**BASE_SPACED, **BF16_CL, "cuda_graphs": "on", "finite_check_every": 50},
    "bf16+cl+graphs+overlap": {**BASE_SPACED, **BF16_CL, "cuda_graphs": "on", "overlap": "on",
                               "finite_check_every": 50},
    "online bf16+cl": {**BASE_SPACED, **BF16_CL, "mode": "online"},
}
OFFICIAL = "official loop"
ORDER = [*VARIANTS, OFFICIAL]  # as printed
# run order: the rows the targets compare come first, so that a tight budget skips the others
RUN_ORDER = ["bf16+cl", "online bf16+cl", OFFICIAL, "fp32", "bf16+cl+graphs",
             "bf16+cl+graphs+overlap"]
# seconds per row on an H200 (engine, fp32: ~28 ms per teacher step + its replay: ~17 s for a
# 586-step window, plus the warm-up; the first rows of a dtype also pay cuDNN's autotuning)
CAPS = {"fp32": 40, "bf16+cl": 40, "bf16+cl+graphs": 40, "bf16+cl+graphs+overlap": 35,
        "online bf16+cl": 25, OFFICIAL: 30}


# ------------------------------------------------------------------------------ data
def synthetic_bundle(args):
    """``args.images`` random uint8 images of CIFAR-100 shape behind the trainer's keyed pipeline
    (on the device: the gpu-resident backend on CUDA), CIFAR augmentation recipe."""
    from spacedkd_fast.data import ArrayData, Augmenter, DataBundle, TensorSource
    from spacedkd_fast.data.augment import CIFAR100_MEAN, CIFAR100_STD

    images, labels = synthetic_arrays(args, args.images)
    data = ArrayData(images, labels, [str(i) for i in range(args.classes)], "synthetic CIFAR-100")
    aug = Augmenter("cifar", args.image_size, seed=0, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    source = TensorSource(data, aug, batch_size=args.batch, seed=0, device=args.device)
    return DataBundle(train=source, test=lambda: [], num_classes=args.classes,
                      image_size=args.image_size, name="synthetic", backend=source.backend,
                      announcement=f"{args.images} synthetic images", recipe="cifar")


def synthetic_arrays(args, n: int):
    rng = np.random.default_rng(0)
    s = args.image_size
    images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    return images, rng.integers(0, args.classes, n).astype(np.int64)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ trainer rows
class CapReached(Exception):
    pass


class Driver:
    """The trainer's epoch loop (train/loop.py) as a stream of steps that crosses epochs."""

    def __init__(self, parts, deadline: float) -> None:
        from spacedkd_fast.train.lr_schedule import EpochSchedule

        self.parts, self.deadline, self.images = parts, deadline, 0
        self._epoch_schedules = [s for s in (parts.teacher_sched, parts.student_sched)
                                 if isinstance(s, EpochSchedule)]
        self._batches = self._keyed()

    def _keyed(self):
        for epoch in itertools.count():
            for sched in self._epoch_schedules:
                sched.set_epoch(epoch)
            yield from self.parts.source.epoch(epoch)

    def run(self, n: int) -> None:
        d, log_every = self.parts.distiller, self.parts.cfg.log_every
        for key, (x, y) in itertools.islice(self._batches, n):
            d.step(key, x, y)
            self.images += x.shape[0]
            if key % log_every == 0:
                d.pop_stats()
            if time.perf_counter() > self.deadline:
                raise CapReached(f"cap reached at key {key}")

    def counts(self) -> tuple[int, int]:
        return self.parts.distiller.teacher_steps, self.parts.distiller.student_steps


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def trainer_row(name: str, bundle, args, cap: float) -> dict:
    from spacedkd_fast.engine.spacing import interval_steps
    from spacedkd_fast.train.build import build_run
    from spacedkd_fast.train.config import build_config
    from spacedkd_fast.train.distributed import init_distributed

    settings = VARIANTS[name]
    row = {"name": name, "settings": settings}
    values = {"dataset": "cifar100", "arch": "resnet18", "interval_rate": args.interval_rate,
              "batch_size": args.batch, "device": str(args.device), "seed": 0,
              "model_kwargs": args.model_kwargs, **settings}
    start = time.perf_counter()
    try:
        cfg = build_config(values)
        parts = build_run(cfg, init_distributed(str(args.device)), data=bundle)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:  # incl. UserError
        return {**row, "status": "not available", "note": one_line(err)}
    L = parts.steps_per_epoch
    interval = interval_steps(L, cfg.interval_rate) if cfg.mode == "spaced" else None
    if interval is None:
        warm, timed = L, L
    elif getattr(parts.distiller, "overlap", False) or settings["cuda_graphs"] == "on":
        warm, timed = interval, interval  # the window is the second interval
    else:
        warm, timed = min(L, interval - 1), interval  # the first replay inside the window
    drv = Driver(parts, start + cap)
    row.update(steps_per_epoch=L, interval_steps=interval, warmup_steps=warm)
    try:
        drv.run(warm)
        sync(args.device)
        t0_counts, images0 = drv.counts(), drv.images
        t0 = time.perf_counter()
        drv.run(timed)
        sync(args.device)
        wall = time.perf_counter() - t0
        t1_counts = drv.counts()
        row.update(timing(wall, t1_counts[0] - t0_counts[0], t1_counts[1] - t0_counts[1],
                          drv.images - images0, L))
        drv.deadline = float("inf")  # the profiled window is short; let it finish
        add_profile(row, args.device, lambda: drv.run(args.profile_steps), drv.counts)
        row["total_teacher_steps"], row["total_student_steps"] = drv.counts()
        row["status"] = "ok"
        prof = row["profile"]
        if settings.get("cuda_graphs") == "on" and prof and prof["graph_launches"] == 0:
            row["note"] = "no cudaGraphLaunch in the profiled window: graphs not in effect"
    except CapReached as err:
        row.update(status="cap", note=f"stopped at the {cap:.0f} s cap ({err}) after "
                   f"{sum(drv.counts())} steps")
    return row


def add_profile(row: dict, device: torch.device, fn, counts) -> None:
    """``row["profile"]``: GPU busy over ``fn()`` (None on a CPU) and the teacher and student
    steps it took (``counts()`` before and after). A profiler failure keeps the row's timing."""
    before = counts()
    try:
        prof = profiled(device, fn)
    except Exception as err:  # noqa: BLE001 - the timing above stands without the profile
        row.update(profile=None, note=f"profiler failed: {type(err).__name__}: {one_line(err)}")
        return
    after = counts()
    row["profile"] = prof and {**prof, "teacher_steps": after[0] - before[0],
                               "student_steps": after[1] - before[1]}


def timing(wall: float, teacher_steps: int, student_steps: int, images: int, L: int) -> dict:
    per_step = wall / teacher_steps if teacher_steps else None
    return {"wall_s": wall, "timed_teacher_steps": teacher_steps,
            "timed_student_steps": student_steps, "images": images,
            "balanced": teacher_steps == student_steps,
            "images_per_s": images / wall if wall > 0 else None,
            "ms_per_step": per_step * 1e3 if per_step else None,
            "epoch_s": per_step * L if per_step else None}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ official loop
def official_row(args, cap: float) -> dict:
    from official_loop import OfficialLoop, official_loader

    from spacedkd_fast.engine.projection import ProjectionHead
    from spacedkd_fast.models import create

    interval, timed = args.official_interval, args.official_batches
    timed = max(interval, timed // interval * interval)  # whole intervals: every batch replayed
    profile_batches = max(interval, args.profile_steps // interval * interval)
    row = {"name": OFFICIAL, "settings": {"amp": "off", "channels_last": "off",
                                          "workers": args.official_workers,
                                          "interval_steps": interval}}
    images, labels = synthetic_arrays(args, (interval + timed + profile_batches) * args.batch)
    torch.manual_seed(0)
    nets = [create("resnet18", args.classes, args.image_size, **args.model_kwargs).to(args.device)
            for _ in range(2)]
    projector = ProjectionHead(nets[1].feature_dim, nets[0].feature_dim).to(args.device)

    def sgd(params):
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    loop = OfficialLoop(nets[0], nets[1], projector, sgd(nets[0].parameters()),
                        sgd(list(nets[1].parameters()) + list(projector.parameters())),
                        interval=interval, device=str(args.device))
    batches = iter(official_loader(images, labels, batch_size=args.batch,
                                   num_workers=args.official_workers))
    deadline = time.perf_counter() + cap
    state = {"capped": False}

    def take(k, capped=True):
        for b in itertools.islice(batches, k):
            yield b
            if capped and time.perf_counter() > deadline:
                state["capped"] = True
                return

    torch.backends.cudnn.benchmark = True  # as in the trainer's CUDA rows: loops are compared
    loop.epoch(take(interval))  # warm-up: starts the workers, one replay
    s0 = loop.n
    t0 = time.perf_counter()
    got = loop.epoch(take(timed))  # ends with a synchronise
    wall = time.perf_counter() - t0
    steps = loop.n - s0
    if state["capped"] or steps < timed:
        return {**row, "status": "cap", "note": f"stopped at the {cap:.0f} s cap after {steps} "
                f"of {timed} timed batches"}
    # every stored batch was replayed: the interval divides the timed batches
    row.update(timing(wall, steps, steps, got, args.steps_per_epoch), status="ok")
    # whole intervals again: the student replays as many batches as the teacher takes
    add_profile(row, args.device, lambda: loop.epoch(take(profile_batches, False)),
                lambda: (loop.n, loop.n))
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog=f"rows: {', '.join(repr(n) for n in ORDER)}. A CPU miniature that shows the code "
               "path (not the speed) in seconds: python benchmarks/epoch_matrix.py --device cpu "
               "--images 1024 --image-size 8 --classes 10 --model-kwargs downsample_factor=64 "
               "--official-workers 0 --budget 50")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the benchmark) or cpu (a miniature: the default sizes take minutes)")
    p.add_argument("--images", type=int, default=50_000, help="synthetic training images")
    p.add_argument("--image-size", type=int, default=32, help="pixels")
    p.add_argument("--classes", type=int, default=100, help="classes")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--interval-rate", type=float, default=1.5, help="spacing s")
    p.add_argument("--model-kwargs", default="", help="both networks' options, K=V,... "
                   "(e.g. downsample_factor=64 for the CPU miniature)")
    p.add_argument("--variants", default=",".join(ORDER),
                   help="comma-separated rows to run (quote names with spaces)")
    p.add_argument("--profile-steps", type=int, default=30,
                   help="steps profiled for the GPU-busy fraction")
    p.add_argument("--official-batches", type=int, default=60, help="official loop: timed batches")
    p.add_argument("--official-interval", type=int, default=10,
                   help="official loop: a replay every this many batches")
    p.add_argument("--official-workers", type=int, default=4, help="official loop: loader workers")
    p.add_argument("--budget", type=float, default=175.0,
                   help="seconds for the whole matrix; rows that no longer fit are skipped")
    p.add_argument("--cap-scale", type=float, default=1.0, help="multiplies each row's cap")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    from spacedkd_fast.train.config_values import parse_kwargs

    args.model_kwargs = parse_kwargs(args.model_kwargs)
    args.device = torch.device(args.device)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in ORDER]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {ORDER}")
    args.steps_per_epoch = -(-args.images // args.batch)
    return args


def matrix_ratios(rows: dict[str, dict]) -> dict:
    spaced = {n for n, v in VARIANTS.items() if v["mode"] == "spaced"}
    return ratios(rows, official=OFFICIAL, online="online bf16+cl", spaced=spaced)


def run_row(name: str, bundle, args, cap: float) -> dict:
    """One row; an unexpected error is the row's result (one line), not the matrix's end."""
    try:
        if name == OFFICIAL:
            return official_row(args, cap)
        return trainer_row(name, bundle, args, cap)
    except Exception as err:  # noqa: BLE001 - reported in the row, the next rows still run
        return {"name": name, "status": "error", "note": f"{type(err).__name__}: {one_line(err)}"}
    finally:
        release(args.device)  # the row's networks and buffers are garbage now


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("epoch_matrix: --device cuda, but torch sees no CUDA device here; use --device cpu "
              "(with the miniature's options: see test_epoch_matrix.py)", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    dev = args.device
    meta = {"device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"CPU x{torch.get_num_threads()} threads", "torch": torch.__version__,
            "cuda": torch.version.cuda, "images": args.images, "image_size": args.image_size,
            "classes": args.classes, "batch": args.batch, "interval_rate": args.interval_rate,
            "steps_per_epoch": args.steps_per_epoch, "model_kwargs": args.model_kwargs,
            "profile_steps": args.profile_steps,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows: dict[str, dict] = {}
    result = {"meta": meta, "rows": rows, "ratios": {}, "targets": TARGETS}
    bundle = synthetic_bundle(args) if set(args.variants) & set(VARIANTS) else None
    for name in [n for n in RUN_ORDER if n in args.variants]:
        left = args.budget - (time.perf_counter() - start)
        cap = min(CAPS[name] * args.cap_scale, left)
        if cap < 0.5 * CAPS[name] * args.cap_scale:
            rows[name] = {"name": name, "status": "skipped",
                          "note": f"{left:.0f} s of the {args.budget:.0f} s budget left"}
        else:
            t0 = time.perf_counter()
            rows[name] = run_row(name, bundle, args, cap)
            rows[name]["row_s"] = time.perf_counter() - t0
        print(f"[{rows[name].get('row_s', 0):5.1f} s] {row_line(rows[name])}", flush=True)
        meta["total_s"] = time.perf_counter() - start
        result["ratios"] = matrix_ratios(rows)
        if args.json:  # after every row: a killed run still leaves the rows it finished
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    report(result, ORDER)
    return result


if __name__ == "__main__":  # run as a script, its folder is on sys.path: official_loop, gpu_busy
    main()
