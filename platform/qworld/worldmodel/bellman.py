"""Exact goal-conditioned Q and V for finite MDPs, and the M matrix of the inverse Bellman equation.

Shapes: S states, A actions, L goals. Conventions (DESIGN.md, PAPER_NOTES.md):

- ``P[s, a, s'] = Pr(s' | s, a)``;
- a goal ``g`` pays ``rewards[g, s']`` on *arriving* in ``s'`` and, when ``terminal[g, s']``,
  the episode ends there (no value after it);
- ``M[g, s'] = rewards[g, s'] + gamma * (1 - terminal[g, s']) * V[g, s']``, so that
  ``Q[g, s, a] = sum_s' P[s, a, s'] M[g, s']``: the inverse Bellman equation ``Q(s,a) = M P(.|s,a)``.

Numpy only: pure functions from arrays to arrays, no Ray.
"""

from __future__ import annotations

import numpy as np

SOLVERS = ("auto", "policy_iteration", "value_iteration")
# Above this many states a dense [L, S, S] solve per policy-iteration step costs more than
# value iteration's O(L S^2 A / (1 - gamma)) sweeps, so "auto" switches.
_AUTO_PI_MAX_STATES = 1000


def _check_inputs(P: np.ndarray, rewards: np.ndarray, gamma: float, terminal: np.ndarray | None):
    """Validate and normalise ``(P[S,A,S], rewards[L,S], gamma, terminal[L,S])``."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 3 or P.shape[0] != P.shape[2]:
        raise ValueError(f"P must have shape [S, A, S], got {P.shape}")
    S = P.shape[0]
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim == 1:  # one goal given as rewards[S]
        rewards = rewards[None]
    if rewards.ndim != 2 or rewards.shape[1] != S:
        raise ValueError(f"rewards must have shape [L, S] with S={S}, got {rewards.shape}")
    if not np.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    if not (0.0 <= float(gamma) < 1.0):
        raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
    if terminal is None:
        terminal = np.zeros(rewards.shape, dtype=bool)
    else:
        terminal = np.asarray(terminal, dtype=bool)
        if terminal.ndim == 1:  # the same terminal states for every goal
            terminal = np.broadcast_to(terminal, rewards.shape)
        if terminal.shape != rewards.shape:
            raise ValueError(f"terminal must have the shape of rewards {rewards.shape}, got {terminal.shape}")
    return P, rewards, float(gamma), terminal


def m_matrix(
    rewards: np.ndarray, V: np.ndarray, gamma: float, terminal: np.ndarray | None = None
) -> np.ndarray:
    """The M matrix of the inverse Bellman equation.

    Args:
        rewards: ``[L, S]`` reward on arriving in s'.
        V: ``[L, S]`` state values (``max_a Q`` for the greedy policy, ``sum_a pi Q`` otherwise).
        gamma: discount.
        terminal: ``[L, S]`` bool (or ``[S]``, shared by all goals); None = never terminal.

    Returns:
        ``M[L, S] = rewards + gamma * (1 - terminal) * V``.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    if V.shape != rewards.shape:
        raise ValueError(f"V must have the shape of rewards {rewards.shape}, got {V.shape}")
    if terminal is None:
        return rewards + gamma * V
    terminal = np.broadcast_to(np.asarray(terminal, dtype=bool), rewards.shape)
    return rewards + gamma * np.where(terminal, 0.0, V)


def backup(P: np.ndarray, M: np.ndarray) -> np.ndarray:
    """One Bellman backup through the dynamics: ``Q[g, s, a] = sum_s' P[s, a, s'] M[g, s']``.

    Args:
        P: ``[S, A, S]``.
        M: ``[L, S]``.

    Returns:
        ``[L, S, A]``.
    """
    return np.einsum("sat,lt->lsa", P, M, optimize=True)


def greedy_policy(Q: np.ndarray, tie_tol: float = 1e-12) -> np.ndarray:
    """One-hot greedy policy, ties broken towards the lowest action index.

    Args:
        Q: ``[..., S, A]`` (usually ``[L, S, A]``).
        tie_tol: actions within ``tie_tol * max(1, |Q|max)`` of the best count as tied, so
            values equal up to float round-off give the same (lowest) action on every machine.

    Returns:
        ``[..., S, A]`` float64 one-hot.
    """
    Q = np.asarray(Q, dtype=np.float64)
    scale = max(1.0, float(np.abs(Q).max(initial=0.0)))
    best = Q.max(axis=-1, keepdims=True)
    # argmax returns the first True: the lowest tied action.
    action = np.argmax(Q >= best - tie_tol * scale, axis=-1)
    return np.eye(Q.shape[-1])[action]


def _evaluate(P, rewards, gamma, keep, policy_probs):
    """Exact policy evaluation, one dense linear solve per goal.

    ``V = T_pi (r + gamma keep V)`` with ``T_pi[l, s, s'] = sum_a pi[l, s, a] P[s, a, s']``, i.e.
    ``(I - gamma T_pi diag(keep)) V = T_pi r``.

    Args:
        P: ``[S, A, S]``; rewards, keep: ``[L, S]`` (``keep = 1 - terminal``);
        policy_probs: ``[L, S, A]``.

    Returns:
        ``V[L, S]``.
    """
    S = P.shape[0]
    T = np.einsum("lsa,sat->lst", policy_probs, P, optimize=True)
    lhs = np.eye(S)[None] - gamma * T * keep[:, None, :]
    rhs = np.einsum("lst,lt->ls", T, rewards)
    return np.linalg.solve(lhs, rhs[..., None])[..., 0]


