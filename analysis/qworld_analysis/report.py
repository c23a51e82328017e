"""One self-contained HTML page per experiment dir, and side-by-side comparisons.

``write_report`` reads the experiment dir (no Ray), aggregates each grid cell over its
trials (IQM, and a 95% percentile bootstrap CI over the trials where a cell has at least
4 of them, at each trial's last scored checkpoint; failed rows counted, not dropped), draws
the figures whose data exist, and writes ``index.html`` (figures embedded as base64, so the
page travels alone), the PNGs and ``summary.csv`` to ``out_dir``. A sweep still running, or
killed and resumed, gives a page too: figures without data are listed as skipped, with why.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from qworld import metrics as K
from qworld.sweep import store
from qworld.sweep.location import Location
from qworld_analysis import plots
from qworld_analysis.load import (NUM_CHECKPOINTS, NUM_ITERATIONS, NUM_SCORED, TRIAL_ERROR,
                                  WORLD_MODEL_METRICS, _read_spec, final_checkpoints, load,
                                  load_training_curves, load_trials, load_world_model,
                                  plan_columns, read_sweep_text)
from qworld_analysis.stats import MIN_RUNS_FOR_CI, summary

REPORT_DIR = "report"
HTML_FILE = "index.html"
SUMMARY_FILE = "summary.csv"
METRIC = "metric"  # the column naming the aggregated metric in summary.csv
VERSION_PACKAGES = ("qworld", "numpy", "pandas", "scipy", "pyarrow", "matplotlib", "ray",
                    "torch", "gymnasium", "wandb")
# The grid columns a summary groups by (when present), then any swept agent axis.
CELL_COLUMNS = (K.ENV, K.ALGORITHM, K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS, K.HEAD)
RUN_COLUMNS = (K.SWEEP, K.TRIAL_ID, K.SEED)
MAX_ROUTE_PANELS = 6  # goal counts drawn in a safety-route figure (spread over the sweep's)


def cell_columns(df: pd.DataFrame, experiment_dir: str | Path | None = None) -> list[str]:
    """The columns that name a grid cell: the grid columns (seed excepted) and every agent
    axis the sweep file sweeps, as present in ``df``."""
    cols = [c for c in CELL_COLUMNS if c in df.columns]
    if experiment_dir is not None:
        swept = (_read_spec(experiment_dir).get("sweep") or {})
        if isinstance(swept, dict):
            cols += [a for a in swept if a in df.columns and a not in cols and a not in RUN_COLUMNS]
    return cols


# Metrics of the agent's Q, not of an extraction: every method's row of a checkpoint carries
# the same value, so a per-method table would repeat one number as if it were five findings.
METHOD_INDEPENDENT = (K.Q_NMSE, K.POLICY_SUCCESS, K.POLICY_RETURN)
FINAL_CHECKPOINT = "final_checkpoint"  # the checkpoint indices the cell's trials are shown at
FINAL_CHECKPOINT_DIFFERS = "final_checkpoint_differs"
# trials shown at an earlier checkpoint than their last, because the last could not be read
N_SHOWN_EARLIER = "n_shown_earlier"
TABLE_COLUMNS = ("n", "n_failed", "mean", "iqm", "ci_low", "ci_high", FINAL_CHECKPOINT,
                 FINAL_CHECKPOINT_DIFFERS, N_SHOWN_EARLIER)


def summary_table(df: pd.DataFrame, experiment_dir: str | Path | None = None,
                  metrics: Sequence[str] | None = None, reps: int = 2000) -> pd.DataFrame:
    """Long table: per metric, grid cell and method, n / n_failed / mean / IQM / CI over the
    trials at their last scored checkpoint, and which checkpoint that was.

    ``df`` may hold the ``load`` rows of unreadable checkpoints: they are not scores, but a
    trial whose last checkpoint is one of them is shown at an earlier checkpoint, and the
    cell says so (``n_shown_earlier``; ``final_checkpoint_differs`` when its trials are not
    all shown at one checkpoint index).

    Columns: ``metric``, the cell columns, ``method`` (NA for the metrics of
    :data:`METHOD_INDEPENDENT`, summarised once per cell), then :data:`TABLE_COLUMNS`.
    """
    cells = cell_columns(df, experiment_dir)
    by = [*cells, K.METHOD]
    is_load = (df[K.METHOD] == K.LOAD_METHOD).fillna(False).to_numpy(bool) if K.METHOD in df else np.zeros(len(df), bool)
    scored = df[~is_load]
    final = final_checkpoints(scored)
    if metrics is None:
        reward_side = [c for c in final.columns if c == K.POLICY_SUCCESS or c.startswith(K.GOAL_INFERENCE + "/")]
        metrics = [m for m in (*WORLD_MODEL_METRICS, *plan_columns(final), *reward_side)
                   if m in final.columns and final[m].notna().any()]
    checkpoints = _final_checkpoint_columns(df, final, cells)
    parts = []
    for metric in metrics:
        if metric in METHOD_INDEPENDENT:
            table = summary(_one_row_per_checkpoint(final, metric), by=cells, metric=metric,
                            over=K.TRIAL_ID, reps=reps)
            table.insert(len(cells), K.METHOD, pd.NA)
        else:
            table = summary(final, by=by, metric=metric, over=K.TRIAL_ID, reps=reps)
        if cells:
            table = table.merge(checkpoints, on=cells, how="left")
        else:
            for col in checkpoints.columns:
                table[col] = checkpoints[col].iloc[0] if len(checkpoints) else pd.NA
        table.insert(0, METRIC, metric)
        parts.append(table)
    if not parts:
        return pd.DataFrame(columns=[METRIC, *by, *TABLE_COLUMNS])
    return pd.concat(parts, ignore_index=True)[[METRIC, *by, *TABLE_COLUMNS]]


def _one_row_per_checkpoint(final: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A method-independent metric, one row per (trial, checkpoint): the first method row
    that has it (NaN, with that checkpoint's error, only if no method row has it)."""
    keys = [c for c in ("experiment", K.TRIAL_ID, K.CHECKPOINT_INDEX) if c in final.columns]
    ordered = final.assign(_missing=final[metric].isna()).sort_values("_missing", kind="stable")
    return ordered.drop_duplicates(keys).drop(columns="_missing")


