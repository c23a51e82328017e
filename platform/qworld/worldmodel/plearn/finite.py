"""World models of finite MDPs from goal-conditioned Q-values: the inverse Bellman equation.

Shapes: S states, A actions, L goals, K = S * A state-action pairs.

For every (s, a) the Bellman equation with reward on arrival reads
``Q[:, s, a] = M @ P[s, a, :]`` with ``M[g, s'] = r_g(s') + gamma (1 - term_g(s')) V_g(s')``
(see :func:`qworld.worldmodel.bellman.m_matrix`), so extracting ``P_hat`` is a linear inverse problem per
(s, a) over the probability simplex. The methods follow Table 1 of the paper:

==============  ====================  ===========================  ===============================
method          assumption on P       goals needed                 how
==============  ====================  ===========================  ===============================
pinv            none (stochastic)     L >= S, M invertible          ``M^+ Q`` then simplex projection
known_support   support given         L >= N - 1, affine indep.     least squares on the support
sparse_search   <= N next states      L >= 2N - 1, general pos.     NNLS, then search over supports
column_match    deterministic         L >= 1, distinct columns      nearest column of M
sgd             none                  (as pinv)                     P-learning: Adam on softmax logits
moves           grid moves shared     see below                     P-learning, shared parameters,
                across cells                                        alternating least squares
regional_moves  grid moves shared     as moves where they hold;     moves per region found from the
                within regions Q      as pinv where they do not     misfit, local / one-state rows,
                reveals                                             the rest projected onto Q
==============  ====================  ===========================  ===============================

What each method is given besides Q and M is :data:`GIVEN`: ``known_support`` is handed the
true support (for deterministic P that *is* P), so it is an oracle and never a finding;
``sparse_search`` is handed the true largest support size. ``moves`` is handed only the
cells' coordinates and assumes (1) each action is one distribution over the grid moves (stay,
up, right, down, left), the same in every cell; (2) a move either arrives in the neighbouring
cell or stays (a wall), which it learns per (cell, move); (3) a cell may jump,
whatever the action, anywhere (teleports), which it detects as cells whose misfit stands out
from the noise. Its few shared parameters are what make it work at the paper's goal counts:
per-(s, a) fits see L equations each, the shared move distribution sees all S L of them.
``regional_moves`` (same inputs) drops assumption (1) where Q contradicts it: cells share a
move distribution within regions found from the misfit, a row no region explains may be a
distribution over the cell's neighbours or one state anywhere, and the rest are the rows
nearest a uniform guess among those that explain Q (:func:`project_consistent`), so it is
exact where pinv is and never further from the truth than its guess.

Every method returns ``P_hat[S, A, S]`` whose rows are probability vectors. Numpy / scipy,
torch only for ``sgd``; no Ray.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np
from scipy.optimize import nnls
from scipy.spatial.distance import pdist

from qworld import metrics as K

METHODS = ("pinv", "known_support", "sparse_search", "column_match", "sgd", "moves", "regional_moves")

IDENTIFIABLE_CASES = ("stochastic", "sparse_known", "sparse_unknown", "deterministic", "not identifiable")

# Options each method accepts (besides return_info); anything else is a typo worth an error.
_OPTIONS = {
    "pinv": {"rcond"},
    "known_support": {"support", "sum_weight"},
    "sparse_search": {"max_support", "tol", "max_subsets", "sum_weight", "chunk_size"},
    "column_match": {"chunk_size"},
    "sgd": {"steps", "batch_size", "lr", "seed", "init", "dtype", "log_every", "schedule"},
    "moves": {"coords", "rounds", "tol", "jump_z", "jump_ridge", "jumps", "openings", "pi_prune",
              "wall_prior", "walls", "cells"},
    "regional_moves": {"coords", "tol", "regions", "trim", "c_steps", "prior", "project_iters", "polish"},
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def project_simplex(X: np.ndarray) -> np.ndarray:
    """Euclidean projection of every row onto the probability simplex.

    Sort-based (Held et al. / Duchi et al.): with ``u`` the row sorted descending and
    ``rho`` the last index where ``u_rho > (sum_{i<=rho} u_i - 1) / (rho + 1)``, the projection
    is ``max(x - theta, 0)`` with ``theta = (sum_{i<=rho} u_i - 1) / (rho + 1)``.

    Args:
        X: ``[..., S]`` finite.

    Returns:
        ``[..., S]`` float64, each row non-negative and summing to 1.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.shape[-1] == 0:
        raise ValueError("cannot project an empty vector onto the simplex")
    u = -np.sort(-X, axis=-1)
    css = np.cumsum(u, axis=-1) - 1.0
    k = np.arange(1, X.shape[-1] + 1, dtype=np.float64)
    cond = u - css / k > 0
    # cond is True on a prefix (k = 1 always qualifies), so its count locates rho.
    rho = cond.sum(axis=-1, keepdims=True) - 1
    theta = np.take_along_axis(css, rho, axis=-1) / (rho + 1.0)
    return np.maximum(X - theta, 0.0)


