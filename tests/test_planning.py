"""Planning inside a model and exact evaluation in the true MDP (qworld.worldmodel.planning)."""

from collections import deque

import numpy as np
import pytest
import torch

from qworld import metrics as K
from qworld.worldmodel.bellman import m_matrix, solve_goal_q
from qworld.worldmodel.planning import SAFETY_TASKS, evaluate_plan, plan, run_safety_task, task_states
from qworld.worldmodel.plearn.finite import extract

torch.set_num_threads(1)

GAMMA = 0.99


def fourrooms(variant):
    from qworld_envs import four_rooms

    return four_rooms(variant)


def bfs_steps(P, start, goal, forbidden=()):
    """Shortest path length in a deterministic MDP, never entering a forbidden state."""
    nxt = P.argmax(-1)  # [S, A]
    dist = {start: 0}
    queue = deque([start])
    while queue:
        s = queue.popleft()
        if s == goal:
            return dist[s]
        for t in nxt[s]:
            t = int(t)
            if t not in dist and t not in forbidden:
                dist[t] = dist[s] + 1
                queue.append(t)
    return None


@pytest.mark.parametrize("task", ["corner_9_1_doorway", "corner_9_9_doorway", "corner_9_9_teleport"])
def test_true_model_plan_matches_bfs_in_deterministic_fourrooms(task):
    mdp = fourrooms("deterministic")
    st = task_states(mdp, task)
    out = run_safety_task(mdp, mdp.P, task, GAMMA)
    shortest = bfs_steps(mdp.P, st["start"][0], st["goal"], set(st["forbidden"]))
    assert out[K.TASK] == task
    assert out[K.PLAN_SUCCESS] == pytest.approx(1.0, abs=1e-12)
    assert out[K.UNSAFE_VISITS] == 0.0
    assert out[K.PLAN_STEPS] == pytest.approx(shortest, abs=1e-9)
    assert out[K.PLAN_EXCESS_STEPS] == pytest.approx(0.0, abs=1e-9)
    assert out[K.PLAN_REGRET] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("task", ["corner_9_1_doorway", "corner_9_9_doorway"])
def test_doorway_constraint_lengthens_the_optimal_route(task):
    mdp = fourrooms("deterministic")
    st = task_states(mdp, task)
    free = bfs_steps(mdp.P, st["start"][0], st["goal"])
    constrained = bfs_steps(mdp.P, st["start"][0], st["goal"], set(st["forbidden"]))
    assert constrained > free
    # And the unconstrained plan walks straight through the doorway.
    reward = np.eye(mdp.num_states)[st["goal"]]
    greedy = plan(mdp.P, reward, GAMMA, terminal=[st["goal"]])
    out = evaluate_plan(mdp.P, greedy, [st["goal"]], st["forbidden"], st["start"], GAMMA)
    assert out[K.UNSAFE_VISITS] == 1.0


def test_teleport_constraint_removes_a_shortcut():
    mdp = fourrooms("teleport")
    st = task_states(mdp, "corner_9_9_teleport")
    reward = np.eye(mdp.num_states)[st["goal"]]
    greedy = plan(mdp.P, reward, GAMMA, terminal=[st["goal"]])
    out_free = evaluate_plan(mdp.P, greedy, [st["goal"]], [], st["start"], GAMMA)
    out = run_safety_task(mdp, mdp.P, "corner_9_9_teleport", GAMMA)
    assert out_free[K.PLAN_STEPS] < out[K.PLAN_STEPS] - 1
    assert out[K.UNSAFE_VISITS] == 0.0 and out[K.PLAN_SUCCESS] == pytest.approx(1.0)


@pytest.mark.parametrize("variant", ["windy", "teleport"])
@pytest.mark.parametrize("task", list(SAFETY_TASKS))
def test_true_model_plan_is_safe_and_optimal_in_stochastic_variants(variant, task):
    out = run_safety_task(fourrooms(variant), fourrooms(variant).P, task, GAMMA)
    assert out[K.PLAN_SUCCESS] == pytest.approx(1.0, abs=1e-9)
    assert out[K.UNSAFE_VISITS] == 0.0
    assert out[K.PLAN_EXCESS_STEPS] == pytest.approx(0.0, abs=1e-9)


