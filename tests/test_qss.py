"""Tabular QSS learned from transition counts (qworld.worldmodel.qss)."""

import numpy as np
import pytest

from qworld.worldmodel.bellman import solve_goal_q
from qworld.worldmodel.qss import (
    fit_qss,
    inverse_dynamics,
    neighbours,
    qss_policy,
    qss_values,
    qss_world_model,
)
from qworld_envs import dense_goals, four_rooms, indicator_goals, make_finite_problem

GAMMA = 0.95

OPEN_4X4 = """\
######
#....#
#....#
#....#
#....#
######
"""


def exhaustive_counts(P, times=1):
    """Every (s, a) seen ``times`` times, each time arriving in its (deterministic) successor."""
    assert np.all((P == 0) | (P == 1)), "exhaustive_counts is for deterministic P"
    return (P * times).astype(np.int64)


def one_hot(policy, A):
    return np.eye(A)[policy]


def deterministic_cases():
    fr = make_finite_problem("qworld/FourRooms-v0", variant="deterministic")
    grid = four_rooms("deterministic", layout=OPEN_4X4)
    rng = np.random.default_rng(0)
    rewards = rng.uniform(-1, 1, (5, grid.num_states))
    terminal = rng.random((5, grid.num_states)) < 0.2
    return {
        "fourrooms-indicator": (fr.mdp.P, fr.goals.rewards, fr.goals.terminal),
        "fourrooms-dense": (fr.mdp.P, *(lambda g: (g.rewards, g.terminal))(dense_goals(fr.mdp, 8, seed=1))),
        "grid4x4-mixed": (grid.P, rewards, terminal),
    }


CASES = deterministic_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_exhaustive_deterministic_qss_equals_optimal(case):
    P, rewards, terminal = CASES[case]
    S, A, _ = P.shape
    counts = exhaustive_counts(P)
    res = fit_qss(counts, rewards, terminal, GAMMA)
    Q_star, V_star = solve_goal_q(P, rewards, GAMMA, terminal)

    # Neighbours are exactly the true one-step successors; Q_ss is finite exactly there.
    true_nbr = P.sum(axis=1) > 0
    assert np.array_equal(res.neighbours, true_nbr)
    assert np.array_equal(np.isfinite(res.Q_ss), np.broadcast_to(true_nbr, res.Q_ss.shape))

    # QSS V = V* = max_a Q*, and per pair Q(s, s') = Q*(s, I(s, s')) (Theorem 2.2.1).
    assert np.abs(res.V - V_star).max() < 1e-8
    s_idx, t_idx = np.nonzero(true_nbr)
    assert np.abs(res.Q_ss[:, s_idx, t_idx] - Q_star[:, s_idx, res.inverse[s_idx, t_idx]]).max() < 1e-8

    # The greedy QSS policy is optimal: its exact value is V*.
    assert res.policy.shape == rewards.shape and res.policy.min() >= 0
    _, V_pi = solve_goal_q(P, rewards, GAMMA, terminal, policy=one_hot(res.policy, A))
    assert np.abs(V_pi - V_star).max() < 1e-8

    # The learned inverse dynamics reproduce P, and nothing was guessed.
    assert np.array_equal(res.P_hat, P)
    assert not res.unseen.any()
    # Shadowed = a move into a wall whose self-loop is credited to a lower wall-bump action.
    succ = P.argmax(-1)
    expected = np.array([[np.any(succ[s, :a] == succ[s, a]) for a in range(A)] for s in range(S)])
    assert np.array_equal(res.shadowed, expected)


def test_greedy_qss_policy_beats_a_wrong_inverse():
    """The policy check is not vacuous: a scrambled inverse model gives a worse policy."""
    P, rewards, terminal = CASES["fourrooms-indicator"]
    res = fit_qss(exhaustive_counts(P), rewards, terminal, GAMMA)
    wrong = np.where(res.inverse >= 0, (res.inverse + 1) % 4, -1)
    _, V_wrong = solve_goal_q(P, rewards, GAMMA, terminal, policy=one_hot(qss_policy(res.Q_ss, wrong), 4))
    _, V_star = solve_goal_q(P, rewards, GAMMA, terminal)
    assert (V_wrong < V_star - 1e-3).any()


def test_redundant_actions_fold_into_one_transition():
    """Duplicated actions (the paper's Sec. 3.3): same values, I names the lowest duplicate."""
    P, rewards, terminal = CASES["grid4x4-mixed"]
    P2 = np.concatenate([P, P], axis=1)  # actions 4..7 repeat 0..3
    res = fit_qss(exhaustive_counts(P2), rewards, terminal, GAMMA)
    _, V_star = solve_goal_q(P2, rewards, GAMMA, terminal)
    assert np.abs(res.V - V_star).max() < 1e-8
    assert res.policy.max() < 4
    assert np.array_equal(res.P_hat, P2)  # the shadowed duplicates fall back to their counts
    assert res.shadowed[:, 4:].all() and not res.unseen.any()


