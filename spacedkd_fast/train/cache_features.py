"""``python -m spacedkd_fast.train.cache_features``: build the precomputed teacher maps of a
``--teacher-features precomputed`` run (the official ``deit-ti_c100_ours_offline``).

The frozen teacher (``--teacher-checkpoint``) runs once over the un-augmented training images at
its own size (``--teacher-image-size``; the images normalised as the recipe's test images are), in
eval mode (running BatchNorm statistics: a stored map must not depend on its batch), and the
outputs of ``--inter-teacher-blocks`` are stored in a memory-mapped cache
(:mod:`spacedkd_fast.data.feature_cache`). The cache lives beside the teacher checkpoint, in
``teacher_maps/<checkpoint>-<data set>-blocks<J_J_..>-<px>px/``: the trainer finds it there,
builds it itself when it is missing (one process), and refuses one that was computed from another
teacher, data set, block list, size or normalisation. This command takes the trainer's flags (the
same command line, with ``spacedkd_fast.train.cache_features`` for ``spacedkd_fast.train``), so
it builds the cache that run will read; ``--rebuild`` replaces a stale one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from ..data.augment import Augmenter
from ..data.feature_cache import (
    DTYPES,
    CacheSpec,
    CacheWriter,
    FeatureCache,
    StaleCacheError,
    file_sha256,
    images_sha256,
)
from ..engine.model_io import unwrap
from ..models import BlockFeatures
from .config import TrainConfig
from .errors import EXIT_BAD_INPUT, UserError
from .report import ProgressBar

COMMAND = "python -m spacedkd_fast.train.cache_features"
BUILD_BATCH = 256


def teacher_size(cfg: TrainConfig, data) -> int:
    """The teacher's input size: ``teacher_image_size``, else the run's image size."""
    return int(cfg.teacher_image_size or data.image_size)


def cache_folder(cfg: TrainConfig, data) -> Path:
    """Where the maps of ``cfg`` live (beside the teacher checkpoint)."""
    ckpt = Path(cfg.teacher_checkpoint)
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(cfg.dataset or data.name))
    blocks = "_".join(str(b) for b in cfg.inter_teacher_blocks)
    return (ckpt.parent / "teacher_maps"
            / f"{ckpt.stem}-{dataset}-blocks{blocks}-{teacher_size(cfg, data)}px")


def keyed_source(data):
    """The data set's training source, which must hold its images in memory."""
    source = data.train
    if not hasattr(source, "images") or not hasattr(source, "params"):
        raise UserError(f"--teacher-features precomputed needs a data set held in memory (CIFAR, "
                        f"digits, Tiny-ImageNet) with --data-backend torch-cpu or gpu-resident; "
                        f"this run's source is {type(source).__name__}")
    try:
        source.augmenter.check_crop_geometry()
    except ValueError as err:
        raise UserError(f"--teacher-features precomputed: {err}") from None
    return source


def cache_spec(cfg: TrainConfig, data) -> CacheSpec:
    """What the cache of ``cfg`` must have been computed from."""
    source = keyed_source(data)
    images = source.images
    return CacheSpec(
        teacher_checkpoint=str(cfg.teacher_checkpoint),
        teacher_sha256=file_sha256(cfg.teacher_checkpoint), teacher_arch=str(cfg.teacher),
        blocks=tuple(int(b) for b in cfg.inter_teacher_blocks),
        teacher_image_size=teacher_size(cfg, data),
        mean=tuple(float(v) for v in source.augmenter.mean),
        std=tuple(float(v) for v in source.augmenter.std),
        dataset=str(cfg.dataset or data.name), num_samples=int(images.shape[0]),
        image_size=(int(images.shape[2]), int(images.shape[3])), data_sha256=images_sha256(images))


