"""regional_moves: grid moves shared only where Q says they are (issue 25, item 2), exact Q.

Terminal states of the gymnasium envs (holes, the goal: ``qworld_envs.tabular``) are absorbing,
so Q says nothing of their rows: they are left out of every comparison.
"""

import numpy as np
import pytest
import torch

from qworld.bellman import m_matrix, solve_goal_q
from qworld.oracle import SGD_OPTIONS
from qworld.plearn.finite import extract, method_options, project_consistent

torch.set_num_threads(1)

GAMMA = 0.99
EXACT = 1e-8  # p_max_err of an exact model (pinv's at L = S)
GENERIC = ("pinv", "sgd", "column_match")


def _gym_mdp(env_id, **kwargs):
    from qworld_envs.tabular import mdp_from_gymnasium

    return mdp_from_gymnasium(env_id, **kwargs)


def _one_room_wind():
    """FourRooms, windy in its first room (16 of 68 cells) and deterministic elsewhere."""
    from qworld_envs import FiniteMDP, four_rooms

    det, windy = four_rooms("deterministic"), four_rooms("windy")
    room = det.meta["rooms"][0]
    P = det.P.copy()
    P[room] = windy.P[room]
    return FiniteMDP(P, coords=det.coords, meta={"windy_states": room})


def _random_dense(rows, cols, seed, A=4):
    from qworld_envs import FiniteMDP

    S = rows * cols
    P = np.random.default_rng(seed).dirichlet(np.ones(S), size=(S, A))
    return FiniteMDP(P, coords=np.argwhere(np.ones((rows, cols))))


def _random_local(rows, cols, seed, A=4):
    """Every (s, a) its own Dirichlet over the cell and its grid neighbours: local, not shared."""
    from qworld.plearn.finite import grid_neighbours
    from qworld_envs import FiniteMDP

    coords = np.argwhere(np.ones((rows, cols)))
    nbr, rng = grid_neighbours(coords), np.random.default_rng(seed)
    P = np.zeros((len(coords), A, len(coords)))
    for s in range(len(coords)):
        for a in range(A):
            np.add.at(P[s, a], nbr[s][nbr[s] >= 0], rng.dirichlet(np.ones(int((nbr[s] >= 0).sum()))))
    return FiniteMDP(P, coords=coords)


def _oracle(mdp, L, seed=0):
    from qworld_envs import indicator_goals

    goals = indicator_goals(mdp, L, seed=seed)
    Q, V = solve_goal_q(mdp.P, goals.rewards, GAMMA, goals.terminal)
    return Q, m_matrix(goals.rewards, V, GAMMA, goals.terminal)


def _run(mdp, Q, M, method, **extra):
    opts = method_options(method, mdp.P, mdp.coords)
    if method == "sgd":
        opts.update(SGD_OPTIONS)  # the oracle study's budget
    return extract(Q, M, method, return_info=True, **opts, **extra)


def _identified(mdp):
    terminal = mdp.meta.get("terminal", np.zeros(mdp.num_states, dtype=bool))
    return np.flatnonzero(~np.asarray(terminal, dtype=bool))


def _mse(P_hat, mdp):
    keep = _identified(mdp)
    return float(np.mean((P_hat[keep] - mdp.P[keep]) ** 2))


def test_wind_in_one_room_is_found_and_exact_from_four_goals():
    """The shared model cannot be right in both kinds of room; two regions are."""
    mdp = _one_room_wind()
    Q, M = _oracle(mdp, 4)
    P_hat, info = _run(mdp, Q, M, "regional_moves")
    assert np.abs(P_hat - mdp.P).max() <= EXACT
    assert info["num_regions"] == 2
    windy = np.zeros(mdp.num_states, dtype=bool)
    windy[mdp.meta["windy_states"]] = True
    # the region of every row of a windy cell is not the region of the calm cells' rows
    assert set(info["region"][windy].ravel()).isdisjoint(info["region"][~windy].ravel())
    shared, _ = _run(mdp, Q, M, "moves")
    assert np.abs(shared - mdp.P).max() > 0.1  # one pi everywhere: wrong somewhere


