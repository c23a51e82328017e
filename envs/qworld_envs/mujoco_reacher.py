"""Goal-conditioned MuJoCo Reacher: gymnasium's Reacher-v5 physics, 9 discrete torques.

Shapes: N states, L goals. World-model state ``(theta1, theta2, omega1, omega2)`` (the
arm's joint angles and velocities; theta1 wrapped to [-pi, pi), theta2 limited to
[-3, 3] by the model). No torch dynamics: ``mujoco_reacher_step`` simulates a batch
row by row with MuJoCo, which the batched env (``BatchedContinuousEnv`` over this problem,
CPU only) uses for PQN's fast env runner; the gymnasium env also runs through RLlib's standard runner. Nothing here
renders, so no GL context is ever created.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import gymnasium
import mujoco
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.envs.mujoco.reacher_v5 import ReacherEnv

from qworld_envs.continuous import (
    MUJOCO_REACHER_ID,
    MUJOCO_REACHER_LINKS,
    ContinuousDynamics,
    ContinuousGoalEnv,
    ContinuousProblem,
    wrap_angle,
)
from qworld_envs.kwargs import resolve_kwargs
from qworld_envs.reacher import TORQUES, fingertip, fingertip_goals

LINK1, LINK2 = MUJOCO_REACHER_LINKS  # body0 -> body1, body1 -> fingertip
FRAME_SKIP = 2  # Reacher-v5's; dt = 2 x 0.01 s
JOINT1_LIMIT = 3.0
TORQUE_SCALE = 0.1
# Sampling box of the velocities (not a physical limit).
SPEED_BOX = 10.0

DEFAULTS: dict[str, Any] = {
    "goal_type": "fingertip",
    "num_goals": 4,  # L fingertip targets on the radius-0.1 circle (half the reach 0.21)
    "goal_seed": 0,  # unused: continuous goals are placed deterministically
    "goal_centers": None,  # explicit [L, 2] targets
    "reward": "sparse",
    "threshold": 0.02,  # sparse radius a (the toy's 0.2 scaled by the reach, 0.21 / 2)
    "sigma": 0.02,
    "torque_scale": TORQUE_SCALE,  # torque of the actions {-1, 0, 1} x this (Box is [-1, 1])
    "start_states": "reset",  # "reset" | "uniform" over the state box (exploring starts, a training aid)
    "max_episode_steps": 100,
}


class DiscretizedTorque(gymnasium.ActionWrapper):
    """Discretises a 2-D torque Box ``[-1, 1]^2`` into 9 actions ``scale * {-1, 0, 1}^2``
    (action ``a = 3 (tau1 + 1) + (tau2 + 1)``, as the toy Reacher)."""

    def __init__(self, env: gymnasium.Env, torque_scale: float = 1.0):
        super().__init__(env)
        box = env.action_space
        if not isinstance(box, spaces.Box) or box.shape != (2,):
            raise ValueError(f"DiscretizedTorque needs a 2-D Box action space, got {box}")
        if not 0 <= torque_scale <= float(np.min(box.high)):
            raise ValueError(f"torque_scale must lie in [0, {np.min(box.high)}], got {torque_scale}")
        self.torques = (TORQUES.numpy() * torque_scale).astype(box.dtype)
        self.action_space = spaces.Discrete(len(self.torques))

    def action(self, action) -> np.ndarray:
        return self.torques[int(action)]


def mujoco_fingertip(state: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` fingertip position (links 0.1 and 0.11) of states ``[N, >= 2]``."""
    return fingertip(state, LINK1, LINK2)


def mujoco_reacher_observe(state: torch.Tensor) -> torch.Tensor:
    """``[N, 6]`` observation ``[theta1 (wrapped), theta2, omega1, omega2, tip_x, tip_y]``."""
    return torch.cat([wrap_angle(state[:, :1]), state[:, 1:4], mujoco_fingertip(state)], -1)


def mujoco_reacher_reset(u: torch.Tensor) -> torch.Tensor:
    """Start states from uniforms ``[N, 4]``: theta1 ~ U[-pi, pi), theta2 ~ U[-2.8, 2.8],
    omega ~ U[-1, 1] (wider than Reacher-v5's reset, so every target is reachable)."""
    theta1 = -math.pi + 2 * math.pi * u[:, :1]
    theta2 = -2.8 + 5.6 * u[:, 1:2]
    omega = -1.0 + 2.0 * u[:, 2:]
    return torch.cat([theta1, theta2, omega], -1)


@functools.lru_cache(maxsize=1)
def _sim() -> tuple[mujoco.MjModel, mujoco.MjData]:
    path = os.path.join(os.path.dirname(gymnasium.envs.mujoco.__file__), "assets", "reacher.xml")
    model = mujoco.MjModel.from_xml_path(path)
    return model, mujoco.MjData(model)


def mujoco_reacher_step(state: torch.Tensor, action: torch.Tensor, noise: torch.Tensor | None = None,
                        *, torque_scale: float = TORQUE_SCALE) -> torch.Tensor:
    """Reacher-v5 physics from each state: ``[N, 4]`` states, ``[N]`` actions -> ``[N, 4]``.

    Each row is simulated from a fresh ``MjData`` (reset, joint state set, ``frame_skip``
    steps), so it agrees with the gym env up to the solver's warm start. Not
    differentiable; a python loop (about 20 us per row).
    """
    model, data = _sim()
    states = state.detach().cpu().double().numpy()
    acts = action.detach().cpu().long().numpy()
    torques = (TORQUES.numpy() * torque_scale).astype(np.float32)  # as DiscretizedTorque hands them to the Box
    out = np.empty_like(states)
    for i, (s, a) in enumerate(zip(states, acts)):
        mujoco.mj_resetData(model, data)
        data.qpos[:2] = s[:2]
        data.qvel[:2] = s[2:]
        data.ctrl[:] = torques[a]
        mujoco.mj_step(model, data, nstep=FRAME_SKIP)
        out[i, :2] = data.qpos[:2]
        out[i, 2:] = data.qvel[:2]
    out[:, 0] = np.remainder(out[:, 0] + np.pi, 2 * np.pi) - np.pi
    return torch.as_tensor(out, dtype=state.dtype, device=state.device)