def test_evaluate_plan_exact_on_hand_chain():
    # States: 0 start, 1 middle, 2 goal, 3 forbidden. From 0 the only action reaches 1 w.p. p
    # and the forbidden state w.p. 1 - p; from 1 it reaches the goal w.p. q, else stays.
    p, q = 0.7, 0.25
    P = np.zeros((4, 1, 4))
    P[0, 0, [1, 3]] = p, 1 - p
    P[1, 0, [2, 1]] = q, 1 - q
    P[2, 0, 2] = P[3, 0, 3] = 1.0
    pi = np.ones((4, 1))
    out = evaluate_plan(P, pi, [2], [3], 0, GAMMA, horizon=5000)
    assert out[K.PLAN_SUCCESS] == pytest.approx(p, abs=1e-12)
    assert out[K.UNSAFE_VISITS] == pytest.approx(1 - p, abs=1e-12)
    assert out[K.PLAN_STEPS] == pytest.approx(1 + 1 / q, abs=1e-9)  # 1 step, then geometric
    # A short horizon cuts the success probability exactly: P(reached by step 3) = p (1 - (1-q)^2).
    short = evaluate_plan(P, pi, [2], [3], 0, GAMMA, horizon=3)
    assert short[K.PLAN_SUCCESS] == pytest.approx(p * (1 - (1 - q) ** 2), abs=1e-12)


def test_plan_regret_is_the_share_of_discounted_success_lost():
    """A slow sure route (0 -> 1 -> 2 -> goal, 3 steps, success 1) against a fast risky one
    (0 -> goal w.p. 0.95, else forbidden): at gamma 0.9 the risky one is optimal (0.95 >
    0.81); the sure plan reaches the goal more often and still loses 1 - 0.81 / 0.95."""
    P = np.zeros((5, 2, 5))
    P[0, 0, 1] = 1.0  # sure route
    P[1, :, 2] = P[2, :, 3] = 1.0
    P[0, 1, [3, 4]] = 0.95, 0.05  # risky shortcut
    P[3, :, 3] = P[4, :, 4] = 1.0
    sure, risky = np.zeros((5, 2)), np.zeros((5, 2))
    sure[:, 0] = risky[:, 0] = 1.0
    risky[0] = [0.0, 1.0]
    optimal = plan(P, np.eye(5)[3], 0.9, terminal=[3, 4])
    assert optimal[0].argmax() == 1
    out = evaluate_plan(P, sure, [3], [4], 0, 0.9, optimal_policy=optimal)
    assert out[K.PLAN_SUCCESS] == pytest.approx(1.0) and out[K.PLAN_EXCESS_STEPS] == pytest.approx(2.0)
    assert out[K.PLAN_REGRET] == pytest.approx(1 - 0.81 / 0.95, abs=1e-12)
    assert evaluate_plan(P, risky, [3], [4], 0, 0.9, optimal_policy=optimal)[K.PLAN_REGRET] == pytest.approx(0.0)


def test_plan_avoids_forbidden_states_when_possible():
    # Two equally long routes from 0 to the goal 3: via 1 (action 0) or via 2 (action 1).
    P = np.zeros((4, 2, 4))
    P[0, 0, 1] = P[0, 1, 2] = 1.0
    P[1, :, 3] = 1.0
    P[2, 0, 3] = P[2, 1, 2] = 1.0
    P[3, :, 3] = 1.0
    reward = np.array([0, 0, 0, 1.0])
    assert plan(P, reward, GAMMA, terminal=[3])[0].argmax() == 0  # both are 2 steps: lowest action
    assert plan(P, reward, GAMMA, forbidden=[1], terminal=[3])[0].argmax() == 1


def pinv_model(mdp, num_goals):
    from qworld_envs import indicator_goals

    goals = indicator_goals(mdp, num_goals, seed=0)
    Q, V = solve_goal_q(mdp.P, goals.rewards, GAMMA, goals.terminal)
    return extract(Q, m_matrix(goals.rewards, V, GAMMA, goals.terminal), "pinv")


@pytest.mark.parametrize(
    "variant, task", [("windy", "corner_9_1_doorway"), ("teleport", "corner_9_9_teleport")]
)
def test_too_few_goals_give_unsafe_or_failing_plans_enough_goals_are_safe(variant, task):
    mdp = fourrooms(variant)
    few = [run_safety_task(mdp, pinv_model(mdp, L), task, GAMMA) for L in (2, 4)]
    assert all(o[K.UNSAFE_VISITS] > 0 or o[K.PLAN_SUCCESS] < 0.99 for o in few)
    full = run_safety_task(mdp, pinv_model(mdp, mdp.num_states), task, GAMMA)
    assert full[K.PLAN_SUCCESS] == pytest.approx(1.0, abs=1e-9)
    assert full[K.UNSAFE_VISITS] == 0.0
    assert full[K.PLAN_EXCESS_STEPS] == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs():
    mdp = fourrooms("deterministic")
    with pytest.raises(ValueError, match="unknown safety task"):
        run_safety_task(mdp, mdp.P, "nope")
    with pytest.raises(ValueError, match="start_states"):
        evaluate_plan(mdp.P, np.ones((68, 4)) / 4, [0], [1], [0], GAMMA)
    with pytest.raises(ValueError, match="policy"):
        evaluate_plan(mdp.P, np.ones((68, 3)), [0], [1], [2], GAMMA)


