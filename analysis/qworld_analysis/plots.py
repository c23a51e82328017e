"""Figures: each function takes DataFrames or arrays and a path, writes a PNG, returns the path
(a :class:`FigurePath`, whose ``figure`` is the matplotlib Figure drawn).

Matplotlib through the Agg canvas directly (no pyplot, no global backend switch), so the
functions are safe in scripts, tests and notebooks alike. Error axes are logarithmic when
the values span more than a decade; exact zeros (a perfectly recovered P) are drawn on a
floor line a decade below the smallest positive value and labelled as such.

Frames are those of :func:`qworld_analysis.load`; shapes: S states, A actions, N points,
d state dims. Drawing only: the numbers a figure shows (Table-1 thresholds, routes) come from
``qworld.worldmodel``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter

from qworld import metrics as K
from qworld.worldmodel.planning import greedy_route
from qworld.worldmodel.plearn.diagnose import variant_thresholds
from qworld_analysis.load import final_checkpoints
from qworld_analysis.stats import MIN_RUNS_FOR_CI, rank_correlation, summary

DPI = 110
LABELS = {
    K.P_MSE: "MSE of P̂ vs P",
    K.P_TV: "total variation of P̂ vs P",
    K.P_MAX_ERR: "max |P̂ - P|",
    K.Q_NMSE: "Q NMSE",
    K.WM_NMSE: "world-model NMSE",
    K.NUM_GOALS: "number of goals L",
    K.ENV_STEPS: "env steps",
    K.TRAIN_EPISODE_SUCCESS: "episode success",
    K.TRAIN_EPISODE_RETURN: "episode return",
    K.TRAIN_LOSS: "TD loss",
    K.TRAIN_Q_MEAN: "mean Q",
}


# The paper's FourRooms world-model errors (mean MSE of P_hat vs P over 10M steps, indicator
# goals; ../shared/PAPER_NOTES.md), keyed (variant, num_goals): the one copy of these numbers.
PAPER_P_MSE = {
    ("deterministic", 1): 0.0,
    ("windy", 1): 6e-3,
    ("windy", 4): 1.3e-3,
    ("teleport", 20): 2e-3,
}


def method_label(method: str) -> str:
    """The method's name, with ``(oracle)`` for a method handed the true support of P and
    ``(not from Q)`` for an explicit model (``qworld.worldmodel.experience.EXPLICIT_METHODS``)."""
    from qworld.worldmodel.experience import EXPLICIT_METHODS

    if method in K.ORACLE_METHODS:
        return f"{method} (oracle)"
    return f"{method} (not from Q)" if method in EXPLICIT_METHODS else str(method)


def paper_p_mse(variant, num_goals, goal_type=None,
                paper: Mapping[tuple[str, int], float] | None = None) -> float | None:
    """The paper's p_mse for a grid cell, or None (another cell, or goals that are not
    indicators: the paper's numbers are for indicator goals)."""
    paper = PAPER_P_MSE if paper is None else paper
    if variant is None or num_goals is None or pd.isna(variant) or pd.isna(num_goals):
        return None
    if goal_type is not None and not pd.isna(goal_type) and goal_type != "indicator":
        return None
    return paper.get((str(variant), int(num_goals)))


class NoDataError(ValueError):
    """The frame holds nothing a plot could draw (the report skips the plot and says why)."""


# --------------------------------------------------------------------------------------
# helpers


def _figure(nrows: int, ncols: int, panel=(4.4, 3.4)):
    """A constrained-layout figure on an Agg canvas and its ``[nrows, ncols]`` axes."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


class FigurePath(type(Path())):
    """The path of a written PNG that also carries its matplotlib ``figure``: callers keep a
    path, tests read the plotted lines and images instead of comparing PNG bytes."""

    figure: Figure | None = None


def _save(fig: Figure, path: str | Path, tight: bool = False) -> FigurePath:
    """Write the PNG; ``tight`` grows the canvas to what is drawn (maps have a fixed aspect,
    so constrained layout can leave a legend below them partly off the canvas)."""
    path = FigurePath(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", **({"bbox_inches": "tight", "pad_inches": 0.1} if tight else {}))
    path.figure = fig
    return path


def _label(col: str) -> str:
    return LABELS.get(col, col)


def _positive_floor(values: np.ndarray) -> float | None:
    """A decade below the smallest positive value, when some values are exactly 0."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not (v <= 0).any():
        return None
    pos = v[v > 0]
    return float(pos.min() / 10) if pos.size else 1e-12


def _spans_decades(values: np.ndarray) -> bool:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    return v.size > 0 and (v.max() / v.min() > 10 or (np.asarray(values) == 0).any())


