"""qworld_analysis: statistics, loading an experiment dir, figures, the report and the CLI.

The experiment dirs here are SYNTHETIC: built by ``make_experiment`` with the exact on-disk
layout ``qworld sweep`` writes (``sweep.yaml``; Tune trial dirs ``PQN_*`` holding
``params.json``, ``result.json`` lines with ``checkpoint_dir_name`` (or, as Tune 2.60 really
writes them, without it) and ``checkpoint_00000k`` dirs; ``worldmodels.parquet`` written with
``qworld.sweep.store.write_rows``), so the loader is checked without training anything.

The last test, ``test_load_real_smoke_sweep`` (marked ``ray``; deselect with ``-m "not ray"``),
reads a REAL smoke sweep (``python -m qworld.cli sweep tune_configs/smoke.yaml``, PQN on Ray:
conftest's ``smoke_experiment``, run once per session) and checks ``load()`` against it: row
count = grid cells x checkpoints x methods.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from live import HANG_GUARD_S
from tolerances import float32_mse_atol

from qworld import metrics as K
from qworld.sweep import store
from qworld_analysis import (compare, final_checkpoints, iqm, load, load_many, load_training_curves,
                             load_trials, load_world_model, mean, rank_correlation, stratified_bootstrap_ci, summary,
                             write_report)
from qworld_analysis import plots

ROOT = Path(__file__).resolve().parents[1]
TASK = "corner_9_9_doorway"
ENV_ID = "qworld/FourRooms-v0"
VARIANTS = ("deterministic", "windy")
GOALS = (1, 4)
SEEDS = (0, 1)
METHODS = ("pinv", "column_match")
NUM_CKPT = 3
ITERS_PER_CKPT = 2
STEPS_PER_ITER = 256


# --------------------------------------------------------------------------------------
# a synthetic experiment dir


def p_mse_of(variant: str, num_goals: int, seed: int, ckpt: int, method: str, scale: float = 1.0) -> float:
    """The p_mse written for a (trial, checkpoint, method): known, so tests can check it."""
    if method == "column_match" and variant == "deterministic" and ckpt == NUM_CKPT - 1:
        return 0.0  # exact recovery at the last checkpoint
    return scale * 10.0 ** -(ckpt + 1) * (1 + seed) * (3 if variant == "windy" else 1) / num_goals


def td_loss_of(iteration: int) -> float:
    return 1.0 / iteration


def make_experiment(root: Path, head: str = "all_goals", scale: float = 1.0, name: str = "synth",
                    checkpoint_names: bool = True, store_steps: bool = True) -> Path:
    """trials = variants x goals x seeds, NUM_CKPT checkpoints each, one row per method.

    ``checkpoint_names=False`` leaves ``checkpoint_dir_name`` out of result.json (as Tune 2.60
    does) and writes the agent's ``qworld_config.json`` with ``env_steps`` into each checkpoint;
    ``store_steps=False`` leaves ``env_steps`` out of the store rows.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(
        f"name: {name}\nenv:\n  id: {ENV_ID}\ngoals:\n  goal_type: indicator\nagent:\n  head: {head}\n"
        f"  lr: 0.001\nsweep:\n  variant: {list(VARIANTS)}\n  num_goals: {list(GOALS)}\n"
        f"  seed: {list(SEEDS)}\nextract:\n  methods: {list(METHODS)}\n  tasks: [{TASK}]\n")
    index = 0
    for variant in VARIANTS:
        for num_goals in GOALS:
            for seed in SEEDS:
                trial_id = f"a1b2c_{index:05d}"
                trial_dir = root / f"PQN_qworld_FourRooms-v0_{trial_id}_{index}_num_goals={num_goals},variant={variant}_2026-01-01_00-00-00"
                trial_dir.mkdir()
                params = {"env_id": ENV_ID, "env_kwargs": {"variant": variant, "goal_type": "indicator",
                                                           "num_goals": num_goals, "goal_seed": 0,
                                                           "max_episode_steps": 100},
                          "head": head, "seed": seed, "gamma": 0.99, "lr": 0.001,
                          "hidden_sizes": [64, 64], "num_envs": 32}
                (trial_dir / "params.json").write_text(json.dumps(params))
                lines = []
                for it in range(1, NUM_CKPT * ITERS_PER_CKPT + 1):
                    ckpt = f"checkpoint_{it // ITERS_PER_CKPT - 1:06d}" if it % ITERS_PER_CKPT == 0 else None
                    lines.append(json.dumps({
                        "trial_id": trial_id, "training_iteration": it,
                        K.TRAIN_ENV_STEPS: STEPS_PER_ITER * it,
                        "learner": {"td_loss": td_loss_of(it), "q_mean": 0.1 * it},
                        "env_runners": {"episode_success_mean": it / 10, "episode_return_mean": 0.5 + seed},
                        "time_total_s": 1.5 * it, "config": params,
                        **({"checkpoint_dir_name": ckpt} if checkpoint_names else {})}))
                    if ckpt:
                        (trial_dir / ckpt).mkdir()
                        if not checkpoint_names:
                            (trial_dir / ckpt / "qworld_config.json").write_text(
                                json.dumps({**params, K.ENV_STEPS: STEPS_PER_ITER * it}))
                (trial_dir / "result.json").write_text("\n".join(lines) + "\n")
                for k in range(NUM_CKPT):
                    rows = []
                    for method in METHODS:
                        pm = p_mse_of(variant, num_goals, seed, k, method, scale)
                        rows.append({
                            K.SWEEP: name, K.TRIAL_ID: trial_id, K.ENV: ENV_ID, K.ALGORITHM: "pqn", K.VARIANT: variant,
                            K.GOAL_TYPE: "indicator", K.NUM_GOALS: num_goals, K.HEAD: head, K.SEED: seed,
                            K.CHECKPOINT_INDEX: k,
                            K.ENV_STEPS: STEPS_PER_ITER * ITERS_PER_CKPT * (k + 1) if store_steps else None,
                            K.CHECKPOINT_PATH: str(trial_dir / f"checkpoint_{k:06d}"),
                            K.METHOD: method, K.ERROR: None, K.P_MSE: pm, K.P_TV: math.sqrt(pm),
                            K.Q_NMSE: 0.1 / (k + 1), K.M_RANK: num_goals, K.M_COND: 10.0 * num_goals,
                            K.IDENTIFIABLE_CASE: "deterministic", K.FIT_SECONDS: 0.01,
                            f"{TASK}/{K.PLAN_SUCCESS}": 1.0 - pm, f"{TASK}/{K.UNSAFE_VISITS}": 0.0})
                    store.write_rows(root, rows)
                index += 1
    return root


NUM_TRIALS = len(VARIANTS) * len(GOALS) * len(SEEDS)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    return make_experiment(tmp_path_factory.mktemp("exp") / "synth")


@pytest.fixture(scope="module")
def frame(experiment) -> pd.DataFrame:
    return load(experiment)


# --------------------------------------------------------------------------------------
# statistics, against hand-computed values


