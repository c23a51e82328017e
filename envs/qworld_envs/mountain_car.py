"""Goal-conditioned MountainCar: gymnasium's MountainCar-v0 physics, rewards replaced.

Shapes: N states, L goals. State ``(p, v)`` in ``[-1.2, 0.6] x [-0.07, 0.07]``; actions
0 push left, 1 no push, 2 push right. The agent observes the state scaled to ``[-1, 1]^2``
(``mountain_car_observe``): raw v is 25x smaller than p, which slows a Q-network down.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from qworld_envs.continuous import (
    MOUNTAIN_CAR_ID,
    ContinuousDynamics,
    ContinuousGoalEnv,
    ContinuousGoals,
    ContinuousProblem,
)
from qworld_envs.kwargs import resolve_kwargs

MIN_POSITION = -1.2
MAX_POSITION = 0.6
MAX_SPEED = 0.07
FORCE = 0.001
GRAVITY = 0.0025
GOAL_TYPES = ("position", "velocity", "gaussian")
# Sparse radius a per goal family, and the gaussian sigma: 0.1 on p; on v the same
# fraction of the range, 0.1 * (2 * 0.07) / 1.8 = 0.00778.
THRESHOLDS = {"position": 0.1, "velocity": 0.01}
SIGMAS = {"position": 0.1, "velocity": 0.1 * (2 * MAX_SPEED) / (MAX_POSITION - MIN_POSITION)}
_FEATURE_DIM = {"position": 0, "velocity": 1}
_RANGES = {"position": (MIN_POSITION, MAX_POSITION), "velocity": (-MAX_SPEED, MAX_SPEED)}

DEFAULTS: dict[str, Any] = {
    "goal_type": "position",  # GOAL_TYPES: goals on p, on v, or gaussian goals on the state (p, v)
    "num_goals": 4,  # L; centers linspace(low, high, L) of the goal dim (gaussian: Halton points of the box)
    "goal_seed": 0,  # unused: continuous goals are placed deterministically
    "goal_centers": None,  # explicit centers, [L] (position / velocity) or [L, 2] (gaussian); overrides num_goals
    "reward": None,  # sparse (indicator, ends the episode) | gaussian (never ends); None: gaussian for
    #   goal_type gaussian, else sparse
    "threshold": None,  # sparse radius a; None = THRESHOLDS[goal_type]
    "sigma": None,  # gaussian scale; None = SIGMAS[goal_type] (gaussian goals: both, one per dim)
    "action_noise": 0.0,  # std of the force noise, in units of FORCE (stochastic variant)
    "start_states": "reset",  # START_STATES: "reset" (p ~ U[-0.6, -0.4], v = 0) | "uniform" over the
    #   box (exploring starts, a training aid; world-model evaluation always uses "reset")
    "max_episode_steps": 200,
}


def mountain_car_step(
    state: torch.Tensor,
    action: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    action_noise: float = 0.0,
    force: float = FORCE,
    gravity: float = GRAVITY,
) -> torch.Tensor:
    """One MountainCar-v0 step for a batch (gymnasium's update, operation for operation).

    ``v' = clip(v + ((a - 1 + action_noise * xi) * force - cos(3 p) * gravity), +-0.07)``,
    ``p' = clip(p + v', -1.2, 0.6)``, and ``v' = 0`` when ``p'`` hits the left wall
    moving left.

    Args:
        state: ``[N, 2]`` (p, v).
        action: ``[N]`` integer actions in {0, 1, 2}.
        noise: ``[N, 1]`` standard normals xi, or None (no noise).
        action_noise: std of the force noise in units of ``force``.
        force, gravity: physics constants (``force=0`` gives the no-force baseline).

    Returns:
        ``[N, 2]`` next states, dtype of ``state``.
    """
    p, v = state[..., 0], state[..., 1]
    push = action.to(state.dtype) - 1.0
    if noise is not None and action_noise:
        push = push + action_noise * noise[..., 0]
    v = v + (push * force + torch.cos(3 * p) * (-gravity))
    v = v.clamp(-MAX_SPEED, MAX_SPEED)
    p = (p + v).clamp(MIN_POSITION, MAX_POSITION)
    v = torch.where((p == MIN_POSITION) & (v < 0), torch.zeros_like(v), v)
    return torch.stack([p, v], -1)


def mountain_car_no_force_step(state: torch.Tensor, action: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, 2]``: the dynamics with force 0 (the no-force baseline model)."""
    return mountain_car_step(state, action, None, force=0.0)


