"""Tiny in-process training runs for the trainer tests: digits at 8 px, a 320-image subset (L = 5
steps per epoch at batch 64), ResNet-18 narrowed 64x."""

from __future__ import annotations

import dataclasses
import io

from spacedkd_fast.train import runner
from spacedkd_fast.train.config import build_config

TINY = dict(dataset="digits", arch="resnet18", model_kwargs={"downsample_factor": 64}, image_size=8,
            augment="none", batch_size=64, lr=0.05, device="cpu", log_every=3, seed=0)
N_TRAIN = 320  # the first 320 digits of the training split: L = 5 steps per epoch at batch 64
L = 5


def tiny_config(tmp_path, **over):
    values = {**TINY, "out": str(tmp_path / "run"), **over}
    return build_config(values)


def run(cfg, data=None) -> tuple[int, str]:
    """``runner.train`` in-process; ``(exit status, what it printed)``."""
    stream = io.StringIO()
    status = runner.train(cfg, progress=False, data=data, stream=stream)
    return status, stream.getvalue()


def make_digits_bundle():
    """Digits at 8 px, unaugmented, training on a 320-image subset (keyed source, batch 64)."""
    from spacedkd_fast.data import ArrayData, TensorSource, build_data, load_digits_split

    full = build_data("digits", batch_size=64, image_size=8, recipe="none", seed=0)
    train = load_digits_split("train", image_size=8)
    subset = ArrayData(train.images[:N_TRAIN].copy(), train.labels[:N_TRAIN].copy(), train.classes,
                       "digits subset")
    source = TensorSource(subset, full.train.augmenter, batch_size=64, seed=0)
    assert source.steps_per_epoch == L
    return dataclasses.replace(full, train=source)