def _need(df: pd.DataFrame, columns: Sequence[str], what: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise NoDataError(f"{what}: no data yet (no column {', '.join(missing)})")
    rows = df.dropna(subset=list(columns))
    if rows.empty:
        raise NoDataError(f"{what}: no data yet (no row with all of {', '.join(columns)})")
    return rows


def _panel_keys(df: pd.DataFrame, cols: Sequence[str]) -> list[tuple]:
    cols = [c for c in cols if c in df.columns]
    if not cols:
        return [()]
    return [k if isinstance(k, tuple) else (k,) for k, _ in df.groupby(cols, dropna=False, sort=True)]


def _select(df: pd.DataFrame, cols: Sequence[str], key: tuple) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for col, value in zip(cols, key):
        mask &= df[col].isna() if pd.isna(value) else (df[col] == value)
    return df[mask.fillna(False).astype(bool)]


def _varying(df: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    """The columns of ``cols`` that take more than one value in ``df``."""
    return [c for c in cols if c in df.columns and df[c].nunique(dropna=False) > 1]


def _title(cols: Sequence[str], key: tuple) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(cols, key))


def _colors(n: int, cmap: str = "tab10") -> list:
    cm = colormaps[cmap]
    if cmap == "tab10":
        return [cm(i % 10) for i in range(n)]
    return [cm(x) for x in np.linspace(0.1, 0.9, max(n, 1))]


def _error_axis(ax, values: np.ndarray, floor: float | None) -> None:
    """A log y axis for errors, limits from ``values`` (all panels of a figure alike).

    Values within less than a decade get a decade of room, so that noise in the 7th digit
    does not look like a trend.
    """
    v = np.asarray(values, dtype=np.float64)
    pos = v[np.isfinite(v) & (v > 0)]
    if pos.size == 0:  # every value is 0: nothing to put on a log axis
        ax.ticklabel_format(axis="y", useOffset=False)
        return
    ax.set_yscale("log")
    lo, hi = min(pos.min(), floor or np.inf), pos.max()
    if hi / lo < 10:
        pad = np.sqrt(10 * lo / hi)
        lo, hi = lo / pad, hi * pad
    ax.set_ylim(lo / 1.5, hi * 1.5)
    if floor is not None:
        ax.axhline(floor, color="0.5", lw=0.8, ls=":")
        ax.annotate("0 (exact) drawn here", (0.01, floor), xycoords=("axes fraction", "data"),
                    fontsize=7, color="0.4", va="bottom")


# --------------------------------------------------------------------------------------
# world-model error


def plot_error_vs_goals(
    df: pd.DataFrame,
    path: str | Path,
    metric: str = K.P_MSE,
    thresholds: Mapping[str, Mapping[str, int]] | str | None = "auto",
    final: bool = True,
) -> Path:
    """World-model error against the number of goals, one panel per (variant, goal_type).

    A line per extraction method through the IQM over runs, with 95% bootstrap CI bars
    where a point has at least ``MIN_RUNS_FOR_CI`` runs, and every run as a faint dot; Table-1 thresholds as dashed vertical lines.

    Args:
        df: rows of :func:`qworld_analysis.load` (``variant``, ``goal_type``,
            ``num_goals``, ``method``, ``metric``, ``trial_id``).
        path: the PNG to write.
        metric: the error column (``p_mse``, ``p_tv`` ...).
        thresholds: ``"auto"`` (from ``qworld_envs.four_rooms(variant).P``), a mapping
            variant -> {label: L}, or None.
        final: keep only each trial's last scored checkpoint first.
    """
    rows = _need(df, [K.NUM_GOALS, K.METHOD, metric], "error vs goals")
    rows = final_checkpoints(rows) if final else rows
    panel_cols = [c for c in (K.VARIANT, K.GOAL_TYPE) if c in rows.columns] + _varying(rows, (K.HEAD,))
    keys = _panel_keys(rows, panel_cols)
    methods = sorted(rows[K.METHOD].dropna().unique())
    colors = dict(zip(methods, _colors(len(methods))))
    floor = _positive_floor(rows[metric])
    fig, axes = _figure(1, len(keys))
    for ax, key in zip(axes[0], keys):
        part = _select(rows, panel_cols, key)
        stats = summary(part, by=[K.METHOD, K.NUM_GOALS], metric=metric, over=K.TRIAL_ID, reps=500)
        for method in methods:
            m = stats[stats[K.METHOD] == method].sort_values(K.NUM_GOALS)
            if m.empty:
                continue
            x = m[K.NUM_GOALS].to_numpy(np.float64)
            y, lo, hi = (np.maximum(m[c].to_numpy(np.float64), floor or 0) for c in ("iqm", "ci_low", "ci_high"))
            ax.plot(x, y, color=colors[method], marker="o", ms=4, lw=1.5, label=method_label(method))
            has_ci = np.isfinite(lo) & np.isfinite(hi)  # no bar where too few runs for a CI
            if has_ci.any():
                ax.errorbar(x[has_ci], y[has_ci], yerr=[(y - lo)[has_ci], (hi - y)[has_ci]],
                            color=colors[method], ls="none", capsize=2, lw=1.5)
            runs = part[part[K.METHOD] == method]
            ax.scatter(runs[K.NUM_GOALS].to_numpy(np.float64),
                       np.maximum(runs[metric].to_numpy(np.float64), floor or 0),
                       color=colors[method], alpha=0.25, s=10, lw=0)
        variant = dict(zip(panel_cols, key)).get(K.VARIANT)
        lines = _thresholds_for(thresholds, variant)
        for i, (label, L) in enumerate(lines.items()):
            ax.axvline(L, color="0.25", ls=(0, (4, 2 + i)), lw=1, alpha=0.8)
            ax.annotate(label, (L, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=7, ha="right", va="top", color="0.2",
                        bbox=dict(fc="white", ec="none", alpha=0.75, pad=0.3))
        ax.set_xscale("log")
        ticks = sorted({int(g) for g in part[K.NUM_GOALS]} | set(lines.values()))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.4)
        _error_axis(ax, rows[metric].to_numpy(np.float64), floor)
        ax.set_xlabel(_label(K.NUM_GOALS))
        ax.set_ylabel(_label(metric))
        ax.set_title(_title(panel_cols, key) or "all trials", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(title="method", fontsize=8, title_fontsize=8, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2), ncol=min(len(methods), 2), frameon=False)
    fig.suptitle(f"{_label(metric)} vs number of goals (IQM over runs; bars: 95% bootstrap CI "
                 f"where ≥ {MIN_RUNS_FOR_CI} runs; dashed: Table 1)", fontsize=11)
    return _save(fig, path)


def _thresholds_for(thresholds, variant) -> dict[str, int]:
    if thresholds is None or variant is None or pd.isna(variant):
        return {}
    if isinstance(thresholds, str):
        if thresholds != "auto":
            raise ValueError(f"thresholds: {thresholds!r}; use 'auto', a mapping or None")
        try:
            return variant_thresholds(str(variant))
        except ValueError:  # not a FourRooms variant
            return {}
    return dict(thresholds.get(variant, {}))


def _iqm_over_steps(line: pd.DataFrame, metric: str, floor: float | None) -> tuple[np.ndarray, ...]:
    """``(env_steps, IQM, CI low, CI high)`` of ``metric`` over runs at each checkpoint, sorted by
    env steps, values raised to ``floor`` (a log axis's stand-in for 0)."""
    stats = summary(line, by=K.CHECKPOINT_INDEX, metric=metric, over=K.TRIAL_ID, reps=300)
    steps = line.groupby(K.CHECKPOINT_INDEX)[K.ENV_STEPS].mean()
    x = steps.reindex(stats[K.CHECKPOINT_INDEX]).to_numpy(np.float64)
    order = np.argsort(x)
    return (x[order], *(np.maximum(stats[c].to_numpy(np.float64)[order], floor or 0)
                        for c in ("iqm", "ci_low", "ci_high")))


def plot_error_vs_steps(
    df: pd.DataFrame,
    path: str | Path,
    metric: str = K.P_MSE,
    methods: Sequence[str] | None = None,
    paper: Mapping[tuple[str, int], float] | None = PAPER_P_MSE,
) -> Path:
    """World-model error over training, the paper's FourRooms panels.

    One panel per variant (columns) and extraction method (rows); a line per number of
    goals through the IQM over runs at each checkpoint, with a 95% bootstrap CI band. A
    line whose (variant, L) has a value in ``paper`` gets it as a dashed horizontal line of
    its colour (p_mse only; a paper value of 0 sits on the "0 (exact)" floor).

    Args:
        df: rows of :func:`qworld_analysis.load` (``env_steps``, ``checkpoint_index``,
            ``num_goals``, ``method``, ``metric``).
        path: the PNG to write.
        metric: the error column.
        methods: the methods to draw (rows of panels); None: every method present.
        paper: (variant, num_goals) -> the paper's p_mse (default :data:`PAPER_P_MSE`);
            None draws no reference.
    """
    rows = _need(df, [K.ENV_STEPS, K.CHECKPOINT_INDEX, K.METHOD, metric], "error vs env steps")
    if methods is not None:
        rows = rows[rows[K.METHOD].isin(list(methods))]
        if rows.empty:
            raise NoDataError(f"error vs env steps: no rows for methods {list(methods)}")
    method_list = sorted(rows[K.METHOD].unique())
    variants = sorted(rows[K.VARIANT].dropna().unique()) if K.VARIANT in rows else []
    variants = variants or [None]
    line_cols = [c for c in (K.GOAL_TYPE, K.NUM_GOALS) if c in rows.columns] + _varying(rows, (K.HEAD,))
    line_keys = _panel_keys(rows, line_cols)
    colors = dict(zip(line_keys, _colors(len(line_keys), "viridis")))

    def reference(variant, key) -> float | None:
        if paper is None or metric != K.P_MSE:
            return None
        key_map = dict(zip(line_cols, key))
        return paper_p_mse(variant, key_map.get(K.NUM_GOALS), key_map.get(K.GOAL_TYPE), paper)

    refs = {}  # (variant, line key) -> the paper's value, for the lines drawn
    for v in variants:
        in_v = rows if v is None else _select(rows, [K.VARIANT], (v,))
        for key in line_keys:
            ref = reference(v, key)
            if ref is not None and not _select(in_v, line_cols, key).empty:
                refs[(v, key)] = ref
    values = np.concatenate([rows[metric].to_numpy(np.float64), np.array(list(refs.values()), dtype=np.float64)])
    floor = _positive_floor(values)  # all panels alike, and room for the references
    fig, axes = _figure(len(method_list), len(variants))
    for i, method in enumerate(method_list):
        for j, variant in enumerate(variants):
            ax = axes[i, j]
            part = rows[rows[K.METHOD] == method]
            if variant is not None:
                part = part[part[K.VARIANT] == variant]
            for key in line_keys:
                line = _select(part, line_cols, key)
                if line.empty:
                    continue
                x, y, lo, hi = _iqm_over_steps(line, metric, floor)
                key_map = dict(zip(line_cols, key))
                L = key_map.get(K.NUM_GOALS)
                label = " ".join([f"L={L}"] + [str(key_map[c]) for c in _varying(rows, (K.GOAL_TYPE, K.HEAD))])
                ax.plot(x, y, color=colors[key], lw=1.6, marker=".", label=label)
                ax.fill_between(x, lo, hi, color=colors[key], alpha=0.2, lw=0)
                ref = refs.get((variant, key))
                if ref is not None:
                    ax.axhline(max(ref, floor or 0), color=colors[key], ls=(0, (5, 3)), lw=1.3,
                               label=f"paper L={L}: {'0 (exact)' if ref == 0 else f'{ref:.1e}'}")
            _error_axis(ax, values, floor)
            ax.set_xlabel(_label(K.ENV_STEPS))
            ax.set_ylabel(_label(metric))
            ax.set_title(f"{variant or 'all'} · {method_label(method)}", fontsize=10)
            ax.grid(True, alpha=0.3)
            labelled = len(ax.get_legend_handles_labels()[1])
            if labelled:
                ax.legend(fontsize=7, ncol=2 if labelled > 6 else 1)
    note = "; dashed: the paper's value (10M steps)" if refs else ""
    fig.suptitle(textwrap.fill(f"{_label(metric)} over training (IQM over runs; band: 95% bootstrap "
                               f"CI where ≥ {MIN_RUNS_FOR_CI} runs{note})",
                               55 * len(variants)), fontsize=11)
    return _save(fig, path)


def plot_models_vs_steps(
    df: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = (K.P_MSE, f"{K.RARE}/{K.P_MSE}"),
) -> Path:
    """Models extracted from Q against explicit models (``supervised``, ``qss``,
    ``forward_model``) of the same trials, over training.

    One column of panels per grid cell, one row per metric; a line per method (per learner
    family and method when the frame holds several families, e.g. PQN's ``successor`` beside
    D3G's ``forward_model``) through the IQM over runs at each checkpoint (95% bootstrap CI
    band where there are enough runs); explicit models dashed. Metrics that no row has are
    left out.

    Args:
        df: rows of :func:`qworld_analysis.load` (``env_steps``, ``checkpoint_index``,
            ``method``, the grid columns and ``metrics``).
        path: the PNG to write.
        metrics: error columns (log axes), e.g. ``p_mse``, ``rare/p_mse``, ``wm_delta_nmse_v``.
    """
    from qworld.worldmodel.experience import EXPLICIT_METHODS

    metrics = [m for m in metrics if m in df.columns and df[m].notna().any()]
    if not metrics:
        raise NoDataError("models vs env steps: none of the metrics was scored")
    rows = _need(df, [K.ENV_STEPS, K.CHECKPOINT_INDEX, K.METHOD], "models vs env steps")
    if not rows[K.METHOD].isin(EXPLICIT_METHODS).any():
        raise NoDataError(f"models vs env steps: no explicit model ({', '.join(EXPLICIT_METHODS)}) was scored")
    cell_cols = _varying(rows, (K.ENV, K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS)) or [K.METHOD]
    cells = _panel_keys(rows, cell_cols) if cell_cols != [K.METHOD] else [None]
    line_cols = _varying(rows, (K.ALGORITHM,)) + [K.METHOD]
    line_keys = sorted(_panel_keys(rows, line_cols), key=lambda k: (k[-1] in EXPLICIT_METHODS, k))
    colors = dict(zip(line_keys, _colors(len(line_keys))))
    fig, axes = _figure(len(metrics), len(cells))
    for i, metric in enumerate(metrics):
        values = rows[metric].to_numpy(np.float64)
        floor = _positive_floor(values)
        for j, cell in enumerate(cells):
            ax = axes[i, j]
            part = rows if cell is None else _select(rows, cell_cols, cell)
            for key in line_keys:
                method = key[-1]
                line = _select(part, line_cols, key)
                line = line[line[metric].notna()]
                if line.empty:
                    continue
                x, y, lo, hi = _iqm_over_steps(line, metric, floor)
                style = (0, (5, 3)) if method in EXPLICIT_METHODS else "-"
                name = " ".join([*map(str, key[:-1]), method_label(method)])
                ax.plot(x, y, color=colors[key], ls=style, lw=1.6, marker=".", label=name)
                ax.fill_between(x, lo, hi, color=colors[key], alpha=0.15, lw=0)
            _error_axis(ax, values, floor)
            ax.set_xlabel(_label(K.ENV_STEPS))
            ax.set_ylabel(_label(metric))
            ax.set_title(_title(cell_cols, cell) if cell is not None else "all", fontsize=10)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill("Extracted from Q (solid) vs explicit models from the same trial (dashed), "
                               "over training (IQM over runs)", 55 * len(cells)), fontsize=11)
    return _save(fig, path)