def build_cache(folder: Path, spec: CacheSpec, teacher: nn.Module, data, *,
                batch_size: int = BUILD_BATCH, dtype: str = "float32", progress: bool = True,
                stream: TextIO | None = None) -> FeatureCache:
    """Run ``teacher`` (loaded, frozen) once over every training image and write the cache."""
    source = keyed_source(data)
    images = source.images
    model = unwrap(teacher)
    device = next(iter(model.parameters())).device
    size = spec.teacher_image_size
    to_teacher = Augmenter(source.augmenter.recipe, size, seed=0, mean=source.augmenter.mean,
                           std=source.augmenter.std)
    n = spec.num_samples
    bar = ProgressBar(-(-n // batch_size), f"teacher maps -> {folder}", stream=stream,
                      enabled=progress)
    recorder = BlockFeatures(model, indices=list(spec.blocks))
    was_training = model.training
    model.eval()
    writer = None
    try:
        with torch.no_grad():
            for step, start in enumerate(range(0, n, batch_size), 1):
                rows = torch.arange(start, min(n, start + batch_size))
                x = to_teacher.test_transform(images.index_select(0, rows.to(images.device)))
                model(x.to(device))
                maps = list(recorder.features)
                if writer is None:
                    writer = CacheWriter(folder, spec, [tuple(m.shape[1:]) for m in maps], dtype)
                writer.write(rows, maps)
                done = int(rows[-1]) + 1
                # a log (not a terminal) gets a line at every tenth of the work
                tenth = step == bar.total or step % max(1, bar.total // 10) == 0
                bar.update(step, done, stats={"done %": 100.0 * done / n} if tenth else None)
        writer.finish()
    finally:
        recorder.remove()
        model.train(was_training)
        bar.close()
    return FeatureCache.open(folder)


def open_cache(cfg: TrainConfig, data, teacher: nn.Module, *, world_size: int = 1,
               progress: bool = True, stream: TextIO | None = None) -> FeatureCache:
    """The run's cache, built first when missing (one process only); ``UserError`` (one line)
    for a stale or damaged cache, naming the command that rebuilds it."""
    folder = cache_folder(cfg, data)
    spec = cache_spec(cfg, data)
    rebuild = f"rebuild it with {COMMAND} --rebuild and this run's flags"
    try:
        cache = FeatureCache.open(folder)
    except FileNotFoundError:
        if world_size > 1:
            raise UserError(f"no precomputed teacher maps in {folder}: build them first with "
                            f"{COMMAND} and this run's flags") from None
        print(f"precomputed teacher maps: none in {folder}; computing them once",
              file=stream or sys.stderr)
        return build_cache(folder, spec, teacher, data, progress=progress, stream=stream)
    except StaleCacheError as err:
        raise UserError(f"{err}; {rebuild}") from None
    try:
        cache.check(spec)
    except StaleCacheError as err:
        raise UserError(f"{err}; {rebuild}") from None
    return cache


# ------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    from .cli import build_parser as trainer_parser

    parser = trainer_parser()
    parser.prog = COMMAND
    parser.description = (
        "Build the precomputed teacher feature maps of a --teacher-features precomputed run (the "
        "official deit-ti_c100_ours_offline), with a progress bar.\n\nGive the run's own flags "
        "(e.g. --config deit-ti_c100_ours_offline --teacher-checkpoint FILE): the maps decided by "
        "--config, --dataset, --data-dir, --augment, --teacher-arch, --teacher-kwargs, "
        "--teacher-checkpoint, --teacher-image-size and --inter-teacher-blocks are computed once "
        "by the frozen teacher (eval mode, un-augmented images at the teacher's size) and stored "
        "memory-mapped beside the checkpoint, in teacher_maps/<checkpoint>-<data set>-blocks<J_J>"
        "-<px>px/, where that run reads them (--no-progress hides the bar; the other flags are "
        "accepted and unused). The "
        "trainer builds a missing cache itself; this command builds it ahead (e.g. before a "
        "multi-process run) or replaces a stale one (--rebuild).")
    parser.epilog = (f"example:\n  {COMMAND} --config deit-ti_c100_ours_offline "
                     "--teacher-checkpoint runs/r-56_c100/best_student.pt\n"
                     "exit status: 0 built (or already up to date), 2 bad input or a stale cache "
                     "without --rebuild.")
    group = parser.add_argument_group("feature cache")
    group.add_argument("--rebuild", action="store_true", default=False,
                       help="replace an existing cache (stale or not)")
    group.add_argument("--verify", action="store_true", default=False,
                       help="also check every block file against its SHA-256 in the manifest")
    group.add_argument("--cache-dtype", choices=DTYPES, default="float32",
                       help="storage type of the maps (float16 halves the file; default float32)")
    group.add_argument("--cache-batch-size", type=int, default=BUILD_BATCH, metavar="N",
                       help=f"images per teacher forward while building (default {BUILD_BATCH})")
    return parser


def _build_from_args(ns: argparse.Namespace, cfg: TrainConfig) -> int:
    from .build import _build_data, _build_model, seed_everything
    from .distributed import init_distributed
    from .speed_defaults import apply_speed_defaults
    from .wiring import load_teacher

    if cfg.teacher_features != "precomputed":
        raise UserError("this configuration has --teacher-features live: nothing to cache (use "
                        "the recipe deit-ti_c100_ours_offline or --teacher-features precomputed)")
    if ns.cache_batch_size <= 0:
        raise UserError(f"--cache-batch-size must be greater than zero, got {ns.cache_batch_size}")
    info = init_distributed(cfg.device)
    apply_speed_defaults(cfg, info.device.type)  # the teacher built as the run builds it
    seed_everything(cfg, info.device)
    data = _build_data(cfg, info)
    folder = cache_folder(cfg, data)
    spec = cache_spec(cfg, data)
    if not ns.rebuild:
        try:
            cache = FeatureCache.open(folder)
            cache.check(spec)
        except FileNotFoundError:
            pass
        except StaleCacheError as err:
            raise UserError(f"{err}; add --rebuild to replace it") from None
        else:
            bad = cache.verify_files() if ns.verify else []
            if bad:
                raise UserError(f"feature cache {folder}: {', '.join(bad)} changed since it was "
                                "written; add --rebuild to replace it")
            print(f"up to date: {folder}")
            return 0
    teacher = _build_model(cfg, data, cfg.teacher, cfg.teacher_kwargs, info.device,
                           image_size=cfg.teacher_image_size)
    load_teacher(teacher, cfg)
    cache = build_cache(folder, spec, teacher, data, batch_size=ns.cache_batch_size,
                        dtype=ns.cache_dtype, progress=not getattr(ns, "no_progress", False))
    gib = sum(a.nbytes for a in cache.arrays) / 2**30
    print(f"built: {folder} ({spec.num_samples} samples, blocks {list(spec.blocks)}, "
          f"shapes {cache.shapes}, {cache.dtype}, {gib:.2f} GiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import config_from_args
    from .config import ConfigError
    from .errors import CheckpointError

    parser = build_parser()
    ns = parser.parse_args(argv)
    field_names = set(TrainConfig.__dataclass_fields__)
    cli = {k: v for k, v in vars(ns).items() if k in field_names}
    try:
        return _build_from_args(ns, config_from_args(ns, cli))
    except (ConfigError, UserError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
