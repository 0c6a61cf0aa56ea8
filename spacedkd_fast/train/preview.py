"""What a run of a configuration will use, settled without running it (``--print-config``).

A run settles some values only when it starts, and records the settled ones in ``config.yaml``:
the data set (auto: CIFAR-100 when on disk, else digits) and the digits defaults, ``--amp`` /
``--channels-last`` auto on the device it gets, and under ``--compat`` the preset's switches and
objective form. :func:`planned` settles them the same way, with the functions the run calls, so
that ``--print-config`` prints what ``config.yaml`` will record. The output folder (``--out``
auto) names the start time and stays ``null``; ``--overlap`` / ``--cuda-graphs`` auto are decided
by the engine and recorded as ``auto`` by the run too.
"""

from __future__ import annotations

import copy

from .build import resolve_dataset
from .config import TrainConfig, apply_dataset_defaults
from .distributed import resolve_device
from .errors import UserError
from .speed_defaults import apply_speed_defaults
from .wiring import compat_of, family, objective_args, record_resolved, resolved_switches


def planned(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` with every value the run settles at its start settled (see above);
    ``UserError`` / ``ConfigError`` for what the run would refuse at that point."""
    from ..engine.compat import resolve_objective

    cfg = copy.deepcopy(cfg)
    dataset = resolve_dataset(cfg)
    apply_dataset_defaults(cfg, dataset)
    if cfg.dataset is None:
        cfg.dataset = dataset
    apply_speed_defaults(cfg, resolve_device(cfg.device).type)
    if compat_of(cfg) is not None:
        switches = resolved_switches(cfg)
        args = objective_args(cfg)
        try:
            objective = resolve_objective(args.get("loss"), args.get("temperature"),
                                          args.get("alpha"), args.get("kd_scale"),
                                          compat=compat_of(cfg), family=family(cfg),
                                          any_callable=not cfg.is_self)
        except (TypeError, ValueError) as err:
            raise UserError(str(err)) from None
        record_resolved(cfg, switches, objective)
    return cfg