def plot_recovery_phase(
    df: pd.DataFrame,
    path: str | Path,
    metric: str = K.P_MSE,
    final: bool = True,
) -> Path:
    """Recovery phase diagram: log10 of the IQM error per (method, num_goals).

    One heatmap per variant (and per goal type / head when those vary). Cells are
    annotated with the value; exact recovery (0) shows as the floor colour and the text
    ``0``; combinations without data stay blank.
    """
    rows = _need(df, [K.NUM_GOALS, K.METHOD, metric], "recovery phase diagram")
    rows = final_checkpoints(rows) if final else rows
    panel_cols = [c for c in (K.VARIANT,) if c in rows.columns] + _varying(rows, (K.GOAL_TYPE, K.HEAD))
    keys = _panel_keys(rows, panel_cols)
    methods = sorted(rows[K.METHOD].unique())
    goals = sorted(int(g) for g in rows[K.NUM_GOALS].unique())
    floor = _positive_floor(rows[metric]) or 1e-12
    stats = summary(rows, by=[*panel_cols, K.METHOD, K.NUM_GOALS], metric=metric,
                    over=K.TRIAL_ID, reps=200)
    logs = np.log10(np.maximum(stats["iqm"].to_numpy(np.float64), floor))
    vmin = float(np.floor(logs.min()))
    norm = Normalize(vmin=vmin, vmax=max(float(np.ceil(logs.max())), vmin + 1))
    fig, axes = _figure(1, len(keys), panel=(max(4.0, 0.6 * len(goals) + 2.2), 0.45 * len(methods) + 2))
    image = None
    all_goals = goals
    for ax, key in zip(axes[0], keys):
        part = _select(stats, panel_cols, key)
        # only the goal counts this panel ran: a blank column reads as "failed", not "not run"
        goals = [g for g in all_goals if (part[K.NUM_GOALS] == g).any()]
        grid = np.full((len(methods), len(goals)), np.nan)
        for method, L, value in part[[K.METHOD, K.NUM_GOALS, "iqm"]].itertuples(index=False):
            grid[methods.index(method), goals.index(int(L))] = value
        shown = np.log10(np.maximum(grid, floor))
        image = ax.imshow(shown, cmap="magma_r", norm=norm, aspect="auto")
        for r in range(len(methods)):
            for c in range(len(goals)):
                if np.isfinite(grid[r, c]):
                    text = "0" if grid[r, c] == 0 else f"{grid[r, c]:.0e}".replace("e-0", "e-")
                    ax.text(c, r, text, ha="center", va="center", fontsize=7,
                            color="white" if norm(shown[r, c]) > 0.55 else "black")
        ax.set_xticks(range(len(goals)), [str(g) for g in goals])
        ax.set_yticks(range(len(methods)), [method_label(m) for m in methods])
        ax.set_xlabel(_label(K.NUM_GOALS))
        ax.set_ylabel("method")
        ax.set_title(_title(panel_cols, key) or "all trials", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label=f"log10 {_label(metric)}", shrink=0.9)
    when = " (final checkpoint)" if final else ""
    fig.suptitle(f"Recovery phase diagram: log10 IQM {metric} over runs{when}", fontsize=11)
    return _save(fig, path)


