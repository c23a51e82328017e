"""Aggregate scores over seeds: mean, IQM and stratified bootstrap confidence intervals.

Shapes follow rliable (Agarwal et al. 2021): ``scores[runs, tasks]``, one column per task
(grid cell), one row per independent run (seed). The aggregates reduce the last two axes,
so ``mean(x[reps, runs, tasks])`` gives ``[reps]`` and a bootstrap needs one call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd

from qworld import metrics as K

SUMMARY_COLUMNS = ("n", "n_failed", "mean", "iqm", "ci_low", "ci_high")
# Below this many runs a percentile bootstrap is no interval worth the name: with 2 runs
# the IQM is their mean and the "CI" their min and max, with 1 run a zero-width point.
MIN_RUNS_FOR_CI = 4


def _as_scores(scores) -> np.ndarray:
    """``[runs]`` or ``[..., runs, tasks]`` -> float array with at least 2 dims."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("scores must have shape [runs] or [..., runs, tasks], got a scalar")
    return x[:, None] if x.ndim == 1 else x


def mean(scores) -> np.ndarray | float:
    """Mean over runs and tasks.

    Args:
        scores: ``[runs]``, ``[runs, tasks]`` or ``[..., runs, tasks]``.

    Returns:
        A float, or ``[...]`` for batched input.
    """
    x = _as_scores(scores)
    out = x.mean(axis=(-2, -1))
    return float(out) if out.ndim == 0 else out


