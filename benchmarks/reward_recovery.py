"""Rewards and goals from learned Q (issue 15), from any finite sweep's last checkpoints.

    .venv/bin/python benchmarks/reward_recovery.py results/goal_inference_fourrooms [--method moves]
    .venv/bin/python benchmarks/reward_recovery.py results/iqlearn_fourrooms

For each trial's last checkpoint: the rewards recovered from the agent's Q with the *true* P
(``qworld.worldmodel.reward.recover_rewards``; greedy V, or the soft V of a soft learner such as IQ-Learn)
scored per goal against the true expected rewards over every (s, a) (Pearson, NMSE), and
held-out goal inference (each goal named from its own Q and a P_hat extracted from the other
goals' Q by ``--method``). With the rows the sweep scored beside them (worldmodels.parquet):
the imitation learner's ``demonstrations/reward_pearson`` and its own policy's success against
the optimal one's. Prints median [min, max] over trials per grid cell.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

import qworld_analysis as qa
from qworld import metrics as K
from qworld.agents import load_q
from qworld.worldmodel.plearn.finite import method_options
from qworld.worldmodel.bellman import m_matrix
from qworld.layout import VALUE_TEMPERATURE
from qworld.worldmodel.reward import (expected_rewards, goal_inference_scores, held_out_models, recover_rewards,
                                     reward_scores, state_values)
from qworld_envs import make_finite_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--method", default="moves")
    args = parser.parse_args()
    df = qa.final_checkpoints(qa.load(args.experiment, resolve_num_goals=True))
    rows = []
    for (trial_id, path), _ in df.groupby([K.TRIAL_ID, K.CHECKPOINT_PATH]):
        qfun = load_q(path)
        cfg = qfun.config
        problem = make_finite_problem(cfg["env_id"], **cfg["env_kwargs"])
        P, goals, gamma = problem.mdp.P, problem.goals, float(cfg["gamma"])
        Q = qfun.q_table()
        temperature = cfg.get(VALUE_TEMPERATURE)
        kind = "soft" if temperature else "greedy"
        r_hat = recover_rewards(Q, P, gamma, goals.terminal, kind=kind, alpha=float(temperature or 1.0))
        scores = reward_scores(r_hat, expected_rewards(P, goals.rewards))
        row = {K.TRIAL_ID: trial_id, K.VARIANT: cfg["env_kwargs"].get(K.VARIANT), K.GOAL_TYPE: cfg.get(K.GOAL_TYPE),
               K.NUM_GOALS: goals.num_goals, "reward_pearson": np.nanmedian(scores["reward_pearson"]),
               "reward_nmse": np.nanmedian(scores["reward_nmse"])}
        if goals.num_goals >= 2 and goals.goal_states is not None:
            M = m_matrix(goals.rewards, state_values(Q, kind, float(temperature or 1.0)), gamma, goals.terminal)
            models = held_out_models(Q, M, args.method, method_options(args.method, P, problem.mdp.coords))
            row["goal_inference_accuracy"] = goal_inference_scores(Q, goals.goal_states, gamma, models)["accuracy"]
        scored = df[(df[K.TRIAL_ID] == trial_id) & (df[K.CHECKPOINT_PATH] == path)].iloc[0]
        for col in (f"{K.DEMONSTRATIONS}/{K.REWARD_PEARSON}", K.POLICY_SUCCESS, f"{K.STAR}/{K.POLICY_SUCCESS}"):
            if col in scored.index:
                row[col] = scored[col]
        rows.append(row)
    out = pd.DataFrame(rows)
    cols = [c for c in ("reward_pearson", "reward_nmse", "goal_inference_accuracy", f"{K.DEMONSTRATIONS}/{K.REWARD_PEARSON}",
                        K.POLICY_SUCCESS, f"{K.STAR}/{K.POLICY_SUCCESS}") if c in out]

    def med_range(v: pd.Series) -> str:
        v = v.dropna()
        return "-" if v.empty else f"{v.median():.5g} [{v.min():.5g}, {v.max():.5g}] n={len(v)}"

    table = out.groupby([K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS], dropna=False)[cols].agg(med_range)
    print(table.to_string())


if __name__ == "__main__":
    main()
