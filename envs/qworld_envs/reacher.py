"""Goal-conditioned toy Reacher (not MuJoCo): a planar two-link arm with unit links.

Shapes: N states, L goals. World-model state ``(theta1, theta2, omega1, omega2)``; 9
actions, torques ``(tau1, tau2) in {-1, 0, 1}^2`` with action ``a = 3 (tau1 + 1) + (tau2 + 1)``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

import numpy as np
import torch

from qworld_envs.continuous import (
    REACHER_ID,
    ContinuousDynamics,
    ContinuousGoalEnv,
    ContinuousGoals,
    ContinuousProblem,
    wrap_angle,
)
from qworld_envs.kwargs import resolve_kwargs

DT = 0.05
LINK = 1.0  # both links
MAX_SPEED = 3.0  # |omega| clip: keeps the state in a box (the grid ground truth needs one)
# [9, 2] torques of the 9 actions, a = 3 (tau1 + 1) + (tau2 + 1).
TORQUES = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=2)), dtype=torch.float64)
GOAL_TYPES = ("fingertip",)
GOAL_RADIUS = 1.0
THRESHOLD = 0.2
SIGMA = 0.2

DEFAULTS: dict[str, Any] = {
    "goal_type": "fingertip",  # GOAL_TYPES
    "num_goals": 4,  # L fingertip targets on the radius-1 circle at angles 2 pi k / L
    "goal_seed": 0,  # unused: continuous goals are placed deterministically
    "goal_centers": None,  # explicit [L, 2] fingertip targets (overrides num_goals)
    "reward": "sparse",  # sparse (indicator, ends the episode) | gaussian (never ends)
    "threshold": THRESHOLD,  # sparse radius a
    "sigma": SIGMA,  # gaussian scale (on x and y)
    "max_speed": MAX_SPEED,  # |omega| clip
    "start_states": "reset",  # "reset" | "uniform" over the state box (exploring starts, a training aid)
    "max_episode_steps": 100,
}


@functools.lru_cache(maxsize=None)
def _torques(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``TORQUES`` on a device (cached: no copy per step on GPU)."""
    return TORQUES.to(device=device, dtype=dtype)


def reacher_step(
    state: torch.Tensor,
    action: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    max_speed: float = MAX_SPEED,
    torque_scale: float = 1.0,
    dt: float = DT,
) -> torch.Tensor:
    """One toy-Reacher step: ``omega' = clip(omega + dt tau)``, ``theta' = wrap(theta + dt omega')``.

    Args:
        state: ``[N, 4]`` (theta1, theta2, omega1, omega2).
        action: ``[N]`` integers in [0, 9).
        noise: unused (deterministic).
        max_speed: |omega| clip.
        torque_scale: multiplies tau (0 gives the no-force baseline).
        dt: time step.

    Returns:
        ``[N, 4]`` next states (angles wrapped to [-pi, pi)).
    """
    tau = _torques(state.device, state.dtype)[action.long()] * torque_scale
    omega = (state[..., 2:] + dt * tau).clamp(-max_speed, max_speed)
    theta = wrap_angle(state[..., :2] + dt * omega)
    return torch.cat([theta, omega], -1)


def reacher_no_force_step(state: torch.Tensor, action: torch.Tensor, noise: torch.Tensor | None = None,
                          *, max_speed: float = MAX_SPEED) -> torch.Tensor:
    """``[N, 4]``: the dynamics with tau = 0 (the no-force baseline model)."""
    return reacher_step(state, action, None, max_speed=max_speed, torque_scale=0.0)


def fingertip(state: torch.Tensor, link1: float = LINK, link2: float = LINK) -> torch.Tensor:
    """``[N, 2]`` fingertip position of states ``[N, >= 2]`` (angles first)."""
    t1, t12 = state[:, 0], state[:, 0] + state[:, 1]
    return torch.stack([link1 * torch.cos(t1) + link2 * torch.cos(t12),
                        link1 * torch.sin(t1) + link2 * torch.sin(t12)], -1)


def reacher_observe(state: torch.Tensor) -> torch.Tensor:
    """``[N, 6]`` observation ``[theta1, theta2 (wrapped), omega1, omega2, tip_x, tip_y]``."""
    return torch.cat([wrap_angle(state[:, :2]), state[:, 2:4], fingertip(state)], -1)


def reacher_reset(u: torch.Tensor, *, max_omega: float = 1.0) -> torch.Tensor:
    """Start states ``[N, 4]`` from uniforms ``u [N, 4]``: theta ~ U[-pi, pi), omega ~ U[-1, 1]."""
    theta = -math.pi + 2 * math.pi * u[:, :2]
    omega = -max_omega + 2 * max_omega * u[:, 2:]
    return torch.cat([theta, omega], -1)


