"""``qworld status``: what an experiment dir holds, read from disk alone (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qworld import metrics as K
from qworld.sweep import store


def latest_scores(experiment_dir: str | Path) -> pd.DataFrame:
    """Per (trial, method): the world-model score at the trial's latest scored checkpoint."""
    rows = store.read_store(experiment_dir)
    if rows.empty:
        return rows
    last = rows.groupby(K.TRIAL_ID)[K.CHECKPOINT_INDEX].transform("max")
    return rows[rows[K.CHECKPOINT_INDEX] == last]


def status_table(experiment_dir: str | Path) -> str:
    """Counts, then one line per grid cell (seeds averaged): p_mse of each method at the
    latest scored checkpoint, the agent's q_nmse and how many seeds are in."""
    from qworld.sweep.run import list_checkpoints, list_trials

    trials = list_trials(experiment_dir)
    checkpoints = list_checkpoints(experiment_dir)
    scored = store.scored_keys(experiment_dir)
    lines = [f"{len(trials)} trials, {len(checkpoints)} checkpoints, {len(scored)} scored"]
    latest = latest_scores(experiment_dir)
    if latest.empty:
        return "\n".join(lines)
    errors = latest[latest[K.ERROR].notna()] if K.ERROR in latest else latest.iloc[:0]
    ok = latest[latest[K.ERROR].isna()] if K.ERROR in latest else latest
    metric = K.P_MSE if K.P_MSE in ok.columns else K.WM_NMSE
    cell = [c for c in (K.ENV, K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS, K.HEAD) if c in ok and ok[c].notna().any()]
    if not ok.empty and metric in ok:
        # groupby + unstack: only the cells that ran (a pivot_table with dropna=False lists
        # every combination of the cell columns, e.g. each variant x num_goals of a cases sweep).
        table = ok.groupby([*cell, K.METHOD], dropna=False)[metric].mean().unstack(K.METHOD)
        table.columns = [f"{metric}[{m}]" for m in table.columns]
        extra = ok.groupby(cell).agg(**{K.Q_NMSE: (K.Q_NMSE, "mean"), "seeds": (K.TRIAL_ID, "nunique"),
                                        K.ENV_STEPS: (K.ENV_STEPS, "max")})
        table = table.join(extra).reset_index()
        with pd.option_context("display.width", 220, "display.max_columns", 30,
                               "display.float_format", "{:.3g}".format):
            lines.append(f"latest checkpoint per trial, mean over seeds:\n{table.to_string(index=False)}")
    if not errors.empty:
        lines.append(f"{len(errors)} rows with errors, e.g.: {errors[K.ERROR].iloc[0]}")
    return "\n".join(lines)