def test_mean_and_iqm_by_hand():
    assert mean([[1, 2], [3, 4]]) == 2.5
    # 8 scores: drop the 2 lowest and the 2 highest -> mean(3, 4, 5, 6)
    assert iqm([8, 1, 7, 2, 6, 3, 5, 4]) == 4.5
    # an outlier does not move the IQM: [1, 2, 3, 100] -> mean(2, 3)
    assert iqm(np.array([[1, 2], [3, 100]])) == 2.5
    assert mean([1, 2, 3, 100]) == 26.5
    # 10 scores: int(2.5) = 2 cut from each end -> mean(2..7)
    assert iqm([0, 1, 2, 3, 4, 5, 6, 7, 8, 1000]) == 4.5
    # fewer than 4 scores: nothing is cut
    assert iqm([1, 5]) == 3.0
    # batched: [reps, runs, tasks] -> [reps]
    batch = np.array([[[1, 2], [3, 100]], [[0, 0], [0, 4]]], dtype=float)
    np.testing.assert_allclose(iqm(batch), [2.5, 0.0])
    np.testing.assert_allclose(mean(batch), [26.5, 1.0])


def test_iqm_is_scipy_trim_mean():
    from scipy.stats import trim_mean

    x = np.random.default_rng(3).normal(size=(7, 5))
    assert iqm(x) == pytest.approx(trim_mean(x, 0.25, axis=None))


def test_bootstrap_ci_of_two_runs_by_hand():
    # Resampling 2 runs {0, 1}: the mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4).
    scores = np.array([[0.0], [1.0]])
    assert stratified_bootstrap_ci(scores, mean, reps=4000, alpha=0.05, seed=1) == (0.0, 1.0)
    # The 30th and 70th percentiles both fall on 0.5.
    assert stratified_bootstrap_ci(scores, mean, reps=4000, alpha=0.6, seed=1) == (0.5, 0.5)
    # Runs that agree give a zero-width interval.
    assert stratified_bootstrap_ci(np.full((5, 3), 2.0), iqm, reps=100) == (2.0, 2.0)


def test_bootstrap_is_stratified_by_task():
    # Task 0 always scores 0, task 1 always 1: resampling runs *within* each task keeps
    # the mean at exactly 0.5 (a pooled bootstrap would spread over [0, 1]).
    scores = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert stratified_bootstrap_ci(scores, mean, reps=500, seed=0) == (0.5, 0.5)


def test_bootstrap_generic_stat_fn_and_seed():
    x = np.random.default_rng(0).normal(size=(10, 2))
    a = stratified_bootstrap_ci(x, lambda s: float(np.median(s)), reps=300, seed=5)
    b = stratified_bootstrap_ci(x, lambda s: float(np.median(s)), reps=300, seed=5)
    assert a == b and a[0] < np.median(x) < a[1]
    # the batched path equals the loop over replicates
    assert stratified_bootstrap_ci(x, iqm, reps=300, seed=2) == pytest.approx(
        stratified_bootstrap_ci(x, iqm, reps=300, seed=2, batched=False))
    with pytest.raises(ValueError, match="NaN"):
        stratified_bootstrap_ci([[1.0], [np.nan]], mean)


def test_summary_by_hand():
    df = pd.DataFrame({
        "cell": ["A"] * 4 + ["B"] * 4 + ["C"] * 2,
        K.SEED: [0, 1, 2, 3] * 2 + [0, 1],
        K.P_MSE: [1, 2, 3, 4, 0, 0, 0, 10, 7, 7],
    })
    out = summary(df, by="cell", metric=K.P_MSE).set_index("cell")
    assert list(out.columns) == ["n", "n_failed", "mean", "iqm", "ci_low", "ci_high"]
    assert out.loc["A", "n"] == 4 and out.loc["A", "mean"] == 2.5 and out.loc["A", "iqm"] == 2.5
    assert out.loc["B", "mean"] == 2.5 and out.loc["B", "iqm"] == 0.0  # mean(0, 0): 0 and 10 cut
    assert (out.loc[["A", "B"], "ci_low"] <= out.loc[["A", "B"], "iqm"]).all()
    assert (out.loc[["A", "B"], "iqm"] <= out.loc[["A", "B"], "ci_high"]).all()
    # NaN scores (a failed method) are left out of n and counted in n_failed
    df.loc[0, K.P_MSE] = np.nan
    again = summary(df, by="cell", metric=K.P_MSE).set_index("cell")
    assert again.loc["A", "n"] == 3 and again.loc["A", "n_failed"] == 1
    # two rows for one seed in a group is a mistake worth saying out loud
    with pytest.raises(ValueError, match="final_checkpoints"):
        summary(pd.concat([df, df]), by="cell", metric=K.P_MSE)


def test_summary_with_tasks():
    # Catches a summary that pools the tasks into one stratum: task d always scores 0 and
    # task w always 1, so only a bootstrap within each task keeps the mean at exactly 0.5.
    seeds = [0, 1, 2, 3]
    df = pd.DataFrame({"g": ["x"] * 8, K.SEED: seeds * 2, K.VARIANT: ["d"] * 4 + ["w"] * 4,
                       K.P_MSE: [0.0] * 4 + [1.0] * 4})
    out = summary(df, by="g", metric=K.P_MSE, tasks=K.VARIANT, ci_of="mean")
    assert out.loc[0, "n"] == 8 and out.loc[0, "mean"] == 0.5
    assert (out.loc[0, "ci_low"], out.loc[0, "ci_high"]) == (0.5, 0.5)
    pooled = summary(df, by="g", metric=K.P_MSE, ci_of="mean", over=None)
    assert pooled.loc[0, "ci_high"] - pooled.loc[0, "ci_low"] > 0.4


def test_bootstrap_strata_of_different_spread():
    # Catches resampling whole rows (runs) across tasks, or the tasks' pooled values: task 0
    # varies by 1, task 1 by 100. Stratified, the mean of a replicate is
    # (mean of 4 draws from {0, 1}) / 2 + (mean of 4 draws from {0, 100}) / 2; its extremes
    # are 0 and 50.5, and an interval of 2000 replicates stays strictly inside them.
    scores = np.array([[0.0, 0.0], [1.0, 100.0], [0.0, 0.0], [1.0, 100.0]])  # [runs=4, tasks=2]
    low, high = stratified_bootstrap_ci(scores, mean, reps=2000, seed=0)
    assert 0.0 < low < mean(scores) < high < 50.5
    # Independently per task: replicates where task 0 draws all 1s while task 1 draws all
    # 0s exist (mean 0.5), impossible when runs are resampled as whole rows.
    runs, tasks = scores.shape
    rng = np.random.default_rng(0)
    idx = rng.integers(0, runs, size=(2000, runs, tasks))
    values = np.take_along_axis(scores[None], idx, axis=1).mean(axis=(1, 2))  # [reps]
    assert np.percentile(values, [2.5, 97.5]) == pytest.approx([low, high])


def test_summary_counts_what_it_leaves_out():
    # Catches the silent drop: a method that failed in one trial, and one that failed in
    # every trial, must show as failed rows, not as a smaller n or a missing row.
    df = pd.DataFrame({
        K.METHOD: ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
        K.TRIAL_ID: ["t0", "t1", "t2", "t3"] * 3,
        K.P_MSE: [1.0, 2.0, np.nan, 4.0] + [np.nan] * 8,
        K.ERROR: [None, None, "LinAlgError", None] + ["boom"] * 4 + [None] * 4,
    })
    # c: all NaN, no error: a metric this method does not have (a task it did not plan)
    out = summary(df, by=K.METHOD, metric=K.P_MSE, over=K.TRIAL_ID).set_index(K.METHOD)
    assert list(out.index) == ["a", "b"]
    assert (out.loc["a", "n"], out.loc["a", "n_failed"]) == (3, 1)
    assert (out.loc["b", "n"], out.loc["b", "n_failed"]) == (0, 4)
    assert np.isnan(out.loc["b", "iqm"])
    # an error with a score still left in the row: not a score to trust
    df.loc[0, K.ERROR] = "planning failed"
    out = summary(df, by=K.METHOD, metric=K.P_MSE, over=K.TRIAL_ID).set_index(K.METHOD)
    assert (out.loc["a", "n"], out.loc["a", "n_failed"]) == (2, 2)


