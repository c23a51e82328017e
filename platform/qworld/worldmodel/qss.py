"""Tabular QSS: goal-conditioned values over state transitions, Q(s, s'), learned from counts.

Edwards et al. (ICML 2020), "Estimating Q(s,s') with Deep Deterministic Dynamics Gradients".
QSS values a *transition* rather than an action:
``Q(s, s') = r(s') + gamma (1 - term(s')) max_{s'' in N(s')} Q(s', s'')``, the greedy
"next state" is ``tau(s) = argmax_{s' in N(s)} Q(s, s')`` and an inverse dynamics model
turns it into an action, ``pi(s) = I(s, tau(s))``. The paper's tabular toys hand-code the
neighbour set ``N`` and the inverse dynamics ``I``; here both are *learned* from what an agent
experienced, the counts of transitions (s, a, s').

Shapes: S states, A actions, L goals. Conventions as in :mod:`qworld.worldmodel.bellman`: goal ``g`` pays
``rewards[g, s']`` on arriving in ``s'`` and, when ``terminal[g, s']``, the episode ends there.

- ``counts[s, a, s']``: int, how often taking ``a`` in ``s`` was seen to arrive in ``s'``;
- ``neighbours[s, s']``: bool, ``s'`` was seen to follow ``s`` (under any action);
- ``inverse[s, s']``: int, the action most often seen taking ``s`` to ``s'``, -1 if never;
- ``Q_ss[g, s, s']``: float, finite exactly on neighbour pairs, ``-inf`` elsewhere.

Because the reward is paid on arrival, ``Q(s, s')`` depends on ``s`` only through whether
``s'`` is a neighbour of ``s``: on neighbour pairs ``Q_ss[g, s, s'] = M[g, s']`` with
``M = r + gamma (1 - term) V`` (the M of :func:`qworld.worldmodel.bellman.m_matrix`) and
``V[g, s] = max_{s' in N(s)} M[g, s']``.

Deterministic vs stochastic dynamics: QSS assumes the agent can *choose* its next state among
the neighbours. That holds for deterministic dynamics, where (with every (s, a) seen) QSS's
``max_s' Q(s, s')`` equals the optimal ``V* = max_a Q*(s, a)`` (the paper's Theorem 2.2.1).
On stochastic dynamics ``N(s)`` collects every successor ever observed from ``s`` under any
action, so QSS plans as if it could pick the best observed successor: its values are
optimistic (``>= V*`` once every successor has been seen), "best possible scenario" values
in the paper's words, and its policy need not be optimal. Nothing here checks determinism.

Numpy only: pure functions from arrays to arrays, no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check_counts(counts: np.ndarray) -> np.ndarray:
    """Validate ``counts[S, A, S]`` (non-negative, integer-valued) and return it as int64."""
    arr = np.asarray(counts)
    if arr.ndim != 3 or arr.shape[0] != arr.shape[2] or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"counts must have shape [S, A, S] with S, A >= 1, got {arr.shape}")
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == bool or not numeric:
        raise ValueError(f"counts must hold integer counts, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("counts must be finite")
        if (arr != np.round(arr)).any():
            raise ValueError("counts must be whole numbers (counts of transitions)")
    if (arr < 0).any():
        s, a, s2 = np.argwhere(arr < 0)[0]
        raise ValueError(f"counts must be non-negative, got counts[{s}, {a}, {s2}] = {arr[s, a, s2]}")
    return arr.astype(np.int64)


def _check_neighbours(neighbours: np.ndarray) -> np.ndarray:
    """Validate ``neighbours[S, S]`` bool."""
    arr = np.asarray(neighbours)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"neighbours must have shape [S, S], got {arr.shape}")
    if arr.dtype != bool:
        raise ValueError(f"neighbours must be a bool array, got dtype {arr.dtype}")
    return arr


def _check_goals(rewards, terminal, gamma, S: int):
    """Validate ``rewards[L, S]``, ``terminal[L, S]`` (or ``[S]``/None) and gamma."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim == 1:  # one goal given as rewards[S]
        rewards = rewards[None]
    if rewards.ndim != 2 or rewards.shape[1] != S or rewards.shape[0] == 0:
        raise ValueError(f"rewards must have shape [L, S] with S={S}, L >= 1, got {rewards.shape}")
    if not np.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    if terminal is None:
        terminal = np.zeros(rewards.shape, dtype=bool)
    else:
        terminal = np.asarray(terminal)
        if terminal.dtype != bool:
            raise ValueError(f"terminal must be a bool array, got dtype {terminal.dtype}")
        if terminal.ndim == 1:  # the same terminal states for every goal
            terminal = np.broadcast_to(terminal, rewards.shape)
        if terminal.shape != rewards.shape:
            raise ValueError(f"terminal must have the shape of rewards {rewards.shape}, got {terminal.shape}")
    if not (0.0 <= float(gamma) < 1.0):
        raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
    return rewards, terminal, float(gamma)