def test_a_small_leak_into_the_forbidden_cell_is_pruned_before_planning():
    """softmax models never give exact zeros: up to 0.2% of every row leaking into the
    forbidden doorway, unevenly across actions, decides the plan unless planning prunes it."""
    from qworld.worldmodel.planning import PLAN_PRUNE, prune_model

    mdp = fourrooms("windy")
    task = "corner_9_1_doorway"
    forbidden = task_states(mdp, task)["forbidden"][0]
    eps = np.random.default_rng(0).uniform(0, 2e-3, size=mdp.P.shape[:2])  # [S, A], as a fit leaves it
    leak = (1 - eps)[..., None] * mdp.P
    leak[..., forbidden] += eps
    reward = np.zeros(mdp.num_states)
    st = task_states(mdp, task)
    reward[st["goal"]] = 1.0
    raw = plan(leak, reward, GAMMA, forbidden=st["forbidden"], terminal=[st["goal"]], prune=0.0)
    pruned = plan(leak, reward, GAMMA, forbidden=st["forbidden"], terminal=[st["goal"]])
    out_raw = evaluate_plan(mdp.P, raw, [st["goal"]], st["forbidden"], st["start"], GAMMA)
    out = evaluate_plan(mdp.P, pruned, [st["goal"]], st["forbidden"], st["start"], GAMMA)
    assert out_raw[K.PLAN_SUCCESS] < 0.5  # the leak sinks the plan ...
    assert out[K.PLAN_SUCCESS] == pytest.approx(1.0, abs=1e-9)  # ... and pruning saves it
    assert out[K.PLAN_EXCESS_STEPS] == pytest.approx(0.0, abs=1e-6)
    # the rule keeps every real outcome: the true windy and teleport models are unchanged
    for variant in ("windy", "teleport"):
        P = fourrooms(variant).P
        assert np.array_equal(prune_model(P), P)
    kept = prune_model(leak)
    assert np.abs(kept - mdp.P).max() <= 2e-3 and 0 < PLAN_PRUNE < 0.25
    with pytest.raises(ValueError, match="prune"):
        prune_model(leak, 1.5)


def test_policy_success_starts_from_the_non_terminal_states_only():
    """policy_success by hand on a 4-state corridor 0 - 1 - 2 - 3, action 0 "right" moving
    one cell with probability 1/2 (else it stays), action 1 "stay"; 3 is the corridor's end.

    Goal 0 ends at state 2 and its greedy action is "right" everywhere: within 2 steps it
    arrives from 1 with probability 1 - 1/2^2 = 3/4, from 0 with 1/2^2 = 1/4, from 3 never.
    The starts are uniform over the non-terminal states {0, 1, 3}, so 1/3 (starting on the
    goal too, uniform over all four, would give (3/4 + 1/4 + 0 + 1) / 4 = 1/2; letting
    arrived mass walk on to 3 would give less). Goal 1 ends at state 0, which "right" never
    reaches from {1, 2, 3}: 0 (1/4 if its own terminal state were a start). Goal 2 has no
    terminal state: NaN."""
    from qworld.worldmodel.scoring import policy_success

    S, A = 4, 2
    P = np.zeros((S, A, S))
    for s in range(S):
        P[s, 1, s] = 1.0
        P[s, 0, s] += 0.5
        P[s, 0, min(s + 1, S - 1)] += 0.5
    Q = np.zeros((3, S, A))
    Q[0, :, 0] = 1.0  # goal 0: "right" is greedy; goal 1: a tie, the lowest action ("right")
    terminal = np.zeros((3, S), dtype=bool)
    terminal[0, 2] = terminal[1, 0] = True
    out = policy_success(P, Q, terminal, horizon=2)
    assert out.shape == (3,)
    assert out[0] == pytest.approx(1 / 3, abs=1e-15)  # float64: a few roundings of numbers <= 1
    assert out[1] == 0.0
    assert np.isnan(out[2])
    # no step at all: no start is on the goal, nothing has arrived
    assert policy_success(P, Q, terminal, horizon=0)[:2].tolist() == [0.0, 0.0]
    # a long horizon: from 0 and 1 the goal is reached almost surely, from 3 never
    assert policy_success(P, Q, terminal, horizon=200)[0] == pytest.approx(2 / 3, abs=1e-15)
