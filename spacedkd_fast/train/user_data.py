"""The trainer on your own Datasets from Python: ``spacedkd_fast.train.run(config, train_set=...,
test_set=...)``.

The sets go through a :class:`~spacedkd_fast.data.KeyedLoader` (so spaced replay stays exact, with
your transforms and loader workers) after the data checks of :mod:`spacedkd_fast.data.user_sets`;
everything else (output folder, checkpoints, ``--resume``, exit statuses) is the trainer's. The
CLI's way to the same path is ``--dataset MODULE:FUNCTION``, which can also resume by itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from .config import TrainConfig, build_config, load_yaml
from .errors import UserError


class UserSets:
    """Builds the run's data bundle from a user's Datasets once the process knows its device and
    rank (:func:`spacedkd_fast.train.build.build_run` calls it with ``(cfg, info)``)."""

    def __init__(self, train_set: Any, test_set: Any, *, num_classes: int | None = None,
                 num_workers: int | None = None, collate_fn: Callable | None = None,
                 name: str | None = None) -> None:
        self.train_set = train_set
        self.test_set = test_set
        self.num_classes = num_classes
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        # what the output folder and config.yaml name as the data set
        # (not a MODULE:FUNCTION spelling: the CLI cannot rebuild these sets by itself)
        self.name = name or f"from-python:{type(train_set).__name__}"

    def __call__(self, cfg: TrainConfig, info: Any):
        from ..data.user_sets import build_user_data

        if cfg.augment not in (None, "none"):
            raise UserError(f"augment {cfg.augment!r}: your sets carry their own transforms "
                            "(leave augment out)")
        try:
            return build_user_data(
                self.train_set, self.test_set, num_classes=self.num_classes,
                batch_size=cfg.batch_size, seed=cfg.seed, device=info.device, rank=info.rank,
                world_size=info.world_size, drop_last=bool(cfg.drop_last),
                num_workers=self.num_workers, collate_fn=self.collate_fn, name=self.name,
                image_size=cfg.image_size)
        except ValueError as err:  # BadDataError, or a loader setting that cannot work
            raise UserError(f"data: {err}") from None


def _config(config: TrainConfig | Mapping[str, Any] | str | None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if config is None:
        return build_config()
    if isinstance(config, str):  # a shipped recipe or a YAML file, as --config
        return build_config(load_yaml(config))
    return build_config(None, dict(config))


def run(config: TrainConfig | Mapping[str, Any] | str | None = None, *, train_set: Any,
        test_set: Any, num_classes: int | None = None, num_workers: int | None = None,
        collate_fn: Callable | None = None, resume: str | os.PathLike | None = None,
        progress: bool = True) -> int:
    """Train ``config`` on your own map-style Datasets; returns the trainer's exit status (0
    done, 3 a non-finite loss, 4 a file could not be written, 130/143 stopped with the state
    saved).

    ``config``: a :class:`TrainConfig`, a dict of its settings (the flags' names, e.g.
    ``{"mode": "spaced", "arch": "resnet18", "epochs": 10, "out": "runs/mine"}``), a recipe name
    or YAML file, or ``None`` (the defaults). ``train_set`` / ``test_set``: items ``(image
    tensor [3, H, W] float, int label)`` (your transforms inside), or what ``collate_fn`` turns into
    ``(images, labels)``. ``num_classes``: default ``len(train_set.classes)`` or 1 + the largest
    label the set lists. ``num_workers``: loader worker processes (default: the cores but one, at
    most 8). ``resume``: the ``out`` folder of an earlier run to continue (pass the same sets;
    ``config`` is then a dict of the settings given with it, as flags with ``--resume``:
    ``{"epochs": 120}`` extends the run).

    Bad input (an empty set, an item that is not an (image, label) pair, a label outside
    ``[0, classes)``, images of unequal sizes without ``collate_fn``, a bad setting) raises
    ``UserError`` / ``ConfigError`` with one line naming the problem; a bad item that only a
    loader worker meets mid-run raises the data layer's ``BadDataError`` (one line too).
    """
    from . import runner

    data = UserSets(train_set, test_set, num_classes=num_classes, num_workers=num_workers,
                    collate_fn=collate_fn)
    if resume is not None:  # config: the settings to change, as flags given with --resume
        overrides = dict(config) if isinstance(config, Mapping) else None
        return runner.resume(resume, overrides=overrides, progress=progress, data=data)
    cfg = _config(config)
    if cfg.dataset is None:
        cfg.dataset = data.name
    return runner.train(cfg, progress=progress, data=data)
