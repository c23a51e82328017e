"""The reward side of the inverse Bellman equation: rewards from Q, given the dynamics.

P-learning recovers P given the rewards; this recovers the rewards given P (the true P, or a
P_hat extracted from other goals), as IQ-Learn does from a soft Q:

    r_hat[g, s, a] = Q[g, s, a] - gamma * sum_s' P[s, a, s'] (1 - terminal[g, s']) V[g, s']

with V greedy (``max_a Q``) or soft (``alpha logsumexp(Q / alpha)``). In qworld's convention
(``bellman``) a goal pays ``rewards[g, s']`` on arriving in s', so the truth it is scored
against is the expected reward of (s, a), ``sum_s' P[s, a, s'] rewards[g, s']``.

Shapes: S states, A actions, L goals. Numpy only, no Ray.
"""

from __future__ import annotations

import numpy as np

V_KINDS = ("greedy", "soft")


def state_values(Q: np.ndarray, kind: str = "greedy", alpha: float = 0.5) -> np.ndarray:
    """``V [L, S]`` of ``Q [L, S, A]``: ``max_a Q`` or ``alpha logsumexp(Q / alpha)``."""
    Q = np.asarray(Q, dtype=np.float64)
    if kind == "greedy":
        return Q.max(-1)
    if kind == "soft":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 for soft values, got {alpha}")
        top = Q.max(-1, keepdims=True)
        return (top + alpha * np.log(np.exp((Q - top) / alpha).sum(-1, keepdims=True)))[..., 0]
    raise ValueError(f"kind must be one of {V_KINDS}, got {kind!r}")


def recover_rewards(Q: np.ndarray, P: np.ndarray, gamma: float, terminal: np.ndarray | None = None,
                    kind: str = "greedy", alpha: float = 0.5) -> np.ndarray:
    """``r_hat [L, S, A]``: each (s, a)'s expected reward implied by Q under dynamics P.

    Args:
        Q: ``[L, S, A]``; P: ``[S, A, S]`` (true or extracted); gamma in (0, 1].
        terminal: ``[L, S]`` (or ``[S]``) bool, the episode ends on arriving in s'; None: never.
        kind, alpha: how V is read off Q (:func:`state_values`).
    """
    Q = np.asarray(Q, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    if Q.ndim != 3 or P.ndim != 3 or P.shape != (Q.shape[1], Q.shape[2], Q.shape[1]):
        raise ValueError(f"need Q [L, S, A] and P [S, A, S] of the same S, A; got Q {Q.shape}, P {P.shape}")
    keep = np.ones(Q.shape[:2]) if terminal is None else 1.0 - np.broadcast_to(
        np.asarray(terminal, dtype=bool), Q.shape[:2]).astype(np.float64)
    V = state_values(Q, kind, alpha)
    return Q - gamma * np.einsum("sat,gt->gsa", P, keep * V)


def expected_rewards(P: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """``[L, S, A]`` true expected reward of each (s, a): ``sum_s' P[s, a, s'] rewards[g, s']``."""
    return np.einsum("sat,gt->gsa", np.asarray(P, dtype=np.float64), np.asarray(rewards, dtype=np.float64))


def reward_scores(r_hat: np.ndarray, r_true: np.ndarray) -> dict[str, np.ndarray]:
    """Per goal: ``reward_nmse`` (MSE / Var(truth)), ``reward_pearson``, ``reward_spearman``.

    Args:
        r_hat, r_true: ``[L, S, A]``.

    Returns:
        Each score as ``[L]`` (NaN where the truth or the estimate is constant).
    """
    from scipy.stats import pearsonr, spearmanr

    a = np.asarray(r_hat, dtype=np.float64).reshape(len(r_hat), -1)
    b = np.asarray(r_true, dtype=np.float64).reshape(len(r_true), -1)
    if a.shape != b.shape:
        raise ValueError(f"r_hat and r_true must have the same shape, got {a.shape} and {b.shape}")
    var = b.var(-1)
    nmse = np.where(var > 0, ((a - b) ** 2).mean(-1) / np.where(var > 0, var, 1.0), np.nan)

    def corr(fn, x, y):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            return np.nan
        return float(fn(x, y)[0])

    # Sparse rewards are mostly ties; values equal to 1e-10 must rank as ties, not by rounding noise.
    a_r, b_r = np.round(a, 10), np.round(b, 10)
    return {"reward_nmse": nmse,
            "reward_pearson": np.array([corr(pearsonr, x, y) for x, y in zip(a, b)]),
            "reward_spearman": np.array([corr(spearmanr, x, y) for x, y in zip(a_r, b_r)])}


def infer_goal_state(Q_g: np.ndarray, P: np.ndarray, gamma: float) -> tuple[int, np.ndarray]:
    """The state an indicator goal pays for, from that goal's ``Q_g [S, A]`` and dynamics P.

    The goal's terminal state is unknown here (it is what is inferred), so the inverse Bellman
    equation is solved for the arrival values ``m [S]`` (``Q_g[s, a] = sum_s' P[s, a, s'] m[s']``,
    least squares over all (s, a)); away from the goal the arrival value is the discounted
    value of going on, ``m[s'] = gamma V(s')``, and at the goal it is the reward, so the goal is
    the state where ``m - gamma max_a Q_g`` is largest.

    Returns:
        ``(goal state, score [S])``.
    """
    Q_g = np.asarray(Q_g, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    S, A = Q_g.shape
    m, *_ = np.linalg.lstsq(P.reshape(S * A, S), Q_g.reshape(-1), rcond=None)
    score = m - gamma * Q_g.max(-1)
    return int(np.argmax(score)), score


def held_out_goal_inference(Q: np.ndarray, rewards: np.ndarray, terminal: np.ndarray, gamma: float,
                            goal_states, method: str = "moves", options: dict | None = None) -> np.ndarray:
    """Goal inference with a model the goal never helped build: for each goal g, extract P_hat
    from the other L - 1 goals' Q (``plearn.finite.extract`` with ``method``), then name g's
    goal state from ``Q[g]`` and that P_hat alone (:func:`infer_goal_state`).

    Args:
        Q: ``[L, S, A]`` (L >= 2); rewards, terminal: ``[L, S]`` of the goals (used only for
            the other goals' M); goal_states: ``[L]`` the truth, to score against.
        method, options: the extraction method and its options (``method_options``).

    Returns:
        ``[L]`` bool: whether each held-out goal was named right.
    """
    from qworld.bellman import m_matrix
    from qworld.plearn.finite import extract

    Q = np.asarray(Q, dtype=np.float64)
    L = Q.shape[0]
    if L < 2:
        raise ValueError(f"goal inference holds one goal out of the others: needs L >= 2, got {L}")
    M = m_matrix(np.asarray(rewards), Q.max(-1), gamma, np.asarray(terminal))
    right = np.zeros(L, dtype=bool)
    for g in range(L):
        others = np.arange(L) != g
        P_hat = extract(Q[others], M[others], method, **dict(options or {}))
        right[g] = infer_goal_state(Q[g], P_hat, gamma)[0] == int(goal_states[g])
    return right
