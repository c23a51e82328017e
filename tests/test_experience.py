"""The trial's experience log and the world models learned directly from it (``qworld.worldmodel.experience``),
and the ``supervised`` method as the P-learning actor scores it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qworld import metrics as K
from qworld.worldmodel.bellman import solve_goal_q
from qworld.worldmodel.experience import ExperienceLog, fit_supervised, load_experience, rare_state_mask, supervised_p
from qworld.worldmodel.scoring_continuous import score_world_model
from qworld.sweep.score import score_q
from qworld_envs import FOUR_ROOMS_ID, MOUNTAIN_CAR_ID, make_continuous_problem, make_finite_problem

torch.set_num_threads(1)


def exhaustive_counts(P: np.ndarray, n: int) -> np.ndarray:
    """A transition log with every (s, a) tried n times, its successors in exact proportion."""
    counts = np.rint(P * n).astype(np.int64)
    assert np.array_equal(counts, P * n), "P must be a multiple of 1/n"
    return counts


def test_supervised_recovers_p_exactly_from_an_exhaustive_log():
    """On a random stochastic MDP (probabilities in eighths) and on windy FourRooms (its
    wind and slip probabilities are exact in a log of 40 tries per pair)."""
    rng = np.random.default_rng(0)
    S, A = 7, 3
    P = rng.multinomial(8, np.ones(S) / S, size=(S, A)) / 8.0
    log = ExperienceLog(A, num_states=S)
    counts = exhaustive_counts(P, 8)
    s, a, s2 = np.nonzero(counts)
    reps = counts[s, a, s2]
    log.add(np.repeat(s, reps), np.repeat(a, reps), np.repeat(s2, reps))
    P_hat, unvisited = supervised_p(log.counts)
    assert np.array_equal(P_hat, P) and not unvisited.any()
    assert log.num_transitions == 8 * S * A

    windy = make_finite_problem(FOUR_ROOMS_ID, variant="windy").mdp.P
    n = 40
    P_hat, unvisited = supervised_p(exhaustive_counts(windy, n))
    assert np.abs(P_hat - windy).max() < 1e-15 and not unvisited.any()


def test_unvisited_rows_are_uniform_and_reported():
    counts = np.zeros((3, 2, 3), np.int64)
    counts[0, 0, 1] = 4
    P_hat, unvisited = supervised_p(counts)
    assert unvisited.sum() == 5 and not unvisited[0, 0]
    assert np.allclose(P_hat[1, 1], 1 / 3) and P_hat[0, 0, 1] == 1.0
    with pytest.raises(ValueError, match="counts"):
        supervised_p(-counts)


def test_reservoir_keeps_a_uniform_sample_of_everything_added():
    """Items 0..N-1 added in uneven batches: each is kept with probability C / N. A log that
    kept the first (or last) C would put the mean index near C/2 (or N - C/2)."""
    N, C = 5000, 200
    means, first_half = [], []
    for seed in range(30):
        log = ExperienceLog(2, state_dim=1, capacity=C, seed=seed)
        start = 0
        for size in [7, 150, 3, 1000, 840, 3000]:
            idx = np.arange(start, start + size, dtype=np.float32)
            log.add(idx[:, None], np.zeros(size, int), idx[:, None] + 1)
            start += size
        assert log.num_transitions == N and log.states.shape == (C, 1)
        assert np.array_equal(log.next_states, log.states + 1)  # rows stay paired
        assert len(np.unique(log.states)) == C
        means.append(log.states.mean())
        first_half.append((log.states < N / 2).mean())
    assert abs(np.mean(means) - (N - 1) / 2) < 0.03 * N
    assert abs(np.mean(first_half) - 0.5) < 0.03


def test_saved_log_loads_back(tmp_path):
    fin = ExperienceLog(4, num_states=5, seed=3)
    fin.add(np.array([0, 1, 1]), np.array([2, 3, 3]), np.array([4, 0, 0]))
    fin.save(tmp_path)
    back = load_experience(tmp_path)
    assert back.finite and np.array_equal(back.counts, fin.counts) and back.num_transitions == 3
    cont = ExperienceLog(3, state_dim=2, capacity=4)
    cont.add(torch.randn(10, 2), torch.randint(3, (10,)), torch.randn(10, 2))
    (tmp_path / "c").mkdir()
    cont.save(tmp_path / "c")
    back = load_experience(tmp_path / "c")
    assert np.array_equal(back.states, cont.states) and np.array_equal(back.actions, cont.actions)
    assert back.num_transitions == 10 and back.capacity == 4
    assert load_experience(tmp_path / "nothing") is None


def mountain_car_transitions(problem, n: int, seed: int = 0):
    dyn = problem.dynamics
    gen = torch.Generator().manual_seed(seed)
    s = dyn.uniform_states(n, gen)
    a = torch.randint(dyn.num_actions, (n,), generator=gen)
    from qworld.worldmodel.scoring_continuous import true_mean_fn

    return s, a, true_mean_fn(dyn)(s, a)


def test_fit_supervised_learns_mountain_car_from_its_transitions():
    """The successor network regressed on 20k true transitions beats the identity model by a
    wide margin on fresh states (and the rare/ split is reported when asked)."""
    problem = make_continuous_problem(MOUNTAIN_CAR_ID)
    s, a, s2 = mountain_car_transitions(problem, 20_000)
    from qworld.worldmodel.plearn.continuous import PLearnConfig

    fit = fit_supervised(problem, s, a, s2, PLearnConfig(steps=1000, batch_size=512, lr=3e-3, hidden=64))
    dyn = problem.dynamics
    seen = s[s[:, 0] < 0]  # the agent "never went right of p = 0"

    scores = score_world_model(fit.step_fn(), problem, seed=1, interior=True,
                               rare=lambda x: rare_state_mask(x, seen, dyn.low, dyn.high))
    # L1 (the default, as P-learning's) fits the interior and leaves the walls' jumps alone
    assert scores[f"{K.INTERIOR}/{K.WM_DELTA_NMSE}_v"] < 0.01
    assert scores[f"{K.INTERIOR}/{K.WM_NMSE}"] < 0.1 * scores[f"{K.INTERIOR}/{K.BASELINE_IDENTITY}/{K.WM_NMSE}"]
    assert 0.2 < scores[f"{K.RARE}/{K.FRACTION}"] < 0.34  # p > 0.09: a third of the box less the radius
    assert f"{K.RARE}/{K.WM_NMSE}" in scores


class TableAgent:
    def __init__(self, Q, env_kwargs, gamma):
        self.Q = Q
        self.config = {"env_id": FOUR_ROOMS_ID, "env_kwargs": env_kwargs, "gamma": gamma, "head": "all_goals"}

    def q_table(self):
        return self.Q


def test_supervised_rows_sit_beside_extracted_ones_with_rare_scores():
    """score_q with a trial's log: the supervised row is exact where the log is exhaustive,
    wrong (uniform) where it is empty, and every row carries the rare/ split."""
    env_kwargs = {"variant": "deterministic", "num_goals": 68, "goal_seed": 0}
    problem = make_finite_problem(FOUR_ROOMS_ID, **env_kwargs)
    P = problem.mdp.P
    Q, _ = solve_goal_q(P, problem.goals.rewards, 0.9, problem.goals.terminal)
    S, A, _ = P.shape
    log = ExperienceLog(A, num_states=S)
    s, a = np.meshgrid(np.arange(S), np.arange(A), indexing="ij")
    tried = s.reshape(-1) >= 10  # the agent never acted in states 0..9
    s, a = s.reshape(-1)[tried], a.reshape(-1)[tried]
    log.add(np.repeat(s, 5), np.repeat(a, 5), np.repeat(P[s, a].argmax(-1), 5))
    rows = score_q(TableAgent(Q, env_kwargs, 0.9), {}, ["pinv", "supervised"], experience=log)
    by = {r[K.METHOD]: r for r in rows}
    assert all(r[K.ERROR] is None for r in rows), [r[K.ERROR] for r in rows]
    sup = by["supervised"]
    assert sup[K.UNVISITED_FRACTION] == pytest.approx(10 / S)
    assert sup[f"{K.RARE}/{K.FRACTION}"] == pytest.approx(10 / S)
    assert sup[f"{K.RARE}/{K.P_TV}"] > 0.5  # uniform rows where nothing was seen
    assert sup[K.P_MSE] == pytest.approx(sup[f"{K.RARE}/{K.P_MSE}"] * 10 / S)  # exact elsewhere
    assert by["pinv"][f"{K.RARE}/{K.P_MSE}"] < 1e-3 * sup[f"{K.RARE}/{K.P_MSE}"]  # Q still knows there
    none = score_q(TableAgent(Q, env_kwargs, 0.9), {}, ["supervised"])[0]
    assert "experience" in none[K.ERROR]


def test_a_pqn_trial_records_its_experience_and_the_scorer_uses_it(ray_session, tmp_path):
    """PQN's fast runner counts every transition it samples (exactly env_steps of them, all
    in the true support), the checkpoint carries the log, a restored algorithm goes on from
    it, and score_checkpoint gives supervised and qss rows from it."""
    from helpers import TINY

    from qworld.agents.pqn import PQNConfig
    from qworld.sweep.score import score_checkpoint

    env_kwargs = {**TINY, "variant": "windy", "num_goals": 4}
    config = PQNConfig().training(env_id=FOUR_ROOMS_ID, env_kwargs=env_kwargs, num_envs=8, rollout_length=8,
                                  total_env_steps=2048, minibatch_size=32, hidden_sizes=[16])
    algo = config.build_algo()
    try:
        for _ in range(3):
            algo.train()
        path = tmp_path / "checkpoint_000001"
        algo.save_to_path(path)
        log = load_experience(path)
        assert log.num_transitions == log.counts.sum() == algo.env_steps_sampled() == 192
        P = make_finite_problem(FOUR_ROOMS_ID, **env_kwargs).mdp.P
        assert ((log.counts > 0) <= (P > 0)).all()
        again = config.build_algo()
        again.restore_from_path(path)
        again.train()
        assert again._experience.num_transitions == 256 and (again._experience.counts >= log.counts).all()
        again.stop()
    finally:
        algo.stop()
    import os

    from qworld.agents import load_q

    # a relative path loads too (RLlib hands it to pyarrow, which read it as a URI and failed)
    assert load_q(os.path.relpath(path)).num_goals == 4
    rows = score_checkpoint(path, sweep="s", trial_id="t", methods=["pinv", "supervised", "qss"],
                            env_steps=192)
    by = {r[K.METHOD]: r for r in rows}
    assert all(r[K.ERROR] is None for r in rows), [r[K.ERROR] for r in rows]
    visits = log.visits()
    assert by["supervised"][K.UNVISITED_FRACTION] == pytest.approx((visits == 0).mean())
    assert by["qss"][K.P_MSE] > 0 and not by["qss"][K.ORACLE] and not by["supervised"][K.ORACLE]
    assert by["pinv"][f"{K.RARE}/{K.FRACTION}"] == pytest.approx((visits < 5).mean())
