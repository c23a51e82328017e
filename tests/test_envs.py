"""Tests of qworld_envs: finite MDPs, FourRooms, goal sets, gym env and batched env."""

import importlib
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import qworld_envs
from qworld_envs import (
    FOUR_ROOMS_LAYOUT,
    GOAL_TYPES,
    BatchedFiniteEnv,
    BatchedGoalEnv,
    FiniteMDP,
    FourRoomsGoalEnv,
    GoalSet,
    dense_goals,
    four_rooms,
    has_batched,
    indicator_goals,
    make_batched,
    make_finite_problem,
    make_goals,
    true_P,
)

ENV_ID = "qworld/FourRooms-v0"
UP, RIGHT, DOWN, LEFT = range(4)
DOORWAYS = [(3, 5), (7, 5), (5, 3), (5, 8)]
TELEPORTS = [(4, 4), (4, 6), (6, 4), (6, 6)]
# room cells of the default map, by the room's row/col ranges
ROOM_RANGES = [((1, 5), (1, 5)), ((1, 5), (6, 10)), ((6, 10), (1, 5)), ((6, 10), (6, 10))]


def room_cells(rows, cols):
    return {(r, c) for r in range(*rows) for c in range(*cols)}


def state_of(mdp, cell):
    return mdp.cell_to_state[cell]


def dist_of(mdp, row):
    """{cell: prob} of a P row, positive entries only."""
    return {tuple(int(x) for x in mdp.coords[s]): float(p) for s, p in enumerate(row) if p > 0}


# ---------------------------------------------------------------- FiniteMDP validation


def random_P(S=4, A=2, seed=0):
    P = np.random.default_rng(seed).uniform(size=(S, A, S))
    return P / P.sum(-1, keepdims=True)


def test_finite_mdp_attributes_and_read_only_P():
    P = random_P()
    mdp = FiniteMDP(P, coords=[(0, 0), (0, 1), (1, 0), (1, 1)], name="toy", meta={"k": 1})
    assert (mdp.num_states, mdp.num_actions) == (4, 2)
    np.testing.assert_array_equal(mdp.P, P)
    assert mdp.P.dtype == np.float64
    assert mdp.cell_to_state == {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}
    assert mdp.meta == {"k": 1} and mdp.name == "toy"
    with pytest.raises(ValueError):
        mdp.P[0, 0, 0] = 1.0  # shared by every consumer, so it must not be writable
    assert FiniteMDP(P).coords is None and FiniteMDP(P).cell_to_state == {}


@pytest.mark.parametrize("shape", [(4, 4), (4, 2, 3), (2, 2, 2, 2), (0, 1, 0)])
def test_finite_mdp_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        FiniteMDP(np.ones(shape))


def test_finite_mdp_names_negative_entry():
    P = random_P()
    P[2, 1] = [0.5, 0.7, -0.2, 0.0]
    with pytest.raises(ValueError, match=r"s=2, a=1.*negative.*-0\.2"):
        FiniteMDP(P)


def test_finite_mdp_names_bad_row_sum():
    P = random_P()
    P[3, 0] *= 0.9
    with pytest.raises(ValueError, match=r"s=3, a=0\] sums to 0\.9"):
        FiniteMDP(P)
    P = random_P()
    P[1, 1, 0] += 1e-9  # inside the tolerance
    FiniteMDP(P)


def test_finite_mdp_names_non_finite_entry():
    P = random_P()
    P[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"s=0, a=1.*non-finite"):
        FiniteMDP(P)


def test_finite_mdp_rejects_bad_coords():
    with pytest.raises(ValueError, match="coords"):
        FiniteMDP(random_P(), coords=[(0, 0), (0, 1)])
    with pytest.raises(ValueError, match="distinct"):
        FiniteMDP(random_P(), coords=[(0, 0), (0, 0), (1, 0), (1, 1)])


