"""spacedkd_fast: Spaced Knowledge Distillation with fused KD-loss kernels.

Top-level names are resolved lazily so that ``import spacedkd_fast`` stays cheap and the pieces
(ops, engine, data, models, trainer) can be imported on their own.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "kd_loss": "spacedkd_fast.losses",
    "KDLoss": "spacedkd_fast.losses",
    "paper_code_kd_loss": "spacedkd_fast.losses",
    "feature_loss": "spacedkd_fast.losses",
    "SpacedDistiller": "spacedkd_fast.distill",
    "SelfDistiller": "spacedkd_fast.distill",
    "CopyReplay": "spacedkd_fast.replay",
    "ReplayableSource": "spacedkd_fast.replay_protocol",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spacedkd_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
