"""spacedkd_fast: Spaced Knowledge Distillation with fused KD-loss kernels.

Layers (imports only go down): ``ops`` (the fused KD op and the objective) <- ``engine`` (spacing,
replay, distillers) <- ``train`` (the CLI and loop); ``data`` and ``models`` stand beside them.
Top-level names are resolved lazily so that ``import spacedkd_fast`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "kd_loss": "spacedkd_fast.ops.losses",
    "paper_code_kd_loss": "spacedkd_fast.ops.losses",
    "feature_loss": "spacedkd_fast.ops.losses",
    "KDObjective": "spacedkd_fast.ops.objective",
    "KDLoss": "spacedkd_fast.ops.objective",
    "SpacedDistiller": "spacedkd_fast.engine.distill",
    "SelfDistiller": "spacedkd_fast.engine.distill",
    "CopyReplay": "spacedkd_fast.engine.replay",
    "ReplayableSource": "spacedkd_fast.engine.source_protocol",
    "KeyedLoader": "spacedkd_fast.data.keyed_loader",
    "evaluate": "spacedkd_fast.evaluation",
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