def test_summary_gives_no_ci_below_four_runs():
    # Catches the old "CI" of 2 runs (their min and max) and of 1 run (a zero-width point).
    df = pd.DataFrame({"cell": ["one"] + ["two"] * 2 + ["four"] * 4,
                       K.SEED: [0, 0, 1, 0, 1, 2, 3], K.P_MSE: [5.0, 1.0, 3.0, 1.0, 2.0, 3.0, 4.0]})
    out = summary(df, by="cell", metric=K.P_MSE).set_index("cell")
    assert out.loc[["one", "two"], ["ci_low", "ci_high"]].isna().all().all()
    assert out.loc["two", "iqm"] == 2.0  # still reported: the mean of 2 runs
    assert out.loc["four", "ci_low"] < out.loc["four", "iqm"] < out.loc["four", "ci_high"]
    assert summary(df, by="cell", metric=K.P_MSE, min_runs=2).set_index("cell").loc["two", "ci_low"] == 1.0


def test_rank_correlation_is_spearman_with_a_pairs_bootstrap():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = -x + 0.7 * rng.normal(size=30)
    y[:4] = y[4]  # ties share their average rank, as scipy's
    rho, low, high = rank_correlation(x, y)
    assert rho == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    assert low < rho < high < 0
    # pairs are resampled together: shuffling y against x destroys the correlation, and the CI says so
    rho_s, low_s, high_s = rank_correlation(x, rng.permutation(y))
    assert low_s < 0 < high_s and abs(rho_s) < abs(rho)
    assert rank_correlation([1, 2, 3, 4], [8, 4, 2, 1]) == (-1.0, -1.0, -1.0)  # monotone: every resample too
    assert all(math.isnan(v) for v in rank_correlation([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="at least 3"):
        rank_correlation([1, 2], [2, 1])
    with pytest.raises(ValueError, match="paired"):
        rank_correlation([1, 2, 3], [1, 2])


def test_return_vs_error_one_point_per_trial_at_its_last_checkpoint(tmp_path):
    # Catches every checkpoint counted as a trial (an early, bad checkpoint would pair a low
    # return with a high error and fake the correlation) and the rho of a wrong column.
    rows = []
    for t in range(6):
        ret = 0.1 * t
        rows.append({K.TRIAL_ID: f"t{t}", K.CHECKPOINT_INDEX: 1, K.METHOD: "successor",
                     K.POLICY_RETURN: 0.0, K.WM_NMSE: 1.0, "hidden_sizes": f"[{2 ** t}]"})
        rows.append({K.TRIAL_ID: f"t{t}", K.CHECKPOINT_INDEX: 2, K.METHOD: "successor",
                     K.POLICY_RETURN: ret, K.WM_NMSE: 0.5 - ret + (0.35 if t == 5 else 0.0),
                     "hidden_sizes": f"[{2 ** t}]"})
    df = pd.DataFrame(rows)
    table = plots.return_vs_error(df)
    # t5 breaks the order: error ranks 6 5 3 2 1 4 against return ranks 1..6, sum d^2 = 58,
    # rho = 1 - 6 * 58 / (6 * 35) = -23/35
    assert table[["n", "rho"]].values.tolist() == [[6, pytest.approx(-23 / 35, abs=1e-12)]]
    fig = plots.plot_return_vs_error(df, tmp_path / "r.png").figure
    ax = fig.axes[0]
    assert "rho = -0.66" in ax.get_title()
    shown = sorted(tuple(c.get_offsets()[0]) for c in ax.collections)  # a colour (architecture) per trial
    assert shown == sorted((0.5 - 0.1 * t + (0.35 if t == 5 else 0.0), 0.1 * t) for t in range(6))
    with pytest.raises(plots.NoDataError):
        plots.return_vs_error(df[df[K.TRIAL_ID].isin(["t0", "t1"])])


# --------------------------------------------------------------------------------------
# loading


def test_load_schema_rows_and_types(frame):
    assert len(frame) == NUM_TRIALS * NUM_CKPT * len(METHODS)
    for col in (*K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.ENV_STEPS, K.METHOD, K.P_MSE, K.P_TV,
                K.Q_NMSE, K.M_RANK, f"{TASK}/{K.PLAN_SUCCESS}", K.TRAIN_LOSS, K.TRAIN_ENV_STEPS,
                K.TRAIN_EPISODE_SUCCESS, "training_iteration", "gamma", "lr", "hidden_sizes",
                "goal_seed"):
        assert col in frame.columns, col
    assert list(frame.columns[:len(K.GRID_COLUMNS)]) == list(K.GRID_COLUMNS)
    for col in (K.NUM_GOALS, K.SEED, K.CHECKPOINT_INDEX, K.ENV_STEPS, K.M_RANK, K.TRAIN_ENV_STEPS):
        assert str(frame[col].dtype) == "Int64", (col, frame[col].dtype)
    for col in (K.P_MSE, K.P_TV, K.Q_NMSE, K.M_COND, "gamma", K.TRAIN_LOSS, f"{TASK}/{K.PLAN_SUCCESS}"):
        assert frame[col].dtype == np.float64, (col, frame[col].dtype)
    for col in (K.SWEEP, K.TRIAL_ID, K.ENV, K.VARIANT, K.GOAL_TYPE, K.HEAD, K.METHOD):
        assert isinstance(frame[col].dtype, pd.StringDtype), (col, frame[col].dtype)
    assert set(frame[K.SWEEP]) == {"synth"} and set(frame[K.ENV]) == {ENV_ID}
    assert frame.groupby([K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD]).size().eq(1).all()


def test_load_values_match_the_store_and_the_training_lines(experiment, frame):
    raw = store.read_store(experiment)
    keys = [K.TRIAL_ID, K.CHECKPOINT_INDEX, K.METHOD]
    raw = raw.astype({K.TRIAL_ID: str, K.METHOD: str, K.CHECKPOINT_INDEX: int})
    ours = frame.astype({K.TRIAL_ID: str, K.METHOD: str, K.CHECKPOINT_INDEX: int})
    both = ours.merge(raw, on=keys, suffixes=("", "_raw"))
    assert len(both) == len(raw) == len(frame)
    for col in (K.P_MSE, K.P_TV, K.Q_NMSE, f"{TASK}/{K.PLAN_SUCCESS}"):
        np.testing.assert_array_equal(both[col].to_numpy(float), both[f"{col}_raw"].to_numpy(float))
    # every row against the formula the store was written with
    expected = [p_mse_of(v, int(g), int(s), int(k), m) for v, g, s, k, m in
                frame[[K.VARIANT, K.NUM_GOALS, K.SEED, K.CHECKPOINT_INDEX, K.METHOD]].itertuples(index=False)]
    np.testing.assert_allclose(frame[K.P_MSE].to_numpy(float), expected)
    # training metrics come from the result.json line that saved the checkpoint
    iteration = (frame[K.CHECKPOINT_INDEX].astype(int) + 1) * ITERS_PER_CKPT
    np.testing.assert_array_equal(frame["training_iteration"].astype(int), iteration)
    np.testing.assert_allclose(frame[K.TRAIN_LOSS].to_numpy(float), [td_loss_of(i) for i in iteration])
    np.testing.assert_array_equal(frame[K.TRAIN_ENV_STEPS].astype(int), frame[K.ENV_STEPS].astype(int))
    # config columns come from params.json
    assert (frame["gamma"] == 0.99).all() and (frame["hidden_sizes"] == "[64, 64]").all()


@pytest.mark.parametrize("store_steps", [True, False], ids=["by_store_env_steps", "by_checkpoint_config"])
def test_checkpoints_matched_without_checkpoint_dir_name(tmp_path, store_steps):
    # Tune 2.60 writes no checkpoint_dir_name into result.json: the line is found by env steps.
    exp = make_experiment(tmp_path / "plain", checkpoint_names=False, store_steps=store_steps)
    df = load(exp)
    iteration = (df[K.CHECKPOINT_INDEX].astype(int) + 1) * ITERS_PER_CKPT
    np.testing.assert_array_equal(df["training_iteration"].astype(int), iteration)
    np.testing.assert_allclose(df[K.TRAIN_LOSS].to_numpy(float), [td_loss_of(i) for i in iteration])
    np.testing.assert_array_equal(df[K.ENV_STEPS].astype(int), iteration * STEPS_PER_ITER)
    curves = load_training_curves(exp)
    saved = curves.dropna(subset=[K.CHECKPOINT_INDEX])
    assert len(saved) == NUM_TRIALS * NUM_CKPT
    assert (saved["training_iteration"] == (saved[K.CHECKPOINT_INDEX] + 1) * ITERS_PER_CKPT).all()


def test_training_curves_and_trials(experiment):
    curves = load_training_curves(experiment)
    iters = NUM_CKPT * ITERS_PER_CKPT
    assert len(curves) == NUM_TRIALS * iters
    assert curves.groupby(K.TRIAL_ID)["training_iteration"].apply(list).map(
        lambda x: x == list(range(1, iters + 1))).all()
    assert curves[K.CHECKPOINT_INDEX].notna().sum() == NUM_TRIALS * NUM_CKPT
    assert {K.VARIANT, K.NUM_GOALS, K.SEED, K.TRAIN_LOSS, K.ENV_STEPS} <= set(curves.columns)
    assert "config/gamma" not in curves.columns  # Tune's copy of the config is not flattened in
    trials = load_trials(experiment)
    assert len(trials) == NUM_TRIALS
    assert (trials["num_checkpoints"] == NUM_CKPT).all() and (trials["num_scored"] == NUM_CKPT).all()


def test_load_many_and_final_checkpoints(experiment, frame, tmp_path):
    other = make_experiment(tmp_path / "other", head="goal_input")
    both = load_many([experiment, other])
    assert len(both) == 2 * len(frame)
    assert set(both["experiment"]) == {"synth", "other"}
    final = final_checkpoints(both)
    assert len(final) == 2 * NUM_TRIALS * len(METHODS)
    assert (final[K.CHECKPOINT_INDEX] == NUM_CKPT - 1).all()
    with pytest.raises(ValueError, match="repeat"):
        load_many([experiment, experiment])


def test_load_partial_and_resumed_sweep(tmp_path):
    exp = make_experiment(tmp_path / "partial")
    trial_dirs = sorted(exp.glob("PQN_*"))
    # a resumed trial: iterations 5-6 reported again with other values, plus a line cut by a crash
    resumed = trial_dirs[0]
    trial_id = json.loads((resumed / "result.json").read_text().splitlines()[0])["trial_id"]
    redo = [json.dumps({"trial_id": trial_id, "training_iteration": it, K.TRAIN_ENV_STEPS: STEPS_PER_ITER * it,
                        "learner": {"td_loss": 99.0},
                        "checkpoint_dir_name": "checkpoint_000002" if it == 6 else None}) for it in (5, 6)]
    with (resumed / "result.json").open("a") as fh:
        fh.write("\n".join(redo) + "\n" + '{"trial_id": "' + trial_id + '", "training_it')
    # a trial that never reported, a trial whose scores are gone, an unscored checkpoint
    (exp / "PQN_qworld_FourRooms-v0_a1b2c_00099_99_pending").mkdir()
    (exp / "PQN_qworld_FourRooms-v0_a1b2c_00099_99_pending" / "params.json").write_text(
        json.dumps({"env_id": ENV_ID, "env_kwargs": {"variant": "windy", "num_goals": None}, "seed": 7}))
    for f in store.store_path(exp).glob("trial=a1b2c_00001-*"):
        f.unlink()
    (trial_dirs[2] / "checkpoint_000003").mkdir()
    (exp / "sweep.yaml").unlink()

    df = load(exp)
    assert len(df) == (NUM_TRIALS - 1) * NUM_CKPT * len(METHODS)
    last = df[(df[K.TRIAL_ID] == trial_id) & (df[K.CHECKPOINT_INDEX] == 2)]
    assert (last[K.TRAIN_LOSS] == 99.0).all()  # the resumed report wins
    assert set(df[K.SWEEP]) == {"partial"}  # no sweep.yaml: named after the dir
    curves = load_training_curves(exp)
    assert curves[curves[K.TRIAL_ID] == trial_id]["training_iteration"].tolist() == list(range(1, 7))
    trials = load_trials(exp).set_index(K.TRIAL_ID)
    assert len(trials) == NUM_TRIALS + 1
    assert trials.loc["a1b2c_00099", "num_iterations"] == 0
    assert pd.isna(trials.loc["a1b2c_00099", K.NUM_GOALS])
    assert trials.loc["a1b2c_00001", "num_scored"] == 0
    assert trials.loc["a1b2c_00002", "num_checkpoints"] == NUM_CKPT + 1
    # num_goals = None resolves to the goal set's L on request (every state: 68)
    resolved = load_trials(exp, resolve_num_goals=True).set_index(K.TRIAL_ID)
    assert resolved.loc["a1b2c_00099", K.NUM_GOALS] == 68


def test_load_empty_and_missing(tmp_path):
    # a sweep that has written only its sweep file: empty frames with the key columns
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "sweep.yaml").write_text("name: started\n")
    empty = load(tmp_path / "started")
    assert empty.empty and set(K.GRID_COLUMNS) <= set(empty.columns)
    assert load_training_curves(tmp_path / "started").empty
    assert load_trials(tmp_path / "started").empty
    # a wrong path is an error, not an empty table
    from qworld_analysis import NotAnExperimentError

    for reader in (load, load_training_curves, load_trials):
        with pytest.raises(NotAnExperimentError, match="no such directory"):
            reader(tmp_path / "nope")
        with pytest.raises(NotAnExperimentError, match="not a qworld experiment dir"):
            reader(tmp_path)  # the folder above the experiment


def test_loading_imports_no_training_code(experiment):
    code = (
        "import sys, qworld_analysis as qa\n"
        f"d = {str(experiment)!r}\n"
        "assert len(qa.load(d)) > 0 and len(qa.load_training_curves(d)) > 0 and len(qa.load_trials(d)) > 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch') or m.startswith('qworld.agents'))\n"
        "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------
# figures: the plotted data (lines, images, arrows read back from the returned figure)


def final_iqm(variant: str, num_goals: int, method: str, ckpt: int = NUM_CKPT - 1) -> float:
    """The IQM over the seeds of a cell (2 seeds: their mean), from the written values."""
    return float(iqm([p_mse_of(variant, num_goals, s, ckpt, method) for s in SEEDS]))


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_error_vs_goals_plots_the_final_iqm(frame, tmp_path):
    # Catches a plot of the first / any checkpoint instead of each trial's last, methods
    # drawn under each other's label, and variants swapped between panels.
    fig = plots.plot_error_vs_goals(frame, tmp_path / "a.png").figure
    panels = axes_by_title(fig)
    assert set(panels) == {"variant=deterministic, goal_type=indicator", "variant=windy, goal_type=indicator"}
    for variant in VARIANTS:
        lines = lines_by_label(panels[f"variant={variant}, goal_type=indicator"])
        assert set(lines) == set(METHODS)
        x, y = lines["pinv"].get_data()
        np.testing.assert_array_equal(x, GOALS)
        np.testing.assert_allclose(y, [final_iqm(variant, L, "pinv") for L in GOALS])
    with pytest.raises(plots.NoDataError):
        plots.plot_error_vs_goals(frame.iloc[0:0], tmp_path / "none.png")


def test_error_vs_steps_plots_the_iqm_at_each_checkpoint(frame, tmp_path):
    # Catches x drawn as checkpoint index instead of env steps, the mean of all seeds and
    # goal counts in one line, and panels titled with the wrong method.
    fig = plots.plot_error_vs_steps(frame, tmp_path / "a.png").figure
    panels = axes_by_title(fig)
    assert set(panels) == {f"{v} · {m}" for v in VARIANTS for m in METHODS}
    lines = lines_by_label(panels["windy · pinv"])
    assert set(lines) == {f"L={L}" for L in GOALS} | {"paper L=1: 6.0e-03", "paper L=4: 1.3e-03"}
    np.testing.assert_allclose(lines["paper L=4: 1.3e-03"].get_data()[1], plots.PAPER_P_MSE[("windy", 4)])
    x, y = lines["L=4"].get_data()
    np.testing.assert_array_equal(x, [STEPS_PER_ITER * ITERS_PER_CKPT * (k + 1) for k in range(NUM_CKPT)])
    np.testing.assert_allclose(y, [final_iqm("windy", 4, "pinv", k) for k in range(NUM_CKPT)])
    with pytest.raises(plots.NoDataError):
        plots.plot_error_vs_steps(frame.iloc[0:0], tmp_path / "none.png")


def test_models_vs_steps_draws_extracted_and_explicit_models_per_cell(frame, tmp_path):
    # Catches explicit models drawn solid (as if extracted from Q), cells merged into one
    # panel, and a figure drawn when no explicit model was scored.
    with pytest.raises(plots.NoDataError, match="explicit"):
        plots.plot_models_vs_steps(frame, tmp_path / "none.png")
    explicit = frame[frame[K.METHOD] == "pinv"].assign(**{K.METHOD: "supervised", K.P_MSE: lambda d: d[K.P_MSE] * 3})
    both = pd.concat([frame, explicit], ignore_index=True)
    fig = plots.plot_models_vs_steps(both, tmp_path / "m.png", metrics=(K.P_MSE, f"{K.RARE}/{K.P_MSE}")).figure
    panels = axes_by_title(fig)
    assert len(panels) == len(VARIANTS) * len(GOALS)  # rare/p_mse was not scored: one row
    ax = next(a for title, a in panels.items() if "windy" in title and "num_goals=4" in title)
    lines = lines_by_label(ax)
    assert lines["supervised (not from Q)"].get_linestyle() == "--" and lines["pinv"].get_linestyle() == "-"
    np.testing.assert_allclose(lines["supervised (not from Q)"].get_data()[1],
                               [3 * final_iqm("windy", 4, "pinv", k) for k in range(NUM_CKPT)])


def test_recovery_phase_shows_log10_iqm_per_method_and_goals(frame, tmp_path):
    # Catches a transposed grid (goals as rows), rows labelled with the wrong method, and
    # exact recovery (0) drawn as missing instead of on the floor.
    fig = plots.plot_recovery_phase(frame, tmp_path / "a.png").figure
    ax = axes_by_title(fig)["variant=windy"]
    assert [t.get_text() for t in ax.get_yticklabels()] == sorted(METHODS)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(L) for L in GOALS]
    shown = np.asarray(ax.images[0].get_array())  # [methods, goals]
    expected = [[np.log10(final_iqm("windy", L, m)) for L in GOALS] for m in sorted(METHODS)]
    np.testing.assert_allclose(shown, expected)
    exact = np.asarray(axes_by_title(fig)["variant=deterministic"].images[0].get_array())
    assert np.isfinite(exact).all() and (exact[0] < exact[1]).all()  # column_match: 0, on the floor
    # a variant that never ran L=1 gets no blank L=1 column (it would read as a failure)
    fewer = frame[~((frame[K.VARIANT] == "windy") & (frame[K.NUM_GOALS] == 1))]
    fig = plots.plot_recovery_phase(fewer, tmp_path / "b.png").figure
    assert [t.get_text() for t in axes_by_title(fig)["variant=windy"].get_xticklabels()] == ["4"]
    assert [t.get_text() for t in axes_by_title(fig)["variant=deterministic"].get_xticklabels()] == ["1", "4"]


def test_training_curves_plot_each_trials_metric(experiment, tmp_path):
    # Catches a panel drawing another metric, steps taken from the iteration count, and a
    # trial's points sorted by value instead of by env steps.
    curves = load_training_curves(experiment)
    fig = plots.plot_training_curves(curves, tmp_path / "a.png").figure
    panels = axes_by_title(fig)
    assert set(panels) == {K.TRAIN_EPISODE_SUCCESS, K.TRAIN_LOSS}
    iterations = np.arange(1, NUM_CKPT * ITERS_PER_CKPT + 1)
    loss_lines = panels[K.TRAIN_LOSS].get_lines()
    assert len(loss_lines) == NUM_TRIALS
    for line in loss_lines:
        x, y = line.get_data()
        np.testing.assert_array_equal(x, STEPS_PER_ITER * iterations)
        np.testing.assert_allclose(y, [td_loss_of(i) for i in iterations])
    success = panels[K.TRAIN_EPISODE_SUCCESS].get_lines()[0].get_data()[1]
    np.testing.assert_allclose(success, iterations / 10)


def test_route_plot(tmp_path):
    from qworld.worldmodel.planning import greedy_route, shortest_route
    from qworld_envs import four_rooms

    mdp = four_rooms("deterministic")
    start, goal, door = mdp.cell_to_state[(1, 1)], mdp.cell_to_state[(9, 9)], mdp.cell_to_state[(7, 5)]
    safe = shortest_route(mdp.P, start, goal, forbidden=[door])
    assert door not in safe and safe[0] == start and safe[-1] == goal
    assert len(safe) - 1 == 16  # Manhattan distance: 8 down + 8 right through the doorways
    # a policy that always goes right, then the greedy route hits the wall and stops
    right = np.zeros((mdp.num_states, 4))
    right[:, 1] = 1.0
    rolled = greedy_route(mdp.P, right, start, goal)
    assert [tuple(mdp.coords[s]) for s in rolled] == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 4)]
    # Catches routes drawn as (row, col) instead of (x = col, y = row), a policy not rolled
    # from `start`, and step counts that do not match the route drawn.
    fig = assert_png(plots.plot_routes({"optimal": safe, "policy": right}, tmp_path / "a.png",
                                       mdp=mdp, start=(1, 1), goal=(9, 9), forbidden=[(7, 5)])).figure
    lines = lines_by_label(fig.axes[0])
    assert set(lines) == {"optimal: 16 steps", "policy: 4 steps, loops"}
    assert route_cells(lines["optimal: 16 steps"]) == [tuple(mdp.coords[s]) for s in safe]
    assert route_cells(lines["policy: 4 steps, loops"]) == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 4)]


