"""World-model extraction from exact and noisy Q (qworld.worldmodel.plearn.finite, qworld.worldmodel.scoring)."""


import numpy as np
import pytest
import torch

from qworld import metrics as K
from qworld.worldmodel.bellman import m_matrix, solve_goal_q
from qworld.worldmodel.plearn._common import project_simplex
from qworld.worldmodel.plearn.diagnose import diagnose
from qworld.worldmodel.plearn.finite import METHODS, extract
from qworld.worldmodel.scoring import (
    column_match_margin,
    nmse,
    p_max_err,
    p_mse,
    p_tv,
    pinv_error_bound,
    q_error_eps,
    score_p,
)

torch.set_num_threads(1)

GAMMA = 0.99
EXACT = 1e-8


# ---------------------------------------------------------------------------- fixtures


def stochastic_mdp(S, A, seed):
    return np.random.default_rng(seed).dirichlet(np.ones(S), size=(S, A))


def sparse_mdp(S, A, N, seed):
    """Every (s, a) has exactly N next states with Dirichlet weights."""
    rng = np.random.default_rng(seed)
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            P[s, a, rng.choice(S, N, replace=False)] = rng.dirichlet(np.ones(N))
    return P


def dense_oracle(P, L, seed):
    """Exact Q and M for L generic dense goals (i.i.d. U(0, 1) rewards on arrival)."""
    rewards = np.random.default_rng(seed + 1000).uniform(0, 1, (L, P.shape[0]))
    Q, V = solve_goal_q(P, rewards, GAMMA)
    return Q, m_matrix(rewards, V, GAMMA), rewards


def goal_oracle(mdp, goals):
    Q, V = solve_goal_q(mdp.P, goals.rewards, GAMMA, goals.terminal)
    return Q, m_matrix(goals.rewards, V, GAMMA, goals.terminal)


def fourrooms(variant):
    from qworld_envs import four_rooms

    return four_rooms(variant)


def assert_valid_rows(P_hat):
    assert np.all(P_hat >= 0)
    assert np.allclose(P_hat.sum(-1), 1.0, atol=1e-12)


# ---------------------------------------------------------------------------- simplex projection


def test_project_simplex_satisfies_kkt():
    rng = np.random.default_rng(0)
    X = rng.normal(0, 2, (200, 7))
    Y = project_simplex(X)
    assert_valid_rows(Y)
    # KKT of min ||y - x||^2 on the simplex: x - y is the same constant theta on the support
    # of y and x <= theta off it.
    for x, y in zip(X, Y):
        on = y > 0
        theta = (x - y)[on]
        assert np.ptp(theta) < 1e-12
        assert np.all(x[~on] <= theta[0] + 1e-12)
    # Points of the simplex are fixed points.
    Pts = rng.dirichlet(np.ones(7), size=50)
    assert np.abs(project_simplex(Pts) - Pts).max() < 1e-15


# ---------------------------------------------------------------------------- Table 1, random MDPs


@pytest.mark.parametrize("seed", [0, 1])
def test_pinv_exact_at_L_equals_S_and_fails_below(seed):
    S, A = 14, 3
    P = stochastic_mdp(S, A, seed)
    Q, M, _ = dense_oracle(P, S, seed)
    P_hat = extract(Q, M, "pinv")
    assert_valid_rows(P_hat)
    assert p_max_err(P_hat, P) <= EXACT
    assert diagnose(M)[K.IDENTIFIABLE_CASE] == "stochastic"
    # Below the threshold recovery really fails, and the diagnosis says so.
    Q, M, _ = dense_oracle(P, S - 3, seed)
    assert p_max_err(extract(Q, M, "pinv"), P) > 1e-2
    d = diagnose(M)
    assert d[K.IDENTIFIABLE_CASE] == "not identifiable" and d[K.M_RANK] == S - 3


