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
    from qworld.sweep.run import list_checkpoints, list_trials

    trials = list_trials(experiment_dir)
    checkpoints = list_checkpoints(experiment_dir)
    scored = store.scored_keys(experiment_dir)
    lines = [f"{len(trials)} trials, {len(checkpoints)} checkpoints, {len(scored)} scored"]
    latest = latest_scores(experiment_dir)
    if not latest.empty:
        cols = [c for c in (K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS, K.HEAD, K.SEED, K.ENV_STEPS,
                            K.METHOD, K.P_MSE, K.Q_NMSE, K.IDENTIFIABLE_CASE, K.ERROR)
                if c in latest.columns]
        table = latest[cols].sort_values([c for c in cols if c in (K.VARIANT, K.NUM_GOALS, K.SEED, K.METHOD)])
        with pd.option_context("display.width", 200, "display.max_columns", 20,
                               "display.float_format", "{:.3g}".format):
            lines.append(table.to_string(index=False))
    return "\n".join(lines)
