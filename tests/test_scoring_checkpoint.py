"""Scoring a checkpoint (``qworld.sweep.score``) on stand-in agents whose Q is known: exact Q
must give exact numbers, a diverged Q error rows, and the status table only cells that ran.

No Ray: ``load_q`` is replaced by an agent built from the true solution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qworld.agents
from qworld import metrics as K
from qworld.worldmodel.bellman import solve_goal_q
from qworld.sweep import store
from qworld.sweep.score import score_checkpoint, score_q
from qworld_envs import FOUR_ROOMS_ID, MOUNTAIN_CAR_ID, make_continuous_problem, make_finite_problem

torch.set_num_threads(1)


class TableAgent:
    """A finite checkpoint's agent: ``q_table()`` is whatever the test hands it."""

    def __init__(self, Q: np.ndarray, env_kwargs: dict, gamma: float):
        self.Q = Q
        self.config = {"env_id": FOUR_ROOMS_ID, "env_kwargs": env_kwargs, "gamma": gamma,
                       "head": "all_goals", "seed": 0}

    def q_table(self) -> np.ndarray:
        return self.Q


def finite_agent(variant: str, num_goals: int, gamma: float = 0.9, corrupt=None) -> TableAgent:
    env_kwargs = {"variant": variant, "goal_type": "indicator", "num_goals": num_goals, "goal_seed": 0}
    problem = make_finite_problem(FOUR_ROOMS_ID, **env_kwargs)
    Q, _ = solve_goal_q(problem.mdp.P, problem.goals.rewards, gamma, problem.goals.terminal)
    return TableAgent(corrupt(Q) if corrupt else Q, env_kwargs, gamma), problem


def test_exact_q_with_every_goal_recovers_windy_p(monkeypatch, tmp_path):
    """L = S indicator goals and exact Q: pinv recovers P to 1e-8 and q_nmse is ~0. Catches a
    scorer that compares P_hat with another P, or Q with another Q (the sweep test's
    ``p_mse < 1`` holds for any row-stochastic P_hat)."""
    agent, problem = finite_agent("windy", 68)
    monkeypatch.setattr(qworld.agents, "load_q", lambda path: agent)
    rows = score_checkpoint(tmp_path / "checkpoint_000002", sweep="s", trial_id="t", methods=["pinv"],
                            tasks=["corner_9_9_doorway"])
    [row] = rows
    assert row[K.ERROR] is None
    assert row[K.P_MAX_ERR] < 1e-8 and row[K.P_MSE] < 1e-16
    assert row[K.Q_NMSE] < 1e-20
    assert row[K.IDENTIFIABLE_CASE] == "stochastic" and row[K.M_RANK] == problem.mdp.num_states
    assert row[f"corner_9_9_doorway/{K.PLAN_SUCCESS}"] == pytest.approx(1.0)
    assert row[f"corner_9_9_doorway/{K.PLAN_EXCESS_STEPS}"] == pytest.approx(0.0, abs=1e-9)
    # and the same scorer sees a wrong Q: half the Q-values off by 10% is no longer ~0
    noisy, _ = finite_agent("windy", 68, corrupt=lambda Q: Q * np.where(np.arange(Q.size).reshape(Q.shape) % 2, 1.1, 1.0))
    assert score_q(noisy, {}, ["pinv"])[0][K.Q_NMSE] > 1e-4


def test_goal_inference_names_held_out_goals_from_exact_q_and_fails_with_a_wrong_q():
    """``extract.tasks: [goal_inference]`` on exact windy Q of 5 goals: every goal's cell named
    from a model extracted without it, rewards recovered to Pearson ~1; the safety task's
    columns beside it are unchanged. Q of shuffled goals names wrong cells."""
    agent, _ = finite_agent("windy", 5, gamma=0.99)
    rows = score_q(agent, {}, ["moves", "pinv"], ["corner_9_9_doorway", K.GOAL_INFERENCE])
    moves, pinv = rows
    assert moves[K.ERROR] is None and pinv[K.ERROR] is None
    assert moves[f"{K.GOAL_INFERENCE}/{K.ACCURACY}"] == 1.0 and moves[f"{K.GOAL_INFERENCE}/{K.HELD_OUT}"] == 5
    assert moves[f"{K.GOAL_INFERENCE}/{K.REWARD_PEARSON}"] > 0.99
    assert moves[f"corner_9_9_doorway/{K.PLAN_SUCCESS}"] == pytest.approx(1.0)
    # the agent is the optimum: its policy succeeds as the optimal one does (windy: nearly always)
    assert moves[K.POLICY_SUCCESS] == pytest.approx(moves[f"{K.STAR}/{K.POLICY_SUCCESS}"])
    assert moves[K.POLICY_SUCCESS] > 0.9
    # each method names the goals from its own model: pinv's, from the 4 goals left in (M of
    # rank 4 against 68 states, P not identified), names none of them (measured 0 of 5; at
    # most one by a round-off tie), where moves' names all 5
    assert pinv[f"{K.GOAL_INFERENCE}/{K.ACCURACY}"] <= 0.2 and pinv[f"{K.GOAL_INFERENCE}/{K.HELD_OUT}"] == 5
    assert K.is_row_metric(f"{K.GOAL_INFERENCE}/{K.ACCURACY}")
    wrong, _ = finite_agent("windy", 5, gamma=0.99, corrupt=lambda Q: Q[[1, 2, 3, 4, 0]])
    [row] = score_q(wrong, {}, ["moves"], [K.GOAL_INFERENCE])
    assert row[f"{K.GOAL_INFERENCE}/{K.ACCURACY}"] < 0.5
    assert row[K.POLICY_SUCCESS] < 0.5 < row[f"{K.STAR}/{K.POLICY_SUCCESS}"]  # each goal chases another's cell