def test_sample_next_never_draws_zero_probability_states():
    # zero mass at both ends and in the middle: the edge cases of inverse-CDF sampling
    P = np.zeros((5, 1, 5))
    P[:, 0] = [0.0, 0.3, 0.0, 0.7, 0.0]
    mdp = FiniteMDP(P)
    rng = np.random.default_rng(0)
    draws = np.array([mdp.sample_next(2, 0, rng) for _ in range(20000)])
    assert set(np.unique(draws)) == {1, 3}
    assert abs((draws == 3).mean() - 0.7) < 0.01


# ------------------------------------------------------------------------ FourRooms


def test_default_map_facts():
    mdp = four_rooms()
    assert mdp.num_states == 68 and mdp.num_actions == 4 and mdp.P.shape == (68, 4, 68)
    # states are the free cells in row-major order
    assert [tuple(c) for c in mdp.coords.tolist()] == sorted(tuple(c) for c in mdp.coords.tolist())
    cells = set(mdp.cell_to_state)
    assert cells == set(DOORWAYS).union(*(room_cells(*rc) for rc in ROOM_RANGES))
    assert sorted(tuple(mdp.coords[s]) for s in mdp.meta["doorway_states"]) == sorted(DOORWAYS)
    rooms = [{tuple(int(x) for x in mdp.coords[s]) for s in room} for room in mdp.meta["rooms"]]
    assert len(rooms) == 4 and all(len(r) == 16 for r in rooms)
    assert sorted(map(sorted, rooms)) == sorted(sorted(room_cells(*rc)) for rc in ROOM_RANGES)
    assert sorted(tuple(mdp.coords[s]) for s in mdp.meta["teleport_states"]) == TELEPORTS
    assert mdp.meta["variant"] == "deterministic"
    assert mdp.meta["layout"].split() == FOUR_ROOMS_LAYOUT.split()


@pytest.mark.parametrize("variant", ["deterministic", "windy", "teleport"])
def test_every_row_is_a_probability_vector(variant):
    P = four_rooms(variant).P
    assert (P >= 0).all()
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-12)


def test_deterministic_moves_and_walls():
    mdp = four_rooms("deterministic")
    assert mdp.is_deterministic

    def nxt(cell, a):
        return tuple(mdp.coords[mdp.P[state_of(mdp, cell)][a].argmax()])

    assert nxt((2, 2), UP) == (1, 2) and nxt((2, 2), RIGHT) == (2, 3)
    assert nxt((2, 2), DOWN) == (3, 2) and nxt((2, 2), LEFT) == (2, 1)
    assert nxt((1, 1), UP) == (1, 1) and nxt((1, 1), LEFT) == (1, 1)  # border walls
    assert nxt((3, 4), RIGHT) == (3, 5) and nxt((3, 5), RIGHT) == (3, 6)  # through a doorway
    assert nxt((3, 5), UP) == (3, 5)  # doorway sides are walls
    assert nxt((4, 3), DOWN) == (5, 3) and nxt((4, 2), DOWN) == (4, 2)  # wall row 5
    assert nxt((4, 3), RIGHT) == (4, 4) and nxt((4, 4), RIGHT) == (4, 4)  # T is an ordinary cell


def test_windy_probabilities():
    mdp = four_rooms("windy")
    row = mdp.P[state_of(mdp, (2, 2)), UP]
    assert dist_of(mdp, row) == {(1, 2): 0.5, (2, 3): 0.25, (2, 1): 0.25}
    row = mdp.P[state_of(mdp, (2, 2)), RIGHT]
    assert dist_of(mdp, row) == {(2, 3): 0.5, (3, 2): 0.25, (1, 2): 0.25}
    # in a corner, the blocked moves stay put and their mass adds up
    row = mdp.P[state_of(mdp, (1, 1)), UP]
    assert dist_of(mdp, row) == {(1, 1): 0.75, (1, 2): 0.25}


