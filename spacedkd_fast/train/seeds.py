"""``--seeds 0,1,2``: the same configuration trained once per seed, in turn, as a group folder.

Layout: ``GROUP/config.yaml`` (the group's configuration, with its seeds) and one run folder per
seed, ``GROUP/seed0``, ``GROUP/seed1``, ... Each member is an ordinary run (resumable on its own);
``--resume GROUP`` continues the group: finished members are skipped, an interrupted one is
resumed, the ones not started yet are trained. ``python -m spacedkd_fast.compare GROUP ...``
reads such groups.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, TextIO

from . import runner
from .build import resolve_dataset
from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .config import TrainConfig, build_config, load_yaml, save_yaml
from .config_checks import parse_seeds
from .errors import EXIT_OK, UserError

GROUP_CONFIG = "config.yaml"


def member_folder(group: str | Path, seed: int) -> Path:
    return Path(group) / f"seed{seed}"


def is_group(folder: str | Path) -> bool:
    """A folder written by ``--seeds``: a group config with seeds, no checkpoint of its own."""
    return _group_seeds(Path(folder)) is not None


def _group_seeds(folder: Path) -> str | None:
    path = folder / GROUP_CONFIG
    if not path.is_file() or (folder / CHECKPOINT_NAME).exists():
        return None
    try:
        seeds = load_yaml(str(path)).get("seeds")
    except Exception:  # noqa: BLE001 - not a group config: the caller treats it as a run folder
        return None
    return seeds or None


def train_group(cfg: TrainConfig, *, progress: bool = True, data: Any = None,
                stream: TextIO | None = None, overrides: dict[str, Any] | None = None) -> int:
    """Train (or continue) one run per seed of ``cfg.seeds`` under ``cfg.out``; returns the first
    non-zero exit status, or 0 when every member has finished."""
    stream = stream or sys.stdout
    seeds = parse_seeds(cfg.seeds)
    if cfg.out is None:
        dataset = resolve_dataset(cfg) if data is None else (cfg.dataset or data.name)
        cfg.out = runner.default_out(cfg, dataset, suffix="-seeds")
    group = Path(cfg.out)
    try:
        group.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, group / GROUP_CONFIG)  # with what a --resume changed (e.g. --epochs)
    except OSError as err:
        raise UserError(f"--out {group}: cannot write there ({err.strerror or err})") from None
    for seed in seeds:
        folder = member_folder(group, seed)
        print(f"== seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}): {folder}", file=stream,
              flush=True)
        if (folder / CHECKPOINT_NAME).exists():
            if load_checkpoint(folder).get("finished") and not overrides:
                print(f"seed {seed}: already finished", file=stream, flush=True)
                continue
            status = runner.resume(folder, overrides=overrides, progress=progress, data=data,
                                   stream=stream)
        else:
            member = copy.deepcopy(cfg)
            member.seed, member.seeds, member.out = seed, "", str(folder)
            member.explicit |= {"seed"}
            status = runner.train(member, progress=progress, data=data, stream=stream)
        if status != EXIT_OK:
            print(f"seeds: stopped at seed {seed}; continue the group with "
                  f"python -m spacedkd_fast.train --resume {group}", file=stream, flush=True)
            return status
    print(f"seeds {cfg.seeds}: runs in {group}/seed*; compare groups with "
          f"python -m spacedkd_fast.compare {group} OTHER_GROUP", file=stream, flush=True)
    return EXIT_OK


def resume_group(group: str | Path, *, overrides: dict[str, Any] | None = None,
                 progress: bool = True, data: Any = None, stream: TextIO | None = None) -> int:
    """Continue a ``--seeds`` group folder (see the module docstring)."""
    values = load_yaml(str(Path(group) / GROUP_CONFIG))
    values.update(overrides or {})  # members not started yet train with them too
    values["out"] = str(group)
    cfg = build_config(values)
    return train_group(cfg, progress=progress, data=data, stream=stream, overrides=overrides)