def return_vs_error(df: pd.DataFrame, errors: Sequence[str] = (K.WM_NMSE,),
                    agent_return: str = K.POLICY_RETURN, reps: int = 2000) -> pd.DataFrame:
    """Spearman rho(agent return, world-model error) over trials, per method and error metric.

    One point per trial: its last scored checkpoint (``final_checkpoints``); the paper's
    architecture study (depth x width x seeds) reports rho = -0.98 for NMSE of s'.

    Returns:
        one row per (method, error): ``method, error, n, rho, ci_low, ci_high`` (a
        percentile bootstrap over trials, :func:`qworld_analysis.stats.rank_correlation`).
    """
    rows = _need(df, [K.METHOD, agent_return], "return vs world-model error")
    rows = final_checkpoints(rows)
    out = []
    for method, part in rows.groupby(K.METHOD, sort=True):
        for error in errors:
            if error not in part.columns:
                continue
            pts = part.dropna(subset=[agent_return, error])
            if len(pts) < 3:
                continue
            rho, low, high = rank_correlation(pts[agent_return], pts[error], reps=reps)
            out.append({K.METHOD: method, "error": error, "n": len(pts), "rho": rho, "ci_low": low, "ci_high": high})
    if not out:
        raise NoDataError(f"return vs world-model error: fewer than 3 trials with {agent_return} and any of {list(errors)}")
    return pd.DataFrame(out)