def test_teleport_sends_uniformly_to_opposite_room():
    mdp = four_rooms("teleport")
    det = four_rooms("deterministic")
    opposite = {(4, 4): ROOM_RANGES[3], (4, 6): ROOM_RANGES[2], (6, 4): ROOM_RANGES[1], (6, 6): ROOM_RANGES[0]}
    for cell, rc in opposite.items():
        for a in range(4):
            d = dist_of(mdp, mdp.P[state_of(mdp, cell), a])
            assert set(d) == room_cells(*rc)
            np.testing.assert_allclose(list(d.values()), 1 / 16)
    # every other state moves as in the deterministic variant, so T cells can be entered
    others = [s for s in range(68) if s not in mdp.meta["teleport_states"]]
    np.testing.assert_array_equal(mdp.P[others], det.P[others])
    assert dist_of(mdp, mdp.P[state_of(mdp, (4, 3)), RIGHT]) == {(4, 4): 1.0}


def test_custom_layout_with_doorway_rooms_and_teleport():
    layout = """
        #####
        #..T#
        #.#.#
        #####
    """
    mdp = four_rooms("teleport", layout=layout)
    assert mdp.num_states == 5
    assert [tuple(c) for c in mdp.coords.tolist()] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 3)]
    assert mdp.meta["doorway_states"] == [state_of(mdp, (1, 2))]
    assert mdp.meta["rooms"] == [[0, 3], [2, 4]]
    # T at (1,3): opposite cell (2,1) lies in the left room {(1,1), (2,1)}
    assert dist_of(mdp, mdp.P[state_of(mdp, (1, 3)), DOWN]) == {(1, 1): 0.5, (2, 1): 0.5}
    assert dist_of(mdp, mdp.P[state_of(mdp, (1, 1)), RIGHT]) == {(1, 2): 1.0}


def test_custom_layout_windy_on_small_grid():
    mdp = four_rooms("windy", layout="...\n...")  # no border: off-grid moves stay
    assert mdp.num_states == 6 and mdp.meta["doorway_states"] == [] and len(mdp.meta["rooms"]) == 1
    assert dist_of(mdp, mdp.P[state_of(mdp, (0, 0)), UP]) == {(0, 0): 0.75, (0, 1): 0.25}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "slippery"}, "deterministic, windy, teleport"),
        ({"layout": "###\n###"}, "no free cell"),
        ({"layout": "#..\n#."}, "equal width"),
        ({"layout": "#.x"}, "unknown characters"),
        ({"variant": "teleport", "layout": "T.#"}, r"opposite cell \(0, 2\)"),
    ],
)
def test_four_rooms_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        four_rooms(**kwargs)


# ---------------------------------------------------------------------------- goals


def test_indicator_goals_default_all_states():
    mdp = four_rooms()
    goals = indicator_goals(mdp)
    assert goals.goal_type == "indicator" and goals.num_goals == 68
    np.testing.assert_array_equal(goals.goal_states, np.arange(68))
    np.testing.assert_array_equal(goals.rewards, np.eye(68))
    np.testing.assert_array_equal(goals.terminal, np.eye(68, dtype=bool))


def test_indicator_goals_from_cells_and_seed():
    mdp = four_rooms()
    goals = indicator_goals(mdp, cells=[(9, 1), (1, 9)])
    np.testing.assert_array_equal(goals.goal_states, [state_of(mdp, (9, 1)), state_of(mdp, (1, 9))])
    assert goals.rewards[1, state_of(mdp, (1, 9))] == 1.0 and goals.rewards.sum() == 2.0
    assert goals.terminal.sum() == 2 and goals.terminal[0, state_of(mdp, (9, 1))]
    drawn = indicator_goals(mdp, num_goals=20, seed=3)
    assert len(set(drawn.goal_states.tolist())) == 20  # no repeats
    np.testing.assert_array_equal(drawn.goal_states, indicator_goals(mdp, num_goals=20, seed=3).goal_states)
    assert not np.array_equal(drawn.goal_states, indicator_goals(mdp, num_goals=20, seed=4).goal_states)
    # nested for a fixed seed: the 4 goals are the first 4 of the 20
    np.testing.assert_array_equal(indicator_goals(mdp, num_goals=4, seed=3).goal_states, drawn.goal_states[:4])
    np.testing.assert_array_equal(np.sort(indicator_goals(mdp, num_goals=68, seed=0).goal_states), np.arange(68))


