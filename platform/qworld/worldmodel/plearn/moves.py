"""The grid-moves world model: P-learning with parameters shared across the cells of a grid
(``moves``), and shared only within the regions Q reveals (``regional_moves``).

``moves`` is handed only the cells' coordinates and assumes (1) each action is one
distribution over the grid moves (stay, up, right, down, left), the same in every cell; (2) a
move either arrives in the neighbouring cell or stays (a wall), which it learns per (cell,
move); (3) a cell may jump, whatever the action, anywhere (teleports), which it detects as
cells whose misfit stands out from the noise. Its few shared parameters are what make it work
at the paper's goal counts: per-(s, a) fits see L equations each, the shared move distribution
sees all S L of them. ``regional_moves`` (same inputs) drops assumption (1) where Q contradicts
it: cells share a move distribution within regions found from the misfit, a row no region
explains may be a distribution over the cell's neighbours or one state anywhere, and the rest
are the rows nearest a uniform guess among those that explain Q (:func:`project_consistent`),
so it is exact where pinv is and never further from the truth than its guess.

Both are called through :func:`qworld.worldmodel.plearn.finite.extract` (methods ``moves``,
``regional_moves``), which validates Q, M and the options. Numpy / scipy; no Ray.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import nnls

from qworld.worldmodel.plearn._common import _residuals, _sum_weight, project_simplex


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


_MOVES_CHOICES = {"jumps": ("auto", "none"), "openings": ("binary", "free"), "walls": ("two-way", "one-way")}


def check_moves_options(options) -> None:
    """ValueError naming a ``moves`` option whose value :func:`_extract_moves` would refuse
    (``plearn.finite.check_options`` runs it before any fit, and on a sweep file before it runs)."""
    for key, allowed in _MOVES_CHOICES.items():
        if key in options and options[key] not in allowed:
            raise ValueError(f"unknown moves {key} {options[key]!r}; allowed: {', '.join(allowed)}")
    weight = options.get("action_weight", 1.0)
    if not (weight == "auto" or (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                                 and 0.0 < weight <= 1.0)):
        raise ValueError(f"action_weight: {weight!r}; allowed: 'auto' or a number in (0, 1]")


def _extract_moves(Q, M, coords=None, rounds=500, tol=1e-6, jump_z=8.0, jump_ridge=1e-6,
                   jumps="auto", openings="binary", pi_prune=0.2, wall_prior=1e-3, walls="two-way", cells=None,
                   q_mask=None, action_weight=1.0):
    """P-learning with parameters shared across cells, fitted by alternating least squares.

    Model, with D = 5 grid moves (stay, up, right, down, left)::

        P(. | s, a) = (1 - j_s) sum_d pi[a, d] (o[s, d] e_{s+d} + (1 - o[s, d]) e_s) + w_s

    - ``pi[a]`` ``[D]``: where action a tries to go, the same in every cell (wind, slips).
    - ``o[s, d]``: whether move d from s arrives, else the agent stays (a wall). Learned from
      Q; only moves towards a non-state are shut by geometry. ``openings="binary"`` takes
      the most probable of the cell's <= 16 wall patterns (MAP: a wall costs
      ``2 log((1 - wall_prior) / wall_prior)`` noise variances of the fit); ``"free"`` fits
      probabilities in [0, 1]. ``walls="two-way"`` (default) ties a move to the move back, so
      both end cells judge an edge: on 18 learned windy FourRooms agents (6 goal draws x 3
      seeds) it removed the one wrong wall (p_mse 4.2e-5 -> 1.0e-6) and changed no other,
      and on FrozenLake it took the worst of 3 L = 4 runs from 1.4e-4 to 4.6e-5. (It was not
      the default while the Q-values of states the agent never acts from were read: those
      outvoted good ones; ``q_mask`` leaves them out.) ``"one-way"``: each cell alone.
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

    ``action_weight`` weighs, in the fit of the shared ``pi`` only, the equations of the actions
    that are not the agent's greedy one (``argmax_a Q[g, s, a]``, read off Q) against those of
    the greedy one: 1 (default) weighs all alike; a number in (0, 1] is that weight; ``"auto"``
    refits once with the ratio of the two classes' residual RMS after the unweighted fit (<= 1;
    1 with exact Q, whose residuals are 0). A learned agent trains its greedy values on its own
    data and the others only from exploration: on learned FrozenLake agents the others'
    residuals were 1.7-3x larger. The openings (walls) keep every equation alike: a wall shows
    in the actions that bump into it, rarely the greedy ones (weighing those down there too made
    a spurious wall on noisy FrozenLake Q). Measured in BENCHMARKS.md "FrozenLake over goal
    draws".
    """
    from scipy.optimize import lsq_linear

    L, S, A = Q.shape
    if coords is None:
        raise ValueError("method 'moves' needs the option coords=[S, 2] (the cells' (row, col))")
    nbr = grid_neighbours(coords)
    if nbr.shape[0] != S:
        raise ValueError(f"coords has {nbr.shape[0]} cells, Q has S = {S} states")
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
    w_sl = np.ones((S, L)) if q_mask is None else q_mask.T.astype(np.float64)  # [S, L] kept equations
    mask_sal = np.repeat(w_sl[:, None, :], A, axis=1)  # [S, A, L] the kept equations, unweighted
    n_eq = mask_sal.sum(axis=(1, 2))  # [S] equations per cell
    greedy_sal = np.arange(A)[None, :, None] == Q.argmax(-1).T[:, None, :]  # [S, A, L] the agent's own greedy action
    # the weights of the shared pi's fit (action_weight); everything else fits with mask_sal
    w_sal = mask_sal if action_weight in ("auto", 1.0) else mask_sal * np.where(greedy_sal, 1.0, float(action_weight))
    seen = n_eq > 0  # a cell without equations has no misfit to tell the noise by
    scale = max(1.0, float(np.abs(M).max()))

    pi = np.full((A, D), 1.0 / D)
    opening = movable.astype(np.float64)
    fits_done: list[float] = []
    W = np.zeros((S, S))

    def local_base(cells=slice(None)):
        """``base[s, a, :] = M e_s + sum_d pi o delta``: M applied to the local part."""
        return Mt[cells, None, :] + np.einsum("ad,sd,sdl->sal", pi, opening[cells], delta[cells])

    def residual(weights=None):
        j = W.sum(-1)
        pred = (1 - j)[:, None, None] * local_base() + (W @ Mt)[:, None, :]  # [S, A, L]
        return (Q.transpose(1, 2, 0) - pred) * (w_sal if weights is None else weights)

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
            X0 = design[shared].transpose(0, 2, 1).reshape(-1, D)
            # the noise variance of one equation, from the typical cell's misfit
            noise_var = float(np.median(misfit(residual(mask_sal))[cells & seen]))
            wall_cost = 2.0 * math.log((1.0 - wall_prior) / wall_prior) * noise_var
            for a in range(A):
                w_rows = w_sal[shared, a, :].reshape(-1)  # rows (cell, goal)
                pi[a] = _fit_move_distribution(X0 * w_rows[:, None], target[shared, a, :].reshape(-1) * w_rows, w_sum, allowed[a])
            # cell s's misfit is ||Xs[s] o[s] - ys[s]||^2 with Xs[s] = [A L, D]
            Xs = (keep[:, None, None, None] * pi[None, :, :, None] * delta[:, None, :, :])  # [S, A, D, L]
            Xs = Xs.transpose(0, 1, 3, 2).reshape(S, A * L, D) * mask_sal.reshape(S, A * L, 1)
            ys = target.reshape(S, A * L) * mask_sal.reshape(S, A * L)
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
                # only edges inside ``cells``: a cell outside fits another pi, its misfit says nothing here
                _share_walls(opening, Xs, ys, edges[cells[edges[:, 0]] & cells[edges[:, 2]]], wall_cost)
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
        w = mask_sal[s].reshape(-1)  # rows (action, goal); pi alone is fitted with action_weight
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
    weight_other = float(action_weight) if action_weight != "auto" else 1.0
    if action_weight == "auto":
        # Feasible weighted least squares over two classes of equations: each class weighted by
        # 1 / its residual's RMS after the unweighted fit (the greedy class as the unit).
        res = residual(mask_sal)
        kept = mask_sal > 0
        var_greedy = float(np.mean(res[kept & greedy_sal] ** 2)) if (kept & greedy_sal).any() else 0.0
        var_other = float(np.mean(res[kept & ~greedy_sal] ** 2)) if (kept & ~greedy_sal).any() else 0.0
        exact = float(np.sum(res[cells] ** 2)) <= 1e-24 * scale**2 * float(n_eq[cells].sum())  # as Occam's test
        if var_other > 0.0 and var_greedy > 0.0 and not exact:
            weight_other = min(1.0, math.sqrt(var_greedy / var_other))
        if weight_other < 1.0:
            w_sal = mask_sal * np.where(greedy_sal, 1.0, weight_other)
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
                   "loss_curve": np.asarray(fits_done), "pi_simplified": pi_simplified, "action_weight": weight_other}


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
