"""``python -m spacedkd_fast.flatness``: how flat is the minimum each run's student reached?

For the best student of each run (``best_student.pt``) on the run's test set: the Hutchinson
estimate of the Hessian trace of the mean cross-entropy (with its standard error), and the loss and
accuracy along a filter-normalised random direction. Writes ``flatness.json`` into each run folder
(``python -m spacedkd_fast.compare`` adds the traces to its table) and ``flatness.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .analysis.cli import HelpFormatter, OneLineErrorParser

DESCRIPTION = """\
Measure the flatness of the best student of each run: the trace of the Hessian of the test loss
(Hutchinson's estimator with Rademacher probes and Hessian-vector products; smaller = flatter, the
paper's evidence for Spaced KD) and a 1-D profile of the test loss and accuracy along a
filter-normalised random direction (Li et al. 2018). BatchNorm uses its running statistics; for a
multi-exit self-KD network the loss is the deepest exit's cross-entropy.

RUN_OR_GROUP: as for python -m spacedkd_fast.compare (run folders, group folders, folders of
groups). The model is rebuilt from the run's config.yaml and best_student.pt, the test set from its
data settings (run from the folder the training ran in, or give --data-dir)."""

EPILOG = """\
printed: per run the best student's epoch and test top-1, the Hessian trace ± its standard error
(probe noise only: every probe sees the same test batches), then each group's mean ± std over runs.
Progress goes to stderr. A run whose flatness.json was computed with the same settings and the same
checkpoint is not measured again (--force to redo it).

examples:
  python -m spacedkd_fast.flatness runs/online runs/spaced
  python -m spacedkd_fast.flatness runs/digits --samples 32 --device cpu
  python -m spacedkd_fast.compare runs/online runs/spaced     (now with the Hessian traces)

outputs: RUN/flatness.json for each run; flatness.png (in --out, default: the folder that holds
all inputs): loss and top-1 along the direction, mean per group with a ± 1 std band, and the traces.
exit status: 0 done, 2 bad input (no runs, no best_student.pt, data or model that do not match)."""

FLATNESS_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m spacedkd_fast.flatness", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="*", metavar="RUN_OR_GROUP",
                   help="run folders, group folders, or folders of groups")
    p.add_argument("--group", action="append", default=[], metavar="NAME=DIR,DIR,...",
                   help="a group made of these run (or group) folders; repeatable")
    p.add_argument("--samples", type=int, default=64, metavar="N",
                   help="Rademacher probes of the Hutchinson estimate (default: 64)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the probes and of the random direction (default: 0)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="use only the first N test batches (default: the whole test set)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="test batch size (default: the run's)")
    p.add_argument("--points", type=int, default=21, metavar="N",
                   help="points of the loss profile (default: 21; 0 skips the profile)")
    p.add_argument("--radius", type=float, default=1.0, metavar="R",
                   help="the profile spans [-R, R] times the direction (default: 1)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="cpu, cuda, cuda:N; auto = cuda when available (default: auto)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding the data sets (default: the run's --data-dir)")
    p.add_argument("--out", metavar="DIR",
                   help="where to write flatness.png (default: the inputs' common folder)")
    p.add_argument("--force", action="store_true",
                   help="measure again even where flatness.json matches these settings")
    return p


class FlatnessError(ValueError):
    """A run that cannot be measured; the message names it and says why."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise FlatnessError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlatnessError(f"--device {name}: no CUDA device is available")
    return device


def load_best_student(folder: Path, config: dict[str, Any], device):
    """The run's best student, rebuilt with the model registry, in eval mode on ``device``.

    Returns ``(model, meta)`` with ``meta`` the checkpoint's arch, num_classes, image_size,
    epoch and top1.
    """
    import torch

    from .models import create, load_checkpoint

    path = folder / "best_student.pt"
    if not path.is_file():
        raise FlatnessError(f"{folder}: no best_student.pt (the trainer writes it at the first "
                            "evaluation)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        meta = {k: ckpt[k] for k in ("arch", "num_classes", "image_size", "epoch", "top1")}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise FlatnessError(f"{path} is not a readable best-student checkpoint "
                            f"({type(err).__name__})") from None
    kwargs = {**(config.get("model_kwargs") or {}), **(config.get("student_kwargs") or {})}
    try:
        model = create(meta["arch"], int(meta["num_classes"]), int(meta["image_size"]), **kwargs)
        load_checkpoint(model, path)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise FlatnessError(f"{folder}: cannot rebuild the student ({err})") from None
    return model.to(device).eval(), meta


def test_batches(config: dict[str, Any], meta: dict[str, Any], *, device, batch_size: int | None,
                 data_dir: str | None, max_batches: int | None) -> tuple[list, str]:
    """The run's test set as a list of ``(x, y)`` batches on ``device``, and its data set name."""
    import itertools

    from .data import build_data

    try:
        data = build_data(config.get("dataset"), data_dir=data_dir or config.get("data_dir")
                          or "./data", recipe=config.get("augment"),
                          batch_size=batch_size or int(config.get("batch_size") or 128),
                          seed=int(config.get("seed") or 0), device=str(device),
                          image_size=int(meta["image_size"]))
    except (FileNotFoundError, ValueError) as err:
        raise FlatnessError(f"data: {err}") from None
    if data.num_classes != int(meta["num_classes"]):
        raise FlatnessError(f"the data set found here ({data.name}, {data.num_classes} classes) is "
                            f"not the run's ({meta['num_classes']} classes); run from the folder "
                            "the training ran in or give --data-dir")
    batches = list(itertools.islice(data.test(), max_batches))
    return batches, data.name


def measure(folder: Path, config: dict[str, Any], args: argparse.Namespace, device,
            prefix: str) -> dict[str, Any]:
    """Hessian trace and loss profile of one run's best student (what flatness.json holds)."""
    from . import __version__
    from .analysis.hessian import hessian_trace, loss_profile

    model, meta = load_best_student(folder, config, device)
    batches, data_name = test_batches(config, meta, device=device, batch_size=args.batch_size,
                                      data_dir=args.data_dir, max_batches=args.max_batches)
    n = sum(int(y.shape[0]) for _, y in batches)
    _say(f"{prefix} best student {meta['arch']} from epoch {meta['epoch']} (test top-1 "
         f"{100 * float(meta['top1']):.2f}%), {data_name} test set: {n} images in {len(batches)} "
         f"batches, device {device}")
    t0 = time.monotonic()
    est = hessian_trace(model, batches, samples=args.samples, seed=args.seed,
                        progress=lambda s: _say(f"{prefix}   Hessian trace: {s} "
                                                f"(of {len(batches)} batches)"))
    _say(f"{prefix}   Hessian trace {est.trace:.5g} ± {est.stderr:.3g} "
         f"({time.monotonic() - t0:.1f} s)")
    profile = None
    if args.points > 0:
        r = args.radius
        k = args.points
        alphas = [0.0] if k == 1 else [-r + 2 * r * i / (k - 1) for i in range(k)]
        t1 = time.monotonic()
        profile = loss_profile(model, batches, alphas=alphas, seed=args.seed,
                               progress=lambda s: _say(f"{prefix}   profile: {s}"))
        _say(f"{prefix}   loss profile done ({time.monotonic() - t1:.1f} s)")
    return {"version": FLATNESS_VERSION, "settings": _settings(args),
            "checkpoint": {k: meta[k] for k in ("arch", "epoch", "top1")},
            "data": data_name, "test_images": n, "device": str(device),
            "hessian_trace": est.trace, "hessian_trace_stderr": est.stderr,
            "hessian_samples": est.samples, "num_params": est.num_params,
            "per_probe": est.per_probe, "profile": profile,
            "wall_s": time.monotonic() - t0, "spacedkd_fast": __version__}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"samples": args.samples, "seed": args.seed, "max_batches": args.max_batches,
            "batch_size": args.batch_size, "points": args.points, "radius": args.radius}