def circle_targets(num_goals: int, radius: float = GOAL_RADIUS) -> np.ndarray:
    """``[L, 2]`` points on a circle at angles ``2 pi k / L`` (L = 4: 0, pi/2, pi, 3pi/2)."""
    angles = 2 * np.pi * np.arange(num_goals) / num_goals
    return radius * np.stack([np.cos(angles), np.sin(angles)], -1)


def fingertip_goals(num_goals: int = 4, reward: str = "sparse", centers: Any = None,
                    threshold: float = THRESHOLD, sigma: float = SIGMA, feature_fn=fingertip,
                    reach: float = 2 * LINK, radius: float = GOAL_RADIUS) -> ContinuousGoals:
    """Fingertip targets (default on the radius-``radius`` circle) with radius a / scale sigma."""
    if centers is None:
        centers = circle_targets(int(num_goals), radius)
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    bound = max(reach, float(np.abs(centers).max()))
    return ContinuousGoals(
        centers=centers, feature_fn=feature_fn, reward=reward, threshold=float(threshold),
        sigma=(float(sigma), float(sigma)), goal_type="fingertip", periodic=(False, False),
        feature_low=(-bound, -bound), feature_high=(bound, bound),
    )


def reacher_dynamics(max_speed: float = MAX_SPEED) -> ContinuousDynamics:
    """True toy-Reacher dynamics."""
    if not max_speed > 1.0:
        raise ValueError(f"max_speed must exceed the reset speed 1, got {max_speed}")
    pi, tip = math.pi, 2 * LINK
    return ContinuousDynamics(
        name="reacher",
        state_names=("theta1", "theta2", "omega1", "omega2"),
        low=(-pi, -pi, -max_speed, -max_speed),
        high=(pi, pi, max_speed, max_speed),
        periodic=(True, True, False, False),
        num_actions=9,
        step_fn=functools.partial(reacher_step, max_speed=float(max_speed)),
        no_force_fn=functools.partial(reacher_no_force_step, max_speed=float(max_speed)),
        reset_fn=reacher_reset,
        reset_dim=4,
        observe_fn=reacher_observe,
        obs_low=(-pi, -pi, -max_speed, -max_speed, -tip, -tip),
        obs_high=(pi, pi, max_speed, max_speed, tip, tip),
    )


def make_reacher_problem(**env_kwargs: Any) -> ContinuousProblem:
    """Toy-Reacher problem from env kwargs (see ``DEFAULTS``)."""
    kw = resolve_kwargs(REACHER_ID, DEFAULTS, env_kwargs)
    if kw["goal_type"] not in GOAL_TYPES:
        raise ValueError(f"Reacher goal_type must be one of {GOAL_TYPES}, got {kw['goal_type']!r}")
    goals = fingertip_goals(kw["num_goals"], kw["reward"], kw["goal_centers"], kw["threshold"], kw["sigma"])
    return ContinuousProblem(dynamics=reacher_dynamics(kw["max_speed"]), goals=goals, env_id=REACHER_ID, env_kwargs=kw)


class ReacherGoalEnv(ContinuousGoalEnv):
    """Goal-conditioned toy Reacher (``qworld/Reacher-v0``): two unit links, no MuJoCo.

    ## Action space
    ``Discrete(9)``: torques ``(tau1, tau2) = TORQUES[a]`` in ``{-1, 0, 1}^2``.

    ## Observation space
    ``Box(float32, (6 + 2,))``: ``[theta1, theta2, omega1, omega2, tip_x, tip_y]``
    (angles wrapped to [-pi, pi)) then the commanded goal's fingertip target (x, y).

    ## Dynamics
    ``omega' = clip(omega + 0.05 tau, -3, 3)``, ``theta' = wrap(theta + 0.05 omega')``;
    fingertip ``(cos t1 + cos(t1 + t2), sin t1 + sin(t1 + t2))``. The world-model state
    is ``(theta, omega)`` (``info["state"]``). The clip (``max_speed``) is a qworld
    addition that keeps the state in a box for the grid ground truth; start speeds are
    at most 1.

    ## Reward
    For target c: ``sparse`` ``1[||tip' - c|| < 0.2]``; ``gaussian``
    ``exp(-||tip' - c||^2 / (2 * 0.2^2))``. ``info["rewards"]`` holds every goal's.

    ## Starting state
    Goal uniform over the L targets (default 4 on the unit circle at angles 0, pi/2, pi,
    3pi/2); ``theta ~ U[-pi, pi)``, ``omega ~ U[-1, 1]`` (or ``options``).

    ## Episode end
    Terminated when a sparse target is reached; truncated after 100 steps.
    """

    make_problem = staticmethod(make_reacher_problem)
