"""The ops layer: the fused KD op (``torch.ops.spacedkd``) with its typed wrappers, fake kernels
and autograd, the KD objective (one type, one default), feature losses and the float64 reference.

Names are loaded on first use, so ``spacedkd_fast.ops.reference`` works without the extension.
"""

from __future__ import annotations

import importlib

_LAZY = {
    **dict.fromkeys(("kd_loss_forward", "kd_loss_backward", "ROW_STATS", "ROW_CE", "ROW_KL",
                     "REDUCTIONS", "build_info", "cuda_compiled"), "kd_op"),
    **dict.fromkeys(("kd_loss", "paper_code_kd_loss", "feature_loss", "KDLossParts"), "losses"),
    **dict.fromkeys(("KDObjective", "KDLoss", "Objective", "as_objective"), "objective"),
    **dict.fromkeys(("FEATURE_LOSSES", "DEFAULT_TEMPERATURE", "DEFAULT_ALPHA", "KD_KINDS",
                     "KD_NORMALIZATIONS"), "names"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spacedkd_fast.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | set(globals()))