def test_frozenlake_slippery_exact_from_four_goals():
    mdp = _gym_mdp("FrozenLake-v1", map_name="8x8", is_slippery=True)
    Q, M = _oracle(mdp, 4)
    P_hat, _ = _run(mdp, Q, M, "regional_moves")
    keep = _identified(mdp)
    assert np.abs(P_hat[keep] - mdp.P[keep]).max() <= EXACT


def test_cliff_rows_are_one_state_anywhere():
    """Stepping into the cliff lands on the start, far from the cell: no grid move, one state."""
    mdp = _gym_mdp("CliffWalking-v1")
    Q, M = _oracle(mdp, 4)
    P_hat, info = _run(mdp, Q, M, "regional_moves")
    keep = _identified(mdp)
    assert np.abs(P_hat[keep] - mdp.P[keep]).max() <= EXACT
    start = int(np.flatnonzero(mdp.meta["env_states"] == 36)[0])  # the env's start cell (3, 0)
    near = np.abs(mdp.coords[:, None, :] - mdp.coords[None, :, :]).sum(-1) <= 1  # [S, S] grid neighbours
    into_cliff = [(s, a) for s in keep for a in range(4) if mdp.P[s, a, start] == 1.0 and not near[s, start]]
    assert into_cliff and all(info["path"][s, a] == "one_state" for s, a in into_cliff)


@pytest.mark.parametrize("build", [lambda: _random_dense(4, 4, 0), lambda: _random_local(4, 4, 1),
                                   lambda: _gym_mdp("FrozenLake-v1", is_slippery=True)])
def test_exact_wherever_pinv_is(build):
    mdp = build()
    keep = _identified(mdp)
    Q, M = _oracle(mdp, mdp.num_states)
    pinv, _ = _run(mdp, Q, M, "pinv")
    P_hat, _ = _run(mdp, Q, M, "regional_moves")
    if np.abs(pinv[keep] - mdp.P[keep]).max() <= EXACT:
        assert np.abs(P_hat[keep] - mdp.P[keep]).max() <= EXACT


@pytest.mark.parametrize("name, L", [("dense", 4), ("dense", 8), ("local", 4), ("local", 8), ("frozen4", 4),
                                     ("cliff", 4)])
def test_never_worse_than_the_best_generic_method(name, L):
    mdp = {"dense": lambda: _random_dense(4, 4, 2), "local": lambda: _random_local(4, 4, 3),
           "frozen4": lambda: _gym_mdp("FrozenLake-v1", is_slippery=True),
           "cliff": lambda: _gym_mdp("CliffWalking-v1")}[name]()
    Q, M = _oracle(mdp, L, seed=1)
    best = min(_mse(_run(mdp, Q, M, m)[0], mdp) for m in GENERIC)
    assert _mse(_run(mdp, Q, M, "regional_moves")[0], mdp) <= best


def test_projection_never_moves_a_guess_away_from_the_truth():
    mdp = _random_dense(3, 3, 4)
    Q, M = _oracle(mdp, 3)
    q = Q.transpose(1, 2, 0).reshape(-1, 3)
    P = mdp.P.reshape(-1, mdp.num_states)
    guesses = np.random.default_rng(0).dirichlet(np.ones(mdp.num_states), size=len(P))
    X = project_consistent(guesses, M, q, iters=20000)
    assert np.all(X >= 0) and np.allclose(X.sum(-1), 1.0)
    assert np.abs(X @ M.T - q).max() <= 1e-6  # it explains Q
    assert np.all(np.linalg.norm(X - P, axis=1) <= np.linalg.norm(guesses - P, axis=1) + 1e-9)
    assert np.linalg.norm(X - P) < 0.9 * np.linalg.norm(guesses - P)


@pytest.mark.parametrize("variant, L", [("deterministic", 1), ("windy", 4), ("teleport", 20)])
def test_fourrooms_no_worse_than_moves(variant, L):
    from qworld_envs import four_rooms

    mdp = four_rooms(variant)
    Q, M = _oracle(mdp, L)
    moves, _ = _run(mdp, Q, M, "moves")
    P_hat, _ = _run(mdp, Q, M, "regional_moves")
    assert _mse(P_hat, mdp) <= max(_mse(moves, mdp), 1e-20)
