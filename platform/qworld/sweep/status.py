"""``qworld status``: what an experiment holds, read from its location alone (no Ray).

Read-only: a damaged results file is named on stderr and left where it is (``qworld resume``
or ``qworld extract`` sets it aside and scores it again); an unreadable one (permission,
network, credentials) is an error naming it. The experiment is a local path or a URI.
"""

from __future__ import annotations

import os

import pandas as pd

from qworld import metrics as K
from qworld.sweep import store
from qworld.sweep.location import Location


def latest_scores(experiment_dir: "str | os.PathLike | Location", rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (trial, method): the world-model score at the trial's latest scored checkpoint."""
    rows = store.read_store(experiment_dir) if rows is None else rows
    if rows.empty:
        return rows
    last = rows.groupby(K.TRIAL_ID)[K.CHECKPOINT_INDEX].transform("max")
    return rows[rows[K.CHECKPOINT_INDEX] == last]


def status_table(experiment_dir: "str | os.PathLike | Location") -> str:
    """Counts, then one line per grid cell (seeds averaged): p_mse of each method at the
    latest scored checkpoint, the agent's q_nmse and how many seeds are in.

    ``scored`` counts the checkpoints on disk whose stored rows are theirs (a checkpoint
    number rewritten after a rollback, whose rows carry another ``checkpoint_uid``, is not);
    rows of checkpoints no longer on disk are counted apart."""
    from qworld.sweep.run import _checkpoints_with_uids, list_trials

    exp = Location.of(experiment_dir)
    trials = list_trials(exp)
    checkpoints = _checkpoints_with_uids(exp)  # (trial, checkpoint, env steps, uid)
    rows = store.read_store(exp)
    stored = {}
    if not rows.empty:
        uids = rows[K.CHECKPOINT_UID] if K.CHECKPOINT_UID in rows else pd.Series([None] * len(rows))
        for t, c, u in zip(rows[K.TRIAL_ID], rows[K.CHECKPOINT_INDEX], uids):
            stored[(str(t), int(c))] = u if isinstance(u, str) and u else None
    if checkpoints:
        from qworld.sweep.score import checkpoint_index

        on_disk = {(str(t), checkpoint_index(ckpt)): uid for t, ckpt, _, uid in checkpoints}
        stale = {key for key, uid in on_disk.items() if key in stored and store.is_stale(stored[key], uid)}
        scored = len([key for key in on_disk if key in stored and key not in stale])
        line = f"{len(trials)} trials, {len(checkpoints)} checkpoints, {scored} scored"
        if stale:
            line += f" ({len(stale)} with stale rows of an earlier checkpoint of that number: `qworld resume` re-scores them)"
        others = len(set(stored) - set(on_disk))
        if others:
            line += f"; rows of {others} checkpoints no longer on disk"
    else:
        line = f"{len(trials)} trials, {len(checkpoints)} checkpoints, {len(stored)} scored"
    lines = [line]
    latest = latest_scores(exp, rows)
    if latest.empty:
        return "\n".join(lines)
    has_error = K.ERROR in latest and latest[K.ERROR].notna().any()
    errors = latest[latest[K.ERROR].notna()] if has_error else latest.iloc[:0]
    ok = latest[latest[K.ERROR].isna()] if K.ERROR in latest else latest
    metric = K.P_MSE if K.P_MSE in ok.columns and ok[K.P_MSE].notna().any() else K.WM_NMSE
    cell = [c for c in (K.ENV, K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS, K.HEAD) if c in ok and ok[c].notna().any()]
    swept = _swept_columns(exp, ok)  # every other axis of the sweep file (e.g. gamma), from params.json
    if not swept.empty:
        ok = ok.merge(swept, on=K.TRIAL_ID, how="left")
        cell += [c for c in swept.columns if c != K.TRIAL_ID and c not in cell]
    if not ok.empty and metric in ok:
        ok = ok.assign(_all="all") if not cell else ok
        cell = cell or ["_all"]
        # groupby + unstack: only the cells that ran (a pivot_table with dropna=False lists
        # every combination of the cell columns, e.g. each variant x num_goals of a cases sweep).
        table = ok.groupby([*cell, K.METHOD], dropna=False)[metric].mean().unstack(K.METHOD)
        table.columns = [f"{metric}[{m}]" for m in table.columns]
        agg = {"seeds": (K.TRIAL_ID, "nunique")}
        for col in (K.Q_NMSE, K.ENV_STEPS):
            if col in ok:
                agg[col] = (col, "mean" if col == K.Q_NMSE else "max")
        extra = ok.groupby(cell, dropna=False).agg(**agg)
        table = table.join(extra).reset_index().drop(columns=["_all"], errors="ignore")
        with pd.option_context("display.width", 220, "display.max_columns", 30,
                               "display.float_format", "{:.3g}".format):
            lines.append(f"latest checkpoint per trial, mean over seeds:\n{table.to_string(index=False)}")
    if not errors.empty:
        lines.append(f"{len(errors)} rows with errors, e.g.: {errors[K.ERROR].iloc[0]}")
    return "\n".join(lines)


def _swept_columns(exp: Location, rows: pd.DataFrame) -> pd.DataFrame:
    """Per trial, the sweep file's grid axes (seed excepted) that the results rows lack, such
    as an agent keyword (``gamma: [0.9, 0.99]``): two cells apart, not one with "seeds 2"."""
    import qworld_analysis as qa

    from qworld.sweep.run import load_spec_of

    try:
        axes = [a for a in load_spec_of(exp).grid_axes if a != K.SEED and a not in rows.columns]
    except Exception:  # noqa: BLE001 - no readable sweep file: the store's own columns
        return pd.DataFrame()
    if not axes:
        return pd.DataFrame()
    trials = qa.load_trials(exp)
    have = [a for a in axes if a in trials.columns]
    return trials[[K.TRIAL_ID, *have]].astype({a: "string" for a in have}) if have else pd.DataFrame()
