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

from qworld.cli.common import bad_input
from qworld.layout import SPEC_FILE

def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a sweep file on a local Ray or a cluster")
    p.add_argument("file", help="a sweep YAML file, e.g. tune_configs/smoke.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set stop.env_steps=20000 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join (default: start a local Ray)")
    p.add_argument("--storage", default=None,
                   help="where experiment dirs go (default ./results; shared storage on a cluster)")
    _add_verbose(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("resume", help="continue an interrupted sweep and score what is unscored")
    p.add_argument("experiment_dir")
    p.add_argument("--address", default=None)
    _add_verbose(p)
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("extract", help="re-score every checkpoint of a sweep (no retraining)")
    p.add_argument("experiment_dir")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--last", action="store_true",
                   help="only each trial's last checkpoint (its rows are replaced; earlier checkpoints keep theirs)")
    p.add_argument("--address", default=None)
    _add_verbose(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("status", help="summarise an experiment dir")
    p.add_argument("experiment_dir")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("sync", help="upload the offline W&B runs of an experiment dir")
    p.add_argument("experiment_dir")
    p.set_defaults(func=_cmd_sync)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Tune's and Ray's full output (progress and per-trial config tables, "
                        "INFO/WARNING logs) on top of the one-line-per-event progress view")


def _cmd_sweep(args) -> int:
    from qworld.sweep.location import StorageError, check_storage
    from qworld.sweep.spec import SweepSpecError, check_local_resources, load_sweep

    try:
        spec = load_sweep(args.file, args.overrides)
        check_local_resources(spec, args.address)
    except SweepSpecError as exc:
        return bad_input(str(exc))
    from qworld.sweep.run import DEFAULT_STORAGE, ExperimentExistsError, check_new_experiment, experiment_location, run_sweep

    # where it goes, checked before any cluster work: reachable, and not another experiment
    try:
        check_storage(args.storage or DEFAULT_STORAGE)
        check_new_experiment(experiment_location(spec, args.storage))
    except StorageError as exc:
        return bad_input(f"--storage: {exc}")
    except OSError as exc:  # resolving the URI itself failed (e.g. an S3 region lookup)
        return bad_input(f"--storage: {args.storage}: {exc}")
    except ExperimentExistsError as exc:
        return bad_input(str(exc))

    outcome = run_sweep(spec, address=args.address, storage=args.storage, verbose=args.verbose)
    _print_outcome(outcome)
    return _exit_code(outcome)


def _is_experiment_dir(path: str) -> bool:
    """``path`` (a folder or a URI) holds a sweep file; an unreachable location is not one."""
    from qworld.sweep.location import Location

    try:
        return (Location.of(path) / SPEC_FILE).is_file()
    except (OSError, ValueError):
        return False


def _cmd_resume(args) -> int:
    from qworld.sweep.run import load_spec_of, resume_sweep
    from qworld.sweep.spec import SweepSpecError, check_local_resources

    if not _is_experiment_dir(args.experiment_dir):
        return bad_input(f"{args.experiment_dir}: not a qworld experiment dir (no {SPEC_FILE})")
    try:
        check_local_resources(load_spec_of(args.experiment_dir), args.address)
    except SweepSpecError as exc:
        return bad_input(str(exc))
    outcome = resume_sweep(args.experiment_dir, address=args.address, verbose=args.verbose)
    _print_outcome(outcome)
    return _exit_code(outcome)


def _cmd_extract(args) -> int:
    from qworld.sweep.run import extract_sweep
    from qworld.sweep.spec import SweepSpecError

    if not _is_experiment_dir(args.experiment_dir):
        return bad_input(f"{args.experiment_dir}: not a qworld experiment dir (no {SPEC_FILE})")
    try:
        outcome = extract_sweep(args.experiment_dir, methods=args.methods, tasks=args.tasks,
                                address=args.address, verbose=args.verbose, last_only=args.last)
    except SweepSpecError as exc:
        return bad_input(str(exc))
    _print_outcome(outcome)
    return 0


def _cmd_status(args) -> int:
    from qworld.sweep.status import status_table

    if not _is_experiment_dir(args.experiment_dir):
        return bad_input(f"{args.experiment_dir}: not a qworld experiment dir (no {SPEC_FILE})")
    try:
        table = status_table(args.experiment_dir)
    except OSError as exc:  # a file that cannot be read (permission, network): named, nothing moved
        print(f"qworld: error: {exc}", file=sys.stderr)
        return 1
    print(table)
    return 0


def _cmd_sync(args) -> int:
    import os
    import tempfile

    import pyarrow.fs as pafs

    from qworld.sweep.location import Location

    loc = Location.of(args.experiment_dir)
    root = loc.local_path
    if root is None:  # an object store: the runs the sweep copied into its wandb/, fetched here
        root = Path(tempfile.mkdtemp(prefix="qworld-sync-"))
        if (loc / "wandb").is_dir():
            pafs.copy_files((loc / "wandb").path, str(root / "wandb"), source_filesystem=loc.fs,
                            destination_filesystem=pafs.LocalFileSystem())
    runs = sorted(root.glob("wandb/offline-run-*"))
    if not runs:
        return bad_input(f"{args.experiment_dir}: no offline W&B runs under wandb/")
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        return bad_input("no W&B key configured: set WANDB_API_KEY or run `wandb login`; "
                          f"{len(runs)} offline runs are kept under {args.experiment_dir}/wandb")
    wandb_bin = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    return subprocess.call([wandb_bin, "sync", *map(str, runs)])


def _print_outcome(outcome) -> None:
    print()
    print(final_table(outcome.experiment_dir))
    print(f"\nexperiment dir: {outcome.experiment_dir}")
    print(f"trials: {outcome.num_trials} ({outcome.num_errors} errored), "
          f"checkpoints: {outcome.num_checkpoints}, scored: {outcome.num_scored}", flush=True)
    if outcome.num_unfinished:
        print(f"interrupted: {outcome.num_unfinished} of {outcome.num_trials} trials did not finish "
              f"(every checkpoint on disk is scored); continue with: qworld resume {outcome.experiment_dir}",
              file=sys.stderr, flush=True)


def _exit_code(outcome) -> int:
    """0: every trial finished; 130: interrupted (Ctrl-C), resumable; 1: a trial errored."""
    from qworld.sweep.run import EXIT_INTERRUPTED

    if outcome.num_unfinished:
        return EXIT_INTERRUPTED
    return 0 if outcome.num_errors == 0 else 1


def final_table(experiment_dir) -> str:
    """One compact table of a sweep's last checkpoints: per grid cell (seeds averaged) and
    extraction method, the agent's q_nmse, the model's p_mse and its safe-plan success per
    safety task. Read from the results store; the cell is the sweep file's grid axes."""
    import pandas as pd
    import qworld_analysis as qa

    from qworld import metrics as K
    from qworld.sweep.run import load_spec_of

    df = qa.final_checkpoints(qa.load(experiment_dir))
    if df.empty:
        return "no scored checkpoints"
    try:
        spec = load_spec_of(experiment_dir)
        axes, methods = [a for a in spec.grid_axes if a != "seed"], list(spec.extract.methods)
    except Exception:  # noqa: BLE001 - the table is still worth printing without the spec
        axes, methods = [], []
    errors = df[df[K.ERROR].notna()] if K.ERROR in df else df.iloc[:0]
    ok = df[df[K.ERROR].isna()] if K.ERROR in df else df
    lines = []
    if not ok.empty:
        cell = [a for a in axes if a in ok.columns] or [
            c for c in (K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS) if c in ok and ok[c].nunique() > 1] or [
            c for c in (K.VARIANT,) if c in ok]
        metric = K.P_MSE if K.P_MSE in ok and ok[K.P_MSE].notna().any() else K.WM_NMSE
        plans = [c for c in ok.columns if c.endswith("/" + K.PLAN_SUCCESS)] or [
            c for c in ok.columns if c.endswith("/" + K.RETURN_RATIO)]
        ok = ok.copy()
        order = methods + sorted(set(ok[K.METHOD]) - set(methods))
        ok["_method_rank"] = ok[K.METHOD].map({m: i for i, m in enumerate(order)})
        ok["_cell_rank"] = ok.groupby(cell, dropna=False, sort=False).ngroup() if cell else 0
        agg = {"seeds": (K.TRIAL_ID, "nunique"), K.ENV_STEPS: (K.ENV_STEPS, "max"),
               K.Q_NMSE: (K.Q_NMSE, "mean"), metric: (metric, "mean"),
               **{c: (c, "mean") for c in plans}}
        agg = {k: v for k, v in agg.items() if v[0] in ok}
        table = (ok.groupby(["_cell_rank", *cell, "_method_rank", K.METHOD], dropna=False)
                 .agg(**agg).reset_index().sort_values(["_cell_rank", "_method_rank"]))
        shown = pd.DataFrame({c: table[c].astype(object) for c in cell})
        for col in ("seeds", K.ENV_STEPS):
            if col in table:
                shown[col] = [f"{int(v):,}" if pd.notna(v) else "-" for v in table[col]]
        if K.Q_NMSE in table:
            shown[K.Q_NMSE] = [f"{v:.3g}" if pd.notna(v) else "-" for v in table[K.Q_NMSE]]
        shown[K.METHOD] = [f"{m} (oracle)" if m in K.ORACLE_METHODS else m for m in table[K.METHOD]]
        shown[metric] = [f"{v:.2e}" if pd.notna(v) else "-" for v in table[metric]]
        for c in plans:
            shown[c.rsplit("/", 1)[0]] = [f"{v:.2f}" if pd.notna(v) else "-" for v in table[c]]
        # a cell's values once, on its first method row
        repeat = table["_cell_rank"].duplicated().values
        for col in [*cell, "seeds", K.ENV_STEPS, K.Q_NMSE]:
            if col in shown:
                shown.loc[repeat, col] = ""
        what = ("plan success per safety task" if plans and plans[0].endswith(K.PLAN_SUCCESS)
                else "return ratio per task")
        lines.append(f"Final checkpoints (mean over seeds): q_nmse of the agent, {metric} per "
                     "method" + (f", {what}" if plans else "") + ":")
        text_cols = [c for c in cell if not pd.api.types.is_numeric_dtype(table[c])]
        lines.append(_text_table(shown, left=[*text_cols, K.METHOD]))
    if not errors.empty:
        first = errors.iloc[0]
        lines.append(f"{len(errors)} rows with errors at the final checkpoints, e.g. "
                     f"{first[K.TRIAL_ID]} {first[K.METHOD]}: {first[K.ERROR]}")
    return "\n".join(lines)


def _text_table(frame, left=()) -> str:
    """Plain text table: the ``left`` columns left-aligned, the others right-aligned."""
    columns = [str(c) for c in frame.columns]
    cells = [[("" if v is None else str(v)) for v in row] for row in frame.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lefts = {str(c) for c in left}

    def fmt(values):
        return "  ".join(v.ljust(w) if c in lefts else v.rjust(w)
                         for v, w, c in zip(values, widths, columns)).rstrip()

    return "\n".join([fmt(columns)] + [fmt(r) for r in cells])