def _policy_iteration(P, rewards, gamma, keep, max_iter):
    """Howard policy iteration, vectorised over goals; exact up to the linear solve."""
    A = P.shape[1]
    Q = backup(P, rewards)  # one-step lookahead as the first policy
    action = np.argmax(Q, axis=-1)
    eye_a = np.eye(A)
    for _ in range(max_iter):
        V = _evaluate(P, rewards, gamma, keep, eye_a[action])
        Q = backup(P, rewards + gamma * keep * V)
        # Switch only on a real improvement: float noise between tied actions would
        # otherwise make the policy cycle forever.
        thresh = 1e-12 * max(1.0, float(np.abs(Q).max()))
        current = np.take_along_axis(Q, action[..., None], axis=-1)[..., 0]
        best = np.argmax(Q, axis=-1)
        improve = Q.max(axis=-1) > current + thresh
        if not improve.any():
            return Q
        action = np.where(improve, best, action)
    raise RuntimeError(f"policy iteration did not converge in {max_iter} iterations")


def _value_iteration(P, rewards, gamma, keep, tol, max_iter, V0=None):
    """Value iteration, vectorised over goals, until ``||V* - V||_inf <= tol``."""
    V = np.zeros(rewards.shape) if V0 is None else V0
    # ||V_k+1 - V_k|| <= tol (1 - gamma) / gamma  =>  ||V_k+1 - V*|| <= tol (contraction).
    stop = tol * (1.0 - gamma) / gamma if gamma > 0 else np.inf
    for _ in range(max_iter):
        Q = backup(P, rewards + gamma * keep * V)
        V_new = Q.max(axis=-1)
        delta = np.abs(V_new - V).max()
        V = V_new
        if delta <= stop:
            return backup(P, rewards + gamma * keep * V)
    raise RuntimeError(f"value iteration did not reach tol={tol} in {max_iter} iterations")


def solve_goal_q(
    P: np.ndarray,
    rewards: np.ndarray,
    gamma: float,
    terminal: np.ndarray | None = None,
    policy: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int | None = None,
    solver: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Goal-conditioned Q and V of a finite MDP, exactly.

    ``Q[g, s, a] = sum_s' P[s, a, s'] (rewards[g, s'] + gamma (1 - terminal[g, s']) V[g, s'])``
    with ``V = max_a Q`` (optimal, ``policy=None``) or ``V = sum_a policy Q`` (evaluation).

    Policy evaluation is one exact linear solve per goal. The optimal Q comes from policy
    iteration (exact linear solves; a handful of iterations for gridworlds even at gamma=0.99,
    where value iteration would need thousands of sweeps to reach 1e-10) or, for large S,
    value iteration stopped when the sup-norm change falls below ``tol (1 - gamma) / gamma``.

    Args:
        P: ``[S, A, S]`` transition tensor.
        rewards: ``[L, S]`` reward on arriving in s' (``[S]`` is read as L = 1).
        gamma: discount in [0, 1).
        terminal: ``[L, S]`` bool (or ``[S]`` shared by all goals); None = never terminal.
        policy: ``[L, S, A]`` action probabilities (``[S, A]`` shared by all goals), or None.
        tol: target accuracy of V in sup norm (value iteration only; the other paths are
            exact to round-off).
        max_iter: iteration cap (default 1000 for policy iteration, 100000 for value iteration).
        solver: "auto" (policy iteration for S <= 1000), "policy_iteration" or "value_iteration".

    Returns:
        ``(Q[L, S, A], V[L, S])``.
    """
    P, rewards, gamma, terminal = _check_inputs(P, rewards, gamma, terminal)
    L, S, A = rewards.shape[0], P.shape[0], P.shape[1]
    keep = 1.0 - terminal.astype(np.float64)
    if policy is not None:
        policy = np.asarray(policy, dtype=np.float64)
        if policy.ndim == 2:
            policy = np.broadcast_to(policy, (L, S, A))
        if policy.shape != (L, S, A):
            raise ValueError(f"policy must have shape [L, S, A] = {(L, S, A)}, got {policy.shape}")
        V = _evaluate(P, rewards, gamma, keep, policy)
        Q = backup(P, rewards + gamma * keep * V)
        return Q, V
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    if solver == "auto":
        solver = "policy_iteration" if S <= _AUTO_PI_MAX_STATES else "value_iteration"
    if solver == "policy_iteration":
        Q = _policy_iteration(P, rewards, gamma, keep, 1000 if max_iter is None else max_iter)
    else:
        Q = _value_iteration(P, rewards, gamma, keep, tol, 100000 if max_iter is None else max_iter)
    return Q, Q.max(axis=-1)


def bellman_residual(
    P: np.ndarray,
    rewards: np.ndarray,
    gamma: float,
    Q: np.ndarray,
    terminal: np.ndarray | None = None,
    policy: np.ndarray | None = None,
) -> float:
    """Sup-norm Bellman residual ``max |Q - backup(P, M(V(Q)))|`` (optimality or policy form).

    Args:
        P: ``[S, A, S]``; rewards: ``[L, S]``; Q: ``[L, S, A]``;
        terminal: ``[L, S]`` or None; policy: ``[L, S, A]`` or None (then ``V = max_a Q``).
    """
    P, rewards, gamma, terminal = _check_inputs(P, rewards, gamma, terminal)
    Q = np.asarray(Q, dtype=np.float64)
    V = Q.max(axis=-1) if policy is None else np.einsum("lsa,lsa->ls", np.broadcast_to(policy, Q.shape), Q)
    return float(np.abs(Q - backup(P, m_matrix(rewards, V, gamma, terminal))).max())