# --------------------------------------------------------------------------------------------
# learned pieces: neighbours, inverse dynamics, forward model
# --------------------------------------------------------------------------------------------


def neighbours(counts: np.ndarray) -> np.ndarray:
    """The learned neighbour relation ``N``: ``s'`` was seen to follow ``s``.

    Args:
        counts: ``[S, A, S]`` non-negative integer transition counts.

    Returns:
        ``[S, S]`` bool, ``N[s, s'] = any_a counts[s, a, s'] > 0``.

    Raises:
        ValueError: bad ``counts`` (shape, negative or non-integer entries).
    """
    return _check_counts(counts).sum(axis=1) > 0


def inverse_dynamics(counts: np.ndarray) -> np.ndarray:
    """The learned inverse dynamics ``I(s, s')``: the action most often seen taking s to s'.

    Ties (several actions seen equally often, e.g. redundant actions or several moves into a
    wall that all leave the agent in place) go to the **lowest action index**, so the result
    does not depend on anything but the counts.

    Args:
        counts: ``[S, A, S]`` non-negative integer transition counts.

    Returns:
        ``[S, S]`` int64, ``I[s, s'] = argmax_a counts[s, a, s']``, or -1 where ``s -> s'``
        was never seen.

    Raises:
        ValueError: bad ``counts``.
    """
    counts = _check_counts(counts)
    # np.argmax returns the first maximum: the lowest tied action.
    inverse = np.argmax(counts, axis=1)
    return np.where(counts.sum(axis=1) > 0, inverse, -1).astype(np.int64)


class QSSWorldModel(NamedTuple):
    """The deterministic forward model QSS implies; unpacks as ``P_hat, unseen, shadowed``.

    Attributes:
        P_hat: ``[S, A, S]`` float64 one-hot rows.
        unseen: ``[S, A]`` bool, (s, a) never seen: the model guessed a self-loop.
        shadowed: ``[S, A]`` bool, (s, a) seen, but every transition seen with ``a`` is
            credited by the inverse dynamics to another action (a redundant action losing
            the tie-break, or an action seen less often than another for the same s').
    """

    P_hat: np.ndarray
    unseen: np.ndarray
    shadowed: np.ndarray


def qss_world_model(counts: np.ndarray) -> QSSWorldModel:
    """The deterministic forward model implied by the learned inverse dynamics.

    For each (s, a), ``P_hat[s, a]`` is one-hot on:

    1. the ``s'`` with ``I(s, s') = a``; if several, the one seen most often with ``a``
       (ties: lowest ``s'``);
    2. else, if (s, a) was seen at all (``shadowed``), the ``s'`` seen most often with ``a``
       (ties: lowest ``s'``). The inverse model alone would have no answer here; this is the
       case of redundant actions (two actions reaching the same ``s'``: ``I`` names only the
       lowest), where falling back to a self-loop would be wrong;
    3. else (``unseen``), a self-loop ``s' = s``: a guess.

    On deterministic dynamics with every (s, a) seen this reproduces ``P`` exactly. On
    stochastic dynamics it is a deterministic caricature (one successor per (s, a)).

    Args:
        counts: ``[S, A, S]`` non-negative integer transition counts.

    Returns:
        :class:`QSSWorldModel` ``(P_hat [S, A, S], unseen [S, A], shadowed [S, A])``.

    Raises:
        ValueError: bad ``counts``.
    """
    counts = _check_counts(counts)
    S, A, _ = counts.shape
    inverse = inverse_dynamics(counts)  # [S, S']
    # cand[s, a, s']: the inverse model credits a with s -> s' (implies counts[s, a, s'] > 0).
    cand = inverse[:, None, :] == np.arange(A)[None, :, None]
    has_cand = cand.any(axis=-1)
    by_inverse = np.argmax(np.where(cand, counts, -1), axis=-1)
    seen = counts.sum(axis=-1) > 0
    by_counts = np.argmax(counts, axis=-1)
    self_loop = np.broadcast_to(np.arange(S)[:, None], (S, A))
    target = np.where(has_cand, by_inverse, np.where(seen, by_counts, self_loop))
    P_hat = np.zeros((S, A, S))
    np.put_along_axis(P_hat, target[..., None], 1.0, axis=-1)
    return QSSWorldModel(P_hat=P_hat, unseen=~seen, shadowed=seen & ~has_cand)