def plot_return_vs_error(
    df: pd.DataFrame,
    path: str | Path,
    errors: Sequence[str] = (K.WM_NMSE,),
    agent_return: str = K.POLICY_RETURN,
    color_by: str | None = None,
) -> Path:
    """The agent's return against its extracted world model's error, a point per trial.

    One panel per (method, error metric), titled with Spearman's rho and its 95% bootstrap
    CI (:func:`return_vs_error`). Points are coloured by ``color_by`` (e.g. the swept
    ``hidden_sizes``; default: the first swept agent axis found among ``hidden_sizes``,
    ``algorithm``).
    """
    table = return_vs_error(df, errors, agent_return)
    rows = final_checkpoints(_need(df, [K.METHOD, agent_return], "return vs world-model error"))
    if color_by is None:
        color_by = next((c for c in ("hidden_sizes", K.ALGORITHM) if c in rows.columns and rows[c].nunique() > 1), None)
    groups = sorted(rows[color_by].dropna().unique(), key=str) if color_by else [None]
    colors = dict(zip(groups, _colors(len(groups), "viridis" if len(groups) > 10 else "tab10")))
    fig, axes = _figure(1, len(table))
    for ax, entry in zip(axes[0], table.itertuples(index=False)):
        part = rows[rows[K.METHOD] == entry.method].dropna(subset=[agent_return, entry.error])
        for group in groups:
            pts = part if group is None else part[part[color_by] == group]
            ax.scatter(pts[entry.error].to_numpy(np.float64), pts[agent_return].to_numpy(np.float64), s=22,
                       color=colors[group], label=None if group is None else str(group), alpha=0.85)
        values = part[entry.error].to_numpy(np.float64)
        if _spans_decades(values) and (values > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(_label(entry.error))
        ax.set_ylabel(_label(agent_return))
        ax.set_title(f"{method_label(entry.method)}: rho = {entry.rho:.2f} [{entry.ci_low:.2f}, {entry.ci_high:.2f}]"
                     f" (n = {entry.n})", fontsize=9)
        ax.grid(True, alpha=0.3)
        if color_by and len(groups) <= 16:
            ax.legend(fontsize=6, title=color_by, title_fontsize=7)
    fig.suptitle("Agent return against world-model error, a point per trial (final checkpoint); "
                 "Spearman rho with its 95% bootstrap CI (paper: -0.98)", fontsize=10)
    return _save(fig, path)


def plot_training_curves(
    curves: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str] = (K.TRAIN_EPISODE_SUCCESS, K.TRAIN_LOSS),
    color_by: Sequence[str] = (K.VARIANT, K.NUM_GOALS, K.HEAD),
) -> Path:
    """Training metrics against env steps, a line per trial, coloured by grid cell.

    Args:
        curves: :func:`qworld_analysis.load_training_curves`.
        metrics: one panel each (those absent from ``curves`` are skipped).
        color_by: columns whose values make a colour (seeds share it).
    """
    present = [m for m in metrics if m in curves.columns and curves[m].notna().any()]
    if not present:
        raise NoDataError(f"training curves: none of {list(metrics)} was reported")
    rows = _need(curves, [K.ENV_STEPS], "training curves")
    cell_cols = [c for c in color_by if c in rows.columns and rows[c].nunique(dropna=False) > 1]
    cells = _panel_keys(rows, cell_cols)
    colors = dict(zip(cells, _colors(len(cells))))
    fig, axes = _figure(1, len(present))
    for ax, metric in zip(axes[0], present):
        seen = set()
        for cell in cells:
            for trial_id, trial in _select(rows, cell_cols, cell).groupby(K.TRIAL_ID):
                trial = trial.dropna(subset=[metric]).sort_values(K.ENV_STEPS)
                label = _title(cell_cols, cell) or "trial"
                ax.plot(trial[K.ENV_STEPS].to_numpy(np.float64), trial[metric].to_numpy(np.float64),
                        color=colors[cell], lw=1.2, alpha=0.8,
                        label=None if label in seen else label)
                seen.add(label)
        values = rows[metric].to_numpy(np.float64)
        if metric == K.TRAIN_LOSS and _spans_decades(values) and (values[np.isfinite(values)] > 0).all():
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel(_label(K.ENV_STEPS))
        ax.set_ylabel(_label(metric))
        ax.set_title(metric, fontsize=10)
        ax.grid(True, alpha=0.3)
        if len(seen) <= 12:
            ax.legend(fontsize=7)
    fig.suptitle("Training curves (a line per trial)", fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# FourRooms maps: routes and values


def _mdp(mdp: Any, layout: str | None):
    """A FiniteMDP with coords: given, or ``qworld_envs.four_rooms(variant, layout)``."""
    if isinstance(mdp, str):
        from qworld_envs import four_rooms

        mdp = four_rooms(mdp, layout=layout)
    if getattr(mdp, "coords", None) is None:
        raise ValueError("the MDP has no grid coords to draw")
    return mdp


def _state(mdp, cell) -> int:
    """A state index from an int state or a (row, col) cell."""
    if isinstance(cell, (int, np.integer)):
        return int(cell)
    r, c = cell
    try:
        return mdp.cell_to_state[(int(r), int(c))]
    except KeyError:
        raise ValueError(f"cell {(int(r), int(c))} is not a free cell of the map") from None


def _draw_map(ax, mdp) -> np.ndarray:
    """Walls dark, free cells white, a light grid; returns the ``[H, W]`` free mask."""
    coords = np.asarray(mdp.coords)
    H, W = coords.max(axis=0) + 2
    layout = mdp.meta.get("layout") if hasattr(mdp, "meta") else None
    if layout:
        rows = [r for r in layout.splitlines() if r.strip()]
        H, W = len(rows), len(rows[0])
    free = np.zeros((H, W), dtype=bool)
    free[coords[:, 0], coords[:, 1]] = True
    ax.imshow(np.where(free, 1.0, 0.25), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, W, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, H, 1), minor=True)
    ax.grid(which="minor", color="0.8", lw=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks(range(W))
    ax.set_yticks(range(H))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    return free


def plot_routes(
    routes: Mapping[str, Sequence[int] | np.ndarray],
    path: str | Path,
    mdp: Any = "deterministic",
    start: int | tuple[int, int] | None = None,
    goal: int | tuple[int, int] | None = None,
    forbidden: Sequence[int | tuple[int, int]] = (),
    layout: str | None = None,
    title: str | None = None,
) -> Path:
    """Routes of a safety task on the FourRooms map; forbidden cells hatched.

    Args:
        routes: label -> a list of states (or (row, col) cells), or a policy ``[S, A]``
            that is rolled greedily from ``start`` in the MDP
            (:func:`qworld.worldmodel.planning.greedy_route`). Put the optimal route first (e.g.
            ``{"optimal": planning.shortest_route(...), "P̂ plan": pi}``).
        path: the PNG to write.
        mdp: a ``FiniteMDP`` with coords, or a FourRooms variant name.
        start, goal: states or cells; ``start`` is needed for policies.
        forbidden: states or cells the task forbids.
        layout: with a variant name, the ASCII layout (None: the paper's map).
    """
    mdp = _mdp(mdp, layout)
    if not routes:
        raise NoDataError("routes: nothing to draw")
    fig, axes = _figure(1, 1, panel=(6.0, 6.0))
    ax = axes[0, 0]
    _draw_routes(ax, mdp, routes, start, goal, forbidden)
    ax.set_title(textwrap.fill(title or f"Routes on {getattr(mdp, 'name', 'the map')}", 70), fontsize=10)
    return _save(fig, path, tight=True)


def _draw_routes(ax, mdp, routes: Mapping[str, Any], start, goal, forbidden) -> None:
    """The map, the forbidden cells hatched, each route as arrows with its length in the
    legend (below the axes); arguments as :func:`plot_routes`."""
    coords = np.asarray(mdp.coords)
    start_s = None if start is None else _state(mdp, start)
    goal_s = None if goal is None else _state(mdp, goal)
    forbidden_s = [_state(mdp, f) for f in forbidden]
    _draw_map(ax, mdp)
    if mdp.meta.get("variant") == "teleport":
        for s in mdp.meta.get("teleport_states", []):
            r, c = coords[s]
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, color="#c9b3ff", alpha=0.6, lw=0))
            ax.text(c, r + 0.32, "T", ha="center", va="center", fontsize=7, color="#5a2ca0")
    for s in forbidden_s:
        r, c = coords[s]
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="////",
                               edgecolor="#d62728", lw=1.2))
    colors = _colors(len(routes))
    offsets = np.linspace(-0.15, 0.15, len(routes)) if len(routes) > 1 else [0.0]
    forbidden_set = set(forbidden_s)
    for (label, route), color, off in zip(routes.items(), colors, offsets):
        arr = np.asarray(route)
        if arr.ndim == 2 and arr.shape == (mdp.num_states, mdp.num_actions):
            if start_s is None:
                raise ValueError(f"route {label!r} is a policy: give `start` to roll it from")
            states = greedy_route(mdp.P, arr, start_s, goal_s)
        else:
            states = [_state(mdp, s if np.ndim(s) == 0 else tuple(s)) for s in route]
        if not states:
            continue
        xy = coords[states][:, ::-1].astype(np.float64) + off  # (col, row) + offset
        unsafe = sum(s in forbidden_set for s in states)
        n = len(states) - 1
        text = f"{label}: {n} step{'s' if n != 1 else ''}" + (f", {unsafe} forbidden" if unsafe else "")
        if goal_s is not None and states[-1] != goal_s:
            text += ", loops" if states.count(states[-1]) > 1 else ", stops short of G"
        for k in range(len(states) - 1):
            jump = np.abs(coords[states[k + 1]] - coords[states[k]]).sum() > 1
            ax.annotate("", xy=xy[k + 1], xytext=xy[k],
                        arrowprops=dict(arrowstyle="-|>", color=color, lw=2,
                                        ls="--" if jump else "-", shrinkA=0, shrinkB=0,
                                        mutation_scale=9))
        ax.plot(xy[:, 0], xy[:, 1], color=color, lw=0, marker=".", ms=4, label=text)
    if start_s is not None:
        r, c = coords[start_s]
        ax.plot(c, r, "o", ms=13, mfc="#2ca02c", mec="k")
        ax.text(c, r, "S", ha="center", va="center", fontsize=8, color="white", weight="bold")
    if goal_s is not None:
        r, c = coords[goal_s]
        ax.plot(c, r, "*", ms=20, mfc="#ffbf00", mec="k")
        ax.text(c, r, "G", ha="center", va="center", fontsize=7, weight="bold")
    ax.add_patch(Rectangle((0, 0), 0, 0, fill=False, hatch="////", edgecolor="#d62728", label="forbidden"))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=8, ncol=1, frameon=False)


