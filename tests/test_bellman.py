"""Exact goal-conditioned Q / V (qworld.worldmodel.bellman)."""

import numpy as np
import pytest
import torch

from qworld.worldmodel.bellman import bellman_residual, greedy_policy, m_matrix, solve_goal_q

torch.set_num_threads(1)

GAMMA = 0.99


def random_mdp(S, A, seed):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(S, 0.3), size=(S, A))


def random_goals(S, L, seed, terminal_frac=0.1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (L, S)), rng.random((L, S)) < terminal_frac


@pytest.mark.parametrize("seed", [0, 1])
def test_optimal_q_satisfies_bellman_optimality(seed):
    P = random_mdp(25, 4, seed)
    rewards, terminal = random_goals(25, 6, seed)
    Q, V = solve_goal_q(P, rewards, GAMMA, terminal)
    assert Q.shape == (6, 25, 4) and V.shape == (6, 25)
    assert np.allclose(V, Q.max(axis=-1), atol=0, rtol=0)
    assert bellman_residual(P, rewards, GAMMA, Q, terminal) < 1e-10
    # The residual check is not vacuous: a slightly wrong Q violates it.
    assert bellman_residual(P, rewards, GAMMA, Q + 1e-6 * (np.arange(4) == 1), terminal) > 1e-8


def test_fourrooms_windy_indicator_goals_residual():
    from qworld_envs import four_rooms, indicator_goals

    mdp = four_rooms("windy")
    goals = indicator_goals(mdp)
    Q, V = solve_goal_q(mdp.P, goals.rewards, GAMMA, goals.terminal)
    assert bellman_residual(mdp.P, goals.rewards, GAMMA, Q, goals.terminal) < 1e-10
    # Indicator goals pay at most 1, once.
    assert V.max() <= 1.0 + 1e-12 and V.min() > 0


def test_value_iteration_agrees_with_policy_iteration():
    P = random_mdp(15, 3, 3)
    rewards, terminal = random_goals(15, 4, 3)
    Q_pi, _ = solve_goal_q(P, rewards, GAMMA, terminal, solver="policy_iteration")
    Q_vi, _ = solve_goal_q(P, rewards, GAMMA, terminal, solver="value_iteration", tol=1e-11)
    assert np.abs(Q_pi - Q_vi).max() < 1e-10


def test_policy_evaluation_of_greedy_policy_is_optimal_q():
    P = random_mdp(20, 4, 5)
    rewards, terminal = random_goals(20, 5, 5)
    Q, _ = solve_goal_q(P, rewards, GAMMA, terminal)
    pi = greedy_policy(Q)
    Q_pi, V_pi = solve_goal_q(P, rewards, GAMMA, terminal, policy=pi)
    assert np.abs(Q_pi - Q).max() < 1e-10
    # A random stochastic policy: its own Bellman equation holds, and it is worse than optimal.
    rng = np.random.default_rng(0)
    mu = rng.dirichlet(np.ones(4), size=(5, 20))
    Q_mu, V_mu = solve_goal_q(P, rewards, GAMMA, terminal, policy=mu)
    assert bellman_residual(P, rewards, GAMMA, Q_mu, terminal, policy=mu) < 1e-10
    assert np.allclose(V_mu, (mu * Q_mu).sum(-1))
    assert np.all(V_mu <= Q.max(-1) + 1e-10) and np.any(V_mu < Q.max(-1) - 1e-3)


def chain_mdp():
    """3 states in a row; action 0 moves right (stays at the end), action 1 stays."""
    P = np.zeros((3, 2, 3))
    for s in range(3):
        P[s, 0, min(s + 1, 2)] = 1.0
        P[s, 1, s] = 1.0
    return P


def test_terminal_handling_on_hand_mdp():
    P, g = chain_mdp(), 0.9
    reward = np.array([[0.0, 0.0, 1.0]])
    # Terminal goal: reward 1 on arriving in state 2, nothing after.
    Q, V = solve_goal_q(P, reward, g, terminal=np.array([[False, False, True]]))
    expected = np.array([[g, g * g], [1.0, g], [1.0, 1.0]])
    assert np.allclose(Q[0], expected, atol=1e-14)
    M = m_matrix(reward, V, g, np.array([[False, False, True]]))
    assert np.allclose(M[0], [g * g, g, 1.0])  # no continuation value at the terminal state
    # Same reward without termination: state 2 pays 1 forever, V(2) = 1 / (1 - g).
    Q, V = solve_goal_q(P, reward, g)
    v2 = 1.0 / (1.0 - g)
    assert np.allclose(V[0], [g * (1 + g * v2), 1 + g * v2, v2])
    assert np.allclose(Q[0, 1], [1 + g * v2, g * (1 + g * v2)])
    assert np.allclose(m_matrix(reward, V, g), reward + g * V)


def test_greedy_policy_breaks_ties_to_lowest_action():
    Q = np.array([[[1.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 1.0 + 1e-15, 5.0]]])
    pi = greedy_policy(Q)
    assert pi.shape == Q.shape
    assert np.array_equal(pi.argmax(-1), [[1, 0, 3]])
    assert np.array_equal(pi.sum(-1), np.ones((1, 3)))
    # Equal up to round-off counts as a tie, so the result does not depend on float noise.
    assert greedy_policy(np.array([[[0.3, 0.1 + 0.2]]])).argmax() == 0


def test_input_validation():
    P = chain_mdp()
    with pytest.raises(ValueError, match="gamma"):
        solve_goal_q(P, np.zeros((1, 3)), 1.0)
    with pytest.raises(ValueError, match="rewards"):
        solve_goal_q(P, np.zeros((1, 4)), 0.9)
    with pytest.raises(ValueError, match=r"P must have shape"):
        solve_goal_q(P[:, :, :2], np.zeros((1, 3)), 0.9)
    with pytest.raises(ValueError, match="policy"):
        solve_goal_q(P, np.zeros((2, 3)), 0.9, policy=np.ones((3, 3, 2)) / 2)
    with pytest.raises(ValueError, match="solver"):
        solve_goal_q(P, np.zeros((1, 3)), 0.9, solver="magic")