def iqm(scores) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle 50% of all runs x tasks scores.

    rliable's definition, ``scipy.stats.trim_mean(scores, 0.25, axis=None)`` (computed here
    with numpy, batched): the lowest and the highest ``floor(0.25 n)`` of the n scores are
    dropped. For n < 4 nothing is dropped.

    Args:
        scores: ``[runs]``, ``[runs, tasks]`` or ``[..., runs, tasks]``.

    Returns:
        A float, or ``[...]`` for batched input.
    """
    x = _as_scores(scores)
    flat = np.sort(x.reshape(*x.shape[:-2], -1), axis=-1)  # [..., n]
    n = flat.shape[-1]
    cut = int(0.25 * n)  # scipy's trim_mean cuts int(proportion * n) from each end
    out = flat[..., cut:n - cut].mean(axis=-1)
    return float(out) if out.ndim == 0 else out


# The aggregates above reduce the last two axes; the bootstrap batches its resamples for them.
_BATCHED = (mean, iqm)


def stratified_bootstrap_ci(
    scores,
    stat_fn: Callable[[np.ndarray], float] = iqm,
    reps: int = 2000,
    alpha: float = 0.05,
    seed: int | None = 0,
    batched: bool | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat_fn(scores)``, resampling runs within each task.

    Each replicate draws, for every task (column) independently, ``runs`` indices with
    replacement, so every task keeps its weight in the aggregate (rliable's
    ``StratifiedBootstrap``).

    Args:
        scores: ``[runs, tasks]`` (or ``[runs]``: one task); no NaN.
        stat_fn: ``[runs, tasks] -> float``.
        reps: bootstrap replicates.
        alpha: the interval covers ``1 - alpha``: percentiles ``100 alpha/2`` and
            ``100 (1 - alpha/2)`` of the replicates.
        seed: of ``numpy.random.default_rng``.
        batched: ``stat_fn`` also maps ``[reps, runs, tasks] -> [reps]`` (one call for all
            replicates); None: True for :func:`mean` and :func:`iqm`.

    Returns:
        ``(low, high)``.
    """
    x = _as_scores(scores)
    if x.ndim != 2:
        raise ValueError(f"scores must have shape [runs, tasks], got {x.shape}")
    if x.size == 0:
        raise ValueError("scores is empty")
    if np.isnan(x).any():
        raise ValueError("scores has NaN: drop or fill missing runs first")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    runs, tasks = x.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(reps, runs, tasks))  # [reps, runs, tasks]
    resampled = np.take_along_axis(x[None], idx, axis=1)  # [reps, runs, tasks]
    if batched is None:
        batched = stat_fn in _BATCHED
    if batched:
        values = np.asarray(stat_fn(resampled), dtype=np.float64).reshape(reps)
    else:
        values = np.array([stat_fn(r) for r in resampled], dtype=np.float64)
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def rank_correlation(
    x,
    y,
    reps: int = 2000,
    alpha: float = 0.05,
    seed: int | None = 0,
) -> tuple[float, float, float]:
    """Spearman's rho of paired runs and its percentile bootstrap CI (pairs resampled).

    Args:
        x: ``[runs]``, e.g. each trial's agent return.
        y: ``[runs]``, e.g. each trial's world-model error (the same trial at index i).
        reps: bootstrap replicates; a replicate whose ranks are constant in x or y (rho
            undefined) is left out of the percentiles.
        alpha: the interval covers ``1 - alpha``.
        seed: of ``numpy.random.default_rng``.

    Returns:
        ``(rho, low, high)``; rho is NaN (and so is the CI) when x or y is constant.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be paired 1-D arrays, got shapes {x.shape} and {y.shape}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("x or y has NaN: drop unpaired runs first")
    if len(x) < 3:
        raise ValueError(f"a rank correlation needs at least 3 runs, got {len(x)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")

    def ranks(v: np.ndarray) -> np.ndarray:  # [..., n] -> average ranks (ties share theirs)
        return pd.DataFrame(v.reshape(-1, v.shape[-1])).rank(axis=1).to_numpy().reshape(v.shape)

    def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [..., n] x2 -> [...]
        a = a - a.mean(-1, keepdims=True)
        b = b - b.mean(-1, keepdims=True)
        den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)

    rho = float(pearson(ranks(x), ranks(y)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(reps, len(x)))  # [reps, runs]
    values = pearson(ranks(x[idx]), ranks(y[idx]))  # [reps]
    values = values[np.isfinite(values)]
    if not np.isfinite(rho) or not len(values):
        return rho, float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return rho, float(low), float(high)


def summary(
    df: pd.DataFrame,
    by: str | Sequence[str],
    metric: str,
    over: str | None = K.SEED,
    tasks: str | Sequence[str] | None = None,
    ci_of: str = "iqm",
    reps: int = 2000,
    alpha: float = 0.05,
    seed: int | None = 0,
    min_runs: int = MIN_RUNS_FOR_CI,
    error: str | None = K.ERROR,
) -> pd.DataFrame:
    """Per group of ``by``: n, n_failed, mean, IQM and a stratified bootstrap CI of ``metric``.

    Within a group, each value of ``over`` is one run and (if given) each value of
    ``tasks`` one task: the group's scores form ``[runs, tasks]``. Rows whose metric is NaN
    (a failed method, a ``return_ratio`` with R* <= 0) or whose ``error`` is set are left
    out of the statistics and counted in ``n_failed``. A group whose rows all lack the
    metric and carry no error (a task not planned for that cell) is no group at all.

    Args:
        df: e.g. :func:`qworld_analysis.final_checkpoints` of :func:`qworld_analysis.load`.
        by: grouping columns; NA is a group of its own.
        metric: the column to aggregate.
        over: the run column (``seed``, or ``trial_id``); None: every row is a run.
        tasks: columns whose values are the tasks aggregated over inside a group.
        ci_of: ``"iqm"`` or ``"mean"``: the statistic the CI is for.
        reps, alpha, seed: of :func:`stratified_bootstrap_ci`.
        min_runs: groups with fewer runs (per task) get ``ci_low = ci_high = NaN``.
        error: the column whose non-null value marks a failed row; None (or absent from
            ``df``): only NaN metrics count as failed.

    Returns:
        One row per group: the ``by`` columns, ``n`` (runs x tasks scored), ``n_failed``
        (rows left out), ``mean``, ``iqm``, ``ci_low``, ``ci_high``; sorted by ``by``.
        ``mean`` / ``iqm`` are NaN where ``n`` is 0.

    Raises:
        ValueError: a group has several rows for one (run, task) (select one checkpoint
            first, e.g. with ``final_checkpoints``), or tasks with different runs.
    """
    by = [by] if isinstance(by, str) else list(by)
    task_cols = [] if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
    stat = {"iqm": iqm, "mean": mean}[ci_of]
    needed = [*by, metric, *task_cols, *([over] if over else [])]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise KeyError(f"summary: columns {missing} are not in the frame")
    data = df[needed].copy()
    data[metric] = pd.to_numeric(data[metric], errors="coerce")
    errored = (df[error].notna().to_numpy() if error is not None and error in df.columns
               else np.zeros(len(df), dtype=bool))
    failed = data[metric].isna().to_numpy() | errored
    data["_failed"], data["_errored"] = failed, errored
    out = []
    for key, group in data.groupby(by, dropna=False, sort=True) if by else [((), data)]:
        key = key if isinstance(key, tuple) else (key,)
        n_failed = int(group["_failed"].sum())
        if n_failed == len(group) and not group["_errored"].any():
            continue
        group = group[~group["_failed"].to_numpy()]
        row = {**dict(zip(by, key)), "n": 0, "n_failed": n_failed, "mean": np.nan,
               "iqm": np.nan, "ci_low": np.nan, "ci_high": np.nan}
        if not group.empty:
            scores = _group_scores(group, metric, over, task_cols, dict(zip(by, key)))
            row.update(n=scores.size, mean=mean(scores), iqm=iqm(scores))
            if scores.shape[0] >= min_runs:
                row["ci_low"], row["ci_high"] = stratified_bootstrap_ci(
                    scores, stat, reps=reps, alpha=alpha, seed=seed)
        out.append(row)
    result = pd.DataFrame(out, columns=[*by, *SUMMARY_COLUMNS])
    for col in ("n", "n_failed"):
        result[col] = result[col].astype("Int64")
    for col in by:  # keep the input's dtypes (Int64 num_goals, string variant ...)
        try:
            result[col] = result[col].astype(df[col].dtype)
        except (TypeError, ValueError):
            pass
    return result


def _group_scores(group: pd.DataFrame, metric: str, over: str | None, task_cols: list[str],
                  where: dict) -> np.ndarray:
    """One group's rows -> ``scores[runs, tasks]``."""
    if over is None:
        if task_cols:
            raise ValueError("summary: tasks need an `over` column naming the runs")
        return group[metric].to_numpy(np.float64)[:, None]
    keys = [over, *task_cols]
    dup = group.duplicated(subset=keys, keep=False)
    if dup.any():
        example = group.loc[dup, keys].iloc[0].to_dict()
        raise ValueError(
            f"summary: several {metric!r} rows per {keys} in group {where} (e.g. {example}); "
            "select one row per run first, e.g. final_checkpoints(df), or add the varying "
            "column to `by`")
    if not task_cols:
        return group[metric].to_numpy(np.float64)[:, None]
    table = group.pivot_table(index=over, columns=task_cols, values=metric, aggfunc="first",
                              dropna=False)
    scores = table.to_numpy(np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"summary: in group {where} the tasks {task_cols} do not all have the same runs")
    return scores
