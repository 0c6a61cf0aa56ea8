"""Optimisers of a run, with the official ViT code's weight-decay parameter groups.

``weight_decay_groups="all"`` decays every parameter (the official CNN code, and torch's default).
``"official"`` decays a tensor only when it has more than one dimension, its name does not end in
``.bias`` and does not contain a token name (``cls_token``, ``pos_embed``, ``distill_token``, and
``dist_token``, timm's name for DeiT's distillation token); every other trainable tensor gets weight
decay 0 (``OFFICIAL_VIT_FACTS.md`` section 1.5). So biases, LayerNorm / BatchNorm affine tensors,
ConViT's gating parameters, class tokens and position embeddings (PiT's 4-D one and PVT's
``pos_embed1..4`` included) are not decayed. Frozen tensors (``requires_grad=False``, e.g. T2T-ViT's
sinusoidal position embedding) are left out of the official groups, as the official optimiser
covers only trainable ones.

The rule needs parameter names, so pass a module (or several, or ``named_parameters()`` pairs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

WEIGHT_DECAY_GROUPS = ("all", "official")
# Substrings of parameter names that are never decayed under the official rule.
NO_DECAY_TOKENS = ("cls_token", "pos_embed", "distill_token", "dist_token")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether the official rule applies weight decay to the tensor ``name``."""
    return (param.ndim > 1 and not name.endswith(".bias") and name != "bias"
            and not any(token in name for token in NO_DECAY_TOKENS))


def _named(params: Any) -> tuple[list[tuple[str, nn.Parameter]] | None, list[Any]]:
    """``([(name, param)], items)`` from a module, modules or named pairs; the names are None for
    bare parameters (``items`` then holds them)."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters()), []
    items = list(params)
    if items and all(isinstance(m, nn.Module) for m in items):
        out: list[tuple[str, nn.Parameter]] = []
        for i, module in enumerate(items):
            out += [(f"{i}.{n}", p) for n, p in module.named_parameters()]
        return out, items
    if items and all(isinstance(m, tuple) and len(m) == 2 for m in items):
        return [(str(n), p) for n, p in items], items
    return None, items


def param_groups(params: Any, weight_decay: float, rule: str = "official") -> list[dict[str, Any]]:
    """Optimizer param groups for ``params`` under ``rule`` (``all`` or ``official``).

    ``params``: an ``nn.Module``, several modules, ``(name, parameter)`` pairs, or (rule ``all``
    only) bare parameters. ``official`` gives up to two groups, ``{"name": "decay", ...,
    "weight_decay": weight_decay}`` and ``{"name": "no_decay", ..., "weight_decay": 0.0}``; empty
    groups are left out. Also usable with ``optimizer.add_param_group`` for parameters that join
    later (a projection head, 1x1 feature adapters).
    """
    if rule not in WEIGHT_DECAY_GROUPS:
        raise ValueError(f"weight_decay_groups must be one of {', '.join(WEIGHT_DECAY_GROUPS)}, "
                         f"got {rule!r}")
    named, items = _named(params)
    if rule == "all":  # one group, as torch builds it from model.parameters()
        tensors = [p for _, p in named] if named is not None else items
        return [{"params": tensors, "weight_decay": weight_decay}]
    if named is None:
        raise TypeError("weight_decay_groups='official' needs parameter names: pass the module "
                        "(or its named_parameters()), not bare parameters")
    decay = [p for n, p in named if p.requires_grad and decays(n, p)]
    no_decay = [p for n, p in named if p.requires_grad and not decays(n, p)]
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Any, params: Any, *, fused: bool = False,
                    graphs: bool = False) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` over ``params`` with ``cfg``'s rate and weight-decay groups.

    ``cfg``: a ``TrainConfig`` (reads ``optimizer``, ``lr``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``weight_decay_groups``). ``params``: the model (or models, or named
    parameters; bare parameters only with ``weight_decay_groups="all"``). SGD: dampening 0, with
    ``nesterov`` as set; Adam / AdamW: betas (0.9, 0.999), eps 1e-8 (torch's defaults, the
    official values). ``fused``: torch's fused kernels (which can skip a step through
    ``found_inf``: the engine's ``check_finite_every > 1`` needs them). ``graphs``: an optimizer
    whose step can be captured in a CUDA graph (the engine's ``cuda_graphs``): fused, the rate a
    float32 tensor on the parameters' device (the schedules write it in place, the captured step
    reads it), Adam / AdamW ``capturable``.
    """
    rule = getattr(cfg, "weight_decay_groups", "all")
    groups = param_groups(params, cfg.weight_decay, rule)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters to optimise")
    extra: dict[str, Any] = {"fused": True} if fused or graphs else {}
    lr: float | torch.Tensor = cfg.lr
    if graphs:
        device = next(p for g in groups for p in g["params"]).device
        lr = torch.tensor(float(cfg.lr), dtype=torch.float32, device=device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                               nesterov=bool(getattr(cfg, "nesterov", False)),
                               weight_decay=cfg.weight_decay, **extra)
    if graphs:
        extra["capturable"] = True
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay, **extra)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, **extra)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd, adam or adamw")