# --------------------------------------------------------------------------------------------
# values and policy
# --------------------------------------------------------------------------------------------


def qss_values(
    counts_or_neighbours: np.ndarray,
    rewards: np.ndarray,
    terminal: np.ndarray | None,
    gamma: float,
    tol: float = 1e-10,
    max_iter: int = 100000,
) -> np.ndarray:
    """The QSS fixed point over the learned neighbour graph, by vectorised value iteration.

    ``Q(s, s') = r_g(s') + gamma (1 - terminal[g, s']) max_{s'' in N(s')} Q(s', s'')`` for
    every neighbour pair ``N[s, s']``; ``-inf`` for every other pair (no transition seen, so
    QSS cannot propose it). A state with no observed successor (a dead end of the data, e.g.
    only ever arrived in) has ``max`` over an empty set; it is valued as if absorbing with
    zero future return, ``V = 0``, the same as a terminal state.

    Exact only for deterministic dynamics, where it equals ``V* = max_a Q*(s, a)`` once every
    (s, a) has been seen. On stochastic dynamics it is optimistic: it plans as if the agent
    could pick the best *observed* successor of each state (see the module docstring).

    Sweeps ``V[g, s] = max_{s' in N(s)} (r + gamma (1 - term) V)[g, s']`` over all goals at
    once, stopping when the sup-norm change is below ``tol (1 - gamma) / gamma`` (then
    ``||V - V_fixed||_inf <= tol`` by contraction). With indicator goals on a graph it
    reaches the fixed point exactly after about its diameter in sweeps.

    Args:
        counts_or_neighbours: ``counts [S, A, S]`` (integer) or ``neighbours [S, S]`` (bool).
        rewards: ``[L, S]`` reward on arriving in s' (``[S]`` is read as L = 1).
        terminal: ``[L, S]`` bool (or ``[S]`` shared by all goals); None = never terminal.
        gamma: discount in [0, 1).
        tol: target accuracy of the values in sup norm.
        max_iter: cap on sweeps.

    Returns:
        ``Q_ss[L, S, S]`` float64, ``-inf`` off the neighbour pairs.

    Raises:
        ValueError: bad shapes / values (the message names the argument).
        RuntimeError: ``tol`` not reached in ``max_iter`` sweeps.
    """
    arr = np.asarray(counts_or_neighbours)
    if arr.ndim == 3:
        nbr = neighbours(arr)
    elif arr.ndim == 2:
        nbr = _check_neighbours(arr)
    else:
        raise ValueError(
            f"counts_or_neighbours must be counts [S, A, S] or neighbours [S, S], got shape {arr.shape}"
        )
    S = nbr.shape[0]
    rewards, terminal, gamma = _check_goals(rewards, terminal, gamma, S)
    keep = 1.0 - terminal.astype(np.float64)

    # Padded neighbour lists: idx[s, k] is the k-th neighbour of s, padded by repeating the
    # first one (harmless for a max); states without neighbours are handled by `alive`.
    degree = nbr.sum(axis=1)
    alive = degree > 0
    K = max(int(degree.max()), 1)
    order = np.argsort(~nbr, axis=1, kind="stable")[:, :K]  # neighbours first, by index
    valid = np.arange(K)[None, :] < degree[:, None]
    idx = np.where(valid, order, order[:, :1])

    def sweep(V):
        M = rewards + gamma * keep * V  # [L, S]
        return np.where(alive[None], M[:, idx].max(axis=-1), 0.0)

    stop = tol * (1.0 - gamma) / gamma if gamma > 0 else np.inf
    V = np.zeros(rewards.shape)
    for _ in range(max_iter):
        V_new = sweep(V)
        delta = np.abs(V_new - V).max()
        V = V_new
        if delta <= stop:
            break
    else:
        raise RuntimeError(f"QSS value iteration did not reach tol={tol} in {max_iter} sweeps")
    M = rewards + gamma * keep * V
    return np.where(nbr[None], M[:, None, :], -np.inf)