def mountain_car_reset(u: torch.Tensor) -> torch.Tensor:
    """Start states ``[N, 2]`` from uniforms ``u [N, 1]``: p ~ U[-0.6, -0.4], v = 0 (as gymnasium)."""
    p = -0.6 + 0.2 * u[:, 0]
    return torch.stack([p, torch.zeros_like(p)], -1)


OBS_CENTER = ((MIN_POSITION + MAX_POSITION) / 2, 0.0)
OBS_HALF_RANGE = ((MAX_POSITION - MIN_POSITION) / 2, MAX_SPEED)


def mountain_car_observe(state: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` observation: the state scaled to ``[-1, 1]^2``,
    ``((p + 0.3) / 0.9, v / 0.07)`` (differentiable)."""
    p = (state[..., 0] - OBS_CENTER[0]) / OBS_HALF_RANGE[0]
    v = state[..., 1] / OBS_HALF_RANGE[1]
    return torch.stack([p, v], -1)


def halton(n: int, bases: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """``[n, len(bases)]`` the first n points (from index 1) of the Halton sequence in
    ``[0, 1)^k``: deterministic and evenly spread for every n."""
    out = np.zeros((n, len(bases)))
    for j, b in enumerate(bases):
        for i in range(n):
            f, r, k = 1.0, 0.0, i + 1
            while k > 0:
                f /= b
                r += f * (k % b)
                k //= b
            out[i, j] = r
    return out


def _select_dim(state: torch.Tensor, dim: int) -> torch.Tensor:
    return state[:, dim : dim + 1]


def _identity_state(state: torch.Tensor) -> torch.Tensor:
    return state


def mountain_car_goals(
    goal_type: str = "position",
    num_goals: int = 4,
    reward: str | None = None,
    centers: Any = None,
    threshold: float | None = None,
    sigma: float | None = None,
) -> ContinuousGoals:
    """Goals on p (``position``), on v (``velocity``), or on the whole state (``gaussian``).

    ``position`` / ``velocity``: default centers ``linspace(low, high, num_goals)`` of that
    dim; sparse radius 0.1 (p) / 0.01 (v); gaussian sigma 0.1 (p) / 0.00778 (v, the same
    fraction of the range). ``reward`` None means sparse.

    ``gaussian``: the paper's Gaussian variant, ``r_g(s') = exp(-||(s' - g) / sigma||^2 / 2)``
    on ``(p, v)`` with per-dim sigma ``(0.1, 0.00778)`` (``sigma`` scales both by
    ``sigma / 0.1``); never terminal. Default centers: the first ``num_goals`` Halton points
    (bases 2, 3) of the state box. ``reward`` must be None or ``"gaussian"``.
    """
    if goal_type not in GOAL_TYPES:
        raise ValueError(f"MountainCar goal_type must be one of {GOAL_TYPES}, got {goal_type!r}")
    if goal_type == "gaussian":
        if reward not in (None, "gaussian"):
            raise ValueError(f"MountainCar goal_type 'gaussian' pays gaussian rewards; reward must be None or 'gaussian', got {reward!r}")
        low = np.array([MIN_POSITION, -MAX_SPEED])
        high = np.array([MAX_POSITION, MAX_SPEED])
        if centers is None:
            centers = low + (high - low) * halton(int(num_goals))
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        scale = 1.0 if sigma is None else float(sigma) / SIGMAS["position"]
        return ContinuousGoals(
            centers=centers,
            feature_fn=_identity_state,
            reward="gaussian",
            threshold=float(THRESHOLDS["position"] if threshold is None else threshold),
            sigma=(SIGMAS["position"] * scale, SIGMAS["velocity"] * scale),
            goal_type=goal_type,
            periodic=(False, False),
            feature_low=tuple(np.minimum(low, centers.min(0)).tolist()),
            feature_high=tuple(np.maximum(high, centers.max(0)).tolist()),
        )
    reward = "sparse" if reward is None else reward
    low, high = _RANGES[goal_type]
    if centers is None:
        centers = np.linspace(low, high, int(num_goals))
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 1)
    return ContinuousGoals(
        centers=centers,
        feature_fn=functools.partial(_select_dim, dim=_FEATURE_DIM[goal_type]),
        reward=reward,
        threshold=float(THRESHOLDS[goal_type] if threshold is None else threshold),
        sigma=(float(SIGMAS[goal_type] if sigma is None else sigma),),
        goal_type=goal_type,
        periodic=(False,),
        feature_low=(min(low, float(centers.min())),),
        feature_high=(max(high, float(centers.max())),),
    )


def mountain_car_dynamics(action_noise: float = 0.0) -> ContinuousDynamics:
    """True MountainCar dynamics (stochastic when ``action_noise > 0``)."""
    if action_noise < 0:
        raise ValueError(f"action_noise must be >= 0, got {action_noise}")
    return ContinuousDynamics(
        name="mountain_car",
        state_names=("p", "v"),
        low=(MIN_POSITION, -MAX_SPEED),
        high=(MAX_POSITION, MAX_SPEED),
        periodic=(False, False),
        num_actions=3,
        step_fn=functools.partial(mountain_car_step, action_noise=float(action_noise)),
        no_force_fn=mountain_car_no_force_step,
        reset_fn=mountain_car_reset,
        reset_dim=1,
        observe_fn=mountain_car_observe,
        obs_low=(-1.0, -1.0),
        obs_high=(1.0, 1.0),
        noise_dim=1 if action_noise > 0 else 0,
    )


def make_mountain_car_problem(**env_kwargs: Any) -> ContinuousProblem:
    """MountainCar problem from env kwargs (see ``DEFAULTS`` for names and defaults)."""
    kw = resolve_kwargs(MOUNTAIN_CAR_ID, DEFAULTS, env_kwargs)
    goals = mountain_car_goals(kw["goal_type"], kw["num_goals"], kw["reward"], kw["goal_centers"],
                               kw["threshold"], kw["sigma"])
    return ContinuousProblem(dynamics=mountain_car_dynamics(kw["action_noise"]), goals=goals,
                          env_id=MOUNTAIN_CAR_ID, env_kwargs=kw)


class MountainCarGoalEnv(ContinuousGoalEnv):
    """Goal-conditioned MountainCar (``qworld/MountainCar-v0``).

    ## Action space
    ``Discrete(3)``: 0 accelerate left, 1 no acceleration, 2 accelerate right.

    ## Observation space
    ``Box(float32, (2 + k,))``: ``concat(((p + 0.3) / 0.9, v / 0.07), goal_features[goal])``
    (the state scaled to ``[-1, 1]^2``) where the goal feature is the goal's center (a
    position for ``position`` goals, a velocity for ``velocity`` goals, k = 1; the state
    ``(p, v)`` for ``gaussian`` goals, k = 2). ``info["state"]`` is the raw state.

    ## Dynamics
    gymnasium's MountainCar-v0 (force 0.001, gravity 0.0025):
    ``v' = clip(v + (a - 1) force - cos(3p) gravity, -0.07, 0.07)``,
    ``p' = clip(p + v', -1.2, 0.6)``, ``v' = 0`` at the left wall. With
    ``action_noise = sigma > 0`` the force is ``(a - 1 + sigma xi) force``, xi ~ N(0, 1)
    from ``self.np_random``.

    ## Reward
    Replaced: for goal g with center c, ``sparse``: ``1[|p' - c| < 0.1]`` (position) /
    ``1[|v' - c| < 0.01]`` (velocity); ``gaussian``: ``exp(-(x' - c)^2 / 2 sigma^2)``
    with sigma 0.1 (position) / 0.00778 (velocity); goal_type ``gaussian``:
    ``exp(-((p' - c_p) / 0.1)^2 / 2 - ((v' - c_v) / 0.00778)^2 / 2)``.
    ``info["rewards"]`` holds every goal's.

    ## Starting state
    Goal uniform over the L goals (or ``options["goal"]``); ``p ~ U[-0.6, -0.4]``,
    ``v = 0`` (or ``options["state"]``); with ``start_states="uniform"`` the state is
    uniform over the box instead (exploring starts).

    ## Episode end
    No termination at p = 0.5. Terminated when a sparse goal is reached (gaussian goals
    never terminate); truncated after 200 steps.

    Args:
        problem: a ``ContinuousProblem`` (else built from ``env_kwargs``, see
            ``mountain_car.DEFAULTS``: goal_type, num_goals, goal_centers, reward,
            threshold, sigma, action_noise, start_states, max_episode_steps).
    """

    make_problem = staticmethod(make_mountain_car_problem)