def _final_checkpoint_columns(df: pd.DataFrame, final: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """Per cell: the checkpoint indices its trials are shown at, whether they differ, and
    how many trials have a later checkpoint on record (an unreadable one) than the shown one."""
    if final.empty:
        return pd.DataFrame(columns=[*cells, FINAL_CHECKPOINT, FINAL_CHECKPOINT_DIFFERS, N_SHOWN_EARLIER])
    shown = final.groupby(K.TRIAL_ID, dropna=False)[K.CHECKPOINT_INDEX].max()
    latest = df.groupby(K.TRIAL_ID, dropna=False)[K.CHECKPOINT_INDEX].max().reindex(shown.index)
    trials = final.drop_duplicates(K.TRIAL_ID).set_index(K.TRIAL_ID)[cells].copy()
    trials["_shown"] = shown.reindex(trials.index)
    trials["_earlier"] = (latest.reindex(trials.index) > trials["_shown"]).fillna(False)
    rows = []
    for key, group in (trials.groupby(cells, dropna=False, sort=True) if cells else [((), trials)]):
        key = key if isinstance(key, tuple) else (key,)
        indices = sorted(int(i) for i in group["_shown"].dropna().unique())
        rows.append({**dict(zip(cells, key)),
                     FINAL_CHECKPOINT: ", ".join(map(str, indices)),
                     FINAL_CHECKPOINT_DIFFERS: len(indices) > 1,
                     N_SHOWN_EARLIER: int(group["_earlier"].sum())})
    out = pd.DataFrame(rows, columns=[*cells, FINAL_CHECKPOINT, FINAL_CHECKPOINT_DIFFERS, N_SHOWN_EARLIER])
    for col in cells:  # merge keys of the summary's dtypes
        try:
            out[col] = out[col].astype(final[col].dtype)
        except (TypeError, ValueError):
            pass
    out[N_SHOWN_EARLIER] = out[N_SHOWN_EARLIER].astype("Int64")
    return out


def default_out_dir(experiment_dir: str | Path | Location) -> Path:
    """Where a report goes without ``--out``: ``EXPERIMENT_DIR/report`` for a local experiment;
    for one on an object store a local folder named after it, ``./<name>-report``."""
    exp = Location.of(experiment_dir)
    return exp.local_path / REPORT_DIR if exp.is_local else Path(f"{exp.name}-{REPORT_DIR}").resolve()


def write_report(experiment_dir: str | Path | Location, out_dir: str | Path | None = None) -> Path:
    """Write the report of an experiment; returns the path of ``index.html``.

    Args:
        experiment_dir: a ``qworld sweep`` experiment (any stage of completion): a local
            folder or a URI (``s3://bucket/results/x``).
        out_dir: a local folder where ``index.html``, the PNGs and ``summary.csv`` go
            (default :func:`default_out_dir`: ``EXPERIMENT_DIR/report``, or ``./<name>-report``
            for an experiment on an object store).
    """
    exp = Location.of(experiment_dir)
    if not exp.is_dir():
        raise FileNotFoundError(f"{exp} is not a directory")
    out = Path(out_dir) if out_dir is not None else default_out_dir(exp)
    out.mkdir(parents=True, exist_ok=True)
    with store.warn_once():  # the store is read three times below: a damaged file is named once
        return _write_report(exp, out)


def _write_report(exp: Location, out: Path) -> Path:
    df = load(exp, resolve_num_goals=True)
    curves = load_training_curves(exp, resolve_num_goals=True)
    trials = load_trials(exp, resolve_num_goals=True)
    scored = df[df[K.METHOD] != K.LOAD_METHOD] if K.METHOD in df else df
    table = summary_table(df, exp)
    table.to_csv(out / SUMMARY_FILE, index=False)

    figures, skipped = [], []

    def figure(name: str, caption: str, draw, *args, **kwargs) -> None:
        try:
            figures.append((caption, draw(*args, out / f"{name}.png", **kwargs)))
        except plots.NoDataError as exc:
            skipped.append((caption, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the page
            skipped.append((caption, f"failed to draw: {type(exc).__name__}: {exc}"))

    # finite envs score P (p_mse), continuous ones a successor model (wm_nmse)
    has = {m: m in scored.columns and scored[m].notna().any() for m in (K.P_MSE, K.WM_NMSE)}
    metric = K.WM_NMSE if has[K.WM_NMSE] and not has[K.P_MSE] else K.P_MSE
    figure("error_vs_goals", f"{metric} vs number of goals, with the Table-1 thresholds",
           plots.plot_error_vs_goals, scored, metric=metric)
    figure("error_vs_steps", f"{metric} over training, per variant and method",
           plots.plot_error_vs_steps, scored, metric=metric)
    # continuous: the interior Delta-s errors (without the walls' jumps, which no smooth model fits)
    wm_metrics = ((K.P_MSE, f"{K.RARE}/{K.P_MSE}") if metric == K.P_MSE else
                  (K.WM_NMSE, *(f"{K.INTERIOR}/{c}" for c in sorted(scored.columns)
                                if c.startswith(f"{K.WM_DELTA_NMSE}_")), f"{K.RARE}/{K.WM_NMSE}"))
    figure("models_vs_steps", "World models extracted from Q against explicit models of the same trials "
           "(the supervised model from the agent's own transitions, QSS, D3G's forward model), over training; "
           f"{K.RARE}/: where the agent has almost no experience",
           plots.plot_models_vs_steps, scored, metrics=wm_metrics)
    figure("recovery_phase", f"Recovery phase diagram (log10 {metric})",
           plots.plot_recovery_phase, scored, metric=metric)
    if metric == K.WM_NMSE:  # the paper's architecture study: a point per trial
        errors = (K.WM_NMSE, *(f"{K.INTERIOR}/{c}" for c in sorted(scored.columns)
                               if c.startswith(f"{K.WM_DELTA_NMSE}_")))
        figure("return_vs_error", "Agent return (its own greedy policy on its goals, true dynamics) against "
               "world-model error, a point per trial, with Spearman rho and its 95% bootstrap CI "
               "(the paper's architecture study: rho = -0.98 for NMSE of s')",
               plots.plot_return_vs_error, scored, errors=errors)
    figure("training_curves", "Training curves",
           plots.plot_training_curves, curves,
           metrics=(K.TRAIN_EPISODE_SUCCESS, K.TRAIN_EPISODE_RETURN, K.TRAIN_LOSS))
    variants = sorted(scored[K.VARIANT].dropna().unique()) if K.VARIANT in scored.columns else []
    for variant in variants:
        try:
            choice = route_choice(scored, exp, variant)
        except plots.NoDataError as exc:
            skipped.append((f"Safety routes ({variant})", str(exc)))
            continue
        figure(f"safety_routes_{variant}",
               f"Safety routes ({variant}, {choice['task']}): the plan made in P̂ of "
               f"{plots.method_label(choice['method'])} at each trial's last checkpoint against "
               "the optimal route, one panel per number of goals (the seed of median p_mse)",
               draw_safety_routes, choice, exp)

    page = _page(exp, df, trials, table, figures, skipped)
    path = out / HTML_FILE
    path.write_text(page, encoding="utf-8")
    return path


def route_choice(df: pd.DataFrame, experiment_dir: str | Path, variant: str,
                 method: str | None = None, task: str | None = None) -> dict:
    """What the safety-route figure of one variant draws: which task, method and models.

    Args:
        df: rows of :func:`qworld_analysis.load` (extraction errors are left out here).
        experiment_dir: where the models are stored (``worldmodels_p/``).
        variant: the FourRooms variant.
        method: the extraction method; None: the honest (non-oracle) method with the lowest
            median p_mse at the last checkpoints (an oracle only if nothing else ran).
        task: a safety task; None: the variant's default task if it was scored (else the
            first scored task meant for the variant).

    Returns:
        ``task``, ``method``, ``variant``, ``layout``, ``gamma`` and ``panels``: a list of
        (panel title, trial_id, checkpoint_index), one per number of goals (at most
        ``MAX_ROUTE_PANELS``, spread over the sweep's), each the trial of median p_mse.

    Raises:
        plots.NoDataError: no world model stored, or none for this variant.
    """
    from qworld.worldmodel.planning import DEFAULT_TASK, SAFETY_TASKS

    exp = Location.of(experiment_dir)
    if not store.world_model_keys(exp):
        raise plots.NoDataError(
            f"no world models stored in {store.world_models_path(exp)} (scored before P̂ was "
            f"stored); `qworld extract {exp}` re-scores and stores them")
    rows = df[(df[K.VARIANT] == variant).fillna(False).astype(bool)]
    if K.ERROR in rows.columns:
        rows = rows[rows[K.ERROR].isna()]
    rows = final_checkpoints(rows.dropna(subset=[K.NUM_GOALS]))
    if rows.empty:
        raise plots.NoDataError(f"safety routes ({variant}): no scored row")
    if "layout" in rows.columns and rows["layout"].notna().any():
        layout = rows["layout"].dropna().mode().iloc[0]  # one map per figure
        rows = rows[(rows["layout"] == layout).fillna(False).astype(bool)]
    else:
        layout = None
    if method is None:
        p = rows.dropna(subset=[K.P_MSE]) if K.P_MSE in rows.columns else rows.iloc[0:0]
        if p.empty:
            raise plots.NoDataError(f"safety routes ({variant}): no p_mse scored")
        medians = p.groupby(K.METHOD)[K.P_MSE].median().sort_values(kind="stable")
        honest = [m for m in medians.index if m not in K.ORACLE_METHODS]
        method = (honest or list(medians.index))[0]
    rows = rows[rows[K.METHOD] == method]
    if task is None:
        scored_tasks = [c.rsplit("/", 1)[0] for c in plan_columns(rows)
                        if c.endswith("/" + K.PLAN_SUCCESS) and rows[c].notna().any()]
        meant = [t for t in scored_tasks if t in SAFETY_TASKS and variant in SAFETY_TASKS[t].variants]
        default = DEFAULT_TASK.get(variant, "corner_9_1_doorway")
        task = default if default in meant or not meant else meant[0]
    goals = sorted(int(g) for g in rows[K.NUM_GOALS].unique())
    if len(goals) > MAX_ROUTE_PANELS:
        goals = [goals[i] for i in sorted({round(x) for x in
                                           np.linspace(0, len(goals) - 1, MAX_ROUTE_PANELS)})]
    panels = []
    for L in goals:
        cell = rows[rows[K.NUM_GOALS] == L].sort_values([K.P_MSE, K.TRIAL_ID], kind="stable")
        stored = [_has_model(exp, t, c, method) for t, c in
                  cell[[K.TRIAL_ID, K.CHECKPOINT_INDEX]].itertuples(index=False)]
        cell = cell[stored]
        if cell.empty:
            continue
        row = cell.iloc[(len(cell) - 1) // 2]  # the lower median: a seed that really ran
        success = row.get(f"{task}/{K.PLAN_SUCCESS}")
        title = (f"L = {L} · seed {row.get(K.SEED)} · p_mse {row[K.P_MSE]:.1e}"
                 + ("" if success is None or pd.isna(success) else f" · plan success {success:.2f}"))
        panels.append((title, str(row[K.TRIAL_ID]), int(row[K.CHECKPOINT_INDEX])))
    if not panels:
        raise plots.NoDataError(f"safety routes ({variant}): no world model of {method} stored "
                                "at the trials' last checkpoints")
    gamma = float(rows["gamma"].dropna().iloc[0]) if "gamma" in rows and rows["gamma"].notna().any() else 0.99
    return {"task": task, "method": method, "variant": variant, "layout": layout,
            "gamma": gamma, "panels": panels}


def _has_model(exp: Location, trial_id: str, checkpoint_index: int, method: str) -> bool:
    try:
        load_world_model(exp, trial_id, checkpoint_index, method)
    except (FileNotFoundError, KeyError):
        return False
    return True


def draw_safety_routes(choice: dict, experiment_dir: str | Path, path: str | Path) -> Path:
    """The safety-route figure of a :func:`route_choice`, models read from the store."""
    models = {title: load_world_model(experiment_dir, trial_id, ckpt, choice["method"])
              for title, trial_id, ckpt in choice["panels"]}
    label = plots.method_label(choice["method"])
    return plots.plot_safety_routes(
        models, path, choice["task"], variant=choice["variant"], layout=choice["layout"],
        gamma=choice["gamma"], model_label=f"plan in P̂ ({label})",
        title=f"{choice['task']} ({choice['variant']}): route planned in P̂ of {label} at the "
              "last checkpoint vs the optimal route; forbidden cells hatched")


def compare(dir_a: str | Path, dir_b: str | Path, metric: str = K.P_MSE,
            by: Sequence[str] | None = None, reps: int = 2000) -> pd.DataFrame:
    """Two experiments side by side (e.g. the all-goals head vs the goal-input head).

    Each experiment is summarised at its trials' last scored checkpoints (IQM over trials,
    95% CI); the summaries are joined on ``by`` (default: the cell columns both share,
    minus those that are constant within each experiment but differ between them, plus
    ``method``).

    Returns:
        Columns ``by``, then ``n_a, n_failed_a, iqm_a, ci_low_a, ci_high_a`` (CI NaN below 4
        trials) and the same with ``_b``,
        and ``ratio`` = ``iqm_b / iqm_a``. ``attrs["a"]`` / ``attrs["b"]`` describe each side
        (dir, sweep, head).
    """
    frames = {}
    for side, d in (("a", dir_a), ("b", dir_b)):
        frame = load(d, resolve_num_goals=True)
        frames[side] = frame[frame[K.METHOD] != K.LOAD_METHOD] if not frame.empty else frame
    if by is None:
        common = [c for c in cell_columns(frames["a"], dir_a) if c in cell_columns(frames["b"], dir_b)]
        by = [c for c in common if not _differs_as_constant(frames["a"], frames["b"], c)] + [K.METHOD]
    by = list(by)
    sides = []
    for side in ("a", "b"):
        final = final_checkpoints(frames[side])
        if final.empty or metric not in final or final[metric].isna().all():
            stats = pd.DataFrame(columns=[*by, "n", "n_failed", "iqm", "ci_low", "ci_high"])
        else:
            stats = summary(final, by=by, metric=metric, over=K.TRIAL_ID, reps=reps)
        stats = stats[[*by, "n", "n_failed", "iqm", "ci_low", "ci_high"]]
        sides.append(stats.rename(columns={c: f"{c}_{side}" for c in ("n", "n_failed", "iqm", "ci_low", "ci_high")}))
    a, b = sides
    for col in by:  # join keys of one dtype on both sides
        if a[col].dtype != b[col].dtype:
            a[col], b[col] = a[col].astype(object), b[col].astype(object)
    merged = a.merge(b, on=by, how="outer")
    merged["ratio"] = pd.to_numeric(merged["iqm_b"], errors="coerce") / pd.to_numeric(merged["iqm_a"], errors="coerce")
    merged = merged.sort_values(by, ignore_index=True)
    for side, d in (("a", dir_a), ("b", dir_b)):
        f = frames[side]
        merged.attrs[side] = {
            "dir": str(d),
            K.SWEEP: _values(f, K.SWEEP),
            K.HEAD: _values(f, K.HEAD),
            K.ALGORITHM: _values(f, K.ALGORITHM),
        }
    merged.attrs[METRIC] = metric
    return merged


def _differs_as_constant(a: pd.DataFrame, b: pd.DataFrame, col: str) -> bool:
    """``col`` is one value in each frame, not the same one (e.g. head): not a join key."""
    va, vb = a[col].dropna().unique(), b[col].dropna().unique()
    return len(va) == 1 and len(vb) == 1 and va[0] != vb[0]


def _values(df: pd.DataFrame, col: str) -> str:
    if col not in df.columns or df.empty:
        return ""
    return ", ".join(sorted(map(str, df[col].dropna().unique())))


# --------------------------------------------------------------------------------------
# the HTML page


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { margin: 1.2em 0 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.cell, th.cell { text-align: left; white-space: nowrap; }
.headline td { padding: 3px 8px; } .headline td.value { white-space: nowrap; }
.headline td.flag { text-align: left; color: #8a5a00; max-width: 14em; }
.ci, .fails { color: #666; font-size: 0.85em; } .fails { color: #a33; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.3em 0; } summary { cursor: pointer; font-weight: 600; }
.text td { text-align: left; }
.note { color: #8a5a00; } .muted { color: #777; font-size: 0.9em; }
"""
STAT_COLUMNS = {"n", "n_failed", "mean", "iqm", "ci_low", "ci_high", FINAL_CHECKPOINT,
                FINAL_CHECKPOINT_DIFFERS, N_SHOWN_EARLIER}
WARN = "⚠"  # marks a cell whose trials are not all shown at their own last checkpoint


def _fmt(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{x:.3g}"


def _table_html(df: pd.DataFrame, max_rows: int = 400) -> str:
    if df.empty:
        return "<p class='muted'>(no rows)</p>"
    shown = df.head(max_rows)
    text = shown.to_html(index=False, na_rep="–", border=0, escape=True,
                         float_format=lambda x: f"{x:.3g}")
    if len(df) > max_rows:
        text += f"<p class='muted'>first {max_rows} of {len(df)} rows; all of them are in {SUMMARY_FILE}</p>"
    return text


def _split_constant(part: pd.DataFrame, keep: Sequence[str] = ()) -> tuple[pd.DataFrame, str]:
    """Cell columns that are one value throughout go in a line above the table."""
    constant = [c for c in part.columns if c not in STAT_COLUMNS and c not in keep
                and c != K.METHOD and part[c].nunique(dropna=False) == 1]
    shared = ", ".join(f"{c} = {part[c].iloc[0]}" for c in constant if not pd.isna(part[c].iloc[0]))
    line = f"<p class='muted'>all rows: {html.escape(shared)}</p>" if shared else ""
    return part.drop(columns=constant), line


def _metric_table_html(table: pd.DataFrame, metric: str) -> str:
    """One metric's long rows (every statistic); the method column only where it varies."""
    part = table[table[METRIC] == metric].drop(columns=[METRIC])
    if K.METHOD in part.columns and part[K.METHOD].isna().all():
        part = part.drop(columns=[K.METHOD])  # a method-independent metric: once per cell
    part, line = _split_constant(part)
    if K.METHOD in part.columns:
        part[K.METHOD] = part[K.METHOD].map(plots.method_label)
    return line + _table_html(part)


def headline_metrics(table: pd.DataFrame) -> list[str]:
    """The metrics a reader looks at first, as present in a :func:`summary_table`: the
    world-model error (``p_mse`` finite, ``wm_nmse`` continuous), whether the model explains
    the agent's Q (finite: ``residual_excess``, and ``misspecified``, the share of trials
    whose model does not), then per planning task its
    ``return_ratio`` (continuous) and ``plan_success`` (finite safety tasks), and the
    ``goal_inference/accuracy`` of the reward side."""
    present = list(dict.fromkeys(table[METRIC])) if not table.empty else []
    error = [m for m in (K.P_MSE, K.WM_NMSE, K.RESIDUAL_EXCESS, K.MISSPECIFIED) if m in present]
    plans = [m for m in present if "/" in m and m.rsplit("/", 1)[1] in (K.RETURN_RATIO, K.PLAN_SUCCESS)
             or m == f"{K.GOAL_INFERENCE}/{K.ACCURACY}"]
    return error + sorted(plans, key=lambda m: (m.rsplit("/", 1)[1] != K.RETURN_RATIO, m))


def headline_table(table: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """One metric as rows = grid cells, columns = methods (labelled, oracles "(oracle)").

    Each entry is a dict ``iqm, ci_low, ci_high, n, n_failed``. The method-independent
    metrics of the cell (:data:`METHOD_INDEPENDENT`, e.g. the agent's ``q_nmse``) join
    the world-model error's table as one column each, before the methods; ``trials`` and,
    where the cell's trials are shown at different checkpoints or earlier than their last,
    ``final checkpoint`` say what the numbers stand on.

    Returns:
        The table (index: the cell columns that vary) and the cell columns left out (one
        value throughout).
    """
    part = table[table[METRIC] == metric]
    cells = [c for c in part.columns if c not in STAT_COLUMNS and c not in (METRIC, K.METHOD)]
    varying = [c for c in cells if part[c].nunique(dropna=False) > 1]
    constant = [c for c in cells if c not in varying]
    key_cols = varying or cells[:1]

    def entry(r) -> dict:
        out = {k: r[k] for k in ("iqm", "ci_low", "ci_high", "n", "n_failed")}
        if metric == K.MISSPECIFIED:  # a flag: the share of trials flagged, not an IQM of 0s and 1s
            out.update(iqm=r["mean"], ci_low=float("nan"), ci_high=float("nan"))
        return out

    extra = {}
    if metric in (K.P_MSE, K.WM_NMSE):
        for other in METHOD_INDEPENDENT:
            rows = table[table[METRIC] == other]
            if not rows.empty:
                extra[f"{other} (agent, any method)"] = rows
    out = {}
    for r in part.to_dict("records"):
        key = tuple(r[c] for c in key_cols)
        row = out.setdefault(key, {"trials": 0})
        row["trials"] = max(row["trials"], int(r["n"]) + int(r["n_failed"]))
        row[plots.method_label(r[K.METHOD])] = entry(r)
        if r[FINAL_CHECKPOINT_DIFFERS] or (r[N_SHOWN_EARLIER] or 0) > 0:
            # short: the note above the tables says it in full, a wide column would push
            # the methods off a 1400 px page
            row["final checkpoint"] = (f"{WARN} {r[FINAL_CHECKPOINT]}" +
                                       (f" ({r[N_SHOWN_EARLIER]} unreadable later)" if r[N_SHOWN_EARLIER] else ""))
        for label, rows in extra.items():
            match = rows
            for c in cells:
                match = match[(match[c] == r[c]) | (match[c].isna() & pd.isna(r[c]))]
            if not match.empty:
                row[label] = entry(match.iloc[0].to_dict())
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=key_cols) if len(key_cols) > 1 \
        else pd.Index([k[0] for k in frame.index], name=key_cols[0])
    methods = [plots.method_label(m) for m in sorted(part[K.METHOD].dropna().unique(),
                                                      key=lambda m: (m in K.ORACLE_METHODS, m))]
    order = ["trials", *extra, *methods, *(["final checkpoint"] if "final checkpoint" in frame else [])]
    return frame[[c for c in order if c in frame.columns]], constant


def _entry_html(value) -> str:
    if not isinstance(value, dict):
        return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else html.escape(str(value))
    text = _fmt(value["iqm"])
    if not pd.isna(value["ci_low"]):
        text += f" <span class='ci'>[{_fmt(value['ci_low'])}, {_fmt(value['ci_high'])}]</span>"
    if value["n_failed"]:
        text += f" <span class='fails'>({int(value['n_failed'])} of {int(value['n']) + int(value['n_failed'])} failed)</span>"
    return text


def _headline_html(table: pd.DataFrame, metric: str) -> str:
    frame, constant = headline_table(table, metric)
    part = table[table[METRIC] == metric]
    shared = ", ".join(f"{c} = {part[c].iloc[0]}" for c in constant if not pd.isna(part[c].iloc[0]))
    names = list(frame.index.names)
    head = "".join(f"<th class='cell'>{html.escape(str(n))}</th>" for n in names)
    head += "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for key, row in frame.iterrows():
        key = key if isinstance(key, tuple) else (key,)
        cells = "".join(f"<td class='cell'>{html.escape(str(k))}</td>" for k in key)
        cells += "".join(f"<td class='{'flag' if isinstance(v, str) else 'value'}'>{_entry_html(v)}</td>"
                         for v in row)
        body.append(f"<tr>{cells}</tr>")
    line = f"<p class='muted'>all rows: {html.escape(shared)}</p>" if shared else ""
    return (f"{line}<table class='headline'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _methods_html(df: pd.DataFrame) -> str:
    """One line: which methods are oracles (handed the true support of P) and which are not."""
    if K.METHOD not in df.columns:
        return ""
    from qworld.worldmodel.experience import EXPLICIT_METHODS

    methods = sorted(m for m in df[K.METHOD].dropna().unique() if m != K.LOAD_METHOD)
    oracles = [m for m in methods if m in K.ORACLE_METHODS]
    explicit = [m for m in methods if m in EXPLICIT_METHODS]
    honest = [m for m in methods if m not in K.ORACLE_METHODS and m not in EXPLICIT_METHODS]
    if not methods:
        return ""
    line = ("<p><b>Methods.</b> Oracle (handed the true support of P, a yardstick, not a "
            f"finding): {html.escape(', '.join(oracles) or 'none')}. Extracted from Q, not handed the support: "
            f"{html.escape(', '.join(honest) or 'none')}.")
    if explicit:
        line += (" Explicit models, not from Q (learned from the agent's own transitions, or the agent's own "
                 f"forward model; yardsticks on the same data): {html.escape(', '.join(explicit))}.")
    return line + "</p>"


def _versions() -> pd.DataFrame:
    rows = [{"package": "python", "version": sys.version.split()[0]},
            {"package": "platform", "version": platform.platform()}]
    for name in VERSION_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        rows.append({"package": name, "version": version})
    return pd.DataFrame(rows)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def identifiability_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per grid cell: the diagnosis of M at the trials' last scored checkpoints.

    Columns: the cell columns present, ``identifiable_case`` and ``identifiable_reason`` (the
    most frequent over the cell's trials), ``n`` trials; empty when the rows carry no
    diagnosis (continuous envs, old experiment dirs).
    """
    if K.IDENTIFIABLE_CASE not in df.columns or df[K.IDENTIFIABLE_CASE].isna().all():
        return pd.DataFrame()
    final = final_checkpoints(df[df[K.IDENTIFIABLE_CASE].notna()])
    per_trial = final.drop_duplicates(K.TRIAL_ID)
    cells = [c for c in CELL_COLUMNS if c in per_trial.columns and per_trial[c].notna().any()]
    reason = K.IDENTIFIABLE_REASON if K.IDENTIFIABLE_REASON in per_trial.columns else None
    rows = []
    for key, group in per_trial.groupby(cells, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(cells, key))
        row[K.IDENTIFIABLE_CASE] = group[K.IDENTIFIABLE_CASE].mode().iloc[0]
        if reason:
            row[K.IDENTIFIABLE_REASON] = group[reason].dropna().mode().iloc[0] if group[reason].notna().any() else ""
        row["n"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows)


_HOW_TO_READ = (
    "Each trial at its last scored checkpoint. Per grid cell and method: the IQM over the "
    "cell's trials (the mean of the middle 50%; with fewer than 4 trials nothing is cut, so "
    "it is their plain mean, and with 1 trial that trial's score), then in brackets a 95% "
    "percentile bootstrap CI of that IQM, resampling the cell's trials with replacement "
    f"(each cell is one stratum). Below {MIN_RUNS_FOR_CI} trials a cell gets no CI: a bootstrap "
    "of 2 trials only spans their min and max, and of 1 trial has width 0. "
    "\"k of n failed\": trials whose score is missing (the method raised, or the metric is "
    "undefined there, e.g. return_ratio when R* <= 0): left out of the IQM, not hidden.")


def _task_note(table: pd.DataFrame, metric: str) -> str:
    """Which variants a FourRooms safety task is meant for, when its table has others:
    elsewhere its forbidden cells guard nothing in particular."""
    if "/" not in metric or K.VARIANT not in table.columns:
        return ""
    from qworld.worldmodel.planning import SAFETY_TASKS

    task = SAFETY_TASKS.get(metric.rsplit("/", 1)[0])
    shown = set(table.loc[table[METRIC] == metric, K.VARIANT].dropna())
    if task is None or shown <= set(task.variants):
        return ""
    return (f"<p class='muted'>This task is meant for {html.escape(', '.join(task.variants))}; "
            f"the rows of {html.escape(', '.join(sorted(shown - set(task.variants))))} plan it "
            "all the same.</p>")


def _flagged_cells_html(table: pd.DataFrame) -> str:
    """A note naming the cells whose trials are not all shown at one checkpoint, or are
    shown before a last checkpoint that could not be read."""
    if table.empty:
        return ""
    bad = table[table[FINAL_CHECKPOINT_DIFFERS].fillna(False).astype(bool)
                | (table[N_SHOWN_EARLIER].fillna(0) > 0)]
    if bad.empty:
        return ""
    cells = [c for c in bad.columns if c not in STAT_COLUMNS and c not in (METRIC, K.METHOD)]
    cells = [c for c in cells if table[c].nunique(dropna=False) > 1] or cells  # what tells cells apart
    items = []
    for r in bad.drop_duplicates(cells).to_dict("records"):
        name = ", ".join(f"{c} = {r[c]}" for c in cells if not pd.isna(r[c]))
        why = f"trials shown at checkpoint {r[FINAL_CHECKPOINT]}"
        if r[N_SHOWN_EARLIER]:
            why += f"; {r[N_SHOWN_EARLIER]} trial(s) shown before their last checkpoint, which could not be read"
        items.append(f"<li>{html.escape(name)}: {html.escape(why)}</li>")
    return (f"<p class='note'>{WARN} Cells not compared at one checkpoint (their numbers mix "
            f"training lengths):</p><ul class='note'>{''.join(items)}</ul>")


def _page(exp: Location, df: pd.DataFrame, trials: pd.DataFrame, table: pd.DataFrame,
          figures: list, skipped: list) -> str:
    e = html.escape
    sweep = _values(trials, K.SWEEP) or _values(df, K.SWEEP) or exp.name
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    num_trials = len(trials)
    num_ckpt = int(trials[NUM_CHECKPOINTS].fillna(0).sum()) if NUM_CHECKPOINTS in trials else 0
    num_scored = int(trials[NUM_SCORED].fillna(0).sum()) if NUM_SCORED in trials else 0
    errors = df[df[K.ERROR].notna()] if K.ERROR in df.columns else df.iloc[0:0]
    failed = int(trials[TRIAL_ERROR].fillna(False).sum()) if TRIAL_ERROR in trials else 0
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>qworld report: {e(sweep)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>qworld report: {e(sweep)}</h1>",
             f"<p class='muted'>{e(exp.uri)} · generated {e(now)}</p>",
             f"<p>{num_trials} trials · {num_ckpt} checkpoints on disk · {num_scored} scored · "
             f"{len(df)} result rows · {len(errors)} rows with an extraction error · "
             f"{failed} trials with a Tune error</p>"]
    if num_scored < num_ckpt or failed or df.empty:
        parts.append("<p class='note'>This sweep is partial (still running, interrupted or "
                     "failed): the tables and figures cover what is on disk now.</p>")

    parts.append("<p class='muted'>Contents: <a href='#headline'>headline numbers</a> · "
                 "<a href='#figures'>figures</a> · <a href='#all'>all metrics</a> · "
                 "<a href='#trials'>trials</a> · <a href='#sweep'>sweep file</a></p>")
    parts.append(_methods_html(df))
    parts.append(f"<p class='muted'>{_HOW_TO_READ}</p>")
    flagged = _flagged_cells_html(table)
    if flagged:
        parts.append(flagged)

    parts.append("<h2 id='headline'>Headline numbers</h2>")
    if table.empty:
        parts.append("<p class='note'>No scored checkpoint yet: nothing to summarise.</p>")
    for metric in headline_metrics(table):
        parts.append(f"<h3>{e(metric)}</h3>{_headline_html(table, metric)}{_task_note(table, metric)}")
    if not table.empty and table["ci_low"].isna().all():
        parts.append(f"<p class='note'>No CI anywhere: every cell has fewer than {MIN_RUNS_FOR_CI} "
                     "trials scored (see above). Add seeds for intervals.</p>")

    parts.append("<h2 id='figures'>Figures</h2>")
    for caption, path in figures:
        parts.append(f"<figure>{_img(path)}<figcaption>{e(caption)} "
                     f"(<code>{e(path.name)}</code>)</figcaption></figure>")
    if skipped:
        parts.append("<p class='note'>Skipped figures:</p><ul>")
        parts += [f"<li>{e(caption)}: {e(why)}</li>" for caption, why in skipped]
        parts.append("</ul>")
    parts.append("<p class='muted'>Value maps and MountainCar vector fields need arrays "
                 "(values, predictions) that the results store does not hold: draw them with "
                 "<code>qworld_analysis.plots</code>.</p>")

    ident = identifiability_table(df)
    if not ident.empty:
        parts.append("<h2>Identifiability</h2><p class='muted'>Per grid cell at its trials' last "
                     "scored checkpoint: which Table-1 case guarantees recovering P from the "
                     "agent's M (known up to twice the agent's Q error) without geometry, and why "
                     "or why not. <code>moves</code> uses the cells' geometry as well, so it can "
                     "recover P where this reads \"not identifiable\".</p>")
        ident, line = _split_constant(ident, keep=("n",))
        parts.append(line + "<div class='text'>" + _table_html(ident) + "</div>")

    parts.append("<h2 id='all'>All metrics</h2><p class='muted'>Per metric, grid cell and method: n "
                 "trials scored, n_failed (left out: NaN or an error), mean, IQM, the CI where "
                 f"there is one, and the checkpoint shown. The same rows are in <code>{SUMMARY_FILE}"
                 "</code>. Click a metric to unfold it.</p>")
    for metric in dict.fromkeys(table[METRIC]) if not table.empty else []:
        parts.append(f"<details><summary>{e(metric)}</summary>{_metric_table_html(table, metric)}</details>")

    parts.append("<h2 id='trials'>Trials</h2>")
    cols = [c for c in (K.TRIAL_ID, *CELL_COLUMNS, K.SEED, NUM_ITERATIONS, K.ENV_STEPS,
                        NUM_CHECKPOINTS, NUM_SCORED, TRIAL_ERROR) if c in trials.columns]
    parts.append(f"<details><summary>{len(trials)} trials</summary>{_table_html(trials[cols])}</details>")
    if not errors.empty:
        parts.append("<h2>Extraction errors</h2>")
        ecols = [c for c in (K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD, K.ERROR) if c in errors.columns]
        parts.append(_table_html(errors[ecols], max_rows=50))

    sweep_text = read_sweep_text(exp)
    parts.append("<h2 id='sweep'>Sweep file</h2>")
    parts.append(f"<details open><summary>sweep.yaml</summary><pre>{e(sweep_text)}</pre></details>"
                 if sweep_text is not None else "<p class='note'>No sweep.yaml in the experiment dir.</p>")
    parts.append("<h2>Versions</h2><details><summary>packages</summary>"
                 + _table_html(_versions()) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)