def plot_safety_routes(
    models: Mapping[str, np.ndarray],
    path: str | Path,
    task: str,
    variant: str = "deterministic",
    layout: str | None = None,
    gamma: float = 0.99,
    model_label: str = "plan in P̂",
    title: str | None = None,
) -> Path:
    """The paper's safety-route figure: one panel per extracted model, each with the route
    planned in that model for a safety task against the optimal route.

    Both routes are computed in ``qworld.worldmodel.planning``: value iteration with the
    task's forbidden cells catastrophic, in the model (:func:`~qworld.worldmodel.planning.safety_route`)
    and in the true P (:func:`~qworld.worldmodel.planning.optimal_safety_route`), each rolled
    greedily in the true P; this function only draws them.

    Args:
        models: panel title -> ``P_hat[S, A, S]`` (e.g. ``{"L = 4": ..., "L = 17": ...}``).
        path: the PNG to write.
        task: a key of ``qworld.worldmodel.planning.SAFETY_TASKS``.
        variant, layout: the FourRooms map and its true dynamics.
        gamma: planning discount.
        model_label: the legend label of the model's route (e.g. the method).
        title: the figure title (default: the task and its description).
    """
    from qworld.worldmodel.planning import SAFETY_TASKS, optimal_safety_route, safety_route, task_states
    from qworld_envs import four_rooms

    if not models:
        raise NoDataError("safety routes: no model to plan in")
    mdp = four_rooms(variant, layout=layout)
    cells = task_states(mdp, task)
    goal, forbidden, start = cells["goal"], cells["forbidden"], cells["start"][0]
    optimal = optimal_safety_route(mdp, task, gamma)
    shape = (mdp.num_states, mdp.num_actions, mdp.num_states)
    fig, axes = _figure(1, len(models), panel=(4.6, 5.6))
    for ax, (label, P_hat) in zip(axes[0], models.items()):
        P_hat = np.asarray(P_hat, dtype=np.float64)
        if P_hat.shape != shape:
            raise ValueError(f"model {label!r} must have shape [S, A, S] = {shape}, got {P_hat.shape}")
        routes = {"optimal (true P)": optimal, model_label: safety_route(mdp, P_hat, task, gamma)}
        _draw_routes(ax, mdp, routes, start, goal, forbidden)
        ax.set_title(textwrap.fill(label, 60), fontsize=9)
    fig.suptitle(textwrap.fill(title or f"{task} ({variant}): {SAFETY_TASKS[task].description}",
                               60 * len(models) ** 0.5 + 40), fontsize=11)
    return _save(fig, path, tight=True)


