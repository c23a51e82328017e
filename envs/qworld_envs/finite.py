"""A finite MDP given by its transition tensor.

Shapes: S states, A actions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROW_SUM_ATOL = 1e-8


def validate_transition_tensor(P: np.ndarray) -> np.ndarray:
    """Check that ``P`` is a transition tensor and return it as float64.

    Args:
        P: ``[S, A, S]`` with ``P[s, a, s'] = Pr(s' | s, a)``.

    Returns:
        ``[S, A, S]`` float64 copy of ``P``.

    Raises:
        ValueError: wrong rank or shape, a non-finite or negative entry, or a row
            ``P[s, a]`` that does not sum to 1; the message names the (s, a).
    """
    P = np.array(P, dtype=np.float64, copy=True)
    if P.ndim != 3:
        raise ValueError(f"P must have shape [S, A, S] (3 dims), got shape {P.shape}")
    S, A, S2 = P.shape
    if S == 0 or A == 0:
        raise ValueError(f"P needs at least one state and one action, got shape {P.shape}")
    if S != S2:
        raise ValueError(f"P must have shape [S, A, S] with the same S twice, got shape {P.shape}")
    # Report the first offending row so a hand-built P can be fixed without a debugger.
    bad = ~np.isfinite(P)
    if bad.any():
        s, a, s2 = np.argwhere(bad)[0]
        raise ValueError(f"P[s={s}, a={a}] has a non-finite entry P[{s}, {a}, {s2}] = {P[s, a, s2]}")
    bad = P < 0
    if bad.any():
        s, a, s2 = np.argwhere(bad)[0]
        raise ValueError(f"P[s={s}, a={a}] has a negative entry P[{s}, {a}, {s2}] = {P[s, a, s2]}")
    sums = P.sum(axis=-1)
    bad = np.abs(sums - 1.0) > ROW_SUM_ATOL
    if bad.any():
        s, a = np.argwhere(bad)[0]
        raise ValueError(
            f"P[s={s}, a={a}] sums to {sums[s, a]:.12g}, not 1 (atol {ROW_SUM_ATOL}): "
            "every row P[s, a] must be a probability vector"
        )
    return P


def inverse_cdf(P: np.ndarray) -> np.ndarray:
    """Row-wise CDF of ``P`` for inverse-CDF sampling.

    Args:
        P: ``[..., S]`` rows of probabilities.

    Returns:
        ``[..., S]`` cumulative sums, scaled so each row ends at exactly 1.0.
        With ``u`` in [0, 1), ``searchsorted(cdf, u, side="right")`` then never
        lands past the last state of positive probability, and a zero-probability
        state has ``cdf[k] == cdf[k-1]`` exactly, so it is never drawn.
    """
    cdf = np.cumsum(P, axis=-1)
    return cdf / cdf[..., -1:]


class FiniteMDP:
    """A finite MDP from any transition tensor ``P[S, A, S]``.

    Rewards are not part of the MDP: goal families (``qworld_envs.goals``) attach
    them, so one ``P`` serves every goal set.

    Attributes:
        P: ``[S, A, S]`` float64, read-only; ``P[s, a, s'] = Pr(s' | s, a)``.
        num_states: S.
        num_actions: A.
        coords: ``[S, 2]`` int (row, col) of each state on a grid, or None.
        cell_to_state: dict ``(row, col) -> s`` (empty without coords).
        name: a label for reprs and logs.
        meta: free-form facts about the MDP (layout, teleport/doorway states, ...);
            ``meta["terminal"]`` (``[S]`` bool), when present, marks the states where the env
            ends every episode (``qworld_envs.tabular``): read it as :attr:`terminal`.
    """

    def __init__(
        self,
        P: np.ndarray,
        coords: np.ndarray | None = None,
        name: str = "",
        meta: dict[str, Any] | None = None,
    ):
        P = validate_transition_tensor(P)
        # Read-only because one P is shared by the gym env, the batched env and scoring.
        P.setflags(write=False)
        self.P = P
        self.num_states, self.num_actions = P.shape[0], P.shape[1]
        self.name = name
        self.meta = dict(meta) if meta is not None else {}
        self.coords = None
        self.cell_to_state: dict[tuple[int, int], int] = {}
        if coords is not None:
            coords = np.array(coords, dtype=np.int64, copy=True)
            if coords.shape != (self.num_states, 2):
                raise ValueError(f"coords must have shape [S, 2] = [{self.num_states}, 2], got {coords.shape}")
            self.cell_to_state = {(int(r), int(c)): s for s, (r, c) in enumerate(coords)}
            if len(self.cell_to_state) != self.num_states:
                raise ValueError("coords must give every state a distinct (row, col) cell")
            coords.setflags(write=False)
            self.coords = coords
        self._cdf = inverse_cdf(P)

    @property
    def terminal(self) -> np.ndarray:
        """``[S]`` bool: the env's terminal states (``meta["terminal"]``; all False without it).

        Their rows are absorbing, every goal ends its episode there, and no Q constrains
        their rows (see ``qworld_envs.tabular``).
        """
        mask = self.meta.get("terminal")
        if mask is None:
            return np.zeros(self.num_states, dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.num_states,):
            raise ValueError(f"meta['terminal'] must have shape [S] = [{self.num_states}], got {mask.shape}")
        return mask

    @property
    def is_deterministic(self) -> bool:
        """True when every row ``P[s, a]`` puts all its mass on one state."""
        return bool(np.all(self.P.max(axis=-1) == 1.0))

    def sample_next(self, s: int, a: int, rng: np.random.Generator) -> int:
        """Draw ``s' ~ P(. | s, a)`` using ``rng`` (one uniform per call)."""
        return int(np.searchsorted(self._cdf[s, a], rng.random(), side="right"))

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return f"FiniteMDP({label}S={self.num_states}, A={self.num_actions})"
