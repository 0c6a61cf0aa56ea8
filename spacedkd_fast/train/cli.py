"""``python -m spacedkd_fast.train``: parse, build, run, report.

The parser is generated from :class:`spacedkd_fast.train.config.TrainConfig` (one flag per field, the
field's help and default), so a recipe key and its flag always mean the same thing. The work is done
by :mod:`spacedkd_fast.train.runner`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import MISSING, fields
from typing import Any

from .config import (
    AUTO_ON_OFF,
    DIGITS_DEFAULTS,
    ConfigError,
    TrainConfig,
    build_config,
    load_yaml,
    print_config,
)
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    CheckpointError,
    UserError,
    is_bad_input,
    resume_folder_error,
)
from .recipe_files import list_recipes

DESCRIPTION = """\
Train with Spaced Knowledge Distillation (Sun et al., ICML 2025).

The default run trains a ResNet-18 teacher and a ResNet-18 student with Spaced online KD and the
paper's CIFAR-100 recipe. When no data set is named and CIFAR-100 is not under
--data-dir, it trains on the embedded digits data set instead (announced in the first lines, with
shorter digits defaults) so that the whole pipeline can be seen working in about a minute on a CPU.

Settings come from, in increasing priority: the built-in defaults, a recipe (--config NAME or
FILE.yaml; see --list-recipes), then the flags given here. The resolved configuration is saved to
OUT/config.yaml; --resume OUT continues a run with exactly that configuration."""

EPILOG = """\
examples:
  python -m spacedkd_fast.train --arch resnet18
      spaced KD on CIFAR-100 (or the digits demo when CIFAR-100 is not on disk)
  python -m spacedkd_fast.train --config cifar100-resnet18-online --out runs/online
  python -m spacedkd_fast.train --config cifar100-resnet18-spaced --compare runs/online
      the paper's comparison: the summary prints the student's gain over the online run
  python -m spacedkd_fast.train --config cifar100-byot-resnet18-spaced-self --amp off
      spaced self KD in fp32 (on CUDA, CNN runs default to bf16 autocast + channels_last)
  python -m spacedkd_fast.train --resume runs/online
  python -m spacedkd_fast.train --resume runs/online --epochs 120
      extend a run (schedules that depend on the total are re-planned; said in the output)
  python -m spacedkd_fast.train --config cifar100-resnet18-spaced --out runs/s --resume auto
      a command a scheduler may re-run: continues runs/s if it is there; with
      --checkpoint-every 10m it loses at most 10 minutes (docs/cluster.md)
  python -m spacedkd_fast.train --config cifar100-resnet18-spaced --seeds 0,1,2 --out runs/spaced
      one run per seed in runs/spaced/seed0, seed1, seed2 (--resume runs/spaced continues them)
  torchrun --nproc_per_node 4 -m spacedkd_fast.train --config cifar100-deit-tiny-spaced1.5