def _up_to_date(run, args: argparse.Namespace) -> bool:
    f = run.flatness
    if args.force or not f or f.get("version") != FLATNESS_VERSION:
        return False
    if f.get("settings") != _settings(args):
        return False
    try:
        import torch

        ckpt = torch.load(run.path / "best_student.pt", map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - measure again; that step reports a broken file
        return False
    return (f.get("checkpoint") or {}).get("epoch") == ckpt.get("epoch")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from .analysis.comparison import decimals
    from .analysis.runs import RunError, collect, parse_group_spec
    from .analysis.stats import spread

    def fail(message: str) -> int:
        print(f"python -m spacedkd_fast.flatness: error: {message}", file=sys.stderr)
        return 2

    if args.samples < 2:
        return fail(f"--samples must be at least 2 (got {args.samples})")
    if args.max_batches is not None and args.max_batches < 1:
        return fail(f"--max-batches must be at least 1 (got {args.max_batches})")
    if args.points < 0 or args.radius <= 0:
        return fail("--points must be >= 0 and --radius > 0")
    try:
        groups = collect(args.paths, [parse_group_spec(s) for s in args.group])
        device = _device(args.device)
        jobs = [(g, r) for g in groups for r in g.runs]
        entries = []
        for i, (group, run) in enumerate(jobs, 1):
            prefix = f"[{i}/{len(jobs)}]"
            _say(f"{prefix} {run.path} (group {group.name})")
            if _up_to_date(run, args):
                _say(f"{prefix}   flatness.json already has these settings; kept (--force redoes)")
            else:
                run.flatness = measure(run.path, run.config, args, device, prefix)
                try:
                    _write_json(run.path / "flatness.json", run.flatness)
                except OSError as err:
                    raise FlatnessError(f"cannot write {run.path / 'flatness.json'} "
                                        f"({err.strerror or err})") from None
            entries.append((group, run))
    except (RunError, FlatnessError) as err:
        return fail(str(err))

    from .compare import _default_out

    out = Path(args.out) if args.out else _default_out(groups)
    fmt = decimals(*(r.flatness["hessian_trace"] for _, r in entries))
    lines = [f"{'run':<40} {'group':<12} {'epoch':>5} {'top-1':>7}  Hessian trace ± s.e."]
    for group, run in entries:
        f = run.flatness
        lines.append(f"{str(run.path)[-40:]:<40} {group.name[:12]:<12} "
                     f"{f['checkpoint']['epoch']:>5} {100 * float(f['checkpoint']['top1']):>6.2f}%"
                     f"  {f['hessian_trace']:{fmt}} ± {f['hessian_trace_stderr']:{fmt}}")
    lines.append("")
    for group in groups:
        s = spread([r.flatness["hessian_trace"] for r in group.runs])
        std = f" ± {s.std:{fmt}}" if s.n > 1 else ""
        lines.append(f"group {group.name}: Hessian trace {s.mean:{fmt}}{std} (mean ± std over "
                     f"{s.n} run{'s' if s.n != 1 else ''})")
    try:
        out.mkdir(parents=True, exist_ok=True)
        from .analysis.plots import plot_flatness

        figure = plot_flatness([(g.name, r.flatness) for g, r in entries], out / "flatness.png")
    except OSError as err:
        return fail(f"--out {out}: cannot write there ({err.strerror or err})")
    print("\n".join(lines))
    print(f"\nwrote flatness.json in each run folder and {figure}; "
          "python -m spacedkd_fast.compare shows the traces next to the accuracies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