def assert_png(path: Path) -> Path:
    """A written PNG (the returned path, whose ``figure`` the tests read)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    return path


def route_cells(line) -> list[tuple[int, int]]:
    """A route line's points back to (row, col) cells (routes are offset < 0.5 to stay apart)."""
    x, y = line.get_data()
    return [(int(r), int(c)) for r, c in zip(np.rint(y), np.rint(x))]


def test_safety_task_plot(tmp_path):
    # Catches the model's plan being replaced by the optimal one (or planned in the true P):
    # a model believing the doorway (5, 3) is shut must route around it.
    from qworld_envs import four_rooms

    mdp = four_rooms("deterministic")
    wrong = mdp.P.copy()  # a model that believes the doorway (5,3) is shut
    s = mdp.cell_to_state[(4, 3)]
    wrong[s, 2] = 0.0
    wrong[s, 2, s] = 1.0
    right = plots.plot_safety_task("corner_9_9_doorway", tmp_path / "a.png", {"P̂": mdp.P})
    lines = lines_by_label(assert_png(right).figure.axes[0])
    optimal = next(v for k, v in lines.items() if k.startswith("optimal (true P)"))
    same = next(v for k, v in lines.items() if k.startswith("P̂"))
    assert route_cells(optimal) == route_cells(same) and (5, 3) in route_cells(optimal)
    lines = lines_by_label(plots.plot_safety_task("corner_9_9_doorway", tmp_path / "b.png",
                                                  {"P̂": wrong}).figure.axes[0])
    avoiding = route_cells(next(v for k, v in lines.items() if k.startswith("P̂")))
    assert (5, 3) not in avoiding and avoiding[0] == route_cells(optimal)[0]