def test_a_diverged_agent_gives_error_rows_not_an_exception(monkeypatch, tmp_path):
    """A NaN Q (diverged training) broke ``diagnose`` outside the per-method try and stopped
    the sweep; now every method's row carries the error and nothing is kept of the models."""
    agent, _ = finite_agent("deterministic", 4, corrupt=lambda Q: np.full_like(Q, np.nan))
    monkeypatch.setattr(qworld.agents, "load_q", lambda path: agent)
    models: dict = {}
    rows = score_checkpoint(tmp_path / "checkpoint_000005", sweep="s", trial_id="t",
                            methods=["pinv", "column_match", "known_support"], world_models=models)
    assert [r[K.METHOD] for r in rows] == ["pinv", "column_match", "known_support"]
    assert all(r[K.ERROR] for r in rows) and models == {}
    assert [r[K.ORACLE] for r in rows] == [False, False, True]
    assert all(r[K.CHECKPOINT_INDEX] == 5 and r[K.VARIANT] == "deterministic" for r in rows)


def test_status_lists_only_the_cells_that_ran(tmp_path):
    """A ``cases`` sweep (windy L=3, teleport L=20) must not print windy L=20 or teleport L=3."""
    from qworld.sweep.status import status_table

    for trial, (variant, L) in enumerate([("windy", 3), ("teleport", 20)]):
        rows = []
        for method in ("moves", "pinv"):
            rows.append({K.SWEEP: "s", K.TRIAL_ID: f"t{trial}", K.ENV: FOUR_ROOMS_ID, K.VARIANT: variant,
                         K.GOAL_TYPE: "indicator", K.NUM_GOALS: L, K.HEAD: "all_goals", K.SEED: 0,
                         K.CHECKPOINT_INDEX: 1, K.ENV_STEPS: 100, K.METHOD: method, K.ERROR: None,
                         K.P_MSE: 1e-3 * (trial + 1), K.Q_NMSE: 1e-2})
        store.write_rows(tmp_path, rows)
    lines = status_table(tmp_path).splitlines()
    cells = [ln for ln in lines if FOUR_ROOMS_ID in ln]
    assert len(cells) == 2, lines
    assert any("windy" in ln and " 3 " in ln for ln in cells) and any("teleport" in ln and " 20 " in ln for ln in cells)
    assert not any("NaN" in ln for ln in lines), lines


class GridAgentModule(nn.Module):
    """A continuous agent whose Q is the exact grid Q* of MountainCar (observations are the
    env's scaled states, mapped back)."""

    def __init__(self, grid_q, num_goals: int, num_actions: int):
        super().__init__()
        self.grid_q, self.num_goals, self.num_actions, self.obs_dim = grid_q, num_goals, num_actions, 2
        self.anchor = nn.Parameter(torch.zeros(()))  # the adapter reads the module's device here

    def _states(self, obs):
        return torch.stack([obs[:, 0].double() * 0.9 - 0.3, obs[:, 1].double() * 0.07], -1)

    def q_all_goals(self, obs):
        s = self._states(obs)
        return torch.stack([self.grid_q(s, torch.full((len(s),), g)) for g in range(self.num_goals)], 1).float()

    def q_goals(self, obs, goal):
        return self.grid_q(self._states(obs), goal).float()


def test_continuous_q_nmse_of_the_exact_grid_q_is_near_zero():
    """The agent's Q against the exact Q of its own greedy policy, on the same grid: ~0 for Q*,
    and large for a Q whose goals are shuffled (catches a q_nmse that only checks finiteness)."""
    from qworld.worldmodel.bellman_grid import GridQ, grid_q_for_problem

    problem = make_continuous_problem(MOUNTAIN_CAR_ID, num_goals=3)
    shape, gamma = (60, 60), 0.99
    Q, grid = grid_q_for_problem(problem, shape, gamma)

    def agent(q_values):
        module = GridAgentModule(GridQ(q_values, grid), problem.goals.num_goals, problem.dynamics.num_actions)
        return type("Agent", (), {"module": module, "config": {"env_id": MOUNTAIN_CAR_ID, "gamma": gamma,
                                                               "env_kwargs": dict(problem.env_kwargs)}})()

    options = {K.Q_NMSE: {"grid_shape": list(shape)}}
    exact = score_q(agent(Q), {}, ["successor"], options={**options, "successor": {"steps": 1}})
    assert exact[0][K.Q_NMSE] < 1e-3, exact[0][K.Q_NMSE]
    shuffled = score_q(agent(Q[[1, 2, 0]]), {}, ["successor"], options={**options, "successor": {"steps": 1}})
    assert shuffled[0][K.Q_NMSE] > 0.1, shuffled[0][K.Q_NMSE]
