"""``qworld report | compare``: the analysis half of the CLI.

Both read experiment dirs from disk with :mod:`qworld_analysis` (pandas, matplotlib); no
Ray is started.
"""

from __future__ import annotations

import argparse
import sys

from qworld import metrics as K
from qworld.cli.common import bad_input

def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an HTML report (figures, summary tables) of an experiment dir")
    p.add_argument("experiment_dir", help="a local folder or a URI (s3://bucket/results/NAME)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="a local folder for index.html, the PNGs and summary.csv (default "
                        "EXPERIMENT_DIR/report; ./NAME-report for an experiment on an object store)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("compare", help="two experiment dirs side by side (IQM and 95%% CI per grid cell)")
    p.add_argument("dir_a", help="an experiment: a local folder or a URI")
    p.add_argument("dir_b", help="an experiment: a local folder or a URI")
    p.add_argument("--metric", default=K.P_MSE, help=f"the column to compare (default {K.P_MSE})")
    p.set_defaults(func=_cmd_compare)


def _experiment_problem(where: str) -> str | None:
    """Why ``where`` (a folder or a URI) cannot be read as an experiment, or None."""
    from qworld.sweep.location import StorageError
    from qworld_analysis import NotAnExperimentError, check_experiment

    try:
        check_experiment(where)
    except (StorageError, NotAnExperimentError) as exc:
        return str(exc)
    except OSError as exc:
        return f"{where}: cannot be read ({' '.join(str(exc).split())})"
    return None


def _cmd_report(args) -> int:
    problem = _experiment_problem(args.experiment_dir)
    if problem:
        return bad_input(problem)
    from qworld_analysis import write_report

    try:
        path = write_report(args.experiment_dir, args.out)
    except OSError as exc:  # unreadable (permission, network, credentials): named, nothing moved
        print(f"qworld: error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


def _cmd_compare(args) -> int:
    for d in (args.dir_a, args.dir_b):
        problem = _experiment_problem(d)
        if problem:
            return bad_input(problem)
    import pandas as pd

    from qworld_analysis import compare

    try:
        table = compare(args.dir_a, args.dir_b, metric=args.metric)
    except OSError as exc:  # unreadable (permission, network, credentials): named, nothing moved
        print(f"qworld: error: {exc}", file=sys.stderr)
        return 1
    for side in ("a", "b"):
        info = table.attrs.get(side, {})
        print(f"{side}: {info.get('dir')}  (sweep {info.get(K.SWEEP) or '?'}, head {info.get(K.HEAD) or '?'})")
    print(f"{args.metric}: IQM over trials at their last scored checkpoint, 95% bootstrap CI "
          "(NaN below 4 trials), n_failed left out; ratio = b / a")
    if table.empty:
        print("(no scored rows to compare)")
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", 500,
                           "display.float_format", "{:.3g}".format):
        print(table.to_string(index=False))
    return 0
