"""Rewards and goals from learned Q (issue 15, items 1-2 on learned agents; no IQ-Learn yet).

    .venv/bin/python benchmarks/reward_recovery.py results/explicit_fourrooms [--method moves]

For each trial's last checkpoint of a finished FourRooms sweep: the rewards recovered from the
agent's Q with the true P (``qworld.reward.recover_rewards``, greedy V) scored per goal against
the true expected rewards (Pearson, NMSE), and held-out goal inference (each goal named from its
own Q and a P_hat extracted from the other goals' Q by ``--method``). Prints median [min, max]
over trials per grid cell.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

import qworld_analysis as qa
from qworld import metrics as K
from qworld.agents import load_q
from qworld.plearn.finite import method_options
from qworld.bellman import m_matrix
from qworld.reward import expected_rewards, goal_inference_scores, held_out_models, recover_rewards, reward_scores
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
        scores = reward_scores(recover_rewards(Q, P, gamma, goals.terminal), expected_rewards(P, goals.rewards))
        row = {K.TRIAL_ID: trial_id, K.VARIANT: cfg["env_kwargs"].get(K.VARIANT), K.GOAL_TYPE: cfg.get(K.GOAL_TYPE),
               K.NUM_GOALS: goals.num_goals, "reward_pearson": np.nanmedian(scores["reward_pearson"]),
               "reward_nmse": np.nanmedian(scores["reward_nmse"])}
        if goals.num_goals >= 2 and goals.goal_states is not None:
            M = m_matrix(goals.rewards, Q.max(-1), gamma, goals.terminal)
            models = held_out_models(Q, M, args.method, method_options(args.method, P, problem.mdp.coords))
            row["goal_inference_accuracy"] = goal_inference_scores(Q, goals.goal_states, gamma, models)["accuracy"]
        rows.append(row)
    out = pd.DataFrame(rows)
    cols = [c for c in ("reward_pearson", "reward_nmse", "goal_inference_accuracy") if c in out]

    def med_range(v: pd.Series) -> str:
        v = v.dropna()
        return "-" if v.empty else f"{v.median():.5g} [{v.min():.5g}, {v.max():.5g}] n={len(v)}"

    table = out.groupby([K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS], dropna=False)[cols].agg(med_range)
    print(table.to_string())


if __name__ == "__main__":
    main()