def test_dense_goals():
    mdp = four_rooms()
    goals = dense_goals(mdp, 5, seed=1)
    assert goals.goal_type == "dense" and goals.rewards.shape == (5, 68) and goals.goal_states is None
    assert not goals.terminal.any() and goals.terminal.shape == (5, 68)
    assert (goals.rewards >= 0).all() and (goals.rewards < 1).all() and goals.rewards.std() > 0.2
    np.testing.assert_array_equal(goals.rewards, dense_goals(mdp, 5, seed=1).rewards)
    assert dense_goals(mdp, 100).num_goals == 100  # generic rewards: L > S is fine
    assert make_goals(mdp, "dense", None, 0).num_goals == 68


def test_goal_errors():
    mdp = four_rooms()
    with pytest.raises(ValueError, match=r"num_goals=69.*S=68"):
        indicator_goals(mdp, num_goals=69)
    with pytest.raises(ValueError, match=r"\(0, 0\)"):
        indicator_goals(mdp, cells=[(1, 1), (0, 0)])
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        indicator_goals(mdp, cells=[(5, 5)])
    with pytest.raises(ValueError, match="num_goals"):
        dense_goals(mdp, 0)
    with pytest.raises(ValueError, match=r"'position'.*indicator, dense"):
        make_goals(mdp, "position", 4, 0)
    with pytest.raises(ValueError, match="shape"):
        GoalSet(rewards=np.zeros((2, 3)), terminal=np.zeros((2, 4), bool), goal_states=None, goal_type="dense")
    assert GOAL_TYPES == ("indicator", "dense")


# ---------------------------------------------------------------------------- tasks


def test_make_finite_task_resolves_kwargs():
    problem = make_finite_problem(ENV_ID, variant="windy", num_goals=3, goal_seed=7)
    assert problem.env_id == ENV_ID and problem.mdp.meta["variant"] == "windy"
    assert problem.env_kwargs == {
        "variant": "windy", "layout": None, "goal_type": "indicator", "num_goals": 3,
        "goal_seed": 7, "goal_cells": None, "max_episode_steps": 100,
    }  # fmt: skip
    assert problem.max_episode_steps == 100
    np.testing.assert_array_equal(problem.goals.goal_states, indicator_goals(problem.mdp, 3, seed=7).goal_states)
    np.testing.assert_array_equal(true_P(ENV_ID, variant="teleport"), four_rooms("teleport").P)
    assert make_finite_problem(ENV_ID).goals.num_goals == 68


def test_make_finite_task_errors():
    with pytest.raises(TypeError, match="'colour'"):
        make_finite_problem(ENV_ID, colour="red")
    with pytest.raises(ValueError, match="qworld/FourRooms-v0"):
        make_finite_problem("qworld/Nope-v0")
    with pytest.raises(ValueError, match="goal_type"):
        make_finite_problem(ENV_ID, goal_type="fingertip")
    with pytest.raises(ValueError, match="max_episode_steps"):
        make_finite_problem(ENV_ID, max_episode_steps=0)


# --------------------------------------------------------------------------- gym env

GYM_CASES = [
    {"variant": "deterministic"},
    {"variant": "windy", "num_goals": 4},
    {"variant": "teleport", "goal_cells": [(9, 1), (9, 9)]},
    {"variant": "windy", "goal_type": "dense", "num_goals": 5},
]


@pytest.mark.parametrize("kwargs", GYM_CASES)
def test_check_env_passes(kwargs):
    env = gymnasium.make(ENV_ID, **kwargs)
    check_env(env.unwrapped, skip_render_check=True)
    env = env.unwrapped
    L = env.problem.goals.num_goals
    assert env.obs_dim == 68 and env.goal_dim == L and env.num_goals == L
    assert env.observation_space.shape == (68 + L,) and env.action_space.n == 4


