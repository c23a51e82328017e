"""World models extracted from Q against explicit models of the same trials (issue 14).

    .venv/bin/python benchmarks/explicit_models.py results/explicit_fourrooms [results/...]

Reads finished experiment dirs (``qworld sweep tune_configs/explicit_fourrooms.yaml``,
``tune_configs/explicit_mountaincar.yaml``, ...) and prints, per grid cell and method, median
[min, max] over seeds of the world-model error (finite: ``p_mse`` and ``rare/p_mse``;
continuous: ``wm_delta_nmse_<dim>`` and their ``interior/`` and ``rare/`` parts) and of the
planning scores (safe-plan success, R_WM / R*), at a few env-step marks (the checkpoint nearest
each mark) and at each trial's last checkpoint. Equal data by construction: an explicit model
reads its own trial's experience log up to the checkpoint scored. Also prints the size of the
trials' ``experience.npz`` files (disk per checkpoint).

Methods: extracted from Q (``plearn``), explicit (``qworld.worldmodel.experience.EXPLICIT_METHODS``),
oracles (``metrics.ORACLE_METHODS``, labelled, never a finding).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

import qworld_analysis as qa
from qworld import metrics as K
from qworld.worldmodel.experience import EXPLICIT_METHODS
from qworld.layout import EXPERIENCE_FILE

CELL = [K.ENV, K.ALGORITHM, K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS]


def med_range(values: pd.Series) -> str:
    v = values.dropna().to_numpy(np.float64)
    if v.size == 0:
        return "-"
    fmt = (lambda x: f"{x:.2f}") if np.all((v >= 0) & (v <= 1.5)) and v.max() > 0.05 else (lambda x: f"{x:.1e}")
    return f"{fmt(np.median(v))} [{fmt(v.min())}, {fmt(v.max())}] n={v.size}"


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (pandas' ``to_markdown`` needs tabulate, which qworld does not install)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def label(method: str) -> str:
    if method in K.ORACLE_METHODS:
        return f"{method} (oracle)"
    return f"{method} (explicit)" if method in EXPLICIT_METHODS else f"{method} (from Q)"


def metrics_of(df: pd.DataFrame) -> list[str]:
    """The error and planning columns this experiment has, in reading order."""
    plan = [c for c in df.columns if c.endswith(f"/{K.PLAN_SUCCESS}") or c.endswith(f"/{K.RETURN_RATIO}")]
    plan = [c for c in plan if not c.startswith((f"{K.STAR}/", f"{K.RARE}/"))]
    if K.P_MSE in df and df[K.P_MSE].notna().any():
        errors = [K.P_MSE, f"{K.RARE}/{K.P_MSE}", K.UNVISITED_FRACTION, f"{K.RARE}/{K.FRACTION}"]
    else:
        dims = sorted(c for c in df.columns if c.startswith(f"{K.WM_DELTA_NMSE}_"))
        errors = [*dims, *(f"{K.INTERIOR}/{c}" for c in dims), *(f"{K.RARE}/{c}" for c in dims),
                  f"{K.RARE}/{K.FRACTION}"]
    return [c for c in errors + sorted(plan) if c in df.columns and df[c].notna().any()]


def at_marks(df: pd.DataFrame, marks: list[int]) -> pd.DataFrame:
    """Per trial and method, the row of the checkpoint nearest each env-step mark (+ the last)."""
    out = []
    for _, trial in df.groupby([K.TRIAL_ID, K.METHOD]):
        steps = trial[K.ENV_STEPS].to_numpy(np.float64)
        for mark in marks:
            row = trial.iloc[int(np.argmin(np.abs(steps - mark)))]
            out.append(row.to_frame().T.assign(mark=f"{mark:,}"))
        out.append(trial.loc[[trial[K.CHECKPOINT_INDEX].idxmax()]].assign(mark="last"))
    return pd.concat(out, ignore_index=True)


def report(exp: Path, marks: list[int]) -> None:
    df = qa.load(exp, resolve_num_goals=True)
    df = df[(df[K.METHOD] != K.LOAD_METHOD) & df[K.ERROR].isna()]
    cols = metrics_of(df)
    print(f"\n## {exp.name}: {df[K.TRIAL_ID].nunique()} trials, {len(df)} rows\n")
    rows = at_marks(df, marks)
    cell_cols = [c for c in CELL if c in rows.columns and rows[c].notna().any()]
    for cell, part in rows.groupby(cell_cols, dropna=False, sort=True):
        print("### " + " ".join(f"{c}={v}" for c, v in zip(cell_cols, cell)))
        table = []
        for (mark, method), g in part.groupby(["mark", K.METHOD], sort=False):
            table.append({"env_steps": mark, K.METHOD: label(method),
                          **{c: med_range(pd.to_numeric(g[c], errors="coerce")) for c in cols}})
        table = pd.DataFrame(table)
        order = {m: i for i, m in enumerate([f"{x:,}" for x in marks] + ["last"])}
        table = table.sort_values(["env_steps", K.METHOD], key=lambda s: s.map(order) if s.name == "env_steps" else s)
        print(markdown(table))
        print()
    sizes = [p.stat().st_size for p in exp.glob(f"*/checkpoint_*/{EXPERIENCE_FILE}")]
    if sizes:
        print(f"{EXPERIENCE_FILE}: {len(sizes)} files, median {np.median(sizes) / 1024:.1f} KiB "
              f"[{min(sizes) / 1024:.1f}, {max(sizes) / 1024:.1f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", type=Path)
    parser.add_argument("--marks", type=int, nargs="*", default=[200_000, 1_000_000],
                        help="env-step marks to report besides each trial's last checkpoint")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also draw every experiment's methods in one models-vs-env-steps figure (PNG)")
    args = parser.parse_args()
    for exp in args.experiments:
        report(exp, args.marks)
    if args.figure is not None:
        from qworld_analysis import plots

        df = qa.load_many(args.experiments, resolve_num_goals=True)
        df = df[(df[K.METHOD] != K.LOAD_METHOD) & df[K.ERROR].isna()]
        dims = sorted(c for c in df.columns if c.startswith(f"{K.WM_DELTA_NMSE}_"))
        metrics = ((K.P_MSE, f"{K.RARE}/{K.P_MSE}") if K.P_MSE in df and df[K.P_MSE].notna().any()
                   else (*(f"{K.INTERIOR}/{c}" for c in dims), *(f"{K.RARE}/{c}" for c in dims)))
        print(f"\nfigure: {plots.plot_models_vs_steps(df, args.figure, metrics=metrics)}")


if __name__ == "__main__":
    main()
