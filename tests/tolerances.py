"""Tolerances for float32 results that follow from the arithmetic (issue 22, item 2).

Imported as ``tolerances`` (pytest puts tests/ on the path). The rule: a float32 result is
compared with a tolerance made of float32's spacing ``EPS32 = 2^-23 = 1.19e-7`` (one
rounding errs by at most ``EPS32 / 2`` relative), the number of roundings the operation
makes and the magnitude they are made at; or its reference is computed in float64. Results
that are exact in float32 (dyadic numbers of few bits) are compared exactly.
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def ulps(n: float, scale: float = 1.0) -> float:
    """``n`` float32 spacings at magnitude ``scale``: a result of about ``n`` roundings of
    numbers no larger than ``scale``."""
    return n * EPS32 * float(scale)


def forward_atol(outputs, depth: int, width: int) -> float:
    """Absolute tolerance between two float32 evaluations of one network on the same inputs
    through another path or batch size (the kernels sum in another order).

    A width-k dot product rounds by about ``sqrt(k)`` spacings of its terms (rounding errors
    add like a random walk: Higham & Mary's probabilistic bound); the ``depth`` layers on
    the way (Linear, LayerNorm, mean) add theirs, with a gain near 1 (normalised or small
    networks); either evaluation errs that much, hence 2. The magnitude is the largest
    ``|output|``, not each entry's: an entry near 0 carries the error of terms as large as
    the others', so a relative tolerance per entry is no bound (issue 22: 1.1e-6 relative
    on a small Q-value, against rtol 1e-6).

    Args:
        outputs: the reference outputs (any array-like; its largest magnitude sets the scale).
        depth: the accumulations on the longest path; width: the widest fan-in on it.
    """
    scale = float(np.max(np.abs(np.asarray(outputs, dtype=np.float64))))
    return 2.0 * depth * math.sqrt(width) * EPS32 * scale


def float32_mse_atol(stored, truth) -> float:
    """How far ``mean((stored - truth)^2)`` may lie from the same mean over the float64
    model that ``stored`` rounds to float32 (rows renormalised after the rounding).

    Each entry of ``stored`` is within ``e <= 2 EPS32 |stored|`` of the float64 one (one
    rounding, ``EPS32 / 2``, and a renormalisation by a row sum within ``EPS32 / 2`` of 1;
    doubled to cover the second-order terms). With ``d = stored - truth``, ``mean((d + e)^2)
    - mean(d^2) = mean(2 d e + e^2)``, and by Cauchy-Schwarz its size is at most
    ``2 sqrt(mean(d^2) mean(e^2)) + mean(e^2)``.
    """
    stored = np.asarray(stored, dtype=np.float64)
    d2 = float(np.mean((stored - np.asarray(truth, dtype=np.float64)) ** 2))
    e2 = float(np.mean((2.0 * EPS32 * stored) ** 2))
    return 2.0 * math.sqrt(d2 * e2) + e2
