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

from qworld import metrics as K

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
    return {K.REWARD_NMSE: nmse,
            K.REWARD_PEARSON: np.array([corr(pearsonr, x, y) for x, y in zip(a, b)]),
            K.REWARD_SPEARMAN: np.array([corr(spearmanr, x, y) for x, y in zip(a_r, b_r)])}


def infer_goal_state(Q_g: np.ndarray, P: np.ndarray, gamma: float) -> tuple[int, np.ndarray]:
    """The state an indicator goal pays for, and its arrival reward, from that goal's
    ``Q_g [S, A]`` and dynamics P alone.

    The goal's terminal state is unknown here (it is what is inferred), so the inverse Bellman
    equation is solved for the arrival values ``m [S]`` (``Q_g[s, a] = sum_s' P[s, a, s'] m[s']``,
    least squares over all (s, a)). Away from the goal the arrival value is the discounted
    value of going on, ``m[s'] = gamma V(s')``; at a terminal goal it is the reward. So
    ``r_hat[s'] = m[s'] - gamma max_a Q_g[s', a]`` is the reward recovered for arriving in s'
    (exact off the goal; at a terminal goal ``r - gamma V(goal)``, where V of a terminal state
    is whatever the agent left there), and the goal is its argmax.

    Returns:
        ``(goal state, r_hat [S])``.
    """
    Q_g = np.asarray(Q_g, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    S, A = Q_g.shape
    m, *_ = np.linalg.lstsq(P.reshape(S * A, S), Q_g.reshape(-1), rcond=None)
    r_hat = m - gamma * Q_g.max(-1)
    return int(np.argmax(r_hat)), r_hat


# The P-learning actor's reward-side task (``extract.tasks: [goal_inference]``): its columns are
# f"{K.GOAL_INFERENCE}/<score>" with the scores of :func:`goal_inference_scores`.
INFERENCE_TASKS = (K.GOAL_INFERENCE,)


def goal_inference_scores(Q: np.ndarray, goal_states, gamma: float, model_for,
                          rewards: np.ndarray | None = None) -> dict[str, float]:
    """Name each goal's cell from its Q and a model ``model_for(g)`` (``P_hat [S, A, S]``) the
    goal never helped build, recovering its arrival reward on the way (:func:`infer_goal_state`).

    Args:
        Q: ``[L, S, A]``; goal_states: ``[L]`` the truth, to score against.
        model_for: ``g -> P_hat [S, A, S]``: extracted from the other goals' Q
            (:func:`held_out_models`), or a model of no goal at all (one learned from experience).
        rewards: ``[L, S]`` the true arrival rewards, to score the recovered ones against
            (None: no reward score); never read to name a goal.

    Returns:
        ``accuracy`` (share of goals named right), ``held_out`` (L) and, with the truth,
        ``reward_pearson``: the mean over the goals of the correlation of the recovered arrival
        reward ``r_hat [S]`` with the true one. (No rank correlation: against an indicator,
        mostly ties, Spearman's rho is capped far below 1 whatever the estimate.)
    """
    Q = np.asarray(Q, dtype=np.float64)
    L = Q.shape[0]
    right = np.zeros(L, dtype=bool)
    pearson = np.full(L, np.nan)
    for g in range(L):
        goal, r_hat = infer_goal_state(Q[g], model_for(g), gamma)
        right[g] = goal == int(goal_states[g])
        truth = None if rewards is None else np.asarray(rewards[g], dtype=np.float64)
        if truth is not None and np.ptp(truth) > 0 and np.ptp(r_hat) > 0:
            pearson[g] = np.corrcoef(r_hat, truth)[0, 1]
    out = {K.ACCURACY: float(right.mean()), K.HELD_OUT: float(L)}
    if rewards is not None:
        out[K.REWARD_PEARSON] = float(np.nanmean(pearson)) if np.isfinite(pearson).any() else float("nan")
    return out


def held_out_models(Q: np.ndarray, M: np.ndarray, method: str, options: dict | None = None,
                    q_mask: np.ndarray | None = None):
    """``g -> P_hat [S, A, S]`` extracted by ``method`` (``plearn.finite.extract``) from every
    goal's Q and M but g's (``Q [L, S, A]``, ``M [L, S]``, L >= 2; ``q_mask [L, S]`` as in
    ``extract``)."""
    from qworld.worldmodel.plearn.finite import extract

    L = len(Q)
    if L < 2:
        raise ValueError(f"goal inference holds one goal out of the others: needs L >= 2, got {L}")

    def model_for(g: int) -> np.ndarray:
        others = np.arange(L) != g
        mask = None if q_mask is None else np.asarray(q_mask)[others]
        return extract(Q[others], M[others], method, q_mask=mask, **dict(options or {}))

    return model_for


def transition_rewards(Q: np.ndarray, goals, states, actions, next_states, dones, gamma: float,
                       kind: str = "soft", alpha: float = 0.5) -> np.ndarray:
    """IQ-Learn's recovered reward of observed transitions: ``r = Q(s, a) - gamma (1 - done) V(s')``.

    Args:
        Q: ``[L, S, A]``; goals, states, actions, next_states: ``[N]`` int; dones: ``[N]`` bool
            (the episode ended on arriving in s'); kind, alpha: V as in :func:`state_values`.

    Returns:
        ``[N]`` rewards.
    """
    Q = np.asarray(Q, dtype=np.float64)
    g, s, a, s2 = (np.asarray(x, dtype=np.int64) for x in (goals, states, actions, next_states))
    V = state_values(Q, kind, alpha)
    return Q[g, s, a] - gamma * (1.0 - np.asarray(dones, dtype=np.float64)) * V[g, s2]


def arrival_rewards(rewards, goals, next_states, dones, num_goals: int, num_states: int,
                    fill: str = "median") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-transition rewards turned into qworld's per-goal arrival rewards, the form P-learning's
    ``M`` takes (``bellman.m_matrix``): the mean reward of arriving in s' under goal g.

    Args:
        rewards, goals, next_states, dones: ``[N]`` observed transitions and their rewards
            (e.g. :func:`transition_rewards` of demonstrations).
        fill: what an (g, s') never arrived in gets: ``"median"`` of the goal's non-terminal
            arrivals (the background reward), or ``"zero"``.

    Returns:
        ``r_hat [L, S]``, ``terminal_hat [L, S]`` bool (an episode ended there) and
        ``seen [L, S]`` bool.
    """
    g = np.asarray(goals, dtype=np.int64)
    s2 = np.asarray(next_states, dtype=np.int64)
    r = np.asarray(rewards, dtype=np.float64)
    total = np.zeros((num_goals, num_states))
    count = np.zeros((num_goals, num_states))
    np.add.at(total, (g, s2), r)
    np.add.at(count, (g, s2), 1.0)
    terminal = np.zeros((num_goals, num_states), dtype=bool)
    terminal[g[np.asarray(dones, dtype=bool)], s2[np.asarray(dones, dtype=bool)]] = True
    seen = count > 0
    r_hat = np.divide(total, count, out=np.zeros_like(total), where=seen)
    if fill not in ("median", "zero"):
        raise ValueError(f"fill must be 'median' or 'zero', got {fill!r}")
    for goal in range(num_goals):
        background = seen[goal] & ~terminal[goal]
        value = float(np.median(r_hat[goal, background])) if fill == "median" and background.any() else 0.0
        r_hat[goal, ~seen[goal]] = value
    return r_hat, terminal, seen