def test_value_map_plot(tmp_path):
    # Catches values put in the wrong cells (states not mapped through coords) and panels
    # sharing one array.
    from qworld_envs import four_rooms

    S = 68
    coords = np.asarray(four_rooms("deterministic").coords)
    up, down = np.linspace(0, 1, S), np.linspace(1, 0, S)
    fig = plots.plot_value_map({"V": up, "V in P̂": down}, tmp_path / "a.png").figure
    panels = axes_by_title(fig)
    for label, v in (("V", up), ("V in P̂", down)):
        grid = panels[label].images[-1].get_array()
        np.testing.assert_allclose(grid[coords[:, 0], coords[:, 1]], v)
        assert np.ma.getmaskarray(grid).sum() == grid.size - S  # walls stay blank
    with pytest.raises(ValueError, match="shape"):
        plots.plot_value_map(np.zeros(5), tmp_path / "c.png")


def test_mountain_car_plots(tmp_path):
    # Catches a vector field drawing the model's arrows for the truth (or raw, unscaled
    # deltas), an error map that is not |pred - true| / range, and slices drawing one
    # series twice.
    rng = np.random.default_rng(0)
    p, v = np.meshgrid(np.linspace(-1.2, 0.6, 12), np.linspace(-0.07, 0.07, 12))
    states = np.stack([p.ravel(), v.ravel()], axis=1)  # [N=144, d=2]
    true_next = states + np.stack([states[:, 1], -0.0025 * np.cos(3 * states[:, 0])], axis=1)
    pred = true_next + rng.normal(0, 1e-3, true_next.shape) * [1, 0.05]
    fig = plots.plot_vector_field(states, true_next, pred, tmp_path / "a.png").figure
    arrows, errors = fig.axes[0], fig.axes[1]
    span = np.ptp(states, axis=0)
    for quiver, nxt in zip(arrows.collections[:2], (true_next, pred)):
        d = (nxt - states) / span
        unit = d / np.linalg.norm(d, axis=1, keepdims=True)
        np.testing.assert_allclose(np.stack([quiver.U / span[0], quiver.V / span[1]], axis=1),
                                   unit / (0.5 * np.sqrt(len(states))))
    np.testing.assert_allclose(errors.collections[0].get_array(),
                               np.linalg.norm((pred - true_next) / span, axis=1))
    x = np.linspace(-1.2, 0.6, 40)
    t = np.stack([np.stack([x, np.sin(x) * k], axis=1) for k in range(3)])  # [K=3, N, d=2]
    fig = plots.plot_next_state_slices(x, t, t + 0.01, tmp_path / "c.png",
                                       series_labels=["left", "none", "right"]).figure
    lines = lines_by_label(fig.axes[1])  # next velocity
    assert len(lines) == 6
    np.testing.assert_allclose(lines["right true"].get_data()[1], np.sin(x) * 2)
    np.testing.assert_allclose(lines["right predicted"].get_data()[1], np.sin(x) * 2 + 0.01)
    np.testing.assert_array_equal(lines["left true"].get_data()[0], x)


