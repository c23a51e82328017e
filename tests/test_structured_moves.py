"""regional_moves: grid moves shared only where Q says they are (issue 25, item 2), exact Q.

Terminal states of the gymnasium envs (holes, the goal: ``qworld_envs.tabular``) are absorbing,
so Q says nothing of their rows: they are left out of every comparison.
"""

import numpy as np
import pytest
import torch

from qworld.worldmodel.bellman import m_matrix, solve_goal_q
from qworld.worldmodel.oracle import SGD_OPTIONS
from qworld.worldmodel.plearn.finite import extract, method_options
from qworld.worldmodel.plearn.moves import project_consistent

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
    from qworld.worldmodel.plearn.moves import grid_neighbours
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
    if mdp.terminal.any() and "q_mask" not in extra:  # their absorbing rows say nothing of P
        from qworld.worldmodel.plearn.finite import trained_q_mask

        extra["q_mask"] = trained_q_mask(np.broadcast_to(mdp.terminal, Q.shape[:2]))
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


# ---------------------------------------------------------------------------- misspecification visible (item 3)


def test_a_model_whose_assumptions_fail_is_flagged_and_one_that_holds_is_not():
    from qworld import metrics as K
    from qworld.worldmodel.scoring import misspecification

    mdp = _one_room_wind()
    Q, M = _oracle(mdp, 4)
    truth = misspecification(Q, M, mdp.P, mdp.P)
    assert truth[K.MODEL_RESIDUAL] <= 1e-12 and truth[K.MISSPECIFIED] == 0.0
    shared = misspecification(Q, M, _run(mdp, Q, M, "moves")[0], mdp.P)  # one pi everywhere: wrong
    assert shared[K.MISSPECIFIED] == 1.0 and shared[K.RESIDUAL_EXCESS] > 1e3
    regional = misspecification(Q, M, _run(mdp, Q, M, "regional_moves")[0], mdp.P)
    assert regional[K.MISSPECIFIED] == 0.0 and regional[K.RESIDUAL_EXCESS] <= 1.0


def test_the_agents_own_q_error_is_not_counted_against_the_model():
    """With a noisy Q the true P leaves a residual; a model as good as the truth is not flagged,
    one that leaves much more is."""
    from qworld import metrics as K
    from qworld.worldmodel.scoring import misspecification

    mdp = _random_dense(3, 3, 5)
    Q, M = _oracle(mdp, 9)
    Qn = Q + 1e-3 * np.random.default_rng(0).standard_normal(Q.shape)
    truth = misspecification(Qn, M, mdp.P, mdp.P)
    assert truth[K.MODEL_RESIDUAL] > 1e-5 and truth[K.RESIDUAL_EXCESS] == pytest.approx(1.0)
    uniform = np.full_like(mdp.P, 1.0 / mdp.num_states)
    assert misspecification(Qn, M, uniform, mdp.P)[K.MISSPECIFIED] == 1.0


def test_every_finite_row_carries_the_columns_and_the_headline_shows_them(monkeypatch, tmp_path):
    import pandas as pd

    import qworld.agents
    from qworld import metrics as K
    from qworld.sweep.score import score_checkpoint
    from qworld_analysis.report import headline_metrics, headline_table, summary_table
    from qworld_envs import FOUR_ROOMS_ID, make_finite_problem

    env_kwargs = {"variant": "windy", "goal_type": "indicator", "num_goals": 4, "goal_seed": 0}
    problem = make_finite_problem(FOUR_ROOMS_ID, **env_kwargs)
    Q, _ = solve_goal_q(problem.mdp.P, problem.goals.rewards, 0.9, problem.goals.terminal)

    class Agent:
        config = {"env_id": FOUR_ROOMS_ID, "env_kwargs": env_kwargs, "gamma": 0.9, "head": "all_goals", "seed": 0}

        def q_table(self):
            return Q

    monkeypatch.setattr(qworld.agents, "load_q", lambda path: Agent())
    rows = {r[K.METHOD]: r for r in score_checkpoint(tmp_path / "checkpoint_000001", sweep="s", trial_id="t",
                                                     methods=["moves", "column_match"])}
    assert rows["moves"][K.MISSPECIFIED] == 0.0 and rows["moves"][K.MODEL_RESIDUAL] <= 1e-12
    # column_match assumes P deterministic; windy P is not, and Q says so
    assert rows["column_match"][K.MISSPECIFIED] == 1.0 and rows["column_match"][K.MODEL_RESIDUAL] > 1e-3

    flags = [1.0, 0.0, 0.0, 0.0]  # one trial of four flagged: its IQM is 0, its share 0.25
    table = summary_table(pd.DataFrame([
        {K.TRIAL_ID: f"t{i}", K.CHECKPOINT_INDEX: 1, K.ENV: "FourRooms", K.HEAD: "all_goals", K.METHOD: "moves",
         K.ERROR: None, K.P_MSE: 1e-3, K.MODEL_RESIDUAL: 0.1, K.RESIDUAL_EXCESS: 3.0, K.MISSPECIFIED: f}
        for i, f in enumerate(flags)]), reps=100)
    assert headline_metrics(table)[:3] == [K.P_MSE, K.RESIDUAL_EXCESS, K.MISSPECIFIED]
    frame, _ = headline_table(table, K.MISSPECIFIED)
    assert frame.iloc[0]["moves"]["iqm"] == 0.25  # the share of trials flagged, not an IQM of 0s and 1s