@pytest.mark.parametrize("seed", [0, 1])
def test_known_support_exact_at_N_minus_1(seed):
    S, A, N = 14, 3, 4
    P = sparse_mdp(S, A, N, seed)
    Q, M, _ = dense_oracle(P, N - 1, seed)
    assert p_max_err(extract(Q, M, "known_support", support=P > 0), P) <= EXACT
    assert diagnose(M, max_support=N, known_support=P > 0)[K.IDENTIFIABLE_CASE] == "sparse_known"
    assert diagnose(M, max_support=N, known_support=True)[K.IDENTIFIABLE_CASE] == "sparse_known"
    # One goal fewer: the affine system on the support is under-determined.
    Q, M, _ = dense_oracle(P, N - 2, seed)
    assert p_max_err(extract(Q, M, "known_support", support=P > 0), P) > 1e-3
    assert diagnose(M, max_support=N, known_support=P > 0)[K.IDENTIFIABLE_CASE] == "not identifiable"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_search_exact_at_2N_minus_1(seed):
    S, A, N = 12, 3, 3
    P = sparse_mdp(S, A, N, seed)
    Q, M, _ = dense_oracle(P, 2 * N - 1, seed)
    P_hat, info = extract(Q, M, "sparse_search", max_support=N, return_info=True)
    assert p_max_err(P_hat, P) <= EXACT
    assert info["num_nnls"] + info["num_search"] == S * A and info["num_search_inexact"] == 0
    assert diagnose(M, max_support=N)[K.IDENTIFIABLE_CASE] == "sparse_unknown"
    # Below 2N - 1 the unknown-support guarantee is gone (recovery may still get lucky).
    Q, M, _ = dense_oracle(P, 2 * N - 2, seed)
    assert diagnose(M, max_support=N)[K.IDENTIFIABLE_CASE] == "not identifiable"


def test_sparse_search_fails_with_too_few_goals():
    S, A, N = 12, 3, 3
    P = sparse_mdp(S, A, N, 0)
    Q, M, _ = dense_oracle(P, 2, 0)
    assert p_max_err(extract(Q, M, "sparse_search", max_support=N), P) > 1e-2


def test_sparse_search_exhaustive_path_alone_is_exact():
    # Force every pair through the support search: NNLS may only accept 0-sparse answers.
    S, A, N = 10, 2, 2
    P = sparse_mdp(S, A, N, 4)
    Q, M, _ = dense_oracle(P, 2 * N - 1, 4)
    aug = np.vstack([M, np.ones((1, S))])
    from qworld.worldmodel.plearn.finite import _support_search

    rhs = np.vstack([Q.reshape(len(M), -1), np.ones((1, S * A))])
    X, exact = _support_search(aug, rhs, N, np.full(S * A, 1e-8), chunk_size=7)
    assert exact.all()
    assert np.abs(X.reshape(S, A, S) - P).max() <= EXACT


# ---------------------------------------------------------------------------- Table 1, FourRooms


@pytest.mark.parametrize("variant", ["deterministic", "windy", "teleport"])
def test_fourrooms_pinv_with_all_indicator_goals(variant):
    from qworld_envs import indicator_goals

    mdp = fourrooms(variant)
    Q, M = goal_oracle(mdp, indicator_goals(mdp))  # L = 68
    assert p_max_err(extract(Q, M, "pinv"), mdp.P) <= EXACT
    assert diagnose(M)[K.IDENTIFIABLE_CASE] == "stochastic"


@pytest.mark.parametrize(
    "variant, method, num_goals",
    [
        # Table-1 thresholds with N = the largest true support: 1, 3, 16.
        ("deterministic", "known_support", 1),
        ("windy", "known_support", 2),
        ("teleport", "known_support", 15),
        ("deterministic", "sparse_search", 1),
        ("windy", "sparse_search", 5),
        ("teleport", "sparse_search", 31),
    ],
)
def test_fourrooms_sparse_methods_at_threshold(variant, method, num_goals):
    from qworld_envs import dense_goals

    mdp = fourrooms(variant)
    support = mdp.P > 0
    N = int(support.sum(-1).max())
    Q, M = goal_oracle(mdp, dense_goals(mdp, num_goals, seed=0))
    opts = {"support": support} if method == "known_support" else {"max_support": N}
    assert p_max_err(extract(Q, M, method, **opts), mdp.P) <= EXACT
    known = support if method == "known_support" else False
    expected = "sparse_known" if method == "known_support" else "sparse_unknown"
    assert diagnose(M, max_support=N, known_support=known)[K.IDENTIFIABLE_CASE] == expected