def test_gym_env_reset_and_goal_episode():
    env = FourRoomsGoalEnv(make_finite_problem(ENV_ID, goal_cells=[(9, 1), (1, 9)]))
    goal_state = state_of(env.problem.mdp, (1, 9))
    obs, info = env.reset(seed=0, options={"goal": 1, "state": state_of(env.problem.mdp, (2, 9))})
    assert obs.dtype == np.float32 and obs.sum() == 2.0
    assert obs[info["state"]] == 1.0 and obs[68 + 1] == 1.0 and info["goal"] == 1
    obs, reward, terminated, truncated, info = env.step(UP)
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    assert info["state"] == goal_state and obs[goal_state] == 1.0
    np.testing.assert_array_equal(info["rewards"], env.problem.goals.rewards[:, goal_state])
    np.testing.assert_array_equal(info["terminals"], env.problem.goals.terminal[:, goal_state])
    assert info["rewards"].dtype == np.float32 and info["terminals"].dtype == bool
    with pytest.raises(ValueError, match="not a non-terminal state"):
        env.reset(options={"goal": 1, "state": goal_state})
    with pytest.raises(ValueError, match="goal"):
        env.reset(options={"goal": 2})


def test_gym_env_start_states_avoid_the_goal_and_cover_the_rest():
    env = FourRoomsGoalEnv(variant="teleport", num_goals=2, goal_seed=1)
    goal_states = env.problem.goals.goal_states
    seen = {0: set(), 1: set()}
    env.reset(seed=0)
    for _ in range(3000):
        _, info = env.reset()
        seen[info["goal"]].add(info["state"])
    for g in (0, 1):
        assert seen[g] == set(range(68)) - {goal_states[g]}  # T cells are fine starts


def test_gym_env_truncation_dense():
    env = FourRoomsGoalEnv(goal_type="dense", num_goals=3, max_episode_steps=7)
    env.reset(seed=0)
    flags = [env.step(env.action_space.sample())[2:4] for _ in range(7)]
    assert flags == [(False, False)] * 6 + [(False, True)]


def gym_frequencies(env, s, a, n):
    """Empirical distribution of s' after (s, a) in the gym env, from n resets."""
    counts = np.zeros(env.obs_dim)
    env.reset(seed=123)
    goal = 0
    for _ in range(n):
        env.reset(options={"goal": goal, "state": s})
        counts[env.step(a)[4]["state"]] += 1
    return counts / n


def batched_frequencies(env, s, a, n):
    """Empirical distribution of s' after (s, a) in a batched env with n envs (one step)."""
    env.reset(seed=321)
    env.state = torch.full((n,), s, dtype=torch.long)
    out = env.step(torch.full((n,), a, dtype=torch.long))
    next_state = out["next_obs"].argmax(1)
    assert torch.equal(out["next_obs"].sum(1), torch.ones(n))
    return torch.bincount(next_state, minlength=env.obs_dim).double().numpy() / n


# (variant, cell, action): an open windy cell, a windy corner, two teleport cells
SAMPLING_CASES = [("windy", (2, 2), UP), ("windy", (1, 1), LEFT), ("teleport", (4, 4), RIGHT), ("teleport", (6, 4), UP)]


@pytest.mark.parametrize("variant, cell, action", SAMPLING_CASES[::2])
def test_gym_env_samples_from_P(variant, cell, action):
    # dense goals: no state is terminal, so every state is a valid start
    env = FourRoomsGoalEnv(variant=variant, goal_type="dense", num_goals=2)
    s = state_of(env.problem.mdp, cell)
    freq = gym_frequencies(env, s, action, 40_000)
    P_row = env.problem.mdp.P[s, action]
    assert (freq[P_row == 0] == 0).all()
    assert np.abs(freq - P_row).max() < 0.01


@pytest.mark.parametrize("variant, cell, action", SAMPLING_CASES)
def test_batched_env_samples_from_P(variant, cell, action):
    env = make_batched(ENV_ID, 100_000, seed=0, variant=variant, goal_type="dense", num_goals=2)
    s = state_of(env.problem.mdp, cell)
    freq = batched_frequencies(env, s, action, 100_000)
    P_row = env.problem.mdp.P[s, action]
    assert (freq[P_row == 0] == 0).all()
    assert np.abs(freq - P_row).max() < 0.01


