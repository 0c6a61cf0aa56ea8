"""Evidence tools: compare groups of runs (several seeds) with a significance test, and measure
how flat a trained model's minimum is.

- ``runs``: reading run folders and grouping them (``collect``, ``Run``, ``Group``);
- ``stats``: mean and spread, Welch's t-test and interval (pure Python);
- ``comparison``: the comparison table (``summarize``, ``format_text``);
- ``hessian``: ``hessian_trace`` (Hutchinson) and ``loss_profile`` (filter-normalised direction);
- ``plots``: ``compare.png`` and ``flatness.png``.

Command lines: ``python -m spacedkd_fast.compare`` and ``python -m spacedkd_fast.flatness``.
Names are imported on first use, so reading runs does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "hessian_trace": "hessian", "loss_profile": "hessian", "TraceEstimate": "hessian",
    "filter_normalized_direction": "hessian",
    "welch_ttest": "stats", "spread": "stats", "WelchResult": "stats", "Spread": "stats",
    "collect": "runs", "Run": "runs", "Group": "runs", "RunError": "runs",
    "summarize": "comparison", "format_text": "comparison",
    "plot_compare": "plots", "plot_flatness": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spacedkd_fast.analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