def test_fourrooms_column_match_one_dense_goal():
    from qworld_envs import dense_goals, indicator_goals

    mdp = fourrooms("deterministic")
    Q, M = goal_oracle(mdp, dense_goals(mdp, 1, seed=0))
    assert p_max_err(extract(Q, M, "column_match"), mdp.P) == 0.0
    d = diagnose(M, deterministic=True)
    assert d[K.IDENTIFIABLE_CASE] == "deterministic" and d[K.M_GAP] > 0 and d[K.NUM_GOALS] == 1
    # One *sparse* goal is not enough: states at equal distance share a column of M.
    Q, M = goal_oracle(mdp, indicator_goals(mdp, 1, seed=0))
    d = diagnose(M, deterministic=True)
    assert d[K.M_GAP] == 0.0 and d[K.IDENTIFIABLE_CASE] == "not identifiable"
    assert p_max_err(extract(Q, M, "column_match"), mdp.P) == 1.0


def test_table1_thresholds():
    from qworld.worldmodel.plearn.diagnose import variant_thresholds

    assert variant_thresholds("deterministic") == {"deterministic: L ≥ 1": 1}
    assert sorted(variant_thresholds("windy").values()) == [2, 5, 68]  # N = 3
    # teleport cells spread over a 16-cell room: N = 16
    assert sorted(variant_thresholds("teleport").values()) == [15, 31, 68]


def test_sgd_windy_fourrooms_all_indicator_goals():
    from qworld_envs import indicator_goals

    mdp = fourrooms("windy")
    Q, M = goal_oracle(mdp, indicator_goals(mdp))
    P_hat, info = extract(Q, M, "sgd", return_info=True, seed=0)
    assert_valid_rows(P_hat)
    curve = info["loss_curve"]
    assert curve.ndim == 1 and len(curve) > 100 and curve[-100:].mean() < 1e-3 * curve[0]
    assert p_mse(P_hat, mdp.P) <= 1e-4  # its speed is benchmarks/'s business, not a test's


# ---------------------------------------------------------------------------- noisy Q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pinv_error_within_bound_for_noisy_q(seed):
    S, A = 12, 3
    P = stochastic_mdp(S, A, seed)
    Q, M, rewards = dense_oracle(P, S, seed)
    for delta in (1e-6, 1e-4):
        Q_hat = Q + np.random.default_rng(seed).uniform(-delta, delta, Q.shape)
        M_hat = m_matrix(rewards, Q_hat.max(-1), GAMMA)  # what an agent's Q would give
        P_hat, info = extract(Q_hat, M_hat, "pinv", return_info=True)
        bound = pinv_error_bound(M_hat, GAMMA, q_error_eps(Q_hat, Q))
        raw_err = np.abs(info["unprojected"] - P).sum(-1).max()
        assert 0 < raw_err <= bound
        assert np.abs(P_hat - P).sum(-1).max() <= bound


def test_pinv_error_bound_is_inf_without_left_inverse():
    assert pinv_error_bound(np.ones((2, 5)), GAMMA, 1e-3) == np.inf


def test_column_match_exact_within_margin_and_not_far_beyond():
    from qworld_envs import dense_goals

    mdp = fourrooms("deterministic")
    goals = dense_goals(mdp, 1, seed=0)
    Q, M = goal_oracle(mdp, goals)
    margin = column_match_margin(M, GAMMA)
    assert margin > 0
    rng = np.random.default_rng(0)
    for scale, exact in ((0.99, True), (50.0, False)):
        noise = rng.uniform(-1, 1, Q.shape)
        Q_hat = Q + scale * margin * noise / np.abs(noise).max()
        assert (q_error_eps(Q_hat, Q) < margin) == exact
        M_hat = m_matrix(goals.rewards, Q_hat.max(-1), GAMMA, goals.terminal)
        err = p_max_err(extract(Q_hat, M_hat, "column_match"), mdp.P)
        assert (err == 0.0) == exact


# ---------------------------------------------------------------------------- scores and API


