"""Scores of extracted world models, and the paper's perturbation bounds; one method's
extraction scored and planned with (:func:`extract_and_plan`, :func:`score_and_plan`: what a
sweep's scorer and the oracle study both run per method).

Shapes: S states, A actions, L goals. Numpy only; metric keys from :mod:`qworld.metrics`.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from qworld import metrics as K
from qworld.worldmodel.planning import run_safety_task, task_name


def _pair(P_hat: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    P_hat = np.asarray(P_hat, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    if P_hat.shape != P.shape or P.ndim != 3:
        raise ValueError(f"P_hat and P must both have shape [S, A, S], got {P_hat.shape} and {P.shape}")
    return P_hat, P


def p_mse(P_hat: np.ndarray, P: np.ndarray) -> float:
    """Mean over all ``(s, a, s')`` of ``(P_hat - P)^2`` (the paper's plotted MSE).

    Args:
        P_hat, P: ``[S, A, S]``.
    """
    P_hat, P = _pair(P_hat, P)
    return float(np.mean((P_hat - P) ** 2))


def p_tv(P_hat: np.ndarray, P: np.ndarray) -> float:
    """Mean over ``(s, a)`` of the total variation distance ``0.5 ||P_hat(s,a) - P(s,a)||_1``.

    Args:
        P_hat, P: ``[S, A, S]``.
    """
    P_hat, P = _pair(P_hat, P)
    return float(np.mean(0.5 * np.abs(P_hat - P).sum(axis=-1)))


def p_max_err(P_hat: np.ndarray, P: np.ndarray) -> float:
    """Largest absolute entry error ``max |P_hat - P|``.

    Args:
        P_hat, P: ``[S, A, S]``.
    """
    P_hat, P = _pair(P_hat, P)
    return float(np.abs(P_hat - P).max())


def nmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Normalised MSE: ``mean((pred - truth)^2) / Var(truth)`` over all entries.

    Args:
        pred, truth: arrays of one shape. A constant ``truth`` gives inf (nan if also exact).
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth must have one shape, got {pred.shape} and {truth.shape}")
    mse = float(np.mean((pred - truth) ** 2))
    var = float(np.var(truth))
    if var == 0.0:
        return float("nan") if mse == 0.0 else float("inf")
    return mse / var


def score_p(P_hat: np.ndarray, P: np.ndarray) -> dict:
    """``{p_mse, p_tv, p_max_err}`` of ``P_hat[S, A, S]`` against the true ``P[S, A, S]``."""
    return {
        K.P_MSE: p_mse(P_hat, P),
        K.P_TV: p_tv(P_hat, P),
        K.P_MAX_ERR: p_max_err(P_hat, P),
    }


def model_residual(Q: np.ndarray, M: np.ndarray, P_hat: np.ndarray, rows: np.ndarray | None = None,
                   q_mask: np.ndarray | None = None) -> float:
    """RMS of the Bellman residual ``Q - M P_hat`` over goals and the ``rows`` states' (s, a),
    over the RMS of Q there: the share of Q the model fails to explain (0 when it explains it).

    Args:
        Q: ``[L, S, A]``; M: ``[L, S]``; P_hat: ``[S, A, S]``; rows: ``[S]`` bool, the states
            scored (default all); q_mask: ``[L, S]`` bool, the (goal, state) Q-values that
            constrain P (``plearn.finite.trained_q_mask``; default all).
    """
    Q = np.asarray(Q, dtype=np.float64)
    rows = np.ones(Q.shape[1], dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    keep = np.ones(Q.shape[:2], dtype=bool) if q_mask is None else np.asarray(q_mask, dtype=bool)
    keep = np.broadcast_to(keep[:, rows, None], Q[:, rows].shape)
    pred = np.einsum("sat,lt->lsa", np.asarray(P_hat, dtype=np.float64)[rows], np.asarray(M, dtype=np.float64))
    q = Q[:, rows]
    scale = float(np.sqrt(np.mean(q[keep] ** 2))) if keep.any() else 0.0
    return float(np.sqrt(np.mean((q - pred)[keep] ** 2))) / scale if scale > 0 else float("nan")


def misspecification(Q: np.ndarray, M: np.ndarray, P_hat: np.ndarray, P: np.ndarray,
                     rows: np.ndarray | None = None, threshold: float = K.MISSPECIFIED_EXCESS,
                     q_mask: np.ndarray | None = None) -> dict:
    """How much of the agent's Q a model fails to explain beyond the agent's own Q error.

    The true ``P`` with the same (agent's) Q and M leaves the residual the agent's Q error
    alone makes; ``residual_excess`` is the model's residual over it (floored at 1e-9, the
    round-off of exact Q), ``misspecified`` (1.0 / 0.0) says it exceeds ``threshold``.

    Returns:
        ``{model_residual, residual_excess, misspecified}``.
    """
    own = model_residual(Q, M, P_hat, rows, q_mask)
    truth = model_residual(Q, M, P, rows, q_mask)
    excess = own / max(truth, 1e-9) if np.isfinite(own) else float("nan")
    flag = float(excess > threshold) if np.isfinite(excess) else float("nan")
    return {K.MODEL_RESIDUAL: own, K.RESIDUAL_EXCESS: excess, K.MISSPECIFIED: flag}


def q_error_eps(Q_hat: np.ndarray, Q: np.ndarray) -> float:
    """The error size ``eps`` used by the bounds below: ``sum_g max_{s,a} |Q_hat - Q|``.

    That is the L1 norm over goals of each goal's sup-norm Q error.

    Args:
        Q_hat, Q: ``[L, S, A]``.
    """
    Q_hat = np.asarray(Q_hat, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    if Q_hat.shape != Q.shape or Q.ndim != 3:
        raise ValueError(f"Q_hat and Q must both have shape [L, S, A], got {Q_hat.shape} and {Q.shape}")
    return float(np.abs(Q_hat - Q).reshape(Q.shape[0], -1).max(axis=1).sum())


def pinv_error_bound(M: np.ndarray, gamma: float, eps: float, m: float = 1.0) -> float:
    """Bound on ``||P_hat(s,a) - P(s,a)||_1`` for pinv extraction from ``eps``-approximate Q.

    ``bound = ||M^+||_1 (1 + gamma m) eps`` (the paper's form), where:

    - ``M`` is the M matrix the extraction used, i.e. built from the *approximate* values
      (``M_hat = r + gamma (1 - term) V_hat``), with full column rank (L >= S), so that
      ``M^+ M = I`` and ``P_raw - P = M^+ (E - dM p)`` exactly, with ``E = Q_hat(s,a) - Q(s,a)``,
      ``dM = M_hat - M_true`` and ``p = P(s, a)``;
    - ``||M^+||_1`` is the induced 1-norm (largest absolute column sum of the ``[S, L]`` M^+);
    - ``eps = sum_g max_{s,a} |Q_hat_g - Q_g|`` (see :func:`q_error_eps`): the L1 norm over goals
      of the per-goal sup errors eps_g, so ``||E||_1 <= eps``;
    - ``m = 1``: ``V_hat = max_a Q_hat`` (or ``sum_a pi Q_hat``) moves by at most eps_g per goal,
      so every entry of row g of dM moves by at most ``gamma eps_g``, and since p is a
      probability vector ``||dM p||_1 <= gamma sum_g eps_g = gamma m eps`` with m = 1.
      (Measure eps differently and m changes: with ``eps = max_{s,a} ||Q_hat(s,a) - Q(s,a)||_1``,
      the max over actions inside V makes ``m = |A|`` the valid choice.)

    The bound holds for the unprojected ``M^+ Q_hat``; the simplex projection keeps it in
    practice but is only non-expansive in L2.

    Args:
        M: ``[L, S]``.
        gamma: discount.
        eps: Q error as defined above.
        m: see above (1 for the default eps).

    Returns:
        The bound (float; inf when M has no left inverse).
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"M must have shape [L, S], got {M.shape}")
    if np.linalg.matrix_rank(M) < M.shape[1]:
        return float("inf")
    pinv_norm = float(np.abs(np.linalg.pinv(M)).sum(axis=1).max())  # max column sum of M^+ [S, L]
    return pinv_norm * (1.0 + gamma * m) * float(eps)


