"""Rewards from Q given the dynamics (``qworld.worldmodel.reward``): exact from exact Q and the true P,
and an indicator goal named from its Q alone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from qworld.worldmodel.bellman import solve_goal_q
from qworld.worldmodel.reward import expected_rewards, infer_goal_state, recover_rewards, reward_scores, state_values
from qworld_envs import FOUR_ROOMS_ID, make_finite_problem


def random_mdp(seed=0, S=9, A=3, L=4):
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(S) * 0.5, size=(S, A))
    rewards = rng.normal(size=(L, S))
    terminal = rng.random((L, S)) < 0.2
    return P, rewards, terminal


def test_rewards_are_exact_from_exact_q_and_true_p_on_a_random_mdp():
    P, rewards, terminal = random_mdp()
    Q, _ = solve_goal_q(P, rewards, 0.9, terminal)
    r_hat = recover_rewards(Q, P, 0.9, terminal)
    truth = expected_rewards(P, rewards)
    np.testing.assert_allclose(r_hat, truth, atol=1e-8)
    scores = reward_scores(r_hat, truth)
    assert np.all(scores["reward_nmse"] < 1e-12) and np.allclose(scores["reward_pearson"], 1.0)
    # ignoring the goals' terminal states is a different (wrong) reward: the test can fail
    assert np.abs(recover_rewards(Q, P, 0.9, None) - truth).max() > 1e-2


@pytest.mark.parametrize("variant", ["deterministic", "windy"])
def test_rewards_are_exact_on_fourrooms_and_every_goal_is_named(variant):
    problem = make_finite_problem(FOUR_ROOMS_ID, variant=variant, num_goals=12, goal_seed=3)
    P, goals = problem.mdp.P, problem.goals
    Q, _ = solve_goal_q(P, goals.rewards, 0.99, goals.terminal)
    r_hat = recover_rewards(Q, P, 0.99, goals.terminal)
    scores = reward_scores(r_hat, expected_rewards(P, goals.rewards))
    assert np.allclose(scores["reward_pearson"], 1.0) and np.all(scores["reward_spearman"] > 0.99)
    named = [infer_goal_state(Q[g], P, 0.99)[0] for g in range(goals.num_goals)]
    assert named == list(goals.goal_states)


def test_soft_values_are_alpha_logsumexp():
    Q = np.random.default_rng(1).normal(size=(2, 5, 4)) * 30  # large: a naive exp would overflow
    np.testing.assert_allclose(state_values(Q, "soft", 0.5), 0.5 * logsumexp(Q / 0.5, axis=-1))
    assert np.all(state_values(Q, "soft", 0.5) >= state_values(Q, "greedy"))
    with pytest.raises(ValueError, match="kind"):
        state_values(Q, "median")
    with pytest.raises(ValueError, match="Q"):
        recover_rewards(Q, np.ones((5, 3, 5)) / 5, 0.9)


def test_held_out_goals_are_named_from_a_model_extracted_from_the_other_goals():
    """Exact Q of 5 windy goals: P_hat by moves from any 4 of them names the fifth's cell."""
    from qworld.worldmodel.plearn.finite import method_options
    from qworld.worldmodel.bellman import m_matrix
    from qworld.worldmodel.reward import goal_inference_scores, held_out_models

    problem = make_finite_problem(FOUR_ROOMS_ID, variant="windy", num_goals=5, goal_seed=1)
    P, goals = problem.mdp.P, problem.goals
    Q, _ = solve_goal_q(P, goals.rewards, 0.99, goals.terminal)
    M = m_matrix(goals.rewards, Q.max(-1), 0.99, goals.terminal)
    models = held_out_models(Q, M, "moves", method_options("moves", coords=problem.mdp.coords))
    scores = goal_inference_scores(Q, goals.goal_states, 0.99, models, goals.rewards)
    assert scores["accuracy"] == 1.0 and scores["held_out"] == 5
    assert scores["reward_pearson"] > 0.99
    # a wrong model names wrong cells: the test can fail
    uniform = np.full_like(P, 1.0 / P.shape[0])
    assert sum(infer_goal_state(Q[g], uniform, 0.99)[0] == goals.goal_states[g] for g in range(5)) < 5


def test_transition_rewards_give_the_arrival_rewards_of_every_goal():
    """IQ-Learn's r = Q(s, a) - gamma (1 - done) V(s') of every transition under exact Q is the
    true reward; averaged per arrival state it is each goal's reward table with its terminal
    states; unseen arrivals get the goal's background reward. A wrong gamma is caught."""
    from qworld.worldmodel.reward import arrival_rewards, transition_rewards

    problem = make_finite_problem(FOUR_ROOMS_ID, variant="windy", num_goals=4, goal_seed=1)
    P, goals = problem.mdp.P, problem.goals
    Q, _ = solve_goal_q(P, goals.rewards, 0.99, goals.terminal)
    rng = np.random.default_rng(0)
    g, s, a = rng.integers(4, size=20000), rng.integers(P.shape[0], size=20000), rng.integers(P.shape[1], size=20000)
    s2 = np.array([rng.choice(P.shape[0], p=P[i, j]) for i, j in zip(s, a)])
    keep = ~goals.terminal[g, s]
    g, s, a, s2 = g[keep], s[keep], a[keep], s2[keep]
    done = goals.terminal[g, s2]
    r = transition_rewards(Q, g, s, a, s2, done, 0.99, kind="greedy")
    # one sample of s' per transition: the reward is exact only in expectation (windy)
    r_hat, terminal, seen = arrival_rewards(r, g, s2, done, 4, P.shape[0])
    assert (terminal == (goals.terminal & seen)).all() and seen.mean() > 0.95
    assert np.corrcoef(r_hat.ravel(), goals.rewards.ravel())[0, 1] > 0.95
    unseen = ~seen
    if unseen.any():
        assert np.all(np.abs(r_hat[unseen]) < 0.1)  # background, not a goal
    wrong = transition_rewards(Q, g, s, a, s2, done, 0.9, kind="greedy")
    assert np.abs(wrong - goals.rewards[g, s2]).mean() > 5 * np.abs(r - goals.rewards[g, s2]).mean()