def test_scores():
    P = stochastic_mdp(5, 2, 0)
    P_hat = stochastic_mdp(5, 2, 1)
    s = score_p(P_hat, P)
    assert set(s) == {K.P_MSE, K.P_TV, K.P_MAX_ERR}
    assert s[K.P_MSE] == pytest.approx(((P_hat - P) ** 2).sum() / P.size)
    assert s[K.P_TV] == pytest.approx(0.5 * np.abs(P_hat - P).sum() / 10)
    assert s[K.P_MAX_ERR] == pytest.approx(np.abs(P_hat - P).max())
    assert p_tv(P, P) == 0 and p_mse(P, P) == 0
    assert 0 < p_tv(P_hat, P) <= 1
    x = np.arange(10.0)
    assert nmse(x + 1, x) == pytest.approx(1 / np.var(x))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_rows_and_info(method):
    S, A, N = 8, 2, 2
    P = sparse_mdp(S, A, N, 0)
    Q, M, _ = dense_oracle(P, S, 0)
    opts = {"known_support": {"support": P > 0}, "sparse_search": {"max_support": N}, "sgd": {"steps": 20},
            "moves": {"coords": np.argwhere(np.ones((2, 4)))},
            "regional_moves": {"coords": np.argwhere(np.ones((2, 4)))}}
    P_hat, info = extract(Q, M, method, return_info=True, **opts.get(method, {}))
    assert P_hat.shape == (S, A, S)
    assert_valid_rows(P_hat)
    assert info["residuals"].shape == (S, A)
    assert info[K.FIT_SECONDS] >= 0
    if method == "sgd":
        assert isinstance(info["loss_curve"], np.ndarray) and len(info["loss_curve"]) == 20


def test_extract_errors_are_clear():
    Q = np.zeros((3, 4, 2))
    M = np.zeros((3, 4))
    with pytest.raises(ValueError, match="pinv.*known_support.*sparse_search.*column_match.*sgd"):
        extract(Q, M, "magic")
    with pytest.raises(ValueError, match="disagree"):
        extract(Q, np.zeros((3, 5)), "pinv")
    with pytest.raises(ValueError, match=r"\[L, S, A\]"):
        extract(np.zeros((3, 4)), M, "pinv")
    with pytest.raises(ValueError, match="support"):
        extract(Q, M, "known_support")
    with pytest.raises(ValueError, match="max_support"):
        extract(Q, M, "sparse_search")
    with pytest.raises(ValueError, match="unknown options"):
        extract(Q, M, "pinv", support=None)


# ---------------------------------------------------------------------------- moves (shared parameters)

SMALL_LAYOUT = """
#########
#...#...#
#.T.....#
#...#...#
##.###.##
#...#...#
#.......#
#...#.T.#
#########
"""


def _moves(mdp, goals, **options):
    Q, M = goal_oracle(mdp, goals)
    return extract(Q, M, "moves", return_info=True, coords=mdp.coords, **options)


@pytest.mark.parametrize("variant, num_goals", [("deterministic", 1), ("windy", 3), ("windy", 4)])
def test_moves_exact_from_exact_q_at_the_papers_goal_counts(variant, num_goals):
    from qworld_envs import indicator_goals

    mdp = fourrooms(variant)
    P_hat, info = _moves(mdp, indicator_goals(mdp, num_goals, seed=0))
    assert_valid_rows(P_hat)
    assert p_mse(P_hat, mdp.P) <= 1e-20
    assert len(info["jump_cells"]) == 0


def test_moves_finds_the_teleports_and_nothing_else():
    from qworld_envs import indicator_goals

    mdp = fourrooms("teleport")
    P_hat, info = _moves(mdp, indicator_goals(mdp, 20, seed=0))
    assert sorted(info["jump_cells"]) == sorted(mdp.meta["teleport_states"])
    assert p_mse(P_hat, mdp.P) <= 2e-5  # with L < 68 the jump target is seen only through M
    rest = np.setdiff1d(np.arange(mdp.num_states), mdp.meta["teleport_states"])
    assert np.abs(P_hat[rest] - mdp.P[rest]).max() <= 1e-8