def mujoco_reacher_dynamics(torque_scale: float = TORQUE_SCALE) -> ContinuousDynamics:
    """True MuJoCo Reacher dynamics (numpy/MuJoCo, not differentiable)."""
    pi, reach = math.pi, LINK1 + LINK2
    inf = math.inf
    return ContinuousDynamics(
        name="mujoco_reacher",
        state_names=("theta1", "theta2", "omega1", "omega2"),
        low=(-pi, -JOINT1_LIMIT, -SPEED_BOX, -SPEED_BOX),
        high=(pi, JOINT1_LIMIT, SPEED_BOX, SPEED_BOX),
        periodic=(True, False, False, False),
        num_actions=9,
        step_fn=functools.partial(mujoco_reacher_step, torque_scale=float(torque_scale)),
        no_force_fn=functools.partial(mujoco_reacher_step, torque_scale=0.0),
        reset_fn=mujoco_reacher_reset,
        reset_dim=4,
        observe_fn=mujoco_reacher_observe,
        obs_low=(-pi, -inf, -inf, -inf, -reach, -reach),
        obs_high=(pi, inf, inf, inf, reach, reach),
        differentiable=False,
    )


def make_mujoco_reacher_problem(**env_kwargs: Any) -> ContinuousProblem:
    """MuJoCo Reacher problem from env kwargs (see ``DEFAULTS``)."""
    kw = resolve_kwargs(MUJOCO_REACHER_ID, DEFAULTS, env_kwargs)
    if kw["goal_type"] != "fingertip":
        raise ValueError(f"MujocoReacher goal_type must be 'fingertip', got {kw['goal_type']!r}")
    if not 0 <= kw["torque_scale"] <= 1:
        raise ValueError(f"torque_scale must lie in [0, 1], got {kw['torque_scale']}")
    goals = fingertip_goals(kw["num_goals"], kw["reward"], kw["goal_centers"], kw["threshold"], kw["sigma"],
                            feature_fn=mujoco_fingertip, reach=LINK1 + LINK2, radius=0.1)
    return ContinuousProblem(dynamics=mujoco_reacher_dynamics(kw["torque_scale"]), goals=goals,
                          env_id=MUJOCO_REACHER_ID, env_kwargs=kw)


class MujocoReacherGoalEnv(ContinuousGoalEnv):
    """Goal-conditioned MuJoCo Reacher (``qworld/MujocoReacher-v0``).

    ## Action space
    ``Discrete(9)``: torques ``torque_scale * (tau1, tau2)``, ``tau in {-1, 0, 1}^2``
    (``DiscretizedTorque`` over Reacher-v5's Box; default scale 0.1, because full torque
    spins the arm past 100 rad/s within a second).

    ## Observation space
    ``Box(float32, (6 + 2,))``: ``[theta1 (wrapped), theta2, omega1, omega2, tip_x, tip_y]``
    then the commanded goal's fingertip target (x, y).

    ## Dynamics
    gymnasium's Reacher-v5 (MuJoCo, RK4, dt = 0.02 s). The world-model state
    (``info["state"]``) is the arm's joint angles and velocities; Reacher-v5's own target
    is parked on the commanded goal and plays no part.

    ## Reward
    Replaced (Reacher-v5's distance and control costs are dropped): for target c,
    ``sparse`` ``1[||tip' - c|| < 0.02]``; ``gaussian`` ``exp(-||tip' - c||^2 / (2 * 0.02^2))``.

    ## Starting state
    Goal uniform over the L targets (default 4 on the radius-0.1 circle at angles 0,
    pi/2, pi, 3pi/2); theta1 ~ U[-pi, pi), theta2 ~ U[-2.8, 2.8], omega ~ U[-1, 1].

    ## Episode end
    Terminated when a sparse target is reached; truncated after 100 steps.
    """

    make_problem = staticmethod(make_mujoco_reacher_problem)

    def __init__(self, problem: ContinuousProblem | None = None, render_mode: str | None = None, **env_kwargs: Any):
        super().__init__(problem, render_mode, **env_kwargs)
        self._sim = DiscretizedTorque(ReacherEnv(), float(self.problem.env_kwargs["torque_scale"]))
        self._raw: ReacherEnv = self._sim.unwrapped

    def _set_state(self, state: np.ndarray) -> None:
        super()._set_state(state)
        raw = self._raw
        mujoco.mj_resetData(raw.model, raw.data)
        target = self.problem.goals.centers[self._goal].numpy()
        raw.set_state(np.concatenate([self._state[:2], target]), np.concatenate([self._state[2:], [0.0, 0.0]]))

    def _advance(self, action: int) -> np.ndarray:
        self._sim.step(action)
        qpos, qvel = self._raw.data.qpos, self._raw.data.qvel
        theta1 = float(np.remainder(qpos[0] + np.pi, 2 * np.pi) - np.pi)
        return np.array([theta1, qpos[1], qvel[0], qvel[1]], dtype=np.float64)

    def close(self):
        self._sim.close()
        super().close()

