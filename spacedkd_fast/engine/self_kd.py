"""SelfDistiller: self KD of one multi-exit network, modes ``self`` and ``spaced-self``.

The deepest exit teaches the shallow ones (SPEC section 4). The step and replay machinery is
:mod:`.base`'s; this module holds the self-KD loss and what a batch does in each mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EngineBase, LossFn
from .compat import check_compat, resolve_objective, resolve_switches
from .model_io import autocast, fp32, model_device, split_output, to_device, train_mode, unwrap
from .modes import SELF_INTERVAL_RATE
from .options import FEATURE_EXITS, FIRST_REPLAY, TRIGGER_STEPS


class SelfDistiller(EngineBase):
    """Self KD of one multi-exit model: modes ``self`` and ``spaced-self`` (SPEC sections 3, 4).

    The model returns ``(features_list, logits_list)`` (deepest exit LAST; features ``[B, D]``,
    logits ``[B, C]``) and may have ``adapters`` (``nn.ModuleList`` of ``num_exits - 1`` layers)
    applied to the shallow exits' features. With ``o = loss`` (a :class:`KDObjective`, default
    ``KDObjective()``: ``kd_scale = T*T``; the official code uses 1), a KD step's loss::

        CE(z_K, y) + sum_i [o.alpha * o.kd_scale * softCE(z_i / T, z_K / T) + (1 - o.alpha) * CE(z_i, y)]
                   + beta * sum_i ||A_i(f_i) - f_K||_2          (z_K, f_K detached in the KD terms)

    ``temperature`` / ``alpha`` / ``kd_scale`` keywords build that objective instead of ``loss``.

    ``spaced-self``: CE of the deepest exit only on each step; at ``n = I, 2I, ...`` the recorded
    batches are replayed with the KD loss (the network keeps learning during the replay).

    ``compat="official"`` reproduces the official ``self_KD`` loop (:mod:`.compat`): replays when
    ``(n - L) % I == 0`` (``self_kd_first_replay="official"``), the trigger batch gets no CE-only
    step (``self_kd_trigger_step="kd-only"``) but still one train-mode forward whose outputs are
    discarded, which updates BatchNorm's running statistics (``self_kd_trigger_forward=True``),
    no feature loss on the exit just before the deepest
    (``self_kd_feature_exits="official"``), the tail dropped (``flush_tail=False``) and the
    objective ``KDObjective(temperature, alpha, kd_scale=1)``. Our defaults give every batch the
    same treatment (one CE-only step, one KD step against a network that has seen ``I`` more
    steps) and replay every batch, so no batch counts more or less than the others.

    ``check_finite_every=N > 1``: losses checked on the device, read every N updates (a fused
    optimizer is needed; see :mod:`.deferred_checks`).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, *, mode: str = "spaced-self",
                 interval_rate: float = SELF_INTERVAL_RATE, steps_per_epoch: int, loss: Any = None,
                 temperature: float | None = None, alpha: float | None = None,
                 kd_scale: float | None = None, beta: float = 0.03, flush_tail: bool | None = None,
                 self_kd_first_replay: str | None = None, self_kd_feature_exits: str | None = None,
                 self_kd_trigger_step: str | None = None,
                 self_kd_trigger_forward: bool | None = None, compat: str | None = None,
                 trace: str | os.PathLike | None = None, source: Any = None,
                 scheduler: Any = None, amp_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None, check_finite: bool = True, check_finite_every: int = 1,
                 on_student_epoch_end: Callable[[int], None] | None = None,
                 copy_device: torch.device | str | None = None,
                 copy_dtype: torch.dtype | None = None, cuda_graphs: Any = False) -> None:
        if cuda_graphs is not False and cuda_graphs is not None:
            raise ValueError("cuda_graphs are not supported for SelfDistiller yet (only the pair "
                             "distiller's steps are captured): use cuda_graphs=False")
        check_compat(compat, "self")
        sw = resolve_switches(compat, "self", {
            "self_kd_first_replay": self_kd_first_replay, "flush_tail": flush_tail,
            "self_kd_feature_exits": self_kd_feature_exits,
            "self_kd_trigger_step": self_kd_trigger_step,
            "self_kd_trigger_forward": self_kd_trigger_forward})
        if sw["self_kd_feature_exits"] not in FEATURE_EXITS:
            raise ValueError(f"self_kd_feature_exits must be one of {FEATURE_EXITS}, got "
                             f"{sw['self_kd_feature_exits']!r}")
        if sw["self_kd_first_replay"] not in FIRST_REPLAY:
            raise ValueError(f"self_kd_first_replay must be one of {FIRST_REPLAY}, got "
                             f"{sw['self_kd_first_replay']!r}")
        if sw["self_kd_trigger_step"] not in TRIGGER_STEPS:
            raise ValueError(f"self_kd_trigger_step must be one of {TRIGGER_STEPS}, got "
                             f"{sw['self_kd_trigger_step']!r}")
        if sw["self_kd_trigger_forward"] and sw["self_kd_trigger_step"] != "kd-only":
            raise ValueError("self_kd_trigger_forward=True needs self_kd_trigger_step='kd-only' "
                             "(a trigger batch that gets a CE step is forwarded by it already)")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.compat = compat
        self.objective = resolve_objective(loss, temperature, alpha, kd_scale, compat=compat,
                                           family="self", any_callable=False)
        super().__init__(mode=mode, interval_rate=interval_rate, self_kd=True,
                         steps_per_epoch=steps_per_epoch, trace=trace, source=source,
                         check_finite=check_finite, amp_dtype=amp_dtype, grad_scaler=grad_scaler,
                         flush_tail=sw["flush_tail"], on_student_epoch_end=on_student_epoch_end,
                         copy_device=copy_device, copy_dtype=copy_dtype,
                         first_replay=sw["self_kd_first_replay"],
                         check_finite_every=check_finite_every)
        self.model = model
        self.opt = self.student_opt = opt
        self.scheduler = self.student_scheduler = scheduler
        self._check_deferred_optimizers(opt)
        self.beta = float(beta)
        self.feature_exits = sw["self_kd_feature_exits"]
        self.trigger_step = sw["self_kd_trigger_step"]
        self.trigger_forward = bool(sw["self_kd_trigger_forward"])
        self.device = self.student_device = self.teacher_device = model_device(model)

    def _forward(self, x: Tensor) -> tuple[list[Tensor] | None, list[Tensor]]:
        train_mode(self.model)
        with autocast(self.device, self.amp_dtype):
            out = self.model(x)
        feats, logits = split_output(out)
        if isinstance(logits, Tensor) or len(logits) < 2:
            raise TypeError("SelfDistiller needs a multi-exit model returning (features_list, "
                            "logits_list) with at least two exits, deepest last")
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) != 1:
            raise ValueError(f"all exits' logits must have the same shape [B, C], got {shapes}")
        return feats, list(logits)

    def self_kd_loss(self, feats: list[Tensor] | None, logits: list[Tensor], y: Tensor
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of SPEC section 4 for one batch (see the class docstring)."""
        o = self.objective
        deep = fp32(logits[-1])
        target = deep.detach()
        ce_deep = F.cross_entropy(deep, y)
        loss = ce_deep
        kl_sum = deep.new_zeros(())
        for z in logits[:-1]:
            # the objective gives (1-a) CE + a k KL(q||p); softCE = KL + H(q), a constant in the
            # student: a k H(q) is added back (detached) so that the value is the SPEC's form.
            term, parts = o(fp32(z), target, y)
            loss = loss + term
            kl_sum = kl_sum + parts["kl"]
        q = F.softmax(target / o.temperature, dim=-1)
        entropy = -(q * F.log_softmax(target / o.temperature, dim=-1)).sum(-1).mean()
        scale = o.kl_scale(deep.shape[-1])
        loss = loss + (len(logits) - 1) * o.alpha * scale * entropy.detach()
        parts = {"ce": ce_deep.detach(), "kl": kl_sum / (len(logits) - 1)}
        if self.beta > 0 and feats is not None:
            adapters = getattr(unwrap(self.model), "adapters", None)
            f_deep = fp32(feats[-1].detach())
            shallow = range(len(feats) - 1)
            if self.feature_exits == "official":  # the official code skips the layer-3 exit
                shallow = range(len(feats) - 2)
            feat = deep.new_zeros(())
            for i in shallow:
                f = fp32(feats[i])  # adapters run in fp32 (autocast may give half features)
                f = f if adapters is None else adapters[i](f)
                feat = feat + torch.dist(fp32(f), f_deep)
            parts["feat"] = feat.detach()
            loss = loss + self.beta * feat
        return loss, parts

    def _kd_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats, logits = self._forward(x)
        return self.self_kd_loss(feats, logits, y)

    # -- batch steps (the mode table's ``step`` values) -------------------------------------
    def _batch_steps(self):
        return {"self-kd": self._self_kd_step, "record": self._record_step}

    def _self_kd_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        x = to_device(x, self.device)
        y = to_device(y, self.device)
        self._student_step(key, x, y, loss_fn=self._kd_loss, guard=(self.model,),
                           teacher_step=self.n, what=" (self-KD)")

    def _record_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        x = to_device(x, self.device)
        y = to_device(y, self.device)
        if self.trigger_step == "kd-only" and self.schedule.replay_due(self.n):
            if self.trigger_forward:
                self._discarded_forward(x)
            self._record_only(key, x, y)  # the replay that follows is its only step
            return

        def ce_loss() -> Tensor:
            _, logits = self._forward(x)
            return F.cross_entropy(fp32(logits[-1]), y)

        self._recorded_ce_step(self.model, ce_loss, key, x, y, self.opt, self.scheduler,
                               " (deepest-exit CE)")

    def _discarded_forward(self, x: Tensor) -> None:
        """The official loop's forward of a trigger batch: outputs thrown away, but BatchNorm's
        running statistics and ``num_batches_tracked`` move (weights do not)."""
        with torch.no_grad():
            self._forward(x)

    # -- replays (the hooks of EngineBase) --------------------------------------------------
    def _replay_loss(self, teacher: nn.Module | None) -> LossFn:
        return self._kd_loss  # the network itself, as it stands now, is the teacher

    def _replay_guard(self, teacher: nn.Module | None) -> tuple[nn.Module | None, ...]:
        return (self.model,)
