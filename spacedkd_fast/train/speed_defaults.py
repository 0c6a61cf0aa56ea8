"""What ``--amp auto`` and ``--channels-last auto`` mean for one run: a pure rule, no torch.

``amp auto`` is bf16 autocast when the run trains on CUDA, every model it builds is convolutional
(the ``family`` of :mod:`spacedkd_fast.model_catalog`), and ``--compat`` is none (the official
presets reproduce the official code's fp32 runs); otherwise it is off. ``channels_last auto``
follows the resolved amp: on exactly when amp is bf16 or fp16 in a CNN run on CUDA, so
``--amp off`` alone restores the fp32 NCHW path. Values the user gave are never replaced; on a CPU
auto is always off/off.

``build_run`` applies the rule once the device is known and writes the result back into the
configuration, so config.yaml and the checkpoint record what ran (a resume reads them as given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model_catalog import is_convolutional, multi_exit_name
from .threads import settled_threads

AUTO = "auto"
SPEED_AUTO_KEYS = ("amp", "channels_last")  # the settings whose "auto" this module resolves

_DEFAULT_ON = "auto: the CUDA default for CNNs; --amp off trains fp32"


@dataclass(frozen=True)
class SpeedChoice:
    """What a run trains with: ``amp`` (off, bf16 or fp16), ``channels_last`` (on or off), and
    ``note``, the run header's words for it (``amp bf16 + channels_last (auto: ...)``)."""

    amp: str
    channels_last: str
    note: str


def run_models(cfg: Any) -> tuple[str, ...]:
    """The registered names of the models ``cfg`` builds (self modes: the multi-exit network)."""
    if cfg.is_self:
        return (multi_exit_name(cfg.arch),)
    if cfg.mode == "base":
        return (cfg.student,)
    return (cfg.teacher, cfg.student)


def as_on_off(value: Any) -> str:
    """``channels_last`` as a word: booleans (old configurations) become ``on`` / ``off``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def channels_last_on(value: Any) -> bool:
    """Whether a resolved ``channels_last`` value (``on``/``off`` or a bool) turns it on."""
    word = as_on_off(value)
    if word not in ("on", "off"):
        raise ValueError(f"channels_last={value!r} is not resolved (resolve_speed first)")
    return word == "on"


def resolve_speed(cfg: Any, device_type: str) -> SpeedChoice:
    """What ``cfg``'s amp and channels_last mean on a ``device_type`` ("cpu", "cuda", "cuda:1")
    device; pure (reads ``cfg``, changes nothing)."""
    cuda = str(device_type).split(":")[0] == "cuda"
    cnn = all(is_convolutional(name) for name in run_models(cfg))
    amp_auto = cfg.amp == AUTO
    amp = cfg.amp
    if amp_auto:
        amp = "bf16" if cuda and cnn and cfg.compat == "none" else "off"
    layout = as_on_off(cfg.channels_last)
    if layout == AUTO:
        layout = "on" if cuda and cnn and amp != "off" else "off"
    words = f"amp {amp}" + (" + channels_last" if layout == "on" else "")
    if amp_auto and amp != "off":
        words += f" ({_DEFAULT_ON})"
    elif amp_auto and cuda:  # say why the CUDA default did not apply
        why = ("the CUDA default is bf16 for CNNs only" if not cnn else
               f"--compat {cfg.compat} reproduces the official fp32 runs")
        words += f" (auto: {why}; --amp bf16 trains in bf16)"
    return SpeedChoice(amp, layout, words)


def apply_speed_defaults(cfg: Any, device_type: str) -> SpeedChoice:
    """Resolve ``cfg``'s auto values for ``device_type`` and write them back into ``cfg``."""
    choice = resolve_speed(cfg, device_type)
    cfg.amp, cfg.channels_last = choice.amp, choice.channels_last
    cfg.threads = settled_threads(getattr(cfg, "threads", 0), device_type)  # 0 (auto): a number
    return choice