def test_inverse_dynamics_most_frequent_action_and_ties():
    counts = np.zeros((3, 3, 3), dtype=np.int64)
    counts[0, 0, 1], counts[0, 1, 1], counts[0, 2, 1] = 1, 3, 3  # tie 1 vs 2: lowest wins
    counts[0, 2, 2] = 5
    counts[1, 0, 0] = 2
    inv = inverse_dynamics(counts)
    assert inv[0, 1] == 1 and inv[0, 2] == 2 and inv[1, 0] == 0
    assert inv[0, 0] == -1 and (inv[2] == -1).all()
    assert np.array_equal(neighbours(counts), inv >= 0)

    P_hat, unseen, shadowed = qss_world_model(counts)
    # (0, 2): s'=2 is credited to action 2 (s'=1 went to action 1), so 0 --2--> 2.
    assert P_hat[0, 2, 2] == 1 and P_hat[0, 1, 1] == 1
    # (0, 0): seen only into s'=1, which I credits to action 1 -> shadowed, falls back to counts.
    assert shadowed[0, 0] and P_hat[0, 0, 1] == 1
    # Never-seen rows: self-loops, flagged.
    assert np.array_equal(unseen, counts.sum(-1) == 0)
    assert P_hat[2, 1, 2] == 1 and P_hat[1, 2, 1] == 1
    assert np.allclose(P_hat.sum(-1), 1)


def test_partial_counts_unseen_mask_and_finite_values():
    P, rewards, terminal = CASES["fourrooms-indicator"]
    S, A, _ = P.shape
    rng = np.random.default_rng(3)
    dropped = rng.random((S, A)) < 0.3
    dropped[5] = True  # one state never left: a dead end of the data
    counts = exhaustive_counts(P) * rng.integers(1, 5, (S, A, 1))
    counts[dropped] = 0
    res = fit_qss(counts, rewards, terminal, GAMMA)

    assert np.array_equal(res.unseen, dropped)
    seen = ~dropped
    assert np.array_equal(res.P_hat[seen], P[seen])
    assert np.array_equal(res.P_hat[dropped], np.eye(S)[np.nonzero(dropped)[0]])  # self-loop guesses

    nbr = res.neighbours
    assert np.array_equal(nbr, (counts.sum(1) > 0))
    assert np.isfinite(res.Q_ss[:, nbr]).all() and np.isneginf(res.Q_ss[:, ~nbr]).all()
    assert np.isfinite(res.V).all()
    # A sub-graph of the true one (rewards >= 0): QSS can only lose value, never invent it.
    _, V_star = solve_goal_q(P, rewards, GAMMA, terminal)
    assert (res.V <= V_star + 1e-12).all()
    assert (res.V < V_star - 1e-6).any()
    # Policy: -1 exactly at states without an observed successor, else an action seen there.
    dead = ~nbr.any(1)
    assert dead[5] and (res.policy[:, dead] == -1).all() and (res.policy[:, ~dead] >= 0).all()
    g, s = np.nonzero(res.policy >= 0)
    assert (counts[s, res.policy[g, s]].sum(-1) > 0).all()


def test_qss_values_from_neighbours_equals_from_counts():
    P, rewards, terminal = CASES["grid4x4-mixed"]
    counts = exhaustive_counts(P, times=2)
    a = qss_values(counts, rewards, terminal, GAMMA)
    b = qss_values(neighbours(counts), rewards, terminal, GAMMA)
    assert np.array_equal(a, b)


def test_stochastic_dynamics_are_optimistic():
    """Windy FourRooms: QSS sees the same successors as the deterministic grid and plans as
    if it could pick them, so it gets the deterministic values, above the true V*."""
    windy = four_rooms("windy")
    det = four_rooms("deterministic")
    goals = indicator_goals(windy)
    counts = np.round(windy.P * 4).astype(np.int64)  # every possible successor seen
    res = fit_qss(counts, goals.rewards, goals.terminal, GAMMA)
    _, V_windy = solve_goal_q(windy.P, goals.rewards, GAMMA, goals.terminal)
    _, V_det = solve_goal_q(det.P, goals.rewards, GAMMA, goals.terminal)
    assert (res.V >= V_windy - 1e-12).all() and (res.V > V_windy + 1e-3).any()
    assert np.abs(res.V - V_det).max() < 1e-8
    # The implied forward model is deterministic: the intended move (seen twice as often).
    assert np.array_equal(res.P_hat, det.P)


@pytest.mark.parametrize(
    "bad, name",
    [
        (np.zeros((3, 2)), "counts"),
        (np.zeros((3, 2, 4)), "counts"),
        (-np.ones((3, 2, 3)), "counts"),
        (np.full((3, 2, 3), 0.5), "counts"),
    ],
)
def test_bad_counts_raise(bad, name):
    rewards, terminal = np.zeros((1, 3)), np.zeros((1, 3), dtype=bool)
    for fn in (neighbours, inverse_dynamics, qss_world_model, lambda c: fit_qss(c, rewards, terminal, GAMMA)):
        with pytest.raises(ValueError, match=name):
            fn(bad)


def test_bad_goal_inputs_raise():
    counts = exhaustive_counts(CASES["grid4x4-mixed"][0])
    S = counts.shape[0]
    with pytest.raises(ValueError, match="rewards"):
        fit_qss(counts, np.zeros((2, S + 1)), None, GAMMA)
    with pytest.raises(ValueError, match="terminal"):
        fit_qss(counts, np.zeros((2, S)), np.zeros((3, S), dtype=bool), GAMMA)
    with pytest.raises(ValueError, match="gamma"):
        fit_qss(counts, np.zeros((2, S)), None, 1.0)
    with pytest.raises(ValueError, match="neighbours"):
        qss_values(np.ones((S, S)), np.zeros((2, S)), None, GAMMA)
    with pytest.raises(ValueError, match="inverse"):
        qss_policy(np.zeros((1, S, S)), np.zeros((S, S + 1), dtype=np.int64))