@pytest.mark.parametrize("variant", ["deterministic", "windy", "teleport"])
def test_batched_env_transitions_stay_in_support_for_every_pair(variant):
    S, A, k = 68, 4, 50
    env = make_batched(ENV_ID, S * A * k, seed=0, variant=variant, goal_type="dense", num_goals=1)
    P = torch.tensor(env.problem.mdp.P)
    env.reset()
    s = torch.arange(S).repeat_interleave(A * k)
    a = torch.arange(A).repeat_interleave(k).repeat(S)
    env.state = s.clone()
    s2 = env.step(a)["next_obs"].argmax(1)
    assert (P[s, a, s2] > 0).all()
    if variant == "deterministic":
        assert torch.equal(s2, P.argmax(-1)[s, a])  # exact, and every pair checked


# ----------------------------------------------------------------------- batched env


def test_batched_interface_and_registry():
    env = make_batched(ENV_ID, 8, seed=0, num_goals=3)
    assert isinstance(env, BatchedGoalEnv) and isinstance(env, BatchedFiniteEnv)
    assert (env.num_envs, env.num_actions, env.num_goals, env.obs_dim, env.goal_dim) == (8, 4, 3, 68, 3)
    assert torch.equal(env.goal_features, torch.eye(3)) and env.max_episode_steps == 100
    assert env.device == torch.device("cpu")
    assert has_batched(ENV_ID) and not has_batched("qworld/Nope-v0")
    with pytest.raises(ValueError, match="qworld/Nope-v0"):
        make_batched("qworld/Nope-v0", 4)
    with pytest.raises(TypeError, match="'colour'"):
        make_batched(ENV_ID, 4, colour="red")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(8, dtype=torch.long))
    out = env.reset()
    assert set(out) == {"obs", "goal"}
    assert out["obs"].shape == (8, 68) and out["obs"].dtype == torch.float32 and out["goal"].dtype == torch.long
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        env.step(torch.full((8,), 4, dtype=torch.long))


def test_batched_reset_distribution():
    n = 100_000
    env = make_batched(ENV_ID, n, seed=0, num_goals=2, goal_seed=5)
    out = env.reset()
    goal, state = out["goal"], out["obs"].argmax(1)
    goal_states = torch.tensor(env.problem.goals.goal_states)
    assert abs(goal.double().mean().item() - 0.5) < 0.01
    assert not (state == goal_states[goal]).any()  # never start on the goal
    freq = torch.bincount(state[goal == 0], minlength=68).double() / (goal == 0).sum()
    expected = torch.full((68,), 1 / 67, dtype=torch.float64)
    expected[goal_states[0]] = 0
    assert (freq - expected).abs().max() < 0.01


def test_batched_step_outputs_match_goal_set():
    env = make_batched(ENV_ID, 256, seed=0, variant="windy", num_goals=10)
    goals = env.problem.goals
    out = env.reset()
    for _ in range(30):
        goal = out["goal"]
        out = env.step(torch.randint(4, (256,)))
        s2 = out["next_obs"].argmax(1).numpy()
        np.testing.assert_array_equal(out["rewards"].numpy(), goals.rewards[:, s2].T.astype(np.float32))
        np.testing.assert_array_equal(out["terminals"].numpy(), goals.terminal[:, s2].T)
        idx = torch.arange(256)
        assert torch.equal(out["reward"], out["rewards"][idx, goal])
        assert torch.equal(out["terminated"], out["terminals"][idx, goal])
        assert torch.equal(out["success"], out["terminated"])
        assert not (out["terminated"] & out["truncated"]).any()
        assert out["rewards"].dtype == torch.float32 and out["terminals"].dtype == torch.bool


