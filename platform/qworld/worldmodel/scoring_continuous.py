"""Scores of a continuous world model: next-state and state-change NMSE, with baselines.

Shapes: B transitions, d state dims.

A model is ``model_fn(states [B, d], actions [B]) -> [B, d]`` (mean next states). It is
compared with the true dynamics' expected next state on states uniform over the box (or
given), beside two baselines: ``identity`` (s' = s) and ``no_force`` (the env's zero-force
model). The finite counterpart is :mod:`qworld.worldmodel.scoring`. Torch only, no Ray.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from qworld import metrics as K
from qworld.worldmodel.plearn.continuous import ModelFn
from qworld.worldmodel.scoring import nmse
from qworld_envs.continuous import periodic_difference, wrap_angle

def nmse_torch(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """:func:`qworld.worldmodel.scoring.nmse` of tensors (on any device)."""
    return nmse(pred.detach().double().cpu().numpy(), truth.detach().double().cpu().numpy())


def successor_scores(pred_next: torch.Tensor, true_next: torch.Tensor, states: torch.Tensor,
                     periodic: Sequence[bool] | None = None, state_names: Sequence[str] | None = None) -> dict:
    """NMSE of predicted next states and state changes against the truth.

    Args:
        pred_next, true_next, states: ``[B, d]``.
        periodic: ``[d]`` angle dims (errors and changes wrapped there).
        state_names: ``[d]`` names used in the per-dim keys (default "0", "1", ...).

    Returns:
        ``{wm_nmse: mean over dims of NMSE(s'_j), wm_delta_nmse_<name>: NMSE(Delta_j)}``,
        ``Delta = s' - s``; NMSE = MSE / Var(truth) per dim.
    """
    d = states.shape[1]
    periodic = tuple(periodic or (False,) * d)
    names = tuple(state_names or (str(j) for j in range(d)))
    pred_next, true_next, states = pred_next.double(), true_next.double(), states.double()
    err = periodic_difference(pred_next, true_next, periodic)  # pred - truth, wrapped
    true_delta = periodic_difference(true_next, states, periodic)
    out, per_dim = {}, []
    for j in range(d):
        per_dim.append(nmse_torch(true_next[:, j] + err[:, j], true_next[:, j]))
        out[f"{K.WM_DELTA_NMSE}_{names[j]}"] = nmse_torch(true_delta[:, j] + err[:, j], true_delta[:, j])
    out[K.WM_NMSE] = float(np.mean(per_dim))
    return out


def _scores_with_baselines(preds: Mapping[str, torch.Tensor], true_next: torch.Tensor, states: torch.Tensor,
                           periodic: Sequence[bool] | None, state_names: Sequence[str] | None) -> dict:
    """``successor_scores`` of every prediction, keys prefixed by its name ("" = the model)."""
    out = {}
    for prefix, pred in preds.items():
        scores = successor_scores(pred, true_next, states, periodic, state_names)
        out.update({(f"{prefix}/{k}" if prefix else k): v for k, v in scores.items()})
    return out


def _predictions(model_fn: ModelFn, no_force_fn: ModelFn | None, states: torch.Tensor,
                 actions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next states of the model ("") and of the baselines, keyed by score prefix."""
    preds = {"": model_fn(states, actions), K.BASELINE_IDENTITY: states}
    if no_force_fn is not None:
        preds[K.BASELINE_NO_FORCE] = no_force_fn(states, actions)
    return preds


def score_successor(model_fn: ModelFn, true_fn: ModelFn, states: torch.Tensor, actions: torch.Tensor, *,
                    no_force_fn: ModelFn | None = None, periodic: Sequence[bool] | None = None,
                    state_names: Sequence[str] | None = None) -> dict:
    """Score a world model's next states, with the baselines next to it.

    Args:
        model_fn: ``(states [B, d], actions [B]) -> [B, d]`` predicted (mean) next states.
        true_fn: the true (mean) next states, same signature.
        states, actions: ``[B, d]``, ``[B]`` where to compare.
        no_force_fn: the "no-force" baseline model (MountainCar: force 0; Reacher: tau = 0).
        periodic, state_names: as in :func:`successor_scores`.

    Returns:
        The model's ``successor_scores`` keys, the same keys prefixed ``identity/``
        (baseline s' = s) and, with ``no_force_fn``, prefixed ``no_force/``.
    """
    with torch.no_grad():
        preds = _predictions(model_fn, no_force_fn, states, actions)
        return _scores_with_baselines(preds, true_fn(states, actions).double(), states, periodic, state_names)


def true_mean_fn(dynamics: Any, quadrature: int = 9) -> ModelFn:
    """``(states, actions) -> [B, d]`` expected next state of the true dynamics
    (Gauss-Hermite over the noise; exact for deterministic dynamics)."""

    def fn(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        nxt, w = dynamics.branches(states.double(), actions, quadrature)
        if any(dynamics.periodic):  # average the wrapped changes, not the wrapped angles
            delta = torch.stack([dynamics.delta(n, states.double()) for n in nxt])
            mean = states.double() + (w[:, None, None] * delta).sum(0)
            return torch.where(torch.as_tensor(dynamics.periodic), wrap_angle(mean), mean)
        return (w[:, None, None] * nxt).sum(0)

    return fn


def _inside_box(dynamics: Any, next_states: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: next states strictly inside the state box on every non-periodic dim."""
    ok = torch.ones(next_states.shape[0], dtype=torch.bool, device=next_states.device)
    for j, (lo, hi, per) in enumerate(zip(dynamics.low, dynamics.high, dynamics.periodic)):
        if not per:
            ok &= (next_states[:, j] > lo) & (next_states[:, j] < hi)
    return ok


def interior_mask(dynamics: Any, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: transitions whose true (mean) next state lies strictly inside the state
    box on every non-periodic dim, i.e. no wall, speed limit or joint limit acted.

    MountainCar's inelastic left wall (``v' = 0``) is the case in point: about 3% of uniform
    (s, a) hit it, their velocity change is up to 0.07 (the force is 0.001), so they hold
    most of the variance of Delta v over the box, and Q barely identifies ``v'`` there
    (every ``v' < -0.003`` at the wall leads to the same next-next state).
    """
    return _inside_box(dynamics, true_mean_fn(dynamics)(states.double(), actions))


def _transitions(dynamics: Any, num_states: int, seed: int,
                 states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where models are compared: ``states`` (default uniform over the box) as float64
    ``[B, d]`` and uniform actions ``[B]``, both from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    if states is None:
        states = dynamics.uniform_states(num_states, gen)
    return states.double(), torch.randint(dynamics.num_actions, (states.shape[0],), generator=gen)


def _subset_scores(keep: torch.Tensor, score_rows: Callable[[torch.Tensor], dict], prefix: str = K.INTERIOR) -> dict:
    """``score_rows(keep)`` under ``prefix/`` (``interior``, ``rare``), with the subset's fraction."""
    out = {f"{prefix}/{K.FRACTION}": float(keep.double().mean())}
    if keep.sum() > 1:
        out.update({f"{prefix}/{k}": v for k, v in score_rows(keep).items()})
    return out


def score_world_model(model_fn: ModelFn, problem: Any, num_states: int = 4096, seed: int = 0,
                     states: torch.Tensor | None = None, interior: bool = False,
                     rare: Callable[[torch.Tensor], Any] | None = None) -> dict:
    """:func:`score_successor` of a model of ``problem``'s dynamics on states uniform over the
    box (or given ``[B, d]``) and uniform actions, with both baselines.

    With ``interior=True`` the same scores restricted to the :func:`interior_mask`
    transitions are added under the prefix ``interior/`` (e.g.
    ``interior/wm_delta_nmse_v``, ``interior/no_force/wm_delta_nmse_v``) with their
    fraction ``interior/fraction``. With ``rare`` (``states [B, d] -> [B]`` bool, e.g.
    ``qworld.worldmodel.experience.rare_state_mask`` against the trial's experience) the same under
    ``rare/``: where the agent has no experience of its own.
    """
    dyn = problem.dynamics
    states, actions = _transitions(dyn, num_states, seed, states)
    with torch.no_grad():  # every model is stepped once; the interior scores reuse the rows
        true_next = true_mean_fn(dyn)(states, actions).double()
        preds = _predictions(model_fn, dyn.no_force_fn, states, actions)

    def score(rows: Any) -> dict:
        return _scores_with_baselines({k: p[rows] for k, p in preds.items()}, true_next[rows], states[rows],
                                      dyn.periodic, dyn.state_names)

    out = score(slice(None))
    if interior:
        out.update(_subset_scores(_inside_box(dyn, true_next), score))
    if rare is not None:
        out.update(_subset_scores(torch.as_tensor(rare(states), dtype=torch.bool), score, K.RARE))
    return out


def model_agreement(model_a: ModelFn, model_b: ModelFn, problem: Any, num_states: int = 4096, seed: int = 0,
                    states: torch.Tensor | None = None) -> dict:
    """How closely two world models of one env agree (the paper's check: the model extracted
    from position goals against the one from velocity goals, NMSE 1.7e-4).

    Both models predict next states for the same states (uniform over the box, or given
    ``[B, d]``) and uniform actions; model b is the reference of :func:`successor_scores`.

    Returns:
        ``{wm_nmse, wm_delta_nmse_<dim>, interior/...}``: NMSE of a's next states and state
        changes against b's (per dim, normalised by the variance of b's), over all states
        and over the states whose *true* next state is interior (see :func:`interior_mask`),
        with ``interior/fraction``.
    """
    dyn = problem.dynamics
    states, actions = _transitions(dyn, num_states, seed, states)
    with torch.no_grad():
        pred_a = model_a(states, actions).double()
        pred_b = model_b(states, actions).double()

    def score(rows: Any) -> dict:
        return successor_scores(pred_a[rows], pred_b[rows], states[rows], dyn.periodic, dyn.state_names)

    return {**score(slice(None)), **_subset_scores(interior_mask(dyn, states, actions), score)}




def noise_std_scores(model_std: ModelFn, problem: Any, num_states: int = 4096, seed: int = 0,
                     quadrature: int = 9) -> dict:
    """The noise scale a stochastic world model recovered against the true one, per state dim:
    ``noise_std_ratio_<dim> = mean model std / mean true std`` of s' over the interior
    transitions (:func:`interior_mask`: no wall or speed limit clips the noise there), for
    the dims the true dynamics make noisy.

    Args:
        model_std: ``(states [B, d], actions [B]) -> [B, d]`` the model's marginal std of s'
            (``GaussianSuccessor.std``).
        problem: a ``ContinuousProblem`` with stochastic dynamics (``noise_dim > 0``).

    Returns:
        ``{f"{K.NOISE_STD_RATIO}_<dim>": ratio}`` (empty for deterministic dynamics).
    """
    dyn = problem.dynamics
    if not dyn.noise_dim:
        return {}
    states, actions = _transitions(dyn, num_states, seed, None)
    with torch.no_grad():
        keep = _inside_box(dyn, true_mean_fn(dyn, quadrature)(states, actions))
        states, actions = states[keep], actions[keep]
        nxt, w = dyn.branches(states, actions, quadrature)  # [K, B, d], [K]
        mean = (w[:, None, None] * nxt).sum(0)
        true_std = ((w[:, None, None] * (nxt - mean) ** 2).sum(0)).sqrt().mean(0)
        got = model_std(states.float(), actions).double().mean(0)
    return {f"{K.NOISE_STD_RATIO}_{name}": float(got[j] / true_std[j])
            for j, name in enumerate(dyn.state_names) if true_std[j] > 0}
