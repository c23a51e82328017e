"""``qworld`` command line: one subcommand per job.

Each subcommand registers itself in ``SUBCOMMANDS`` with a function that adds its arguments
to a subparser and a function that runs it (set as the parser default ``func``, returning the
exit status); adding ``sweep``, ``extract``, ``resume``, ``status`` or ``report`` means writing
those two functions and one registry line, or a module whose ``add_commands(sub)`` adds
subparsers with ``set_defaults(func=...)`` itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from qworld import metrics as K

# Columns of the printed oracle table (the parquet keeps them all).
ORACLE_PRINT_COLUMNS = (
    K.VARIANT,
    K.NUM_GOALS,
    K.METHOD,
    K.P_MSE,
    K.P_MAX_ERR,
    K.M_RANK,
    K.IDENTIFIABLE_CASE,
    K.TASK,
    K.PLAN_SUCCESS,
    K.UNSAFE_VISITS,
    K.PLAN_EXCESS_STEPS,
    K.FIT_SECONDS,
)


def _add_oracle_args(p: argparse.ArgumentParser) -> None:
    from qworld.oracle import DEFAULT_NUM_GOALS, DEFAULT_VARIANTS
    from qworld.plearn.finite import METHODS

    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(DEFAULT_VARIANTS))
    p.add_argument("--num-goals", nargs="+", type=int, default=list(DEFAULT_NUM_GOALS), help="goal counts L")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--goal-type", default="indicator", choices=["indicator", "dense"])
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0, help="goal draw and sgd seed")
    p.add_argument(
        "--tasks", nargs="+", default=["default"], help="safety tasks: default | all | none | task names"
    )
    p.add_argument("--out", type=Path, default=Path("results/oracle.parquet"), help="parquet file to write")


def _format_table(df) -> str:
    """Compact, readable table: few columns, short floats."""
    cols = [c for c in ORACLE_PRINT_COLUMNS if c in df]
    if K.ERROR in df and df[K.ERROR].notna().any():
        cols.append(K.ERROR)
    view = df[cols].rename(
        columns={K.NUM_GOALS: "L", K.IDENTIFIABLE_CASE: "case", K.PLAN_EXCESS_STEPS: "excess_steps"}
    )
    return view.to_string(index=False, float_format=lambda x: f"{x:.3g}", na_rep="-")


def _run_oracle(args: argparse.Namespace) -> int:
    from qworld.oracle import oracle_study

    keyword = len(args.tasks) == 1 and args.tasks[0] in ("default", "all", "none")
    tasks = args.tasks[0] if keyword else args.tasks
    t0 = time.perf_counter()
    df = oracle_study(
        variants=args.variants,
        num_goals_list=args.num_goals,
        methods=args.methods,
        gamma=args.gamma,
        seed=args.seed,
        goal_type=args.goal_type,
        tasks=tasks,
    )
    seconds = time.perf_counter() - t0
    print(_format_table(df))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(args.out, index=False)
    print(f"\n{len(df)} rows in {seconds:.1f} s -> {args.out}")
    return 1 if df[K.ERROR].notna().any() else 0


# name -> (help, add_arguments, run)
AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
SUBCOMMANDS: dict[str, tuple[str, AddArgs, Run]] = {
    "oracle": (
        "extract P from exact Q with every method on FourRooms, score it, plan with it",
        _add_oracle_args,
        _run_oracle,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=run)
    # Imported lazily inside their commands: `qworld oracle` never pays for Ray or RLlib.
    from qworld import analysis_commands, demonstrations
    from qworld.sweep import commands as sweep_commands

    sweep_commands.add_commands(sub)
    analysis_commands.add_commands(sub)
    demonstrations.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qworld`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