def plot_safety_task(
    task: str,
    path: str | Path,
    models: Mapping[str, np.ndarray | Sequence[int]] | None = None,
    variant: str = "deterministic",
    gamma: float = 0.99,
    layout: str | None = None,
) -> Path:
    """A named safety task (``qworld.worldmodel.planning.SAFETY_TASKS``): the optimal safe route in the
    true MDP against the routes planned in extracted models.

    Args:
        task: e.g. ``"corner_9_9_doorway"``.
        path: the PNG to write.
        models: label -> ``P_hat[S, A, S]`` (planned in with the task's goal and forbidden
            cells, then rolled greedily in the true P), a policy ``[S, A]``, or a route.
        variant, layout: the FourRooms map (true dynamics).
        gamma: planning discount.
    """
    from qworld.worldmodel.planning import SAFETY_TASKS, safety_route, task_states
    from qworld_envs import four_rooms

    mdp = four_rooms(variant, layout=layout)
    cells = task_states(mdp, task)
    goal, forbidden, start = cells["goal"], cells["forbidden"], cells["start"][0]
    routes: dict[str, Any] = {"optimal (true P)": safety_route(mdp, mdp.P, task, gamma)}
    S, A = mdp.num_states, mdp.num_actions
    for label, model in (models or {}).items():
        arr = np.asarray(model)
        routes[label] = safety_route(mdp, arr, task, gamma) if arr.shape == (S, A, S) else model
    return plot_routes(routes, path, mdp=mdp, start=start, goal=goal, forbidden=forbidden,
                       title=f"{task} ({variant}): {SAFETY_TASKS[task].description}")


