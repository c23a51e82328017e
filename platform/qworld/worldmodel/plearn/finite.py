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
moves           grid moves shared     see plearn/moves.py           P-learning, shared parameters,
                across cells                                        alternating least squares
regional_moves  grid moves shared     as moves where they hold;     moves per region found from the
                within regions Q      as pinv where they do not     misfit, local / one-state rows,
                reveals                                             the rest projected onto Q
==============  ====================  ===========================  ===============================

What each method is given besides Q and M is :data:`GIVEN`: ``known_support`` is handed the
true support (for deterministic P that *is* P), so it is an oracle and never a finding;
``sparse_search`` is handed the true largest support size. ``moves`` and ``regional_moves``
are handed only the cells' coordinates; their model (moves shared across cells, walls,
jumps) lives in :mod:`qworld.worldmodel.plearn.moves`. Whether M determines P at all (the
Table-1 case) is :func:`qworld.worldmodel.plearn.diagnose.diagnose`.

This module holds the linear-inverse methods, :func:`extract` (every method's one entry),
:func:`trained_q_mask`, :data:`GIVEN` and :func:`method_options`.

Every method returns ``P_hat[S, A, S]`` whose rows are probability vectors. Numpy / scipy,
torch only for ``sgd``; no Ray.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.optimize import nnls

from qworld import metrics as K
from qworld.worldmodel.plearn._common import _residuals, _sum_weight, project_simplex
from qworld.worldmodel.plearn.moves import _extract_moves, _extract_regional_moves

METHODS = ("pinv", "known_support", "sparse_search", "column_match", "sgd", "moves", "regional_moves")

# Options each method accepts (besides return_info); anything else is a typo worth an error.
_OPTIONS = {
    "pinv": {"rcond"},
    "known_support": {"support", "sum_weight"},
    "sparse_search": {"max_support", "tol", "max_subsets", "sum_weight", "chunk_size"},
    "column_match": {"chunk_size"},
    "sgd": {"steps", "batch_size", "lr", "seed", "init", "dtype", "log_every", "schedule"},
    "moves": {"coords", "rounds", "tol", "jump_z", "jump_ridge", "jumps", "openings", "pi_prune",
              "wall_prior", "walls", "cells", "action_weight"},
    "regional_moves": {"coords", "tol", "regions", "trim", "c_steps", "prior", "project_iters", "polish"},
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


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


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError naming an unknown ``method``, an option it does not take, or an option
    value it refuses before any fit (what a sweep file can be checked for before it runs)."""
    if method not in _METHOD_FNS:
        raise ValueError(f"unknown extraction method {method!r}; allowed: {', '.join(METHODS)}")
    unknown = sorted(set(options) - _OPTIONS[method])
    if unknown:
        raise ValueError(
            f"method {method!r} got unknown options {unknown}; allowed: {sorted(_OPTIONS[method]) or 'none'}"
        )
    if method == "moves":
        from qworld.worldmodel.plearn.moves import check_moves_options

        check_moves_options(options)


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
            terminal states). Exact Q of an MDP with terminal states wants it too: their
            absorbing rows are a convention, not dynamics, and ``moves``' two-way walls would
            read them as walls around the cell (the oracle study passes it).
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
            ("auto" | "none"), ``openings`` ("binary" | "free"), ``walls`` ("two-way" |
            "one-way", binary openings), ``wall_prior`` (1e-3: prior
            probability that a move between two states is walled, binary openings; a wall
            must lower the misfit by 2 log((1 - p) / p) noise variances), ``pi_prune`` (0.2: moves of
            an action below this fraction of its largest are dropped if an F-test allows;
            0 keeps them all), ``jump_z`` (robust z-score of a cell's misfit above which a
            jump is tried, 8), ``jump_ridge`` (1e-6, relative ridge of the jump fit),
            ``cells`` (bool ``[S]``: the cells that inform the shared pi; default all),
            ``action_weight`` (1: every action's equations alike; a number in (0, 1] for the
            non-greedy actions' equations, or "auto": from the two classes' residuals);
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
    check_options(method, options)
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