def test_noisy_q_with_its_error_as_tol_keeps_the_regions():
    """A learned agent's Q: with ``tol`` at its relative error (and no polish onto the noise)
    the two regions of the one-room wind still come out, where one shared pi cannot."""
    from qworld_envs import indicator_goals

    mdp = _one_room_wind()
    goals = indicator_goals(mdp, 4, seed=0)
    Q, _ = solve_goal_q(mdp.P, goals.rewards, GAMMA, goals.terminal)
    Qn = Q + 1e-4 * np.random.default_rng(0).standard_normal(Q.shape)
    Mn = m_matrix(goals.rewards, Qn.max(-1), GAMMA, goals.terminal)
    P_hat, info = extract(Qn, Mn, "regional_moves", return_info=True, coords=mdp.coords, tol=5e-4, polish=False)
    assert info["num_regions"] == 2
    moves = extract(Qn, Mn, "moves", coords=mdp.coords)
    assert _mse(P_hat, mdp) <= 1e-6 < _mse(moves, mdp)


# --- q_mask: the Q-values of states the agent never acts from say nothing of P ------------


def _garbage_at_terminal_states(mdp, Q, seed=0):
    """Q as a learned agent leaves it: arbitrary values at the states terminal for every goal."""
    bad = np.asarray(mdp.terminal, dtype=bool)
    Q = Q.copy()
    Q[:, bad] = np.random.default_rng(seed).uniform(-1.0, 2.0, Q[:, bad].shape)
    return Q


@pytest.mark.parametrize("method", ["moves", "regional_moves", "pinv", "column_match", "sgd"])
def test_garbage_where_the_agent_never_acts_is_ignored_with_the_mask(method):
    """FrozenLake, exact Q but for arbitrary values at the holes and the goal (as a trained
    network leaves them): with ``trained_q_mask`` every method gives what it gives on the
    exact Q; ``moves`` stays exact, and without the mask the garbage bends its shared pi."""
    from qworld.worldmodel.plearn.finite import trained_q_mask
    from qworld_envs.goals import make_goals

    mdp = _gym_mdp("FrozenLake-v1", map_name="8x8", is_slippery=True)
    goals = make_goals(mdp, "indicator", 4, 0)  # the env's terminal states end every goal's episode
    Q, V = solve_goal_q(mdp.P, goals.rewards, GAMMA, goals.terminal)
    M = m_matrix(goals.rewards, V, GAMMA, goals.terminal)  # V at terminal states never enters M
    noisy = _garbage_at_terminal_states(mdp, Q)
    mask = trained_q_mask(goals.terminal)
    assert not mask[:, mdp.terminal].any() and mask[:, ~mdp.terminal].all()
    keep = _identified(mdp)
    clean, _ = _run(mdp, Q, M, method)
    masked, info = _run(mdp, noisy, M, method, q_mask=mask)
    assert np.abs(masked[keep] - clean[keep]).max() <= (1e-6 if method == "sgd" else 1e-9)
    assert info["residuals"].shape == (mdp.num_states, mdp.num_actions)
    if method == "moves":
        assert np.abs(masked[keep] - mdp.P[keep]).max() <= EXACT
        unmasked, _ = _run(mdp, noisy, M, method, q_mask=None)
        assert _mse(unmasked, mdp) > 100 * _mse(masked, mdp) + 1e-12


def test_mask_leaves_exact_q_alone_and_names_a_bad_shape():
    from qworld.worldmodel.plearn.finite import trained_q_mask

    mdp = _one_room_wind()
    Q, M = _oracle(mdp, 4)
    every = np.ones(Q.shape[:2], dtype=bool)
    for method in ("moves", "pinv"):
        assert np.array_equal(_run(mdp, Q, M, method)[0], _run(mdp, Q, M, method, q_mask=every)[0])
    # a goal's own cell is terminal for that goal only: kept (the agent acts there for the others)
    terminal = np.zeros_like(every)
    terminal[np.arange(4), [3, 7, 11, 15]] = True
    assert trained_q_mask(terminal).all()
    with pytest.raises(ValueError, match=r"q_mask must be a bool \[L, S\] = \[4, 68\]"):
        extract(Q, M, "pinv", q_mask=every[:, :5])