def test_batched_auto_reset_on_reaching_the_goal():
    env = make_batched(ENV_ID, 4, seed=0, goal_cells=[(1, 9), (9, 1), (9, 9)])
    mdp = env.problem.mdp
    env.reset()
    # env 0 heads for goal 0 at (1, 9) from (3, 9): two steps up; the others wander in room 1
    env.goal = torch.tensor([0, 1, 1, 1])
    env.state = torch.tensor([state_of(mdp, (3, 9))] + [state_of(mdp, (1, 1))] * 3)
    up = torch.full((4,), UP, dtype=torch.long)
    out = env.step(up)
    assert not out["terminated"].any() and out["episode_length"].eq(0).all()
    out = env.step(up)
    goal_state = state_of(mdp, (1, 9))
    assert out["terminated"].tolist() == [True, False, False, False] and out["success"][0]
    assert out["reward"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out["next_obs"][0].argmax() == goal_state  # the true next obs
    assert out["episode_length"].tolist() == [2, 0, 0, 0] and out["episode_return"].tolist() == [1.0, 0, 0, 0]
    # obs is the start of the new episode: a non-terminal state of the redrawn goal
    new_state, new_goal = int(out["obs"][0].argmax()), int(out["goal"][0])
    assert new_state == int(env.state[0]) and new_goal == int(env.goal[0])
    assert not env.problem.goals.terminal[new_goal, new_state]
    assert torch.equal(out["obs"][1:], out["next_obs"][1:]) and out["goal"][1:].eq(1).all()


def test_batched_truncation_and_episode_stats():
    T = 5
    env = make_batched(ENV_ID, 64, seed=1, goal_type="dense", num_goals=3, max_episode_steps=T)
    env.reset()
    ret = torch.zeros(64)
    for t in range(1, 2 * T + 1):
        out = env.step(torch.randint(4, (64,)))
        ret += out["reward"]
        assert not out["terminated"].any()  # dense goals never terminate
        assert out["truncated"].all() == (t % T == 0) and out["truncated"].any() == (t % T == 0)
        if t % T == 0:
            assert out["episode_length"].eq(T).all()
            # the env adds the same float32 rewards in the same order: equal
            torch.testing.assert_close(out["episode_return"], ret, rtol=0, atol=0)
            ret.zero_()
        else:
            assert out["episode_length"].eq(0).all() and out["episode_return"].eq(0).all()
            assert torch.equal(out["obs"], out["next_obs"])


def test_batched_seeding():
    def rollout(seed, reset_seed=None):
        env = make_batched(ENV_ID, 32, seed=seed, variant="windy", num_goals=4)
        obs = [env.reset(seed=reset_seed)["obs"]]
        actions = torch.Generator().manual_seed(0)
        for _ in range(20):
            obs.append(env.step(torch.randint(4, (32,), generator=actions))["obs"])
        return torch.stack(obs)

    assert torch.equal(rollout(0), rollout(0))
    assert not torch.equal(rollout(0), rollout(1))
    assert torch.equal(rollout(0, reset_seed=7), rollout(1, reset_seed=7))


# --------------------------------------------------------------------------- package


def test_gym_registration_is_idempotent_and_make_passes_kwargs():
    importlib.reload(qworld_envs)
    env = gymnasium.make(ENV_ID, variant="teleport", num_goals=2)
    assert env.unwrapped.problem.mdp.meta["variant"] == "teleport" and env.unwrapped.num_goals == 2


def test_import_does_not_import_ray():
    code = "import sys, qworld_envs; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_base_modules_never_import_concrete_envs_or_the_registry():
    """Module dependency is one way: base modules -> concrete env modules -> registry."""
    import ast
    from pathlib import Path

    pkg = Path(qworld_envs.__file__).parent
    base = ("finite", "goals", "kwargs", "problems", "batched", "continuous")
    concrete = ("four_rooms", "gym_env", "mountain_car", "reacher", "mujoco_reacher")

    def imported(module: str) -> set[str]:
        tree = ast.parse((pkg / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):  # also imports inside functions
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return {n.split(".", 1)[1] for n in names if n.startswith("qworld_envs.")}

    for module in base:
        assert imported(module).isdisjoint((*concrete, "registry")), module
    for module in concrete:
        assert "registry" not in imported(module), module