@pytest.mark.parametrize("variant", ["windy", "teleport"])
def test_moves_on_another_layout(variant):
    from qworld_envs import four_rooms, indicator_goals

    mdp = four_rooms(variant, layout=SMALL_LAYOUT)
    P_hat, info = _moves(mdp, indicator_goals(mdp, 12, seed=1))
    tele = mdp.meta["teleport_states"] if variant == "teleport" else []  # 'T' is a plain cell otherwise
    assert sorted(info["jump_cells"]) == sorted(tele)
    rest = np.setdiff1d(np.arange(mdp.num_states), tele)
    assert np.abs(P_hat[rest] - mdp.P[rest]).max() <= 1e-8
    for s in tele:  # a jump row: the same whatever the action, and it explains Q
        assert np.abs(P_hat[s] - P_hat[s, :1]).max() <= 1e-6
        assert info["residuals"][s].max() <= 1e-6
        # 12 goals see the room's 7 cells only through M: most of the mass, not all, lands there
        room = [r for r in mdp.meta["rooms"] if set(np.flatnonzero(mdp.P[s, 0])) <= set(r)][0]
        assert P_hat[s, 0, room].sum() >= 0.5


@pytest.mark.parametrize("walls", ["one-way", "two-way"])
def test_moves_learns_a_wall_between_two_free_cells(walls):
    """A wall no layout shows (free cells on both sides): the method is not told; Q tells it."""
    from qworld_envs import FiniteMDP, dense_goals

    base = fourrooms("windy")
    s, t = base.cell_to_state[(2, 2)], base.cell_to_state[(2, 3)]
    P = base.P.copy()
    for a in range(4):  # every mass from (2,2) into (2,3) now bounces back, and vice versa
        P[s, a, s] += P[s, a, t]
        P[s, a, t] = 0.0
        P[t, a, t] += P[t, a, s]
        P[t, a, s] = 0.0
    mdp = FiniteMDP(P, coords=base.coords)
    P_hat, info = _moves(mdp, dense_goals(mdp, 2, seed=0), walls=walls)
    assert p_mse(P_hat, P) <= 1e-20
    assert info["opening"][s, 2] == pytest.approx(0.0, abs=1e-9)  # move right from (2,2) is shut


def test_moves_does_not_mistake_noise_for_jumps():
    from qworld_envs import indicator_goals

    mdp = fourrooms("windy")
    goals = indicator_goals(mdp, 4, seed=0)
    Q, _ = goal_oracle(mdp, goals)
    Qn = Q + 1e-3 * np.random.default_rng(0).standard_normal(Q.shape)
    Mn = m_matrix(goals.rewards, Qn.max(-1), GAMMA, goals.terminal)
    P_hat, info = extract(Qn, Mn, "moves", return_info=True, coords=mdp.coords)
    assert len(info["jump_cells"]) == 0
    pinv = extract(Qn, Mn, "pinv")
    assert p_mse(P_hat, mdp.P) <= 1e-4 < p_mse(pinv, mdp.P)


def test_moves_needs_coordinates():
    Q, M = np.zeros((2, 4, 4)), np.zeros((2, 4))
    with pytest.raises(ValueError, match="coords"):
        extract(Q, M, "moves")
    with pytest.raises(ValueError, match="coords has 3 cells"):
        extract(Q, M, "moves", coords=np.zeros((3, 2)))


def test_diagnosis_says_why_one_indicator_goal_is_not_enough():
    from qworld_envs import dense_goals, indicator_goals

    mdp = fourrooms("deterministic")
    _, M = goal_oracle(mdp, indicator_goals(mdp, 1, seed=0))
    d = diagnose(M, deterministic=True)
    assert d[K.IDENTIFIABLE_CASE] == "not identifiable"
    assert "same distance" in d[K.IDENTIFIABLE_REASON] and "cannot tell them apart" in d[K.IDENTIFIABLE_REASON] and "rank M = 1 < S = 68" in d[K.IDENTIFIABLE_REASON]
    _, M = goal_oracle(mdp, dense_goals(mdp, 1, seed=0))
    assert diagnose(M, deterministic=True)[K.IDENTIFIABLE_CASE] == "deterministic"
    # known only up to an error larger than the gap, the same M no longer identifies P
    noisy = diagnose(M, deterministic=True, gap_tol=1.0)
    assert noisy[K.IDENTIFIABLE_CASE] == "not identifiable" and "closer than 1" in noisy[K.IDENTIFIABLE_REASON]