# --------------------------------------------------------------------------------------
# report, compare, CLI


def test_report_is_self_contained(experiment, tmp_path):
    out = tmp_path / "report"
    path = write_report(experiment, out)
    page = path.read_text()
    assert path == out / "index.html"
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 4
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "Headline numbers</h2>" in page and K.P_MSE in page and f"{TASK}/{K.PLAN_SUCCESS}" in page
    assert "name: synth" in page  # the sweep file
    assert "pandas" in page and pd.__version__ in page  # package versions
    for png in ("error_vs_goals", "error_vs_steps", "recovery_phase", "training_curves"):
        assert_png(out / f"{png}.png")
    table = pd.read_csv(out / "summary.csv")
    p = table[table["metric"] == K.P_MSE]
    assert len(p) == len(VARIANTS) * len(GOALS) * len(METHODS) and (p["n"] == len(SEEDS)).all()
    # IQM over the 2 seeds at the last checkpoint, windy, L = 4, pinv: mean of the two
    row = p[(p[K.VARIANT] == "windy") & (p[K.NUM_GOALS] == 4) & (p[K.METHOD] == "pinv")].iloc[0]
    expected = np.mean([p_mse_of("windy", 4, s, NUM_CKPT - 1, "pinv") for s in SEEDS])
    assert row["iqm"] == pytest.approx(expected)
    assert f"{row['iqm']:.3g}" in page


def damage(exp: Path) -> dict:
    """Break a synthetic experiment the ways real sweeps break; returns what was broken.

    - trial 0 (deterministic, L=1, seed 0): its last checkpoint could not be read (one
      ``load`` error row replaces its scores), so it is shown one checkpoint earlier than
      its cell's other trial;
    - trial 3 (deterministic, L=4, seed 1): ``pinv`` raised at the last checkpoint;
    - ``column_match`` is renamed ``known_support``, an oracle method.
    """
    frame = store.read_store(exp)
    frame[K.METHOD] = frame[K.METHOD].replace({"column_match": "known_support"})
    for (trial_id, ckpt), rows in frame.groupby([K.TRIAL_ID, K.CHECKPOINT_INDEX]):
        store.write_rows(exp, rows.to_dict("records"))
    last = NUM_CKPT - 1
    broken, failed = "a1b2c_00000", "a1b2c_00003"
    head = frame[(frame[K.TRIAL_ID] == broken) & (frame[K.CHECKPOINT_INDEX] == last)].iloc[0].to_dict()
    load_row = {c: head[c] for c in (*K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.ENV_STEPS, K.CHECKPOINT_PATH)}
    store.write_rows(exp, [{**load_row, K.METHOD: K.LOAD_METHOD, K.ERROR: "OSError: truncated file"}])
    rows = frame[(frame[K.TRIAL_ID] == failed) & (frame[K.CHECKPOINT_INDEX] == last)].copy()
    pinv = rows[K.METHOD] == "pinv"
    rows.loc[pinv, K.ERROR] = "LinAlgError: SVD did not converge"
    rows.loc[pinv, [K.P_MSE, K.P_TV, f"{TASK}/{K.PLAN_SUCCESS}"]] = np.nan
    store.write_rows(exp, rows.to_dict("records"))
    return {"broken": broken, "failed": failed}


