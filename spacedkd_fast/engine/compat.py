"""``compat`` presets: one switch that turns on every behaviour of an official code base.

Each switch keeps its own keyword; a preset only changes the value a keyword takes when the user
leaves it out (``None``). A user value that contradicts the preset is an error, never silently
replaced. The presets (SPEC sections 2-4, ``OFFICIAL_VIT_FACTS.md`` section 4):

- ``"official"`` on :class:`~.self_kd.SelfDistiller`: the official ``self_KD`` loop.
- ``"official"`` on :class:`~.spaced.SpacedDistiller`: the official ``online_KD`` loop.
- ``"official-vit"`` on :class:`~.spaced.SpacedDistiller`: the official ``vit`` loop.

The objective under a preset is built from the user's ``temperature`` / ``alpha`` in the form of
that code base (:data:`OBJECTIVE_FORMS`); ``loss=`` is accepted only when it has that form.
"""

from __future__ import annotations

from typing import Any

from ..ops.objective import KDObjective, as_objective

# switch name -> (our default, the official code's behaviour), per preset
SELF_SWITCHES: dict[str, tuple[Any, Any]] = {
    "self_kd_first_replay": ("interval", "official"),  # (n - L) % I == 0, Python modulo
    "self_kd_trigger_step": ("ce-and-kd", "kd-only"),  # the trigger batch's only step is its KD step
    "self_kd_trigger_forward": (False, True),  # ... after a forward that only moves BN statistics
    "self_kd_feature_exits": ("all", "official"),  # no feature loss on the layer-3 exit
    "flush_tail": (True, False),  # unreplayed batches at the end are dropped
}
PAIR_SWITCHES: dict[str, tuple[Any, Any]] = {
    "teacher_bn_update": (False, True),  # soft-target forwards update the teacher's BN statistics
    "flush_tail": (True, False),
    "offline_student_data": ("replay", "fresh"),  # offline student: new passes of the loader
    "zero_interval": ("error", "online"),  # int(L * s) == 0 runs online KD
}
VIT_SWITCHES: dict[str, tuple[Any, Any]] = {
    "replay": ("keyed", "fresh"),  # catch-up on a second, independently shuffled loader
    "teacher_bn_update": (False, True),  # the teacher stays in train mode
    "flush_tail": (True, False),  # a counter below the threshold at the end is never replayed
    "offline_student_data": ("replay", "fresh"),
    "shared_optimizer": (False, True),  # one AdamW over teacher and student
    "kd_second_forward": (False, True),  # non-DeiT students: KD logits from a second forward
    "frozen_teacher_mode": ("eval", "train"),  # a frozen teacher runs in train mode (drop path)
}

PRESETS: dict[tuple[str, str], dict[str, tuple[Any, Any]]] = {
    ("self", "official"): SELF_SWITCHES,
    ("pair", "official"): PAIR_SWITCHES,
    ("pair", "official-vit"): VIT_SWITCHES,
}

OBJECTIVE_FORMS: dict[tuple[str, str], dict[str, Any]] = {
    # self_KD: alpha * softCE(z_i / T, z_K / T) without a T^2 factor
    ("self", "official"): {"kind": "kl", "kd_scale": 1.0, "normalization": "batch"},
    # online_KD: probabilities fed to KLDivLoss (SPEC section 2, kind 'paper-code')
    ("pair", "official"): {"kind": "paper-code", "normalization": "batch"},
    # vit: T^2 * KL_sum / (B * C)
    ("pair", "official-vit"): {"kind": "kl", "kd_scale": None, "normalization": "class"},
}


def check_compat(compat: str | None, family: str) -> None:
    allowed = [None] + [name for fam, name in PRESETS if fam == family]
    if compat not in allowed:
        raise ValueError(f"compat must be one of {allowed}, got {compat!r}")


def resolve_switches(compat: str | None, family: str, given: dict[str, Any]) -> dict[str, Any]:
    """The value of every switch of ``family``: the user's where given (``not None``), else the
    preset's, else ours."""
    ours: dict[str, Any] = {}
    for (fam, _), switches in PRESETS.items():
        if fam == family:
            ours.update({name: default for name, (default, _) in switches.items()})
    preset = {name: official for name, (_, official)
              in PRESETS.get((family, compat), {}).items()}
    out = {}
    for name, default in ours.items():
        value, want = given.get(name), preset.get(name, default)
        if value is None:
            out[name] = want
        elif name in preset and value != want:
            raise ValueError(f"compat={compat!r} sets {name}={want!r}; drop {name}={value!r} "
                             "or use compat=None")
        else:
            out[name] = value
    return out


def resolve_objective(loss: Any, temperature: float | None, alpha: float | None,
                      kd_scale: float | None, *, compat: str | None, family: str,
                      any_callable: bool):
    """The objective a distiller trains: ``loss`` (checked against the preset's form), or a
    :class:`KDObjective` built from ``temperature`` / ``alpha`` / ``kd_scale`` (the ones not
    given take the package default, or the preset's form)."""
    given = {name: v for name, v in (("temperature", temperature), ("alpha", alpha),
                                     ("kd_scale", kd_scale)) if v is not None}
    form = OBJECTIVE_FORMS.get((family, compat), {}) if compat is not None else {}
    if loss is not None and given:
        raise ValueError(f"pass either loss=KDObjective(...) or {', '.join(given)}, not both")
    if loss is None:
        fixed = {k: v for k, v in form.items() if k in given and given[k] != v}
        if fixed:
            name = next(iter(fixed))
            raise ValueError(f"compat={compat!r} trains {name}={form[name]!r}; drop "
                             f"{name}={given[name]!r} or use compat=None")
        return KDObjective(**{**form, **given})
    objective = as_objective(loss)
    if form and not (isinstance(objective, KDObjective)
                     and all(getattr(objective, k) == v for k, v in form.items())):
        raise ValueError(
            f"compat={compat!r} trains KDObjective({', '.join(f'{k}={v!r}' for k, v in form.items())}) "
            f"built from temperature and alpha; loss={loss!r} contradicts it: pass "
            "temperature=... and alpha=... instead of loss=, or use compat=None")
    if not any_callable and not (isinstance(objective, KDObjective) and objective.kind == "kl"):
        raise TypeError("SelfDistiller needs loss=KDObjective(kind='kl', ...) or a KDLoss (the "
                        f"self-KD loss adds the soft targets' entropy back), got {loss!r}")
    return objective