def plot_value_map(
    values: np.ndarray | Mapping[str, np.ndarray],
    path: str | Path,
    mdp: Any = "deterministic",
    layout: str | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    annotate: bool = True,
    log: bool = False,
) -> Path:
    """A value per state drawn on the grid (walls grey); panels share one colour scale.

    Args:
        values: ``[S]``, or label -> ``[S]`` for panels side by side (e.g. V in P vs in P̂).
        mdp: a ``FiniteMDP`` with coords, or a FourRooms variant name.
        annotate: print each value in its cell.
        log: logarithmic colour scale (positive values only).
    """
    mdp = _mdp(mdp, layout)
    panels = dict(values) if isinstance(values, Mapping) else {"": values}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in panels.items()}
    for label, v in arrays.items():
        if v.shape != (mdp.num_states,):
            raise ValueError(f"values {label!r} must have shape [S] = [{mdp.num_states}], got {v.shape}")
    allv = np.concatenate(list(arrays.values()))
    finite = allv[np.isfinite(allv)]
    if finite.size == 0:
        raise NoDataError("value map: no finite value")
    norm = (LogNorm(vmin=finite[finite > 0].min(), vmax=finite.max()) if log
            else Normalize(vmin=finite.min(), vmax=finite.max() if finite.max() > finite.min() else finite.min() + 1))
    coords = np.asarray(mdp.coords)
    fig, axes = _figure(1, len(arrays), panel=(5.0, 4.6))
    image = None
    for ax, (label, v) in zip(axes[0], arrays.items()):
        free = _draw_map(ax, mdp)
        grid = np.full(free.shape, np.nan)
        grid[coords[:, 0], coords[:, 1]] = v
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, interpolation="nearest")
        if annotate:
            for s, (r, c) in enumerate(coords):
                if np.isfinite(v[s]):
                    ax.text(c, r, f"{v[s]:.2g}", ha="center", va="center", fontsize=6,
                            color="white" if norm(v[s]) < 0.5 else "black")
        ax.set_title(label, fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="value")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# continuous dynamics (MountainCar)


def plot_vector_field(
    states: np.ndarray,
    true_next: np.ndarray,
    pred_next: np.ndarray,
    path: str | Path,
    labels: Sequence[str] = ("position p", "velocity v"),
    title: str | None = None,
) -> Path:
    """Predicted vs true next-state direction over a 2-D state space, plus the error map.

    Left: arrows of ``s' - s`` for the true dynamics (black) and the model (red), each
    axis scaled by its state range so both axes count (MountainCar's v moves 1000x less
    than p), arrows normalised to unit length. Right: the next-state error
    ``||(pred - true) / range||`` at each state, coloured on a log scale.

    Args:
        states: ``[N, 2]``.
        true_next, pred_next: ``[N, 2]`` next states from the true dynamics and the model.
    """
    s, t, p = (np.asarray(a, dtype=np.float64) for a in (states, true_next, pred_next))
    if s.ndim != 2 or s.shape[1] != 2 or t.shape != s.shape or p.shape != s.shape:
        raise ValueError(f"states, true_next, pred_next must all be [N, 2], got {s.shape}, {t.shape}, {p.shape}")
    span = np.ptp(s, axis=0)
    span[span == 0] = 1.0

    def unit(d):
        d = d / span
        n = np.linalg.norm(d, axis=1, keepdims=True)
        return np.divide(d, n, out=np.zeros_like(d), where=n > 0)

    dt, dp = unit(t - s), unit(p - s)
    err = np.linalg.norm((p - t) / span, axis=1)
    fig, axes = _figure(1, 2, panel=(5.2, 4.2))
    ax = axes[0, 0]
    scale = 1.0 / (0.5 * np.sqrt(len(s)))  # arrows about half a grid spacing long
    for d, color, label in ((dt, "black", "true"), (dp, "#d62728", "predicted")):
        ax.quiver(s[:, 0], s[:, 1], d[:, 0] * span[0] * scale, d[:, 1] * span[1] * scale,
                  color=color, angles="xy", scale_units="xy", scale=1, width=0.004,
                  alpha=0.8, label=label)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title("next-state direction", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[0, 1]
    pos = err[err > 0]
    norm = LogNorm(vmin=pos.min(), vmax=max(pos.max(), pos.min() * 10)) if pos.size else None
    sc = ax.scatter(s[:, 0], s[:, 1], c=np.maximum(err, pos.min() if pos.size else 0), cmap="magma",
                    norm=norm, s=max(4, 9000 / len(s)), marker="s")
    fig.colorbar(sc, ax=ax, label="|pred − true| / state range")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(f"next-state error (mean {err.mean():.2e})", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_next_state_slices(
    x: np.ndarray,
    true_next: np.ndarray,
    pred_next: np.ndarray,
    path: str | Path,
    xlabel: str = "position p",
    dim_labels: Sequence[str] = ("next position p'", "next velocity v'"),
    series_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Slices of the dynamics: each next-state component against one state coordinate.

    One panel per state dim; a colour per series (e.g. per action), the true next state
    solid, the model's dashed.

    Args:
        x: ``[N]`` the coordinate varied along the slice.
        true_next, pred_next: ``[N, d]`` or ``[K, N, d]`` (K series).
        series_labels: K labels (default ``series 0..``).
    """
    x = np.asarray(x, dtype=np.float64)
    t, p = np.asarray(true_next, dtype=np.float64), np.asarray(pred_next, dtype=np.float64)
    if t.ndim == 2:
        t, p = t[None], p[None]
    if t.ndim != 3 or t.shape != p.shape or t.shape[1] != x.shape[0]:
        raise ValueError(f"true_next and pred_next must be [N, d] or [K, N, d] with N = {x.shape[0]}, "
                         f"got {np.shape(true_next)}, {np.shape(pred_next)}")
    K_, _, d = t.shape
    series = list(series_labels) if series_labels is not None else [f"series {k}" for k in range(K_)]
    dims = list(dim_labels) + [f"dim {i}" for i in range(len(dim_labels), d)]
    colors = _colors(K_)
    fig, axes = _figure(1, d, panel=(4.6, 3.6))
    for i, ax in enumerate(axes[0]):
        for k in range(K_):
            ax.plot(x, t[k, :, i], color=colors[k], lw=1.8, label=f"{series[k]} true")
            ax.plot(x, p[k, :, i], color=colors[k], lw=1.4, ls="--", label=f"{series[k]} predicted")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(dims[i])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Next state along a slice: true (solid) vs predicted (dashed)", fontsize=11)
    return _save(fig, path)