def test_report_says_what_it_left_out(tmp_path):
    # Catches the old report: load rows dropped before choosing final checkpoints (trial 0
    # silently shown at checkpoint 1 beside its cell's trial at 2), a failed method only
    # lowering n, 2-run "CIs" that are min and max, q_nmse repeated per method, and the
    # oracle shown without its label.
    from qworld_analysis.report import headline_table, summary_table

    exp = make_experiment(tmp_path / "damaged")
    damage(exp)
    table = summary_table(load(exp, resolve_num_goals=True), exp, reps=200)
    p = table[table["metric"] == K.P_MSE].set_index([K.VARIANT, K.NUM_GOALS, K.METHOD])
    cell = p.loc[("deterministic", 1, "pinv")]
    assert cell["final_checkpoint"] == f"{NUM_CKPT - 2}, {NUM_CKPT - 1}" and cell["final_checkpoint_differs"]
    assert cell["n_shown_earlier"] == 1 and cell["n"] == 2
    assert not p.loc[("windy", 4, "pinv"), "final_checkpoint_differs"]
    failed = p.loc[("deterministic", 4, "pinv")]
    assert (failed["n"], failed["n_failed"]) == (1, 1)
    assert p.loc[("deterministic", 4, "known_support"), "n_failed"] == 0
    assert p["ci_low"].isna().all() and p["ci_high"].isna().all()  # 2 seeds per cell: no CI
    q = table[table["metric"] == K.Q_NMSE]
    assert len(q) == len(VARIANTS) * len(GOALS) and q[K.METHOD].isna().all()

    head, constant = headline_table(table, K.P_MSE)
    assert list(head.columns) == ["trials", f"{K.Q_NMSE} (agent, any method)", "pinv",
                                  "known_support (oracle)", "final checkpoint"]
    assert head.index.names == [K.VARIANT, K.NUM_GOALS] and K.ENV in constant
    expected = np.mean([p_mse_of("windy", 4, s, NUM_CKPT - 1, "pinv") for s in SEEDS])
    assert head.loc[("windy", 4), "pinv"]["iqm"] == pytest.approx(expected)
    assert head.loc[("deterministic", 4), "pinv"]["n_failed"] == 1
    assert head.loc[("deterministic", 1), "final checkpoint"].startswith("⚠")

    page = write_report(exp, tmp_path / "report").read_text()
    headline, rest = page.split("<h2 id='all'>", 1)
    assert "1 of 2 failed" in headline and "known_support (oracle)" in headline
    assert "Cells not compared at one checkpoint" in headline and "variant = deterministic, num_goals = 1" in headline
    assert "<details><summary>p_mse</summary>" in rest and "<details>" not in headline.split("<h2 id='figures'>")[0]
    assert "fewer than 4 trials" in headline
    assert headline.index("Headline numbers") < headline.index("data:image/png")


def test_headline_metrics_of_a_continuous_sweep():
    # Catches a headline that knows only the finite p_mse (a continuous report would open
    # with no table) or that lists every metric (no longer a headline).
    from qworld_analysis.report import headline_metrics, headline_table, summary_table

    rows = []
    for seed in range(5):
        for method in ("successor", "gaussian"):
            rows.append({K.TRIAL_ID: f"t{seed}", K.CHECKPOINT_INDEX: 3, K.ENV: "MountainCar",
                         K.HEAD: "goal_input", K.METHOD: method, K.ERROR: None,
                         K.WM_NMSE: 0.1 * (seed + 1) * (2 if method == "gaussian" else 1),
                         K.Q_NMSE: 0.01 * seed, K.P_TV: np.nan,
                         f"hill/{K.RETURN_RATIO}": np.nan if seed == 0 else 0.9,
                         f"hill/{K.PLAN_EXCESS_STEPS}": 2.0})
    table = summary_table(pd.DataFrame(rows), reps=200)
    assert headline_metrics(table) == [K.WM_NMSE, f"hill/{K.RETURN_RATIO}"]
    ratio = table[table["metric"] == f"hill/{K.RETURN_RATIO}"]
    assert (ratio["n"] == 4).all() and (ratio["n_failed"] == 1).all()  # R* <= 0 in trial 0
    assert ratio["ci_low"].notna().all()  # 4 trials: an interval
    head, _ = headline_table(table, K.WM_NMSE)
    assert list(head.columns) == ["trials", f"{K.Q_NMSE} (agent, any method)", "gaussian", "successor"]
    assert head.iloc[0]["trials"] == 5
    assert head.iloc[0]["successor"]["iqm"] == pytest.approx(iqm([0.1 * (s + 1) for s in range(5)]))


def test_goal_inference_and_policy_success_reach_the_headline():
    # Catches a summary that keeps only the world-model and planning columns: the reward side's
    # accuracy and the agent's own policy success would be computed and never shown.
    from qworld_analysis.report import headline_metrics, headline_table, summary_table

    rows = [{K.TRIAL_ID: f"t{seed}", K.CHECKPOINT_INDEX: 2, K.ENV: "FourRooms", K.HEAD: "all_goals",
             K.METHOD: method, K.ERROR: None, K.P_MSE: 1e-3, K.Q_NMSE: 0.01, K.POLICY_SUCCESS: 0.5 + 0.1 * seed,
             f"{K.GOAL_INFERENCE}/{K.ACCURACY}": 1.0 if method == "moves" else 0.0}
            for seed in range(3) for method in ("moves", "pinv")]
    table = summary_table(pd.DataFrame(rows), reps=100)
    assert f"{K.GOAL_INFERENCE}/{K.ACCURACY}" in headline_metrics(table)
    head, _ = headline_table(table, f"{K.GOAL_INFERENCE}/{K.ACCURACY}")
    assert head.iloc[0]["moves"]["iqm"] == 1.0 and head.iloc[0]["pinv"]["iqm"] == 0.0
    head, _ = headline_table(table, K.P_MSE)
    assert head.iloc[0][f"{K.POLICY_SUCCESS} (agent, any method)"]["iqm"] == pytest.approx(0.6)


def test_report_on_a_sweep_with_nothing_scored(tmp_path):
    exp = make_experiment(tmp_path / "early")
    for f in store.store_path(exp).glob("*.parquet"):
        f.unlink()
    page = write_report(exp).read_text()
    assert (exp / "report" / "summary.csv").is_file()
    assert "No scored checkpoint yet" in page and "Skipped figures" in page and "no data yet" in page
    assert page.count("data:image/png;base64") == 1  # the training curves still render