def _check_qm(Q: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``Q[L, S, A]`` and ``M[L, S]`` and return them as float64."""
    Q = np.asarray(Q, dtype=np.float64)
    M = np.asarray(M, dtype=np.float64)
    if Q.ndim != 3:
        raise ValueError(f"Q must have shape [L, S, A], got {Q.shape}")
    if M.ndim != 2:
        raise ValueError(f"M must have shape [L, S], got {M.shape}")
    if Q.shape[:2] != M.shape:
        raise ValueError(
            f"Q [L, S, A] = {Q.shape} and M [L, S] = {M.shape} disagree on L or S "
            "(Q is indexed [goal, state, action], M [goal, next state])"
        )
    if not (np.isfinite(Q).all() and np.isfinite(M).all()):
        raise ValueError("Q and M must be finite")
    return Q, M


def _pairs(Q: np.ndarray) -> np.ndarray:
    """``Q[L, S, A]`` -> ``[L, K]`` with column ``k = s * A + a``."""
    L, S, A = Q.shape
    return Q.reshape(L, S * A)


def _unpairs(X: np.ndarray, S: int, A: int) -> np.ndarray:
    """``[n A, S]`` rows of next-state vectors -> ``[n, A, S]`` (n = S unless a subset of states)."""
    return X.reshape(-1, A, X.shape[-1])


def _residuals(Q: np.ndarray, M: np.ndarray, P_hat: np.ndarray, q_mask: np.ndarray | None = None) -> np.ndarray:
    """``[S, A]`` Euclidean norm over goals of ``Q(s, a) - M P_hat(s, a)``, over the goals
    whose Q constrains the state (``q_mask [L, S]``, default all)."""
    diff = Q - np.einsum("sat,lt->lsa", P_hat, M, optimize=True)
    if q_mask is not None:
        diff = diff * q_mask[:, :, None]
    return np.linalg.norm(diff, axis=0)


def _check_q_mask(q_mask: Any, L: int, S: int) -> np.ndarray | None:
    """``q_mask`` as bool ``[L, S]``, or None when it leaves nothing out."""
    if q_mask is None:
        return None
    mask = np.asarray(q_mask, dtype=bool)
    if mask.shape != (L, S):
        raise ValueError(f"q_mask must be a bool [L, S] = {[L, S]} array (goal, state), got shape {list(mask.shape)}")
    return None if mask.all() else mask


def _extract_rowwise(fn, Q, M, q_mask, options):
    """A method that solves each (s, a) row alone, on the goals ``q_mask`` keeps for s.

    States are grouped by which goals constrain them (at most L + 2 groups for a learned
    agent: all goals, all but the state's own goal, none); a state no goal constrains keeps
    the uniform row (nothing in Q says otherwise, and its row is not scored). The per-state
    diagnostics of the groups are put back in state order, their counts added.
    """
    L, S, A = Q.shape
    P_hat = np.full((S, A, S), 1.0 / S)
    info: dict[str, Any] = {}
    patterns, group = np.unique(q_mask.T, axis=0, return_inverse=True)
    for p, goals in enumerate(patterns):
        states = np.flatnonzero(group.reshape(-1) == p)
        if not goals.any():
            continue
        opts = {**options, "support": np.asarray(options["support"])[states]} if "support" in options else options
        P_hat[states], part = fn(Q[goals][:, states], M[goals], **opts)
        for key, value in part.items():
            if isinstance(value, np.ndarray) and value.shape[:1] == (len(states),):
                if key not in info:
                    fill = "unconstrained" if value.dtype == object else (np.nan if value.dtype.kind == "f" else 0)
                    info[key] = np.full((S, *value.shape[1:]), fill, dtype=value.dtype)
                info[key][states] = value
            else:
                info[key] = info.get(key, 0) + value
    return P_hat, info


def _sum_weight(M: np.ndarray, sum_weight: float | None) -> float:
    # The sum-to-one row is weighted like the largest entry of M so it is neither ignored
    # nor dominant when Q is noisy; for exact Q any positive weight gives the same answer.
    return float(sum_weight) if sum_weight is not None else max(1.0, float(np.abs(M).max()))


# --------------------------------------------------------------------------------------------
# methods: each takes Q[L, S, A], M[L, S] and returns (P_hat[S, A, S], info)
# --------------------------------------------------------------------------------------------


def _extract_pinv(Q, M, rcond=None):
    L, S, A = M.shape[0], M.shape[1], Q.shape[2]
    pinv = np.linalg.pinv(M) if rcond is None else np.linalg.pinv(M, rcond=rcond)  # [S, L]
    raw = _unpairs((pinv @ _pairs(Q)).T, S, A)
    return project_simplex(raw), {"unprojected": raw}


def _extract_known_support(Q, M, support=None, sum_weight=None):
    (L, n, A), S = Q.shape, M.shape[1]  # n: the rows solved (S, or a subset of states)
    if support is None:
        raise ValueError("method 'known_support' needs the option support=bool[S, A, S]")
    support = np.asarray(support, dtype=bool)
    if support.shape != (n, A, S):
        raise ValueError(f"support must have shape [S, A, S] = {(n, A, S)}, got {support.shape}")
    if not support.any(axis=-1).all():
        s, a = np.argwhere(~support.any(axis=-1))[0]
        raise ValueError(f"support[{s}, {a}] is empty: every (s, a) needs at least one next state")
    w = _sum_weight(M, sum_weight)
    aug = np.vstack([M, np.full((1, S), w)])  # [L + 1, S]: the affine system [M; 1] p = [Q; 1]
    raw = np.zeros((n, A, S))
    for s in range(n):
        for a in range(A):
            cols = np.flatnonzero(support[s, a])
            rhs = np.append(Q[:, s, a], w)
            raw[s, a, cols] = np.linalg.lstsq(aug[:, cols], rhs, rcond=None)[0]
    # Project on the support only: mass outside it is known to be zero.
    P_hat = np.zeros_like(raw)
    for s in range(n):
        for a in range(A):
            cols = np.flatnonzero(support[s, a])
            P_hat[s, a, cols] = project_simplex(raw[s, a, cols])
    return P_hat, {"unprojected": raw}


def _num_subsets(S: int, N: int) -> int:
    return sum(math.comb(S, k) for k in range(1, N + 1))


def _keep_best(score, p, J, best_res, best_X, idx):
    """Per pair, keep the subset with the lowest finite score if it beats the stored one.

    Args:
        score: ``[n, u]`` score of subset i for pair j (inf = not a candidate).
        p: ``[n, k, u]`` the solutions on the subsets; J: ``[n, k]`` the subsets.
        best_res, best_X: running best score ``[U]`` and solution ``[U, S]`` (updated in place).
        idx: ``[u]`` rows of ``best_*`` that the u pairs map to.
    """
    j = np.argmin(score, axis=0)
    r = score[j, np.arange(score.shape[1])]
    better = np.flatnonzero(r < best_res[idx])
    if len(better) == 0:
        return
    sol = np.zeros((len(better), best_X.shape[1]))
    np.put_along_axis(sol, J[j[better]], p[j[better], :, better], axis=1)
    best_res[idx[better]] = r[better]
    best_X[idx[better]] = sol


def _support_search(aug, rhs, N, tol_abs, chunk_size):
    """Exhaustive search over supports of size 1..N for each column of ``rhs``.

    For each pair the answer is the smallest support with an exact non-negative fit (lowest
    residual among those); without any (noisy Q), the best non-negative fit of any size, and
    without that, the best fit at all (the caller projects onto the simplex).

    Args:
        aug: ``[L + 1, S]`` the augmented matrix ``[M; w 1]``.
        rhs: ``[L + 1, U]`` the augmented targets ``[Q; w]`` of U pairs.
        N: largest support size.
        tol_abs: ``[U]`` residual below which a non-negative solution counts as exact.
        chunk_size: subsets per batch (memory ~ ``chunk_size * (L + 1) * U`` floats).

    Returns:
        ``X[U, S]`` the chosen solutions (not yet projected) and ``exact[U]`` bool.
    """
    S, U = aug.shape[1], rhs.shape[1]
    neg_tol = 1e-9  # non-negativity up to the round-off of the solve
    exact_res, exact_X = np.full(U, np.inf), np.zeros((U, S))
    valid_res, valid_X = np.full(U, np.inf), np.zeros((U, S))
    any_res, any_X = np.full(U, np.inf), np.zeros((U, S))
    for k in range(1, N + 1):
        todo = np.flatnonzero(~np.isfinite(exact_res))  # exact at a smaller size: done
        if len(todo) == 0:
            break
        b = rhs[:, todo]
        local = np.arange(len(todo))
        k_res, k_X = np.full(len(todo), np.inf), np.zeros((len(todo), S))
        combos = itertools.combinations(range(S), k)
        while len(J := np.array(list(itertools.islice(combos, chunk_size)), dtype=np.int64).reshape(-1, k)):
            A_J = aug[:, J].transpose(1, 0, 2)  # [n, L + 1, k]
            p = np.linalg.pinv(A_J) @ b  # [n, k, u]: least squares (min norm if k > L + 1)
            res = np.linalg.norm(A_J @ p - b, axis=1)  # [n, u]
            valid = p.min(axis=1) >= -neg_tol
            _keep_best(np.where(valid & (res <= tol_abs[todo]), res, np.inf), p, J, k_res, k_X, local)
            _keep_best(np.where(valid, res, np.inf), p, J, valid_res, valid_X, todo)
            _keep_best(res, p, J, any_res, any_X, todo)
        exact_res[todo], exact_X[todo] = k_res, k_X
    exact = np.isfinite(exact_res)
    X = np.where(exact[:, None], exact_X, np.where(np.isfinite(valid_res)[:, None], valid_X, any_X))
    return X, exact


def _backward_elimination(aug, b, x, N, tol_abs, max_tries=8):
    """Shrink an exact non-negative solution to at most N non-zeros, or return None.

    Drops one column at a time, smallest weight first, keeping the drop only if NNLS on the
    remaining columns still fits exactly: the true N-sparse solution stays feasible as long as
    no column of its support is dropped, so when exact fits survive down to N columns they are
    the unique N-sparse one (general position, L >= 2N - 1).

    Args:
        aug: ``[L + 1, S]``; b: ``[L + 1]``; x: ``[S]`` exact NNLS solution; tol_abs: float.
    """
    S = aug.shape[1]
    allowed = np.ones(S, dtype=bool)
    for _ in range(S):
        support = np.flatnonzero(x > 1e-10)
        if len(support) <= N:
            return x
        for j in support[np.argsort(x[support])][:max_tries]:
            trial = allowed.copy()
            trial[j] = False
            cols = np.flatnonzero(trial)
            y, rnorm = nnls(aug[:, cols], b, maxiter=50 * S)
            if rnorm <= tol_abs:
                allowed, x = trial, np.zeros(S)
                x[cols] = y
                break
        else:
            return None
    return None


def _extract_sparse_search(
    Q, M, max_support=None, tol=1e-8, max_subsets=250_000, sum_weight=None, chunk_size=2048
):
    (L, n, A), S = Q.shape, M.shape[1]  # n: the rows solved (S, or a subset of states)
    if max_support is None:
        raise ValueError("method 'sparse_search' needs the option max_support=N (largest support size)")
    N = int(max_support)
    if not 1 <= N <= S:
        raise ValueError(f"max_support must lie in [1, S={S}], got {max_support}")
    w = _sum_weight(M, sum_weight)
    aug = np.vstack([M, np.full((1, S), w)])  # [L + 1, S]
    rhs = np.vstack([_pairs(Q), np.full((1, n * A), w)])  # [L + 1, K]
    tol_abs = tol * (1.0 + np.linalg.norm(rhs, axis=0))  # [K]
    X = np.zeros((n * A, S))
    how = np.empty(n * A, dtype=object)

    # 1) NNLS on [M; w 1] p = [Q; w]. Under general position with L >= 2N - 1 an exact
    #    solution with at most N non-zeros is the unique N-sparse one (two of them would
    #    differ by a 2N-sparse null vector of [M; 1]), so it is accepted as is.
    for k in range(n * A):
        x, rnorm = nnls(aug, rhs[:, k], maxiter=50 * S)
        X[k] = x
        how[k] = "nnls" if (np.count_nonzero(x > 1e-10) <= N and rnorm <= tol_abs[k]) else ""
    todo = np.flatnonzero(how == "")

    # 2) The rest: exhaustive search over supports while it is affordable; else backward
    #    elimination from the NNLS solution, and failing that the N largest NNLS weights refit.
    if len(todo) and _num_subsets(S, N) <= max_subsets:
        X[todo], exact = _support_search(aug, rhs[:, todo], N, tol_abs[todo], chunk_size)
        how[todo] = np.where(exact, "search", "search_inexact")
    elif len(todo):
        for k in todo:
            x = _backward_elimination(aug, rhs[:, k], X[k], N, tol_abs[k])
            if x is not None:
                X[k], how[k] = x, "elimination"
                continue
            cols = np.argsort(-X[k])[:N]
            x = np.zeros(S)
            x[cols] = nnls(aug[:, cols], rhs[:, k], maxiter=50 * N)[0]
            X[k], how[k] = x, "greedy"
    P_hat = project_simplex(_unpairs(X, S, A))
    paths = ("nnls", "search", "search_inexact", "elimination", "greedy")
    counts = {f"num_{h}": int(np.sum(how == h)) for h in paths}
    return P_hat, {"unprojected": _unpairs(X, S, A), "path": how.reshape(n, A), **counts}


def _extract_column_match(Q, M, chunk_size=256):
    (L, n, A), S = Q.shape, M.shape[1]  # n: the rows solved (S, or a subset of states)
    q = _pairs(Q).T  # [K, L]
    idx = np.empty(n * A, dtype=np.int64)
    dist = np.empty(n * A)
    # Direct differences (not the |q|^2 - 2 q.m + |m|^2 expansion) keep close columns apart;
    # chunks bound the [chunk, L, S] difference tensor.
    for start in range(0, n * A, chunk_size):
        d = np.linalg.norm(q[start : start + chunk_size, :, None] - M[None], axis=1)  # [k, S]
        idx[start : start + chunk_size] = np.argmin(d, axis=1)
        dist[start : start + chunk_size] = d.min(axis=1)
    P_hat = np.zeros((n * A, S))
    P_hat[np.arange(n * A), idx] = 1.0
    return _unpairs(P_hat, S, A), {"match_distance": dist.reshape(n, A)}


def _extract_sgd(
    Q, M, steps=2000, batch_size=2048, lr=0.3, seed=0, init="uniform", dtype="float32", log_every=1,
    schedule="constant", q_mask=None,
):
    """P-learning: Adam on per-(s, a) softmax logits with minibatches of (g, s, a); a
    (g, s) that ``q_mask`` leaves out weighs nothing in the loss."""
    import torch  # only this method needs it

    L, S, A = Q.shape
    if dtype not in ("float32", "float64"):
        raise ValueError(f"unknown sgd dtype {dtype!r}; allowed: float32, float64")
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(int(seed))
    if init == "uniform":
        logits0 = torch.zeros(S * A, S, dtype=tdtype)
    elif init == "random":
        logits0 = 0.01 * torch.randn(S * A, S, generator=gen, dtype=tdtype)
    else:
        raise ValueError(f"unknown sgd init {init!r}; allowed: uniform, random")
    logits = torch.nn.Parameter(logits0)
    M_t = torch.as_tensor(M, dtype=tdtype)  # [L, S]
    Q_t = torch.as_tensor(_pairs(Q), dtype=tdtype)  # [L, K]
    W_t = None if q_mask is None else torch.as_tensor(np.repeat(q_mask, A, axis=1), dtype=tdtype)  # [L, K]
    if schedule not in ("constant", "cosine"):
        # cosine is not the default: zero entries need their logits driven far down (about
        # -10), and a decaying rate slows exactly that (windy FourRooms: ~4x worse p_mse).
        raise ValueError(f"unknown sgd schedule {schedule!r}; allowed: constant, cosine")
    # Adam written out (Kingma & Ba, default betas): torch.optim would import torch._dynamo
    # (seconds per process) and wrap every step, which dominates at this problem size.
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    m1 = torch.zeros_like(logits)
    m2 = torch.zeros_like(logits)
    # Same sampled loss, two ways to compute it: for small problems the full [K, L] product
    # softmax(logits) M^T is cheaper than gathering [B, S] rows (whose backward scatters into
    # logits), about 1.7x per step on FourRooms; for large K * L gathering wins.
    dense = S * A * L <= 64 * batch_size
    curve = []
    for step in range(int(steps)):
        g = torch.randint(L, (batch_size,), generator=gen)
        k = torch.randint(S * A, (batch_size,), generator=gen)  # k = s * A + a: uniform (s, a)
        if dense:
            pred = (torch.softmax(logits, dim=-1) @ M_t.T)[k, g]
        else:
            pred = (torch.softmax(logits[k], dim=-1) * M_t[g]).sum(-1)
        err2 = (pred - Q_t[g, k]) ** 2
        loss = torch.mean(err2 if W_t is None else W_t[g, k] * err2)
        loss.backward()
        with torch.no_grad():
            grad, t = logits.grad, step + 1
            m1.mul_(beta1).add_(grad, alpha=1 - beta1)
            m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            rate = lr if schedule == "constant" else 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            denom = (m2 / (1 - beta2**t)).sqrt_().add_(adam_eps)
            logits.addcdiv_(m1, denom, value=-rate / (1 - beta1**t))
            logits.grad = None
        if step % log_every == 0:
            curve.append(loss.item())
    with torch.no_grad():
        P_hat = torch.softmax(logits, dim=-1).double().numpy()
    # softmax rows sum to 1 up to float32 round-off; renormalise in float64.
    P_hat = P_hat / P_hat.sum(axis=-1, keepdims=True)
    return _unpairs(P_hat, S, A), {"loss_curve": np.asarray(curve)}


# The moves a grid cell can make, as (d_row, d_col): what geometry offers, not what an action
# does. Index 0 is "stay".
GRID_MOVES = np.array([[0, 0], [-1, 0], [0, 1], [1, 0], [0, -1]], dtype=np.int64)


def grid_neighbours(coords: np.ndarray) -> np.ndarray:
    """``nbr[S, D]``: the state one grid move away (``GRID_MOVES``), -1 where no state is.

    Args:
        coords: ``[S, 2]`` integer (row, col) of every state.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape [S, 2] (row, col), got {coords.shape}")
    index = {(int(r), int(c)): s for s, (r, c) in enumerate(coords)}
    nbr = np.full((len(coords), len(GRID_MOVES)), -1, dtype=np.int64)
    for s, (r, c) in enumerate(coords):
        for d, (dr, dc) in enumerate(GRID_MOVES):
            nbr[s, d] = index.get((int(r + dr), int(c + dc)), -1)
    return nbr


def moves_model(pi: np.ndarray, opening: np.ndarray, nbr: np.ndarray, jumps: np.ndarray) -> np.ndarray:
    """``P[S, A, S]`` of the moves model (see :func:`_extract_moves`).

    Args:
        pi: ``[A, D]`` move distribution of each action, the same in every cell.
        opening: ``[S, D]`` probability that move d from s arrives (0 where ``nbr`` is -1).
        nbr: ``[S, D]`` from :func:`grid_neighbours`.
        jumps: ``[S, S]`` action-independent jump mass ``w_s`` (row sums ``j_s <= 1``).
    """
    S, D = nbr.shape
    A = pi.shape[0]
    local = np.zeros((S, A, S))
    arrive = pi[None, :, :] * opening[:, None, :]  # [S, A, D]
    rows = np.arange(S)
    for d in range(D):
        ok = nbr[:, d] >= 0
        local[rows[ok], :, nbr[ok, d]] += arrive[ok, :, d]
    local[rows, :, rows] += 1.0 - arrive.sum(-1)  # a move that does not arrive stays
    j = jumps.sum(-1)
    return (1.0 - j)[:, None, None] * local + jumps[:, None, :]


def _fit_move_distribution(X: np.ndarray, y: np.ndarray, weight: float, allowed: np.ndarray | None = None) -> np.ndarray:
    """argmin ||X p - y|| over the simplex when column 0 ("stay") of X is zero.

    "stay" only takes what the moves leave, so NNLS on the moves is exact whenever their
    mass is at most 1; otherwise (or when "stay" is not allowed) the sum row, weighted by
    ``weight``, enforces the simplex.

    Args:
        X: ``[n, D]`` with ``X[:, 0] = 0``; y: ``[n]``.
        allowed: ``[D]`` bool, the moves p may use (default all).

    Returns:
        ``p[D]`` on the probability simplex, zero outside ``allowed``.
    """
    D = X.shape[1]
    allowed = np.ones(D, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    cols = np.flatnonzero(allowed[1:]) + 1
    p = np.zeros(D)
    if len(cols):
        p[cols] = nnls(X[:, cols], y, maxiter=50 * D)[0]
    if p[1:].sum() > 1.0 or not allowed[0]:
        cols = np.flatnonzero(allowed)
        aug = np.vstack([X[:, cols], np.full((1, len(cols)), weight)])
        p = np.zeros(D)
        p[cols] = project_simplex(nnls(aug, np.append(y, weight), maxiter=50 * D)[0])
        return p
    p[0] = max(0.0, 1.0 - p[1:].sum())
    return p / p.sum()


# Every 0/1 pattern of k moves, k = 0..4: _BINARY_PATTERNS[k] is [2^k, k].
_BINARY_PATTERNS = [np.array(list(itertools.product((0.0, 1.0), repeat=k)), dtype=np.float64).reshape(2**k, k) for k in range(5)]


def _edges(nbr: np.ndarray) -> np.ndarray:
    """``[E, 4]`` rows ``(s, d, t, d')``: the move d from s reaches state t, and d' back.

    Only moves between two states (GRID_MOVES 1..4; up/down and right/left are opposite).
    """
    back = {1: 3, 3: 1, 2: 4, 4: 2}
    rows = [(s, d, int(nbr[s, d]), back[d]) for s in range(nbr.shape[0]) for d in (2, 3)
            if nbr[s, d] >= 0]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def _share_walls(opening, Xs, ys, edges, wall_cost, sweeps=3):
    """Coordinate descent on walls that block both ways: one open/shut value per edge.

    Both end cells' misfits judge an edge, so one badly learned Q-value (an action the
    agent rarely takes) is outvoted by the other side. Updates ``opening`` in place.

    Args:
        opening: ``[S, D]``; Xs: ``[S, A L, D]``; ys: ``[S, A L]``; edges: ``_edges(nbr)``.
    """
    def misfit(s):
        return float(np.sum((Xs[s] @ opening[s] - ys[s]) ** 2))

    for _ in range(sweeps):
        changed = False
        for s, d, t, e in edges:
            costs = []
            for v in (0.0, 1.0):
                opening[s, d] = opening[t, e] = v
                costs.append(misfit(s) + misfit(t) + (wall_cost if v == 0.0 else 0.0))
            best = 1.0 if costs[1] <= costs[0] else 0.0  # a tie stays open: walls are the rarer case
            changed |= best != opening[s, d]
            opening[s, d] = opening[t, e] = best
        if not changed:
            break


def _extract_moves(Q, M, coords=None, rounds=500, tol=1e-6, jump_z=8.0, jump_ridge=1e-6,
                   jumps="auto", openings="binary", pi_prune=0.2, wall_prior=1e-3, walls="one-way", cells=None,
                   q_mask=None):
    """P-learning with parameters shared across cells, fitted by alternating least squares.

    Model, with D = 5 grid moves (stay, up, right, down, left)::

        P(. | s, a) = (1 - j_s) sum_d pi[a, d] (o[s, d] e_{s+d} + (1 - o[s, d]) e_s) + w_s

    - ``pi[a]`` ``[D]``: where action a tries to go, the same in every cell (wind, slips).
    - ``o[s, d]``: whether move d from s arrives, else the agent stays (a wall). Learned from
      Q; only moves towards a non-state are shut by geometry. ``openings="binary"`` takes
      the most probable of the cell's <= 16 wall patterns (MAP: a wall costs
      ``2 log((1 - wall_prior) / wall_prior)`` noise variances of the fit); ``"free"`` fits
      probabilities in [0, 1]. ``walls="two-way"`` ties a move to the move back, so both end
      cells judge an edge (not the default: on learned agents a badly learned Q-value on one
      side then outvotes a good one as often as the reverse).
    - ``w_s`` ``[S]`` >= 0 with mass ``j_s``: a jump anywhere whatever the action (teleports).

    Given: S, A, the cells' coordinates, Q and M. Not given: anything of P.

    Fit: least squares in ``Q = M P`` is bilinear in ``(pi, o)`` and linear in ``w``, so
    each block is a small constrained linear fit: ``pi[a]`` NNLS on the simplex (one design
    shared by all cells), ``o[s]`` per cell, ``w_s`` NNLS with a small ridge (it spreads
    the mass: with L < S goals the jump target is seen only through M). Jump cells: after a
    fit without jumps, a cell whose misfit lies more than ``jump_z`` robust standard
    deviations (MAD) above the median cell's gets a jump, kept only if that halves its misfit
    with a support its ``A L`` equations identify. Last, Occam on ``pi`` (below).

    ``cells`` (bool ``[S]``, default all) are the cells whose equations inform ``pi``, the
    noise estimate, the jump search and the stopping loss; the others only get their
    openings (``regional_moves`` fits one region at a time this way). ``q_mask`` (bool
    ``[L, S]``, default all) keeps the equations of the (goal, state) pairs whose Q-values
    constrain P; the others weigh nothing anywhere in the fit.
    """
    from scipy.optimize import lsq_linear

    L, S, A = Q.shape
    if coords is None:
        raise ValueError("method 'moves' needs the option coords=[S, 2] (the cells' (row, col))")
    nbr = grid_neighbours(coords)
    if nbr.shape[0] != S:
        raise ValueError(f"coords has {nbr.shape[0]} cells, Q has S = {S} states")
    if jumps not in ("auto", "none"):
        raise ValueError(f"unknown moves jumps {jumps!r}; allowed: auto, none")
    if openings not in ("binary", "free"):
        raise ValueError(f"unknown moves openings {openings!r}; allowed: binary, free")
    if walls not in ("two-way", "one-way"):
        raise ValueError(f"unknown moves walls {walls!r}; allowed: two-way, one-way")
    cells = np.ones(S, dtype=bool) if cells is None else np.asarray(cells, dtype=bool)
    if cells.shape != (S,) or not cells.any():
        raise ValueError(f"cells must be a bool [S] = [{S}] mask with at least one cell, got shape {cells.shape}")
    D = nbr.shape[1]
    movable = nbr >= 0
    movable[:, 0] = False  # "stay" always arrives where it is
    edges = _edges(nbr)
    Mt = M.T  # [S, L]
    delta = np.where(movable[..., None], Mt[np.maximum(nbr, 0)] - Mt[:, None, :], 0.0)  # [S, D, L]
    w_sum = _sum_weight(M, None) * math.sqrt(S)  # the pi design stacks S cells
    w_sl = np.ones((S, L)) if q_mask is None else q_mask.T.astype(np.float64)  # [S, L] equation weights
    w_sal = np.broadcast_to(w_sl[:, None, :], (S, A, L))
    n_eq = w_sal.sum(axis=(1, 2))  # [S] equations per cell
    seen = n_eq > 0  # a cell without equations has no misfit to tell the noise by
    scale = max(1.0, float(np.abs(M).max()))

    pi = np.full((A, D), 1.0 / D)
    opening = movable.astype(np.float64)
    fits_done: list[float] = []
    W = np.zeros((S, S))

    def local_base(cells=slice(None)):
        """``base[s, a, :] = M e_s + sum_d pi o delta``: M applied to the local part."""
        return Mt[cells, None, :] + np.einsum("ad,sd,sdl->sal", pi, opening[cells], delta[cells])

    def residual():
        j = W.sum(-1)
        pred = (1 - j)[:, None, None] * local_base() + (W @ Mt)[:, None, :]  # [S, A, L]
        return (Q.transpose(1, 2, 0) - pred) * w_sal

    def misfit(res):
        """Per-cell mean squared residual ``[S]`` over the cell's kept equations."""
        return np.sum(res**2, axis=(1, 2)) / np.maximum(n_eq, 1.0)

    def fit(rounds, jump_cells, shared=None, allowed=None):
        """Alternate the blocks; only the ``shared`` cells (bool [S]) inform ``pi``, whose
        rows use only the ``allowed`` moves (bool [A, D])."""
        shared = cells if shared is None else shared
        allowed = np.ones((A, D), dtype=bool) if allowed is None else allowed
        prev = np.inf
        for _ in range(rounds):
            keep = 1.0 - W.sum(-1)  # [S]
            target = Q.transpose(1, 2, 0) - (W @ Mt)[:, None, :] - keep[:, None, None] * Mt[:, None, :]
            design = (keep[:, None, None] * opening[..., None] * delta)  # [S, D, L]
            w_rows = w_sl[shared].reshape(-1)  # rows (cell, goal)
            X = design[shared].transpose(0, 2, 1).reshape(-1, D) * w_rows[:, None]
            # the noise variance of one equation, from the typical cell's misfit
            noise_var = float(np.median(misfit(residual())[cells & seen]))
            wall_cost = 2.0 * math.log((1.0 - wall_prior) / wall_prior) * noise_var
            for a in range(A):
                pi[a] = _fit_move_distribution(X, target[shared, a, :].reshape(-1) * w_rows, w_sum, allowed[a])
            # cell s's misfit is ||Xs[s] o[s] - ys[s]||^2 with Xs[s] = [A L, D]
            Xs = (keep[:, None, None, None] * pi[None, :, :, None] * delta[:, None, :, :])  # [S, A, D, L]
            Xs = Xs.transpose(0, 1, 3, 2).reshape(S, A * L, D) * w_sal.reshape(S, A * L, 1)
            ys = target.reshape(S, A * L) * w_sal.reshape(S, A * L)
            for s in range(S):
                cols = np.flatnonzero(movable[s])
                if len(cols) == 0 or keep[s] <= 0:
                    continue
                if openings == "binary":
                    # every wall pattern of the cell (at most 2^4): the most probable one,
                    # each wall costing 2 log((1 - p) / p) noise variances (MAP, prior p)
                    patterns = _BINARY_PATTERNS[len(cols)]  # [2^k, k]
                    err = np.sum((patterns @ Xs[s][:, cols].T - ys[s]) ** 2, axis=1)
                    opening[s, cols] = patterns[np.argmin(err + wall_cost * (1.0 - patterns).sum(1))]
                else:
                    opening[s, cols] = lsq_linear(Xs[s][:, cols], ys[s], bounds=(0.0, 1.0), method="bvls").x
            if openings == "binary" and walls == "two-way":
                _share_walls(opening, Xs, ys, edges, wall_cost)
            for s in jump_cells:
                fit_jump(s)
            loss = float(np.sum(residual()[cells] ** 2))
            fits_done.append(loss)
            if (np.isfinite(prev) and prev - loss <= tol * prev) or loss <= 1e-30 * scale**2:
                break
            prev = loss
        return loss

    def fit_jump(s):
        base = local_base([s])[0]  # [A, L]
        w = w_sal[s].reshape(-1)  # rows (action, goal)
        B = (Mt[None, :, :] - base[:, None, :]).transpose(0, 2, 1).reshape(A * L, S) * w[:, None]  # [A L, S]
        y = (Q[:, s, :].T - base).reshape(-1) * w
        rho = jump_ridge * float(np.mean(B**2)) if B.size else 0.0
        w = nnls(np.vstack([B, math.sqrt(rho) * np.eye(S)]), np.append(y, np.zeros(S)), maxiter=50 * S)[0]
        W[s] = w / max(1.0, w.sum())

    # Outlier cells (candidate jumps) would bend the shared pi towards themselves: fit pi
    # on the other cells until the set of outliers is stable.
    shared = cells.copy()
    for _ in range(5 if jumps == "auto" else 1):
        fit(rounds, [], shared)
        per_cell = np.sqrt(misfit(residual()))  # [S]
        # Robust z-score of the cell's misfit among the cells that inform pi (median, MAD):
        # under noise alone the misfits of the cells spread little, a jump stands out.
        med = float(np.median(per_cell[shared & seen]))
        mad = 1.4826 * float(np.median(np.abs(per_cell[shared & seen] - med)))
        floor = max(med + jump_z * mad, 1e-6 * scale)
        outliers = (per_cell > floor) & cells
        if jumps != "auto" or np.array_equal(cells & ~outliers, shared) or outliers[cells].all():
            break
        shared = cells & ~outliers
    jump_cells: list[int] = []
    if jumps == "auto":
        for s in np.flatnonzero((per_cell > floor) & cells):
            before = per_cell[s]
            fit_jump(s)
            after = np.sqrt(misfit(residual())[s])
            # Kept only if it explains the misfit with a support the A * L equations of the
            # cell can identify (2N <= A L, as L >= 2N - 1 in Table 1): noise is not a jump.
            if after <= 0.5 * before and 2 * np.count_nonzero(W[s] > 1e-12) <= n_eq[s]:
                jump_cells.append(int(s))
            else:
                W[s] = 0.0
        if jump_cells:
            fit(rounds, jump_cells)
    # Occam on pi: drop the moves of each action below ``pi_prune`` x its largest and refit;
    # keep the smaller model unless an F-test says the dropped mass was real (p < 1e-6: the
    # test takes the S A L equations as independent, but an error in one M[g, s'] enters
    # every equation of s' and its neighbours, so at p < 0.001 noise in Q kept a few percent
    # of spurious "stay" on 1 in 30 noisy windy FourRooms draws (p_mse 1e-5 instead of 1e-6)).
    # Noise spreads a little mass over every move (and into "stay", as errors in M shrink
    # the fit): this removes it, and a deterministic P comes out exactly deterministic.
    loss_free = float(np.sum(residual()[cells] ** 2))
    allowed = pi >= pi_prune * pi.max(axis=1, keepdims=True)
    dropped = int(np.count_nonzero(~allowed & (pi > 0)))
    pi_simplified = False
    if dropped:
        saved = pi.copy(), opening.copy(), W.copy()
        loss_small = fit(rounds, jump_cells, allowed=allowed)
        n, k = int(n_eq[cells].sum()), dropped
        dof = max(1, n - A * (D - 1))
        if loss_free <= 1e-24 * scale**2 * n:  # exact fit: only an exact smaller fit will do
            keep_small = loss_small <= 1e-24 * scale**2 * n
        else:
            from scipy.stats import f as f_dist

            stat = ((loss_small - loss_free) / k) / (loss_free / dof)
            keep_small = stat <= f_dist.ppf(1.0 - 1e-6, k, dof)
        if keep_small:
            pi_simplified = True
        else:
            pi, opening, W[:] = saved[0], saved[1], saved[2]
    P_hat = moves_model(pi, opening, nbr, W)
    P_hat = np.maximum(P_hat, 0.0)
    P_hat /= P_hat.sum(-1, keepdims=True)
    return P_hat, {"pi": pi.copy(), "opening": opening.copy(), "jump_cells": np.array(jump_cells, dtype=np.int64),
                   "loss_curve": np.asarray(fits_done), "pi_simplified": pi_simplified}


def project_consistent(X0: np.ndarray, M: np.ndarray, q: np.ndarray, iters: int = 3000,
                       rcond: float = 1e-12) -> np.ndarray:
    """Each row of ``X0`` projected onto the rows that explain Q: ``{p >= 0, [M; 1] p = [q; 1]}``.

    Dykstra's alternating projections between the affine set (least-squares solutions of
    ``[M; 1] p = [q; 1]``, so noisy Q keeps it non-empty) and the non-negative orthant give
    the nearest point of their intersection. Projecting onto a convex set that holds the
    true row never moves a guess away from it, so with exact Q the result is at least as
    close to the truth as ``X0`` is, and with ``M`` of full column rank (L >= S) the set is
    the true row alone: exact, as pinv is.

    Args:
        X0: ``[K, S]`` guesses; M: ``[L, S]``; q: ``[K, L]`` the rows' Q-values.

    Returns:
        ``[K, S]`` non-negative rows summing to 1.
    """
    L, S = M.shape
    w = _sum_weight(M, None)
    aug = np.vstack([M, np.full((1, S), w)])  # [L + 1, S]
    rhs = np.hstack([q, np.full((len(q), 1), w)])  # [K, L + 1]
    pinv = np.linalg.pinv(aug, rcond=rcond)  # [S, L + 1]

    def affine(X):
        return X - (X @ aug.T - rhs) @ pinv.T

    x = np.asarray(X0, dtype=np.float64).copy()
    if x.size == 0:
        return x.reshape(0, S)
    if np.linalg.matrix_rank(aug, tol=rcond * np.linalg.norm(aug, 2)) == S:
        iters = 1  # the affine set is one point: the least-squares solution
    p = np.zeros_like(x)
    c = np.zeros_like(x)
    for _ in range(int(iters)):
        y = affine(x + p)
        p = x + p - y
        x_new = np.maximum(y + c, 0.0)
        c = y + c - x_new
        done = np.abs(x_new - x).max() <= 1e-13
        x = x_new
        if done:
            break
    x = np.maximum(x, 0.0)
    sums = x.sum(-1, keepdims=True)
    return np.where(sums > 0, x / np.where(sums > 0, sums, 1.0), 1.0 / S)


def _project_rows(X0, M, q, rows, keep, iters):
    """:func:`project_consistent` of the ``rows`` ``[n, 2]`` (s, a), each onto the Q-values
    of the goals ``keep [L, S]`` keeps for its state (one call per pattern of goals)."""
    out = np.empty((len(rows), M.shape[1]))
    patterns, group = np.unique(keep.T[rows[:, 0]], axis=0, return_inverse=True)
    for p, goals in enumerate(patterns):
        idx = np.flatnonzero(group.reshape(-1) == p)
        out[idx] = project_consistent(X0[idx], M[goals], q[rows[idx, 0], rows[idx, 1]][:, goals], iters=iters)
    return out


def _extract_regional_moves(Q, M, coords=None, tol=1e-9, regions=4, trim=0.5, c_steps=6, prior="uniform",
                            project_iters=3000, polish=True, q_mask=None):
    """Moves shared only where Q says they are: regions of cells, each with its own ``pi``.

    1. Regions, found from the misfit: fit ``moves`` (:func:`_extract_moves`) with ``pi``
       informed by the remaining cells; trimmed refits (C-steps of least trimmed squares)
       inform ``pi`` by the best-fitting ``trim`` share of them (all of them once that many
       fit exactly), so a majority sharing one distribution is not bent by a minority. The
       rows the fit explains (``||Q(s, a) - M P_hat(s, a)|| <= tol (1 + ||Q(s, a)||)``) are
       kept; the cells with a row it does not explain form the next region's candidates.
    2. Rows no region explains: a distribution over the cell and its grid neighbours alone
       (NNLS on ``[M; 1]`` restricted to them), kept if it explains the row and is the only
       one that does (those columns independent); else one next state anywhere (the
       nearest column of M), kept if it explains the row exactly and no other column does.
    3. The rest: ``prior`` (``"uniform"``; ``"model"``: the last region's row) projected
       onto the rows that explain Q (:func:`project_consistent`): never further from the
       truth than the prior with exact Q, and exact where M has full column rank.
       ``polish`` (default) projects the kept rows too, for the same two reasons.

    The defaults read Q as exact (``tol`` 1e-9 relative). For a learned agent's Q set ``tol``
    to its relative Q error and ``polish=False``: projecting onto noisy Q fits the noise.

    ``q_mask`` (bool ``[L, S]``): as in ``moves``, each row is explained by, and projected
    onto, the Q-values of the goals that constrain its state.

    Given: the cells' coordinates, Q and M (like ``moves``). Nothing of P.
    """
    L, S, A = Q.shape
    keep = np.ones((L, S), dtype=bool) if q_mask is None else q_mask
    if coords is None:
        raise ValueError("method 'regional_moves' needs the option coords=[S, 2] (the cells' (row, col))")
    if prior not in ("model", "uniform"):
        raise ValueError(f"unknown regional_moves prior {prior!r}; allowed: uniform, model")
    nbr = grid_neighbours(coords)
    if nbr.shape[0] != S:
        raise ValueError(f"coords has {nbr.shape[0]} cells, Q has S = {S} states")
    q = Q.transpose(1, 2, 0)  # [S, A, L]
    q_norm = np.linalg.norm(q * keep.T[:, None, :], axis=-1)  # [S, A] over the goals that constrain s
    tau = tol * (1.0 + q_norm)  # [S, A]
    P_hat = np.zeros((S, A, S))
    how = np.full((S, A), "", dtype=object)
    region = np.full((S, A), -1, dtype=np.int64)
    remaining = np.ones(S, dtype=bool)
    last = None
    for r in range(int(regions)):
        if not remaining.any():
            break
        cells = remaining.copy()
        for _ in range(int(c_steps)):
            P_r, info_r = _extract_moves(Q, M, coords=coords, cells=cells, q_mask=q_mask)
            res = _residuals(Q, M, P_r, q_mask)  # [S, A]
            ok = (res <= tau) & remaining[:, None]
            exact_cells = ok.all(axis=1)
            misfit = np.sqrt(np.mean(res**2, axis=1))
            k = max(1, int(math.ceil(trim * remaining.sum())))
            if exact_cells.sum() >= k:
                new = exact_cells
            else:
                order = np.flatnonzero(remaining)[np.argsort(misfit[remaining], kind="stable")]
                new = np.zeros(S, dtype=bool)
                new[order[:k]] = True
            if np.array_equal(new, cells):
                break
            cells = new
        last = P_r if last is None else np.where(remaining[:, None, None], P_r, last)
        if not ok.any():
            break
        P_hat[ok] = P_r[ok]
        how[ok] = "region"
        region[ok] = r
        remaining &= ~ok.all(axis=1)
    todo = np.argwhere(how == "")
    w = _sum_weight(M, None)
    aug = np.vstack([M, np.full((1, S), w)])
    for s, a in todo:
        goals = np.append(keep[:, s], True)  # the sum row is always kept
        rhs = np.append(q[s, a], w)[goals]
        cols = np.unique(np.append(nbr[s][nbr[s] >= 0], s))
        x, rnorm = nnls(aug[goals][:, cols], rhs, maxiter=50 * len(cols))
        # kept only with an equation to spare (len(cols) <= L): with as many unknowns as
        # equations any non-negative solution fits, which is no evidence of locality
        if len(cols) < goals.sum() and rnorm <= tau[s, a] and np.linalg.matrix_rank(aug[goals][:, cols]) == len(cols):
            P_hat[s, a] = 0.0
            P_hat[s, a, cols] = x / x.sum()
            how[s, a] = "local"
            continue
        if not keep[:, s].any():
            continue  # no goal constrains s: its row is projected (stays the prior)
        d = np.linalg.norm(M[keep[:, s]] - q[s, a][keep[:, s]][:, None], axis=0)
        close = np.flatnonzero(d <= tau[s, a])
        if len(close) == 1:
            P_hat[s, a] = 0.0
            P_hat[s, a, close[0]] = 1.0
            how[s, a] = "one_state"
    todo = np.argwhere(how == "")
    if len(todo):
        X0 = last[todo[:, 0], todo[:, 1]] if prior == "model" else np.full((len(todo), S), 1.0 / S)
        P_hat[todo[:, 0], todo[:, 1]] = _project_rows(X0, M, q, todo, keep, project_iters)
        how[todo[:, 0], todo[:, 1]] = "projected"
    if polish:  # the kept rows not on Q to round-off: a jump's ridge leaves them close to it, not on it
        off = _residuals(Q, M, P_hat, q_mask) > 1e-12 * (1.0 + q_norm)
        kept = np.argwhere((how != "projected") & off)
        P_hat[kept[:, 0], kept[:, 1]] = _project_rows(P_hat[kept[:, 0], kept[:, 1]], M, q, kept, keep, project_iters)
    counts = {f"num_{h}": int(np.sum(how == h)) for h in ("region", "local", "one_state", "projected")}
    return P_hat, {"path": how, "region": region, "num_regions": int(region.max()) + 1, **counts}


# The methods that solve every (s, a) row alone: a q_mask splits them by state.
_ROW_METHODS = ("pinv", "known_support", "sparse_search", "column_match")

_METHOD_FNS = {
    "pinv": _extract_pinv,
    "known_support": _extract_known_support,
    "sparse_search": _extract_sparse_search,
    "column_match": _extract_column_match,
    "sgd": _extract_sgd,
    "moves": _extract_moves,
    "regional_moves": _extract_regional_moves,
}


def extract(Q: np.ndarray, M: np.ndarray, method: str, return_info: bool = False,
            q_mask: np.ndarray | None = None, **options: Any):
    """Extract the world model ``P_hat`` from goal-conditioned Q-values.

    Args:
        Q: ``[L, S, A]`` Q-values of L goals.
        M: ``[L, S]`` with ``M[g, s'] = r_g(s') + gamma (1 - term_g(s')) V_g(s')``.
        method: one of ``METHODS``.
        return_info: also return a dict of diagnostics.
        q_mask: ``[L, S]`` bool, the (goal, state) pairs whose Q-values constrain P (default
            all). A learned agent's Q at a state terminal for the goal is never a training
            target (episodes end on arrival, nothing bootstraps from it), so it says
            nothing of P there: :func:`trained_q_mask`. Every method then fits only the kept
            equations; a state no goal keeps gets the uniform row (not scored: the MDP's
            terminal states). Exact Q needs no mask.
        **options: per method —
            pinv: ``rcond`` (pseudo-inverse cutoff);
            known_support: ``support`` (bool ``[S, A, S]``, required), ``sum_weight``;
            sparse_search: ``max_support`` (N, required), ``tol`` (relative residual of an exact
            fit, 1e-8), ``max_subsets`` (exhaustive search only while the number of supports
            of size <= N is at most this, else greedy; 250000), ``sum_weight``, ``chunk_size``;
            column_match: ``chunk_size``;
            sgd: ``steps`` (2000), ``batch_size`` (2048), ``lr`` (Adam, 0.3), ``schedule``
            ("constant" | "cosine"), ``seed`` (0), ``init`` ("uniform" | "random"),
            ``dtype`` ("float32" | "float64"), ``log_every`` (1);
            moves: ``coords`` (``[S, 2]`` (row, col), required), ``rounds`` (500 alternations
            at most), ``tol`` (relative loss decrease that stops them, 1e-6), ``jumps``
            ("auto" | "none"), ``openings`` ("binary" | "free"), ``walls`` ("one-way" |
            "two-way", binary openings), ``wall_prior`` (1e-3: prior
            probability that a move between two states is walled, binary openings; a wall
            must lower the misfit by 2 log((1 - p) / p) noise variances), ``pi_prune`` (0.2: moves of
            an action below this fraction of its largest are dropped if an F-test allows;
            0 keeps them all), ``jump_z`` (robust z-score of a cell's misfit above which a
            jump is tried, 8), ``jump_ridge`` (1e-6, relative ridge of the jump fit),
            ``cells`` (bool ``[S]``: the cells that inform the shared pi; default all);
            regional_moves: ``coords`` (required), ``tol`` (1e-9: a row is explained when
            ``||Q(s, a) - M P_hat(s, a)|| <= tol (1 + ||Q(s, a)||)``; exact Q by default, a
            learned agent's relative Q error for its Q), ``regions`` (4 at most), ``trim``
            (0.5: the share of the remaining cells the trimmed refits keep), ``c_steps`` (6
            trimmed refits at most), ``prior`` ("uniform" | "model": the guess projected for
            the rows nothing else explains), ``project_iters`` (3000 Dykstra steps at most),
            ``polish`` (True: project the kept rows onto Q too; False for noisy Q).

    Returns:
        ``P_hat[S, A, S]`` (rows are probability vectors), or ``(P_hat, info)`` with
        ``return_info``: ``info["residuals"]`` ``[S, A]`` = ``||Q(s,a) - M P_hat(s,a)||_2``,
        ``info["fit_seconds"]``, plus per method: ``unprojected`` ``[S, A, S]`` (pinv,
        known_support, sparse_search), ``loss_curve`` ``[steps]`` (sgd, moves: one per
        round), ``pi`` ``[A, 5]``, ``opening`` ``[S, 5]``, ``jump_cells`` (moves), ``path`` ``[S, A]``
        ("region" | "local" | "one_state" | "projected"), ``region`` ``[S, A]`` (-1: none),
        ``num_regions`` and ``num_*`` counts of the paths (regional_moves), ``match_distance``
        ``[S, A]`` (column_match), ``path`` ``[S, A]`` and ``num_*`` counts (sparse_search).

    Raises:
        ValueError: unknown method or option, bad shapes, a missing required option.
    """
    if method not in _METHOD_FNS:
        raise ValueError(f"unknown extraction method {method!r}; allowed: {', '.join(METHODS)}")
    unknown = sorted(set(options) - _OPTIONS[method])
    if unknown:
        raise ValueError(
            f"method {method!r} got unknown options {unknown}; allowed: {sorted(_OPTIONS[method]) or 'none'}"
        )
    Q, M = _check_qm(Q, M)
    mask = _check_q_mask(q_mask, *M.shape)
    t0 = time.perf_counter()
    fn = _METHOD_FNS[method]
    if mask is None:
        P_hat, info = fn(Q, M, **options)
    elif method in _ROW_METHODS:
        P_hat, info = _extract_rowwise(fn, Q, M, mask, options)
    else:
        P_hat, info = fn(Q, M, q_mask=mask, **options)
    info[K.FIT_SECONDS] = time.perf_counter() - t0
    if not return_info:
        return P_hat
    info["residuals"] = _residuals(Q, M, P_hat, mask)
    return P_hat, info


def trained_q_mask(terminal: np.ndarray) -> np.ndarray:
    """``[L, S]`` bool: the (goal, state) pairs at which a learned agent's Q says something of P.

    An episode ends on arriving in a state terminal for its goal, so a state terminal for
    *every* goal (a hole, a cliff, the env's own goal: ``FiniteMDP.terminal``) is never an
    input the agent acts from, and its Q-values there are whatever the network makes of an
    input it never saw (RMS error 0.4-0.8 on FrozenLake and CliffWalking agents whose error
    elsewhere is 0.01). A goal's own cell is kept: the agent acts there under the other
    goals, and its Q-values there were measured as accurate as elsewhere. ``terminal`` is
    part of the goals' definition (it is in M already): the mask hands a method nothing of
    the answer.

    Args:
        terminal: ``[L, S]`` bool, ``goals.terminal``.
    """
    terminal = np.asarray(terminal, dtype=bool)
    return np.broadcast_to(~terminal.all(axis=0), terminal.shape).copy()


# --------------------------------------------------------------------------------------------
# what each method is given
# --------------------------------------------------------------------------------------------

# Besides Q and M (the goal rewards and the agent's V), what each method is handed. A method
# handed part of the answer is an oracle (``qworld.metrics.ORACLE_METHODS``): a yardstick, never a
# finding.
GIVEN = {
    "pinv": "nothing",
    "known_support": "the true support of P (oracle)",
    "sparse_search": "the largest true support size N (an assumption on P, read off the true P)",
    "column_match": "nothing (assumes P deterministic)",
    "sgd": "nothing",
    "moves": "the cells' grid coordinates",
    "regional_moves": "the cells' grid coordinates",
}


def method_options(method: str, P_true: np.ndarray | None = None, coords: np.ndarray | None = None) -> dict:
    """The options a sweep or the oracle study hands ``method``, per :data:`GIVEN`.

    Args:
        method: one of ``METHODS``.
        P_true: ``[S, A, S]`` true dynamics; read only for the methods that are given
            something of it (known_support, sparse_search).
        coords: ``[S, 2]`` the cells' (row, col) (moves).
    """
    if method in ("known_support", "sparse_search"):
        if P_true is None:
            raise ValueError(f"method {method!r} is given part of the true P; pass P_true")
        support = np.asarray(P_true) > 0
        if method == "known_support":
            return {"support": support}
        return {"max_support": int(support.sum(axis=-1).max())}
    if method in ("moves", "regional_moves"):
        if coords is None:
            raise ValueError(f"method {method!r} is given the cells' coordinates; this MDP has none")
        return {"coords": np.asarray(coords)}
    return {}


# --------------------------------------------------------------------------------------------
# identifiability
# --------------------------------------------------------------------------------------------


def _subsets(S: int, k: int, max_checks: int, rng: np.random.Generator) -> np.ndarray:
    """All k-subsets of range(S) when there are at most ``max_checks``, else a random sample."""
    if math.comb(S, k) <= max_checks:
        return np.array(list(itertools.combinations(range(S), k)), dtype=np.int64).reshape(-1, k)
    return np.sort(np.argsort(rng.random((max_checks, S)), axis=1)[:, :k], axis=1)


def _independent(aug: np.ndarray, J: np.ndarray, tol: float, chunk: int = 4096) -> bool:
    """True when for every row of ``J`` the columns ``aug[:, J]`` are linearly independent."""
    if J.shape[1] > aug.shape[0]:
        return False
    for start in range(0, len(J), chunk):
        sv = np.linalg.svd(aug[:, J[start : start + chunk]].transpose(1, 0, 2), compute_uv=False)
        if np.any(sv[:, -1] <= tol * sv[:, 0]):
            return False
    return True


def diagnose(
    M: np.ndarray,
    max_support: int | None = None,
    deterministic: bool = False,
    known_support: bool | np.ndarray = False,
    tol: float = 1e-10,
    max_checks: int = 2000,
    seed: int = 0,
    gap_tol: float | None = None,
) -> dict:
    """Identifiability diagnosis of ``M``: which Table-1 case (if any) guarantees recovery.

    The assumptions describe what is known about the true P (they are not checked):
    ``deterministic``; ``max_support`` N (at most N next states per (s, a));
    ``known_support`` (True: the support is known; or the bool ``[S, A, S]`` support itself,
    then affine independence is checked on exactly those supports).

    Cases, first match wins (the assumption-free case first):

    - "stochastic": rank M = S (needs L >= S); pinv recovers any P.
    - "deterministic": ``deterministic`` and the columns of M are distinct (gap > tol scale).
    - "sparse_known": ``max_support`` and ``known_support``, L >= N - 1 and the columns of
      ``[M; 1]`` on each support (every N-subset when the support is only ``True``) are
      linearly independent, i.e. the columns of M there are affinely independent.
    - "sparse_unknown": ``max_support``, unknown support, L >= 2N - 1 and any min(2N, S)
      columns of ``[M; 1]`` linearly independent (general position).
    - "not identifiable": none of the above.

    Subset conditions are checked exhaustively when there are at most ``max_checks`` subsets,
    else on ``max_checks`` random subsets (drawn with ``seed``): a pass is then evidence,
    not proof; a failure is always a real counterexample.

    Args:
        M: ``[L, S]``.
        tol: relative tolerance: a singular value below ``tol * largest`` counts as zero,
            columns closer than ``tol * max(1, |M|max)`` as equal.
        gap_tol: absolute distance below which two columns count as equal, when M is only
            known up to an error (a learned agent: about twice its Q error); overrides the
            relative ``tol`` for the column gap.

    Returns:
        dict with ``m_rank`` (int), ``m_cond`` (largest / smallest of the min(L, S) singular
        values; inf when one is zero), ``m_gap`` (smallest Euclidean distance between two
        columns of M; inf when S = 1), ``identifiable_case``, ``identifiable_reason`` (one
        line: why this case, or which condition fails for each assumption made),
        ``num_goals`` (L), ``num_states`` (S).
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"M must have shape [L, S], got {M.shape}")
    L, S = M.shape
    sv = np.linalg.svd(M, compute_uv=False)
    rank = int(np.sum(sv > tol * sv[0])) if sv[0] > 0 else 0
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
    dists = pdist(M.T)  # [S (S - 1) / 2] distances between the columns of M
    gap = float(dists.min()) if S > 1 else float("inf")
    scale = max(1.0, float(np.abs(M).max()))
    aug = np.vstack([M, np.ones((1, S))])
    rng = np.random.default_rng(seed)

    gap_floor = tol * scale if gap_tol is None else float(gap_tol)
    case = "not identifiable"
    why = [f"rank M = {rank} < S = {S} (pinv needs L >= S goals in general position)"]
    if rank == S:
        case = "stochastic"
        why = [f"rank M = S = {S}"]
    elif deterministic and gap > gap_floor:
        case = "deterministic"
        why = [f"P deterministic and the columns of M are distinct (gap {gap:.3g} > {gap_floor:.3g})"]
    elif deterministic:
        pairs = int(np.sum(dists <= gap_floor))
        why.append(f"P deterministic but {pairs} pairs of next states have columns of M closer than "
                   f"{gap_floor:.3g} (gap {gap:.3g}): within that, Q cannot tell them apart (one indicator "
                   "goal gives cells at the same distance from it the same value)")
    if case == "not identifiable" and max_support is not None:
        N = int(max_support)
        if known_support is not False and known_support is not None:
            if isinstance(known_support, (bool, np.bool_)):
                J = _subsets(S, min(N, S), max_checks, rng)
            else:
                supp = np.asarray(known_support, dtype=bool)
                if supp.ndim != 3 or supp.shape[-1] != S:
                    raise ValueError(
                        f"known_support must be a bool or a bool [S, A, S] support, got shape {supp.shape}"
                    )
                J = [np.flatnonzero(r) for r in np.unique(supp.reshape(-1, S), axis=0)]
                N = max(len(j) for j in J)
            ok = L >= N - 1
            if ok and isinstance(J, list):
                by_size: dict[int, list] = {}
                for j in J:
                    by_size.setdefault(len(j), []).append(j)
                ok = all(_independent(aug, np.array(js), tol) for js in by_size.values())
            elif ok:
                ok = _independent(aug, J, tol)
            if ok:
                case = "sparse_known"
                why = [f"support known, L = {L} >= N - 1 = {N - 1}, columns affinely independent on it"]
            else:
                why.append(f"support known but L = {L} < N - 1 = {N - 1} or columns affinely dependent on it")
        elif L >= 2 * N - 1 and _independent(aug, _subsets(S, min(2 * N, S), max_checks, rng), tol):
            case = "sparse_unknown"
            why = [f"L = {L} >= 2N - 1 = {2 * N - 1} and M in general position"]
        else:
            why.append(f"N = {N}-sparse with unknown support needs L >= 2N - 1 = {2 * N - 1} in general position")
    return {
        K.M_RANK: rank,
        K.M_COND: cond,
        K.M_GAP: gap,
        K.IDENTIFIABLE_CASE: case,
        K.IDENTIFIABLE_REASON: "; ".join(why),
        K.NUM_GOALS: L,
        K.NUM_STATES: S,
    }