def test_rows_no_goal_constrains_stay_uniform_and_per_state_info_is_in_state_order():
    mdp = _gym_mdp("FrozenLake-v1", map_name="4x4", is_slippery=True)
    Q, M = _oracle(mdp, 16)
    from qworld.worldmodel.plearn.finite import trained_q_mask
    from qworld_envs.goals import make_goals

    mask = trained_q_mask(make_goals(mdp, "indicator", 16, 0).terminal)
    P_hat, info = _run(mdp, _garbage_at_terminal_states(mdp, Q), M, "column_match", q_mask=mask)
    assert np.allclose(P_hat[mdp.terminal], 1.0 / mdp.num_states)
    assert info["match_distance"].shape == (mdp.num_states, mdp.num_actions)
    assert np.isnan(info["match_distance"][mdp.terminal]).all()
    assert np.isfinite(info["match_distance"][~mdp.terminal]).all()


def test_moves_on_noisy_q_is_right_on_every_goal_draw():
    """Windy FourRooms, L = 4, Q with i.i.d. noise at a converged agent's error (q_nmse 3e-4)
    over 10 goal draws x 3 noise draws: ``moves`` keeps no spurious "stay" (its Occam step
    judged at p < 1e-6; at p < 0.001 one of these 30 fits kept 3-4% of it, p_mse 9.7e-6)."""
    from qworld_envs import make_finite_problem

    worst = 0.0
    for goal_seed in range(10):
        problem = make_finite_problem("qworld/FourRooms-v0", variant="windy", num_goals=4, goal_seed=goal_seed)
        P, goals = problem.mdp.P, problem.goals
        Q, _ = solve_goal_q(P, goals.rewards, GAMMA, goals.terminal)
        rng = np.random.default_rng(goal_seed)
        for _ in range(3):
            noisy = Q + rng.normal(0.0, np.sqrt(3e-4 * Q.var()), Q.shape)
            M = m_matrix(goals.rewards, noisy.max(-1), GAMMA, goals.terminal)
            P_hat = extract(noisy, M, "moves", **method_options("moves", P, problem.mdp.coords))
            worst = max(worst, float(np.mean((P_hat - P) ** 2)))
    assert worst <= 5e-6


def _q_noisier_off_the_greedy_action(rel, seed):
    """FrozenLake 8x8 slippery, L = 4: exact Q plus noise of variance ``rel`` x Var(Q) on the
    greedy action's values and 3x that standard deviation on the others' (as a learned agent's:
    it trains its greedy values on its own data, the others only from exploration)."""
    from qworld.worldmodel.plearn.finite import trained_q_mask
    from qworld_envs import make_finite_problem

    problem = make_finite_problem("qworld/FrozenLake-v1", map_name="8x8", is_slippery=True, num_goals=4, goal_seed=0)
    goals = problem.goals
    Q, _ = solve_goal_q(problem.mdp.P, goals.rewards, GAMMA, goals.terminal)
    mask = trained_q_mask(goals.terminal)
    greedy = Q.argmax(-1)[..., None] == np.arange(Q.shape[-1])
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(rel * Q[mask].var()), Q.shape)
    noisy = Q + noise * np.where(greedy, 1.0, 3.0)
    return problem.mdp, noisy, m_matrix(goals.rewards, noisy.max(-1), GAMMA, goals.terminal), mask


def test_action_weight_leaves_exact_q_exact_and_names_a_bad_value():
    mdp, Q, M, mask = _q_noisier_off_the_greedy_action(0.0, 0)
    keep = ~mdp.terminal
    P_hat, info = extract(Q, M, "moves", return_info=True, q_mask=mask, action_weight="auto",
                          **method_options("moves", mdp.P, mdp.coords))
    assert np.abs(P_hat[keep] - mdp.P[keep]).max() <= EXACT and info["action_weight"] == 1.0
    for bad in (0.0, 1.5, "greedy"):
        with pytest.raises(ValueError, match="action_weight"):
            extract(Q, M, "moves", q_mask=mask, action_weight=bad, **method_options("moves", mdp.P, mdp.coords))


def test_action_weight_auto_down_weighs_the_noisier_values_and_fits_pi_closer():
    """On Q whose non-greedy values are 3x noisier, ``auto`` finds a weight below 1 for them and
    its model is closer to P than the unweighted fit on every one of 5 noise draws."""
    errors = {1.0: [], "auto": []}
    for seed in range(5):
        mdp, Q, M, mask = _q_noisier_off_the_greedy_action(1e-3, seed)
        keep = ~mdp.terminal
        for weight in errors:
            P_hat, info = extract(Q, M, "moves", return_info=True, q_mask=mask, action_weight=weight,
                                  **method_options("moves", mdp.P, mdp.coords))
            errors[weight].append(float(np.mean((P_hat[keep] - mdp.P[keep]) ** 2)))
            if weight == "auto":
                assert 0.3 < info["action_weight"] < 0.9, info["action_weight"]
    assert all(a < b for a, b in zip(errors["auto"], errors[1.0])), errors
