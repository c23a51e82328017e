"""What the finite extraction methods share: the probability simplex every extracted row lies
on, the weight of the sum-to-one row, and the misfit of rows to Q.

:mod:`qworld.worldmodel.plearn.finite` (the linear-inverse methods and ``extract``) and
:mod:`qworld.worldmodel.plearn.moves` (the grid-moves model) both import from here, so neither
imports the other's module at import time but ``finite``'s dispatch table. Numpy only; no Ray.
"""

from __future__ import annotations

import numpy as np


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


def _residuals(Q: np.ndarray, M: np.ndarray, P_hat: np.ndarray, q_mask: np.ndarray | None = None) -> np.ndarray:
    """``[S, A]`` Euclidean norm over goals of ``Q(s, a) - M P_hat(s, a)``, over the goals
    whose Q constrains the state (``q_mask [L, S]``, default all)."""
    diff = Q - np.einsum("sat,lt->lsa", P_hat, M, optimize=True)
    if q_mask is not None:
        diff = diff * q_mask[:, :, None]
    return np.linalg.norm(diff, axis=0)


def _sum_weight(M: np.ndarray, sum_weight: float | None) -> float:
    # The sum-to-one row is weighted like the largest entry of M so it is neither ignored
    # nor dominant when Q is noisy; for exact Q any positive weight gives the same answer.
    return float(sum_weight) if sum_weight is not None else max(1.0, float(np.abs(M).max()))
