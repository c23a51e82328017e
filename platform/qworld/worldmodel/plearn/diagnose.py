"""Identifiability of a world model from Q: which case of the paper's Table 1 (if any)
guarantees that ``M`` determines P (:func:`diagnose`), and the goal counts above which each
case does (:func:`table1_thresholds`). Numpy / scipy; no Ray.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.spatial.distance import pdist

from qworld import metrics as K

IDENTIFIABLE_CASES = ("stochastic", "sparse_known", "sparse_unknown", "deterministic", "not identifiable")


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


def table1_thresholds(P: np.ndarray) -> dict[str, int]:
    """The goal counts L above which Table 1 guarantees recovery of ``P[S, A, S]``.

    Deterministic P: ``L >= 1`` (column matching). Otherwise, with N the largest support
    of a row P(s, a): ``L >= N - 1`` (known support), ``L >= 2N - 1`` (support search) and
    ``L >= S`` (pseudo-inverse, any stochastic P).

    Returns:
        label -> L, increasing, thresholds below 1 left out.
    """
    P = np.asarray(P)
    S = P.shape[0]
    support = int((P > 0).sum(axis=-1).max())
    if support == 1:
        return {"deterministic: L ≥ 1": 1}
    out = {f"known support: L ≥ N−1 = {support - 1}": support - 1,
           f"support search: L ≥ 2N−1 = {2 * support - 1}": 2 * support - 1,
           f"stochastic: L ≥ S = {S}": S}
    return {k: v for k, v in out.items() if v >= 1}


def variant_thresholds(variant: str, layout: str | None = None) -> dict[str, int]:
    """:func:`table1_thresholds` of ``qworld_envs.four_rooms(variant, layout).P``."""
    from qworld_envs import four_rooms

    return table1_thresholds(four_rooms(variant, layout=layout).P)