def test_moves_drops_the_mass_noise_spreads_when_the_smaller_model_fits():
    """From noisy Q a deterministic P comes out exactly deterministic (F-test on pi's support);
    windy keeps its three moves."""
    from qworld_envs import indicator_goals

    for variant, exact in (("deterministic", True), ("windy", False)):
        mdp = fourrooms(variant)
        goals = indicator_goals(mdp, 4, seed=0)
        Q, _ = goal_oracle(mdp, goals)
        Qn = Q + 1e-3 * np.random.default_rng(1).standard_normal(Q.shape)
        Mn = m_matrix(goals.rewards, Qn.max(-1), GAMMA, goals.terminal)
        P_hat, info = extract(Qn, Mn, "moves", return_info=True, coords=mdp.coords)
        assert info["pi_simplified"]
        assert np.count_nonzero(info["pi"], axis=1).tolist() == ([1] * 4 if exact else [3] * 4)
        if exact:
            assert p_mse(P_hat, mdp.P) == 0.0
        unpruned = extract(Qn, Mn, "moves", coords=mdp.coords, pi_prune=0.0)
        assert p_mse(P_hat, mdp.P) <= p_mse(unpruned, mdp.P)


def test_moves_keeps_small_moves_that_are_real():
    """The other side of the F-test: a wind that slips 5% to each side of the intended move
    (90%) lies below ``pi_prune`` (0.2) x the largest move, so the Occam step refits without
    the slips, and must keep the larger model: from exact Q only an exact smaller fit would
    do (it is not exact), from noisy Q the smaller model's misfit grows far beyond the noise
    (F-test, p < 0.001). Kept, the slips would be lost: p_mse 2.1e-4 instead of ~0."""
    from qworld.worldmodel.plearn.moves import grid_neighbours, moves_model
    from qworld_envs import FiniteMDP, indicator_goals

    base = fourrooms("deterministic")  # actions 0..3 = up, right, down, left = moves 1..4
    nbr = grid_neighbours(base.coords)
    pi = np.zeros((4, 5))
    slips = np.array([(2, 4), (1, 3), (2, 4), (1, 3)])  # the two moves at right angles
    pi[np.arange(4), np.arange(4) + 1] = 0.9
    pi[np.arange(4)[:, None], slips] = 0.05
    P = moves_model(pi, (nbr >= 0).astype(np.float64), nbr, np.zeros((len(nbr), len(nbr))))
    mdp = FiniteMDP(P, coords=base.coords)
    goals = indicator_goals(mdp, 4, seed=0)
    Q, _ = goal_oracle(mdp, goals)
    for noise, mse in ((0.0, 1e-20), (1e-3, 1e-4)):
        Qn = Q + noise * np.random.default_rng(1).standard_normal(Q.shape)
        Mn = m_matrix(goals.rewards, Qn.max(-1), GAMMA, goals.terminal)
        P_hat, info = extract(Qn, Mn, "moves", return_info=True, coords=mdp.coords)
        assert not info["pi_simplified"], noise
        assert (info["pi"][np.arange(4)[:, None], slips] > 0.02).all(), (noise, info["pi"])  # 0.029..0.048 noisy
        assert p_mse(P_hat, P) <= mse, noise


def test_two_way_walls_let_the_other_side_outvote_one_bad_q_value():
    from qworld_envs import dense_goals

    mdp = fourrooms("deterministic")
    goals = dense_goals(mdp, 2, seed=0)
    Q, M = goal_oracle(mdp, goals)
    s, t = mdp.cell_to_state[(2, 2)], mdp.cell_to_state[(2, 3)]
    Q = Q.copy()
    g = int(np.argmax(np.abs(M[:, t] - M[:, s])))
    Q[g, s, 1] = M[g, s]  # for its clearest goal the agent "believes" right from (2,2) stays put
    one = extract(Q, M, "moves", coords=mdp.coords, walls="one-way")
    two = extract(Q, M, "moves", coords=mdp.coords, walls="two-way")
    assert one[s, 1, s] == 1.0  # one-way: that Q-value alone decides
    assert p_mse(two, mdp.P) == 0.0  # two-way: (2,3) -> (2,2) is open, so is the way back