def column_match_margin(M: np.ndarray, gamma: float, m: float = 1.0) -> float:
    """Largest ``eps`` for which column matching is still guaranteed exact: ``gap / (2 (1 + gamma m))``.

    With ``gap`` the smallest Euclidean distance between two columns of M, eps and m as in
    :func:`pinv_error_bound`: the true column k satisfies ``||M_hat[:, k] - Q_hat(s,a)||_2 <=
    ||E||_2 + ||dM[:, k]||_2 <= (1 + gamma m) eps`` while every other column is at least
    ``gap - (1 + gamma m) eps`` away, so the argmin is k whenever ``eps < margin``. Here ``M``
    is the exact (noise-free) M whose gap is meant.

    Args:
        M: ``[L, S]``.
        gamma: discount.
        m: see :func:`pinv_error_bound`.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"M must have shape [L, S], got {M.shape}")
    cols = M.T
    diff = np.linalg.norm(cols[:, None, :] - cols[None, :, :], axis=-1)
    np.fill_diagonal(diff, np.inf)
    gap = float(diff.min())
    return gap / (2.0 * (1.0 + gamma * m))


def policy_success(P: np.ndarray, Q: np.ndarray, terminal: np.ndarray, horizon: int,
                   success: np.ndarray | None = None) -> np.ndarray:
    """Probability that the greedy policy of each goal reaches one of its success states
    within ``horizon`` steps, from a start state uniform over its non-terminal states (the
    finite envs' reset distribution, ``qworld_envs.goals.start_states``).

    Args:
        P: ``[S, A, S]`` the true dynamics; Q: ``[L, S, A]`` (greedy ties to the lowest action,
            as ``bellman.greedy_policy``); terminal: ``[L, S]`` bool; horizon: the time limit;
            success: ``[L, S]`` bool, the terminal states that count (``GoalSet.success``:
            an env's holes end the episode without success); None = every terminal state.

    Returns:
        ``[L]`` success probabilities (NaN for a goal with no success state).
    """
    P = np.asarray(P, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    terminal = np.asarray(terminal, dtype=bool)
    success = terminal if success is None else np.asarray(success, dtype=bool)
    S = P.shape[0]
    out = np.full(Q.shape[0], np.nan)
    for g in range(Q.shape[0]):
        done = terminal[g]
        if not success[g].any() or done.all():
            continue
        P_pi = P[np.arange(S), Q[g].argmax(-1)]  # [S, S]
        P_pi[done] = 0.0
        P_pi[done, done] = 1.0  # arrival ends the episode: the mass stays where it arrived
        dist = (~done).astype(np.float64) / (~done).sum()
        for _ in range(int(horizon)):
            dist = dist @ P_pi
        out[g] = dist[success[g]].sum()
    return out


def extract_and_plan(Q: np.ndarray, M: np.ndarray, mdp: Any, method: str, options: Mapping[str, Any],
                     gamma: float, optimal: Mapping[str, np.ndarray],
                     q_mask: np.ndarray | None = None) -> tuple[np.ndarray, dict, dict[str, dict]]:
    """One extraction method on one finite Q, scored and planned with.

    Args:
        Q: ``[L, S, A]``; M: ``[L, S]`` (``bellman.m_matrix``); q_mask: ``[L, S]`` the Q-values
            that constrain P (``plearn.finite.trained_q_mask`` for a learned agent).
        mdp: the true ``FiniteMDP``.
        options: the method's ``extract`` keywords (``plearn.finite.method_options``, ...).
        optimal: task (a ``planning.SAFETY_TASKS`` name or a ``planning.PlanningTask``) -> the
            task's optimal policy in the true MDP (``planning.task_optimal_plan``); one plan is
            run per task.

    Returns:
        ``(P_hat [S, A, S], {fit_seconds, p_mse, p_tv, p_max_err, p_rows_unscored},
        {task name: plan metrics})``.
    """
    from qworld.worldmodel.plearn.finite import extract  # looked up per call (scipy loads on first use)

    start = time.perf_counter()
    P_hat = extract(Q, M, method, q_mask=q_mask, **options)
    seconds = time.perf_counter() - start
    scores, plans = score_and_plan(P_hat, mdp, gamma, optimal)
    return P_hat, {K.FIT_SECONDS: seconds, **scores}, plans


def score_and_plan(P_hat: np.ndarray, mdp: Any, gamma: float,
                   optimal: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, dict]]:
    """Any finite world model ``P_hat [S, A, S]`` scored against the true ``mdp`` and planned
    with: ``({p_mse, p_tv, p_max_err, p_rows_unscored}, {task name: plan metrics})`` (see
    :func:`extract_and_plan`). The rows of the MDP's terminal states (``mdp.terminal``), which
    no Q constrains, are left out of the scores and counted in ``p_rows_unscored``."""
    plans = {task_name(task): run_safety_task(mdp, P_hat, task, gamma=gamma, optimal_policy=policy)
             for task, policy in optimal.items()}
    scored = ~mdp.terminal
    return {**score_p(P_hat[scored], mdp.P[scored]), K.P_ROWS_UNSCORED: float((~scored).sum())}, plans