def test_status_keeps_cells_apart_that_differ_in_an_agent_keyword_axis(tmp_path):
    # Catches `qworld status` merging a gamma: [0.9, 0.99] sweep into one cell with "seeds 2"
    # (the store's rows carry the grid columns, not the agent keywords).
    from qworld.sweep.status import status_table

    exp = make_experiment(tmp_path / "gammas")
    spec = (exp / "sweep.yaml").read_text().replace("sweep:\n", "sweep:\n  gamma: [0.9, 0.99]\n")
    (exp / "sweep.yaml").write_text(spec)
    for params_file in exp.glob("*/params.json"):
        params = json.loads(params_file.read_text())
        params["gamma"] = 0.9 if params["seed"] == SEEDS[0] else 0.99
        params_file.write_text(json.dumps(params))
    header, *cells = status_table(exp).splitlines()[2:]
    assert header.split()[1:7] == ["variant", "goal_type", "num_goals", "head", "gamma", "p_mse[column_match]"]
    assert len(cells) == len(VARIANTS) * len(GOALS) * 2  # each cell once per gamma
    assert [int(line.split()[-3]) for line in cells] == [1] * len(cells)  # seeds: one trial each


def test_compare_side_by_side(experiment, tmp_path):
    other = make_experiment(tmp_path / "goal_input", head="goal_input", scale=2.0)
    table = compare(experiment, other)
    assert K.HEAD not in table.columns  # the head is what differs: not a join key
    assert len(table) == len(VARIANTS) * len(GOALS) * len(METHODS)
    assert {"n_a", "n_failed_a", "iqm_a", "ci_low_a", "ci_high_a", "n_b", "iqm_b", "ratio"} <= set(table.columns)
    nonzero = table[table["iqm_a"] > 0]
    np.testing.assert_allclose(nonzero["ratio"].to_numpy(float), 2.0)
    assert table.attrs["a"][K.HEAD] == "all_goals" and table.attrs["b"][K.HEAD] == "goal_input"


def test_cli_commands(experiment, tmp_path, capsys, monkeypatch):
    import qworld_analysis.report
    from qworld.cli.analysis import add_commands

    calls = []  # the report itself is tested above: here only the wiring

    def fake_report(experiment_dir, out_dir=None):
        calls.append((str(experiment_dir), out_dir))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "index.html").write_text("<html></html>")
        return Path(out_dir) / "index.html"

    monkeypatch.setattr(qworld_analysis.report, "write_report", fake_report)

    parser = argparse.ArgumentParser(prog="qworld")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", str(experiment), str(experiment)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "ratio" in out and "column_match" in out and "head all_goals" in out
    args = parser.parse_args(["report", str(experiment), "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert calls == [(str(experiment), str(tmp_path / "r"))]
    assert "index.html" in capsys.readouterr().out
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.func(args) == 2
    # a folder that is no experiment (e.g. the one above it): refused, and nothing written into it
    (tmp_path / "plain").mkdir()
    for argv in (["report", str(tmp_path / "plain")], ["compare", str(experiment), str(tmp_path / "plain")]):
        args = parser.parse_args(argv)
        assert args.func(args) == 2
        assert "not a qworld experiment dir" in capsys.readouterr().err
    assert not any((tmp_path / "plain").iterdir()) and len(calls) == 1


# --------------------------------------------------------------------------------------
# a REAL smoke sweep (Ray, PQN, P-learning actor)


@pytest.fixture(scope="module")
def smoke_sweep(smoke_experiment) -> Path:
    """conftest's session smoke sweep, read only."""
    return smoke_experiment.path


@pytest.mark.ray
def test_load_real_smoke_sweep(smoke_sweep, tmp_path):
    import yaml
    from qworld_envs import four_rooms

    spec = yaml.safe_load((smoke_sweep / "sweep.yaml").read_text())  # the file as run, with --set
    cells = math.prod(len(v) for v in spec["sweep"].values())
    methods = spec["extract"]["methods"]
    iterations = spec["stop"]["env_steps"] // (spec["agent"]["num_envs"] * spec["agent"]["rollout_length"])
    every = spec["checkpoint"]["every"]
    checkpoints = iterations // every + (1 if spec["checkpoint"]["at_end"] and iterations % every else 0)

    df = load(smoke_sweep)
    assert len(df) == cells * checkpoints * len(methods)
    assert len(load_trials(smoke_sweep)) == cells
    assert set(df[K.METHOD]) == set(methods)
    assert set(df[K.VARIANT]) == set(spec["sweep"]["variant"])
    assert (df[K.NUM_GOALS] == spec["goals"]["num_goals"]).all() and str(df[K.NUM_GOALS].dtype) == "Int64"
    assert df[K.P_MSE].notna().all() and df[K.P_MSE].dtype == np.float64
    # the supervised model is built from each trial's own log: its unvisited share only falls
    sup = df[df[K.METHOD] == "supervised"].sort_values(K.CHECKPOINT_INDEX)
    assert sup[K.ERROR].isna().all() and sup[K.UNVISITED_FRACTION].between(0, 1).all()
    assert (sup.groupby(K.TRIAL_ID)[K.UNVISITED_FRACTION].diff().dropna() <= 0).all()
    # each checkpoint joined to the training iteration that saved it
    assert (df["training_iteration"] == (df[K.CHECKPOINT_INDEX] + 1) * every).all()
    assert (df[K.ENV_STEPS] == df[K.TRAIN_ENV_STEPS]).all() and df[K.TRAIN_LOSS].notna().all()
    assert len(load_training_curves(smoke_sweep)) == cells * iterations
    # the P-learning actor stored every extracted model under its rows' key
    assert store.world_model_keys(smoke_sweep) == store.scored_keys(smoke_sweep)
    for _, row in df.groupby(K.METHOD).tail(1).iterrows():
        P_hat = load_world_model(smoke_sweep, row[K.TRIAL_ID], int(row[K.CHECKPOINT_INDEX]), row[K.METHOD])
        P = four_rooms(row[K.VARIANT]).P
        # the row scored the float64 model, the store keeps it in float32 (tolerances.float32_mse_atol)
        assert row[K.P_MSE] == pytest.approx(np.mean((P_hat - P) ** 2), rel=0, abs=float32_mse_atol(P_hat, P))
    page = write_report(smoke_sweep, tmp_path / "report").read_text()
    assert page.count("data:image/png;base64") >= 4 + len(spec["sweep"]["variant"])  # + route figures
    assert "safety_routes_windy.png" in page


def test_identifiability_table_names_each_cells_case_and_reason():
    from qworld_analysis.report import identifiability_table

    rows = []
    for trial, (L, case, why) in enumerate([(1, "not identifiable", "rank M = 1 < S = 68"),
                                            (68, "stochastic", "rank M = S = 68")]):
        for ckpt in (0, 1):
            for method in ("moves", "pinv"):
                rows.append({K.TRIAL_ID: f"t{trial}", K.CHECKPOINT_INDEX: ckpt, K.METHOD: method,
                             K.ENV: "qworld/FourRooms-v0", K.VARIANT: "windy", K.GOAL_TYPE: "indicator",
                             K.NUM_GOALS: L, K.HEAD: "all_goals", K.SEED: 0, K.P_MSE: 0.1,
                             K.IDENTIFIABLE_CASE: case if ckpt == 1 else "stale",
                             K.IDENTIFIABLE_REASON: why if ckpt == 1 else "stale"})
    table = identifiability_table(pd.DataFrame(rows))
    assert table[K.NUM_GOALS].tolist() == [1, 68]
    assert table[K.IDENTIFIABLE_CASE].tolist() == ["not identifiable", "stochastic"]  # the last checkpoint's
    assert table[K.IDENTIFIABLE_REASON].tolist() == ["rank M = 1 < S = 68", "rank M = S = 68"]
    assert identifiability_table(pd.DataFrame(rows).drop(columns=[K.IDENTIFIABLE_CASE])).empty
