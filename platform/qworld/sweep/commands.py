"""``qworld sweep | resume | extract | status | sync``: the sweep half of the CLI.

Validation happens first and needs no Ray: a bad sweep file exits with code 2 and one line
naming the field, before anything is launched.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a sweep file on a local Ray or a cluster")
    p.add_argument("file", help="a sweep YAML file, e.g. tune_configs/smoke.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set stop.env_steps=20000 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join (default: start a local Ray)")
    p.add_argument("--storage", default=None,
                   help="where experiment dirs go (default ./results; shared storage on a cluster)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("resume", help="continue an interrupted sweep and score what is unscored")
    p.add_argument("experiment_dir")
    p.add_argument("--address", default=None)
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("extract", help="re-score every checkpoint of a sweep (no retraining)")
    p.add_argument("experiment_dir")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--address", default=None)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("status", help="summarise an experiment dir")
    p.add_argument("experiment_dir")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("sync", help="upload the offline W&B runs of an experiment dir")
    p.add_argument("experiment_dir")
    p.set_defaults(func=_cmd_sync)


def _bad_input(message: str) -> int:
    print(f"qworld: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _cmd_sweep(args) -> int:
    from qworld.sweep.spec import SweepSpecError, load_sweep

    try:
        spec = load_sweep(args.file, args.overrides)
    except SweepSpecError as exc:
        return _bad_input(str(exc))
    from qworld.sweep.run import run_sweep

    outcome = run_sweep(spec, address=args.address, storage=args.storage)
    _print_outcome(outcome)
    return 0 if outcome.num_errors == 0 else 1


def _cmd_resume(args) -> int:
    from qworld.sweep.run import resume_sweep

    if not (Path(args.experiment_dir) / "sweep.yaml").is_file():
        return _bad_input(f"{args.experiment_dir}: not a qworld experiment dir (no sweep.yaml)")
    outcome = resume_sweep(args.experiment_dir, address=args.address)
    _print_outcome(outcome)
    return 0 if outcome.num_errors == 0 else 1


def _cmd_extract(args) -> int:
    from qworld.sweep.run import extract_sweep
    from qworld.sweep.spec import SweepSpecError

    if not (Path(args.experiment_dir) / "sweep.yaml").is_file():
        return _bad_input(f"{args.experiment_dir}: not a qworld experiment dir (no sweep.yaml)")
    try:
        outcome = extract_sweep(args.experiment_dir, methods=args.methods, tasks=args.tasks,
                                address=args.address)
    except SweepSpecError as exc:
        return _bad_input(str(exc))
    _print_outcome(outcome)
    return 0


def _cmd_status(args) -> int:
    from qworld.sweep.status import status_table

    if not (Path(args.experiment_dir) / "sweep.yaml").is_file():
        return _bad_input(f"{args.experiment_dir}: not a qworld experiment dir (no sweep.yaml)")
    print(status_table(args.experiment_dir))
    return 0


def _cmd_sync(args) -> int:
    import os

    runs = sorted(Path(args.experiment_dir).glob("wandb/offline-run-*"))
    if not runs:
        return _bad_input(f"{args.experiment_dir}: no offline W&B runs under wandb/")
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        return _bad_input("no W&B key configured: set WANDB_API_KEY or run `wandb login`; "
                          f"{len(runs)} offline runs are kept under {args.experiment_dir}/wandb")
    wandb_bin = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    return subprocess.call([wandb_bin, "sync", *map(str, runs)])


def _print_outcome(outcome) -> None:
    from qworld.sweep.status import status_table

    print()
    print(status_table(outcome.experiment_dir))
    print(f"\nexperiment dir: {outcome.experiment_dir}")
    print(f"trials: {outcome.num_trials} ({outcome.num_errors} errored), "
          f"checkpoints: {outcome.num_checkpoints}, scored: {outcome.num_scored}")
