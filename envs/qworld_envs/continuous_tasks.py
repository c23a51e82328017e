"""The unseen-goal tasks of the continuous envs: goals an agent was never trained on, planned
inside an extracted world model (``qworld.worldmodel.planning_continuous``) and scored in the
true dynamics.

One catalogue, ``UNSEEN_GOAL_TASKS[env_id][name]``, beside the envs whose states the tasks
are defined on: a task's reward and terminal functions read the env's state layout
(MountainCar ``(p, v)``, Reacher ``(theta1, theta2, omega1, omega2)``) and its geometry (the
arms' links). Torch only; nothing here imports MuJoCo (the MuJoCo arm's links are
``continuous.MUJOCO_REACHER_LINKS``) or anything of ``qworld``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from qworld_envs.continuous import (
    MOUNTAIN_CAR_ID,
    MUJOCO_REACHER_ID,
    MUJOCO_REACHER_LINKS,
    REACHER_ID,
    wrap_angle,
)


@dataclass(frozen=True)
class UnseenGoalTask:
    """A goal the agent was not trained on, over world-model states.

    Attributes:
        name: key in ``UNSEEN_GOAL_TASKS[env_id]``.
        description: one line.
        reward_fn: ``next_states [N, d] -> [N]`` reward on arrival.
        terminal_fn: ``next_states [N, d] -> [N]`` bool, the episode ends there.
    """

    name: str
    description: str
    reward_fn: Callable[[torch.Tensor], torch.Tensor]
    terminal_fn: Callable[[torch.Tensor], torch.Tensor]


# --- the tasks' reward / terminal functions (module level, so tasks pickle) -------------
def _ball(states: torch.Tensor, dims: Sequence[int], center: Sequence[float], radius: float,
          periodic: bool | Sequence[bool] = False) -> torch.Tensor:
    """``[N]`` bool: ``states[:, dims]`` within ``radius`` of ``center`` (differences wrapped
    on the periodic dims: all of them for ``True``, or one flag per dim)."""
    diff = states[:, list(dims)] - torch.as_tensor(center, dtype=states.dtype, device=states.device)
    wrap = torch.as_tensor(periodic, device=states.device).expand(len(dims))
    diff = torch.where(wrap, wrap_angle(diff), diff)
    return diff.square().sum(-1).sqrt() < radius


def _ball_reward(states, dims, center, radius, periodic=False):
    return _ball(states, dims, center, radius, periodic).to(states.dtype)


def _any_ball(states, dims, centers, radius):
    return functools.reduce(torch.logical_or, [_ball(states, dims, c, radius) for c in centers])


def _any_ball_reward(states, dims, centers, radius):
    return _any_ball(states, dims, centers, radius).to(states.dtype)


def _gentle_success(states: torch.Tensor) -> torch.Tensor:
    return _ball(states, (0,), (0.6,), 0.1) & (states[:, 1].abs() <= 0.05)


def _gentle_reward(states: torch.Tensor) -> torch.Tensor:
    return _gentle_success(states).to(states.dtype)


def _gentle_terminal(states: torch.Tensor) -> torch.Tensor:
    return _gentle_success(states) | (states[:, 1].abs() > 0.05)


def _fingertip_ball(states, center, radius, links=(1.0, 1.0)):
    from qworld_envs.reacher import fingertip

    tip = fingertip(states, *links)
    return (tip - torch.as_tensor(center, dtype=states.dtype, device=states.device)).norm(dim=-1) < radius


def _fingertip_reward(states, center, radius, links=(1.0, 1.0)):
    return _fingertip_ball(states, center, radius, links).to(states.dtype)


def _ball_task(name, description, dims, center, radius, periodic: bool | tuple = False) -> UnseenGoalTask:
    return UnseenGoalTask(
        name, description,
        functools.partial(_ball_reward, dims=tuple(dims), center=tuple(center), radius=radius, periodic=periodic),
        functools.partial(_ball, dims=tuple(dims), center=tuple(center), radius=radius, periodic=periodic),
    )


_SQRT2 = math.sqrt(2.0)
_MJ_LINKS = MUJOCO_REACHER_LINKS
_MJ_FAR = sum(_MJ_LINKS) / _SQRT2  # the stretched arm's fingertip at 45 degrees
UNSEEN_GOAL_TASKS: dict[str, dict[str, UnseenGoalTask]] = {
    MOUNTAIN_CAR_ID: {
        "fast_car": _ball_task("fast_car", "reach velocity v = 0.06 (|v - 0.06| < 0.01); ends there",
                               (1,), (0.06,), 0.01),
        "gentle_car": UnseenGoalTask(
            "gentle_car",
            "reach p = 0.6 (|p - 0.6| < 0.1) keeping |v| <= 0.05: reward 1 there; |v| > 0.05 ends the episode with 0",
            _gentle_reward, _gentle_terminal),
        "shortest_path": UnseenGoalTask(
            "shortest_path", "reach the nearer of p = -1.0 and p = 0.4 (|p - c| < 0.1); ends there",
            functools.partial(_any_ball_reward, dims=(0,), centers=((-1.0,), (0.4,)), radius=0.1),
            functools.partial(_any_ball, dims=(0,), centers=((-1.0,), (0.4,)), radius=0.1)),
    },
    REACHER_ID: {
        "far_fingertip": UnseenGoalTask(
            "far_fingertip", "fingertip at (sqrt2, sqrt2), the arm stretched out (||tip - c|| < 0.2); ends there",
            functools.partial(_fingertip_reward, center=(_SQRT2, _SQRT2), radius=0.2),
            functools.partial(_fingertip_ball, center=(_SQRT2, _SQRT2), radius=0.2)),
        "target_angle": _ball_task("target_angle", "joint angles theta = (0, pi) (||wrap(theta - c)|| < 0.2); ends there",
                                   (0, 1), (0.0, math.pi), 0.2, periodic=True),
        "target_velocity": _ball_task("target_velocity", "joint velocities omega = (2, 2) (||omega - c|| < 0.2); ends there",
                                      (2, 3), (2.0, 2.0), 0.2),
    },
    # The toy Reacher's three goals carried over to MuJoCo's arm (links 0.1 + 0.11, radius
    # 0.02 = the env's goal radius; theta2 limited to [-3, 3], so the folded arm is 2.5;
    # one full-torque step changes omega by about 0.4 rad/s, hence the velocity radius 0.4).
    MUJOCO_REACHER_ID: {
        "far_fingertip": UnseenGoalTask(
            "far_fingertip", f"fingertip at ({_MJ_FAR:.4f}, {_MJ_FAR:.4f}), the arm stretched out (||tip - c|| < 0.02); ends there",
            functools.partial(_fingertip_reward, center=(_MJ_FAR, _MJ_FAR), radius=0.02, links=_MJ_LINKS),
            functools.partial(_fingertip_ball, center=(_MJ_FAR, _MJ_FAR), radius=0.02, links=_MJ_LINKS)),
        "target_angle": _ball_task("target_angle", "joint angles theta = (0, 2.5) (||theta - c|| < 0.2, theta1 wrapped); ends there",
                                   (0, 1), (0.0, 2.5), 0.2, periodic=(True, False)),
        "target_velocity": _ball_task("target_velocity", "joint velocities omega = (2, 2) (||omega - c|| < 0.4); ends there",
                                      (2, 3), (2.0, 2.0), 0.4),
    },
}
