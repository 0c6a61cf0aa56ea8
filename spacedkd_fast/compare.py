"""``python -m spacedkd_fast.compare``: is the difference between groups of runs real?

Reads run folders and groups of runs (e.g. ``--seeds 0,1,2`` output), prints the best and final
test top-1 of every model as mean ± std over the runs, the Hessian trace when
``python -m spacedkd_fast.flatness`` has measured it, and each group's difference from the baseline
group with a 95% interval and Welch's t-test; writes compare.txt, compare.json and compare.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .analysis.cli import HelpFormatter, OneLineErrorParser

DESCRIPTION = """\
Compare groups of training runs: several seeds per configuration, mean ± std, and whether the
difference between configurations is larger than the seed-to-seed spread.

RUN_OR_GROUP is a run's output folder (holding metrics.jsonl), a group folder whose sub-folders are
runs (e.g. what --seeds 0,1,2 writes: seed0/, seed1/, ...), or a folder of group folders. Loose run
folders with the same configuration apart from the seed form one group. --group NAME=DIR,DIR names
a group explicitly."""

EPILOG = """\
printed: the table of best and final test top-1 (%) per group and model (mean ± sample std, n),
the Hessian trace of the best students (after python -m spacedkd_fast.flatness), and
group - baseline differences with a 95% interval (Welch-Satterthwaite degrees of freedom) and
Welch's two-sided p-value. A p-value says how surprising the difference would be if the two
configurations were equally good; with 3 seeds per group only large, consistent gaps reach p < 0.05.

examples:
  python -m spacedkd_fast.compare runs/online runs/spaced
  python -m spacedkd_fast.compare runs/digits              (a folder of groups)
  python -m spacedkd_fast.compare --group online=runs/a,runs/b --group spaced=runs/c,runs/d
  python -m spacedkd_fast.compare runs/online runs/spaced --json > comparison.json

outputs (in --out, default: the folder that holds all inputs): compare.txt, compare.json,
compare.png (test top-1 per epoch, mean per group with a ± 1 std band).
exit status: 0 done, 2 bad input (no runs found, unreadable metrics, unwritable --out)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m spacedkd_fast.compare", description=DESCRIPTION,
                     epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="RUN_OR_GROUP",
                        help="run folders, group folders, or folders of groups")
    parser.add_argument("--group", action="append", default=[], metavar="NAME=DIR,DIR,...",
                        help="a group made of these run (or group) folders; repeatable")
    parser.add_argument("--baseline", metavar="NAME",
                        help="the group the others are compared with (default: the first)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write compare.txt/.json/.png (default: the inputs' "
                             "common folder)")
    parser.add_argument("--json", action="store_true",
                        help="print the comparison as JSON instead of the table")
    parser.add_argument("--no-plot", action="store_true", help="do not write compare.png")
    return parser


def _default_out(groups) -> Path:
    folders = [str(p.resolve()) for g in groups for p in (g.source or [r.path for r in g.runs])]
    try:
        common = Path(os.path.commonpath(folders))
    except ValueError:
        return Path.cwd()
    return common if common != Path(common.anchor) else Path.cwd()


def _fail(message: str) -> int:
    print(f"python -m spacedkd_fast.compare: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from .analysis.comparison import format_text, summarize
    from .analysis.runs import RunError, collect, parse_group_spec

    try:
        named = [parse_group_spec(s) for s in args.group]
        groups = collect(args.paths, named)
        summary = summarize(groups, baseline=args.baseline)
    except (RunError, ValueError) as err:
        return _fail(str(err))
    out = Path(args.out) if args.out else _default_out(groups)
    text = format_text(summary)
    try:
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "compare.txt", out / "compare.json"]
        if not args.no_plot:
            from .analysis.plots import plot_compare

            files.append(plot_compare(groups, out / "compare.png"))
        summary["files"] = [str(f) for f in files]
        (out / "compare.txt").write_text(text + "\n")
        (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    except OSError as err:
        return _fail(f"--out {out}: cannot write there ({err.strerror or err})")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(text)
        print(f"\nwrote {', '.join(summary['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