outputs (in OUT): metrics.jsonl and metrics.csv (one row per epoch: test_* test accuracies,
in percent in the CSV's *_pct columns, train_* training-loss means), config.yaml, curves.png, summary.txt, checkpoint.pt (resume),
best_student.pt (student weights at its best top-1).
exit status: 0 done, 2 bad input, 3 stopped by a non-finite loss, 4 an output file could not be
written (disk full, permission), 130 / 143 stopped by Ctrl-C / SIGTERM (state saved)."""



class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _default_text(name: str, default: Any) -> str:
    if isinstance(default, bool):
        text = "on" if default else "off"
    elif default is None:
        text = {"kd_scale": "T*T", "dataset": "auto", "out": "auto", "augment": "the data set's",
                "image_size": "the data set's (vit: 224)",
                "drop_last": "the augmentation recipe's choice"}.get(name, "none")
    elif isinstance(default, list):
        text = ",".join(f"{v:g}" for v in default) or "none"
    elif isinstance(default, dict):
        text = ",".join(f"{k}={v}" for k, v in default.items()) or "none"
    else:
        text = str(default)
    digits = DIGITS_DEFAULTS.get(name)
    extra = f"; digits default: {digits}" if digits is not None else ""
    return f"(default: {text}{extra})"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser: one flag per configuration field plus the run-control flags.

    Configuration flags default to ``argparse.SUPPRESS`` so that only the flags the user typed
    override a recipe file; the defaults are shown in the help text.
    """
    parser = argparse.ArgumentParser(prog="python -m spacedkd_fast.train", description=DESCRIPTION,
                                     epilog=EPILOG, formatter_class=_Formatter,
                                     argument_default=argparse.SUPPRESS)
    run = parser.add_argument_group("run control")
    run.add_argument("--config", metavar="RECIPE|FILE.yaml",
                     help="start from a shipped recipe (by name) or a YAML file; flags override it")
    run.add_argument("--list-recipes", action="store_true",
                     help="list the shipped recipes (the paper's experiments) and exit")
    run.add_argument("--list-models", action="store_true",
                     help="list the model architectures and exit")
    run.add_argument("--resume", metavar="OUT|auto",
                     help="continue the run (or --seeds group) in folder OUT from its last "
                          "checkpoint, with its saved configuration; flags equal to the saved "
                          "values are accepted, --epochs N extends the run. auto (with --out): "
                          "a command that can be re-run (scheduler requeue, torchrun restarts) - "
                          "continue the run in --out if it holds one of this configuration, "
                          "start it if not, refuse if the configuration differs (a folder named "
                          "auto: --resume ./auto)")
    run.add_argument("--print-config", action="store_true",
                     help="print the configuration the run will use as YAML (what OUT/config.yaml "
                          "will record) and exit: defaults, recipe and flags, with the data set "
                          "found, the digits defaults, --amp/--channels-last auto on this machine "
                          "and the --compat preset's switches settled as the run settles them "
                          "(--out auto stays null: it names the start time)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar (epoch lines only)")

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{meta['help']} {_default_text(f.name, default)}"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if meta.get("choices") == AUTO_ON_OFF:
            # a three-way auto|on|off switch: the bare flag means on and --no-FLAG off, as the
            # on/off switches spell it (--channels-last was one before auto existed)
            kwargs.update(choices=meta["choices"], nargs="?", const="on",
                          help=f"{help_text}; {flag} alone: on, --no-{flag[2:]}: off")
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const",
                               const="off", help=argparse.SUPPRESS)
        elif meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta.get("metavar") or f.name.upper()
        group.add_argument(flag, **kwargs)
    return parser


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``(run-control namespace, {field: value typed on the command line})``."""
    ns = build_parser().parse_args(argv)
    field_names = {f.name for f in fields(TrainConfig)}
    cli = {k: v for k, v in vars(ns).items() if k in field_names}
    return ns, cli


def config_from_args(ns: argparse.Namespace, cli: dict[str, Any]) -> TrainConfig:
    file_values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    return build_config(file_values, cli)


def _print_recipes() -> None:
    recipes = list_recipes()
    width = max(len(n) for n in recipes)
    print("Shipped recipes (use with --config NAME; flags override them):\n")
    for name, description in recipes.items():
        lines = textwrap.wrap(description, 100 - width - 4) or [""]
        print(f"  {name:<{width}}  {lines[0]}")
        for line in lines[1:]:
            print(f"  {'':<{width}}  {line}")


def _print_models() -> None:
    from ..model_catalog import describe_models  # torch-free: answers at once

    for name, description in describe_models().items():
        print(f"  {name:<22} {description}")


def _run_auto(ns: argparse.Namespace, cli: dict[str, Any], progress: bool) -> int:
    """``--resume auto``: the command's own configuration, continued if ``--out`` holds it."""
    cfg = config_from_args(ns, cli)  # (--print-config was answered by _run)
    if cfg.out is None:
        raise ConfigError("--resume auto needs --out DIR: the folder in which a re-run of the "
                          "same command finds its run")
    if cfg.seeds:
        from . import seeds

        if seeds.is_group(cfg.out):  # each member continues with its own seed and folder
            same = {k: v for k, v in cli.items() if k not in ("seeds", "out")}
            return seeds.resume_group(cfg.out, overrides=same, progress=progress)
        return seeds.train_group(cfg, progress=progress)
    from . import runner

    return runner.train(cfg, progress=progress, resume="auto")


def _print_planned(ns: argparse.Namespace, cli: dict[str, Any]) -> int:
    """``--print-config``: the configuration as the run will settle it (:mod:`.preview`)."""
    if getattr(ns, "resume", None) not in (None, "auto"):
        raise ConfigError(f"--print-config with --resume: the run's configuration is "
                          f"{ns.resume}/config.yaml")
    file_values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    cfg = build_config(file_values, cli, runnable=False)  # shown even when it cannot run yet
    from .preview import planned

    print_config(planned(cfg))
    return 0


def _run(ns: argparse.Namespace, cli: dict[str, Any]) -> int:
    progress = not getattr(ns, "no_progress", False)
    if getattr(ns, "print_config", False):
        return _print_planned(ns, cli)
    if getattr(ns, "resume", None) == "auto":
        return _run_auto(ns, cli, progress)
    if getattr(ns, "resume", None):
        if getattr(ns, "config", None):
            raise ConfigError("--resume uses the run's saved configuration; drop --config")
        missing = resume_folder_error(ns.resume)  # answered before torch is imported
        if missing is not None:
            raise missing
        from . import seeds

        if seeds.is_group(ns.resume):
            return seeds.resume_group(ns.resume, overrides=cli, progress=progress)
        from . import runner

        return runner.resume(ns.resume, overrides=cli, progress=progress)
    cfg = config_from_args(ns, cli)  # before torch is imported: bad values answer at once
    if cfg.seeds:
        from . import seeds

        return seeds.train_group(cfg, progress=progress)
    from . import runner

    return runner.train(cfg, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (see the epilog of ``--help``)."""
    ns, cli = parse(argv)
    if getattr(ns, "list_recipes", False):
        _print_recipes()
        return 0
    if getattr(ns, "list_models", False):
        _print_models()
        return 0
    try:
        return _run(ns, cli)
    except (ConfigError, UserError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as err:  # e.g. the compiled extension built for another torch
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: cannot load spacedkd_fast: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # after ImportError: that one has its own wording above
        if not is_bad_input(err):  # a bad data-set item a loader met mid-run: one line, exit 2
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM while the first one was being handled
        from .stop import owns_sigint

        if not owns_sigint():  # Ctrl-C belongs to the code that called main in-process
            raise
        print("aborted: the last checkpoint written is kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