def qss_policy(Q_ss: np.ndarray, inverse: np.ndarray, tie_tol: float = 1e-12) -> np.ndarray:
    """Greedy QSS policy: ``a = I(s, tau(s))`` with ``tau(s) = argmax_{s'} Q(s, s')``.

    Ties between next states (within ``tie_tol * max(1, |finite Q|max)``) go to the lowest
    ``s'``, so round-off does not change the action across machines.

    Args:
        Q_ss: ``[L, S, S]`` (``-inf`` off neighbour pairs, as from :func:`qss_values`).
        inverse: ``[S, S]`` int, from :func:`inverse_dynamics`.
        tie_tol: relative tolerance for ties.

    Returns:
        ``[L, S]`` int64 actions; -1 for a state with no finite ``Q(s, .)`` (no observed
        successor), or whose best successor has no inverse action.

    Raises:
        ValueError: shapes that do not agree.
    """
    Q_ss = np.asarray(Q_ss, dtype=np.float64)
    inverse = np.asarray(inverse)
    if Q_ss.ndim != 3 or Q_ss.shape[1] != Q_ss.shape[2]:
        raise ValueError(f"Q_ss must have shape [L, S, S], got {Q_ss.shape}")
    S = Q_ss.shape[1]
    if inverse.shape != (S, S) or not np.issubdtype(inverse.dtype, np.integer):
        raise ValueError(
            f"inverse must be an int array of shape [S, S] = {(S, S)}, got {inverse.dtype} {inverse.shape}"
        )
    finite = np.isfinite(Q_ss)
    scale = max(1.0, float(np.abs(Q_ss[finite]).max(initial=0.0)))
    best = Q_ss.max(axis=-1, keepdims=True)
    # argmax returns the first True: the lowest tied next state.
    tau = np.argmax(finite & (Q_ss >= best - tie_tol * scale), axis=-1)  # [L, S]
    action = inverse[np.arange(S)[None, :], tau]
    return np.where(finite.any(axis=-1), action, -1).astype(np.int64)


@dataclass(frozen=True)
class QSSResult:
    """Everything tabular QSS learns from one set of counts.

    Attributes:
        Q_ss: ``[L, S, S]`` QSS values, ``-inf`` off neighbour pairs.
        V: ``[L, S]`` ``max_{s'} Q_ss`` (0 for states with no observed successor).
        policy: ``[L, S]`` int greedy actions (-1: no observed successor).
        neighbours: ``[S, S]`` bool learned neighbour relation.
        inverse: ``[S, S]`` int learned inverse dynamics (-1: never seen).
        P_hat: ``[S, A, S]`` deterministic forward model (:func:`qss_world_model`).
        unseen: ``[S, A]`` bool, (s, a) never seen (``P_hat`` guessed a self-loop there).
        shadowed: ``[S, A]`` bool, seen but credited to another action by ``inverse``.
    """

    Q_ss: np.ndarray
    V: np.ndarray
    policy: np.ndarray
    neighbours: np.ndarray
    inverse: np.ndarray
    P_hat: np.ndarray
    unseen: np.ndarray
    shadowed: np.ndarray


def fit_qss(
    counts: np.ndarray,
    rewards: np.ndarray,
    terminal: np.ndarray | None,
    gamma: float,
    tol: float = 1e-10,
    max_iter: int = 100000,
) -> QSSResult:
    """Tabular QSS in one call: neighbours, inverse dynamics, values, policy, forward model.

    Args:
        counts: ``[S, A, S]`` non-negative integer transition counts.
        rewards: ``[L, S]``; terminal: ``[L, S]`` bool or None; gamma in [0, 1).
        tol, max_iter: as in :func:`qss_values`.

    Returns:
        :class:`QSSResult`.

    Raises:
        ValueError: bad inputs (the message names the argument).
    """
    counts = _check_counts(counts)
    nbr = neighbours(counts)
    inverse = inverse_dynamics(counts)
    Q_ss = qss_values(nbr, rewards, terminal, gamma, tol=tol, max_iter=max_iter)
    V = np.where(nbr.any(axis=1)[None], Q_ss.max(axis=-1), 0.0)
    model = qss_world_model(counts)
    return QSSResult(
        Q_ss=Q_ss,
        V=V,
        policy=qss_policy(Q_ss, inverse),
        neighbours=nbr,
        inverse=inverse,
        P_hat=model.P_hat,
        unseen=model.unseen,
        shadowed=model.shadowed,
    )
