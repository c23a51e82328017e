"""State from observation, ``observe(s) -> s``, for the continuous envs D3G runs on.

D3G's networks live in the world-model state space (its forward model predicts ``s' - s``,
which qworld scores against the true dynamics), but the env runners and the QFunction API
hand the module observations ``observe(s)``. Every continuous env observes its state
invertibly:

- MountainCar: ``obs = ((p + 0.3) / 0.9, v / 0.07)`` (affine);
- toy Reacher: ``obs = [wrap(theta1), wrap(theta2), omega1, omega2, tip_x, tip_y]`` and
  MuJoCo Reacher ``[wrap(theta1), theta2, omega1, omega2, tip_x, tip_y]``: the state is
  the first 4 entries (angles already wrapped, as the state is).

``UNOBSERVE`` maps an env id to its inverse (module-level functions, so modules holding
them pickle); :func:`round_trip_error` checks one against the env's ``observe``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from qworld_envs.continuous import MOUNTAIN_CAR_ID, MUJOCO_REACHER_ID, REACHER_ID, periodic_difference
from qworld_envs.mountain_car import OBS_CENTER, OBS_HALF_RANGE


def mountain_car_unobserve(obs: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` observation -> ``[N, 2]`` state ``(p, v)`` (inverse of ``mountain_car_observe``)."""
    p = obs[..., 0] * OBS_HALF_RANGE[0] + OBS_CENTER[0]
    v = obs[..., 1] * OBS_HALF_RANGE[1]
    return torch.stack([p, v], -1)


def prefix_unobserve(obs: torch.Tensor, state_dim: int) -> torch.Tensor:
    """The state is the observation's first ``state_dim`` entries."""
    return obs[..., :state_dim]


UNOBSERVE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    MOUNTAIN_CAR_ID: mountain_car_unobserve,
    REACHER_ID: functools.partial(prefix_unobserve, state_dim=4),
    MUJOCO_REACHER_ID: functools.partial(prefix_unobserve, state_dim=4),
}


def unobserve_fn(env_id: str) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The inverse observation of ``env_id`` (None when unknown)."""
    return UNOBSERVE.get(env_id)


def round_trip_error(problem, n: int = 256) -> float:
    """Max ``|unobserve(observe(s)) - s|`` (wrapped) over ``n`` states uniform in the box, in
    float32 as the module computes it; ``inf`` when the env has no inverse."""
    fn = unobserve_fn(problem.env_id)
    if fn is None:
        return float("inf")
    dyn = problem.dynamics
    gen = torch.Generator().manual_seed(0)
    s = dyn.uniform_states(n, gen, dtype=torch.float32)
    back = fn(dyn.observe(s).float())
    if back.shape != s.shape:
        return float("inf")
    return float(periodic_difference(back, s, dyn.periodic).abs().max())
