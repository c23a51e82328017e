"""Env ids -> problems, batched envs and gymnasium envs: the one place where envs are registered.

Every id is a finite env (``FINITE_ENVS``: id -> ``FiniteEnvSpec``) or a continuous env
(``CONTINUOUS_ENVS``: id -> problem factory); ``BATCHED_ENVS`` maps every id to its batched
factory (``BatchedFiniteEnv`` / ``BatchedContinuousEnv`` over the id's problem) and
``GYM_ENTRY_POINTS`` to its gymnasium env. This module imports the concrete env modules;
they never import it. ``qworld_envs.mujoco_reacher`` (which loads MuJoCo) is imported
only when its problem or env is first built.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import gymnasium
import numpy as np
import torch

from qworld_envs.batched import BatchedFiniteEnv, BatchedGoalEnv
from qworld_envs.continuous import (
    MOUNTAIN_CAR_ID,
    MUJOCO_REACHER_ID,
    REACHER_ID,
    BatchedContinuousEnv,
    ContinuousProblem,
)
from qworld_envs.four_rooms import FOUR_ROOMS_ID, FOUR_ROOMS_SPEC
from qworld_envs.mountain_car import make_mountain_car_problem
from qworld_envs.reacher import make_reacher_problem
from qworld_envs.problems import FiniteEnvSpec, FiniteProblem, build_finite_problem
from qworld_envs.tabular import TABULAR_FILE_ID, TABULAR_GYM_IDS, file_env_spec, gym_env_spec, qworld_id


def _make_mujoco_reacher_problem(**env_kwargs: Any) -> ContinuousProblem:
    from qworld_envs.mujoco_reacher import make_mujoco_reacher_problem  # loads MuJoCo: only when used

    return make_mujoco_reacher_problem(**env_kwargs)


# env id -> how to build its MDP (kwargs: the spec's plus problems.GOAL_KWARGS).
# Beside FourRooms: gymnasium's tabular envs (those the installed gymnasium has) as
# qworld/<gymnasium id>, read from their own P table, and any MDP from an .npz file.
FINITE_ENVS: dict[str, FiniteEnvSpec] = {
    FOUR_ROOMS_ID: FOUR_ROOMS_SPEC,
    **{qworld_id(gym_id): gym_env_spec(gym_id) for gym_id in TABULAR_GYM_IDS if gym_id in gymnasium.registry},
    TABULAR_FILE_ID: file_env_spec(),
}

# env id -> factory(**env_kwargs) -> ContinuousProblem (kwargs: the env module's DEFAULTS).
CONTINUOUS_ENVS: dict[str, Callable[..., ContinuousProblem]] = {
    MOUNTAIN_CAR_ID: make_mountain_car_problem,
    REACHER_ID: make_reacher_problem,
    MUJOCO_REACHER_ID: _make_mujoco_reacher_problem,
}

# env id -> "module:class" of its gymnasium env (imported by gymnasium on first make), or
# a function building it (the finite envs beside FourRooms, added below).
GYM_ENTRY_POINTS: dict[str, str | Callable[..., gymnasium.Env]] = {
    FOUR_ROOMS_ID: "qworld_envs.gym_env:FourRoomsGoalEnv",
    MOUNTAIN_CAR_ID: "qworld_envs.mountain_car:MountainCarGoalEnv",
    REACHER_ID: "qworld_envs.reacher:ReacherGoalEnv",
    MUJOCO_REACHER_ID: "qworld_envs.mujoco_reacher:MujocoReacherGoalEnv",
}


def _finite_gym_env(env_id: str, render_mode: str | None = None, **env_kwargs: Any) -> gymnasium.Env:
    """The goal-conditioned gymnasium env of finite env ``env_id`` (``gymnasium.make`` entry point)."""
    from qworld_envs.gym_env import FourRoomsGoalEnv

    return FourRoomsGoalEnv(problem=make_finite_problem(env_id, **env_kwargs), render_mode=render_mode)


for _env_id in FINITE_ENVS:
    if _env_id not in GYM_ENTRY_POINTS:
        GYM_ENTRY_POINTS[_env_id] = functools.partial(_finite_gym_env, _env_id)

# Batched envs whose step runs on the CPU only (MuJoCo in a Python loop).
CPU_ONLY_BATCHED: set[str] = {MUJOCO_REACHER_ID}


def make_finite_problem(env_id: str = FOUR_ROOMS_ID, **env_kwargs: Any) -> FiniteProblem:
    """Build the true MDP and the goal set of a finite env.

    For ``"qworld/FourRooms-v0"`` the kwargs are ``variant`` ("deterministic"),
    ``layout`` (None), ``goal_type`` ("indicator"), ``num_goals`` (None),
    ``goal_seed`` (0), ``goal_cells`` (None), ``max_episode_steps`` (100).

    Raises:
        ValueError: unknown env id or a bad kwarg value.
        TypeError: unknown kwargs (named in the message).
    """
    return build_finite_problem(env_id, _finite_spec(env_id), env_kwargs)


def true_P(env_id: str = FOUR_ROOMS_ID, **env_kwargs: Any) -> np.ndarray:
    """``[S, A, S]`` true transition tensor of a finite env (goal kwargs are checked, then ignored)."""
    spec = _finite_spec(env_id)
    return spec.mdp(spec.resolve(env_id, env_kwargs)).P


def resolve_finite_env(name: str, env_kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``(env id, env kwargs)`` of a finite env named as a user may name it.

    ``name`` is a qworld id (``qworld/FrozenLake-v1``), the gymnasium id of a registered
    tabular env (``FrozenLake-v1`` -> ``qworld/FrozenLake-v1``), or the path of an ``.npz``
    MDP (-> ``qworld/TabularMDP-v0`` with ``path``, made absolute).

    Raises:
        ValueError: none of these; the message lists the finite env ids.
    """
    import os

    kwargs = dict(env_kwargs or {})
    if name in FINITE_ENVS:
        env_id = name
    elif qworld_id(name) in FINITE_ENVS:
        env_id = qworld_id(name)
    elif str(name).endswith(".npz"):
        env_id = TABULAR_FILE_ID
        kwargs["path"] = str(name)
    else:
        raise ValueError(f"{name!r} is not a finite env; allowed: {', '.join(sorted(FINITE_ENVS))}, their "
                         f"gymnasium ids ({', '.join(g for g in TABULAR_GYM_IDS if qworld_id(g) in FINITE_ENVS)}) "
                         "or the path of an .npz MDP")
    if env_id == TABULAR_FILE_ID and isinstance(kwargs.get("path"), str):
        kwargs["path"] = os.path.abspath(os.path.expanduser(kwargs["path"]))
    return env_id, kwargs


def _finite_spec(env_id: str) -> FiniteEnvSpec:
    if env_id not in FINITE_ENVS:
        raise ValueError(f"unknown finite env id {env_id!r}; known: {', '.join(sorted(FINITE_ENVS))}")
    return FINITE_ENVS[env_id]


def make_continuous_problem(env_id: str, **env_kwargs: Any) -> ContinuousProblem:
    """Build the true dynamics and goal set of a continuous env from its kwargs.

    See ``make_mountain_car_problem``, ``make_reacher_problem`` and ``make_mujoco_reacher_problem``
    (and each module's ``DEFAULTS``) for each env's kwargs and defaults.

    Raises:
        ValueError: unknown env id or a bad kwarg value.
        TypeError: unknown kwargs.
    """
    if env_id not in CONTINUOUS_ENVS:
        raise ValueError(f"unknown continuous env id {env_id!r}; known: {', '.join(sorted(CONTINUOUS_ENVS))}")
    return CONTINUOUS_ENVS[env_id](**env_kwargs)


def _build_batched(
    batched_cls: type[BatchedGoalEnv],
    make_problem: Callable[..., Any],
    num_envs: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **env_kwargs: Any,
) -> BatchedGoalEnv:
    return batched_cls(make_problem(**env_kwargs), num_envs, seed=seed, device=device)


# env id -> factory(num_envs, seed=0, device="cpu", **env_kwargs) -> BatchedGoalEnv.
BATCHED_ENVS: dict[str, Callable[..., BatchedGoalEnv]] = {
    **{
        env_id: functools.partial(_build_batched, BatchedFiniteEnv, functools.partial(make_finite_problem, env_id))
        for env_id in FINITE_ENVS
    },
    **{
        env_id: functools.partial(_build_batched, BatchedContinuousEnv, make_problem)
        for env_id, make_problem in CONTINUOUS_ENVS.items()
    },
}


def has_batched(env_id: str, device: str | torch.device = "cpu") -> bool:
    """Whether ``env_id`` has batched dynamics that can run on ``device``."""
    if env_id not in BATCHED_ENVS:
        return False
    return torch.device(device).type == "cpu" or env_id not in CPU_ONLY_BATCHED


def make_batched(
    env_id: str, num_envs: int, seed: int = 0, device: str | torch.device = "cpu", **env_kwargs: Any
) -> BatchedGoalEnv:
    """Build ``num_envs`` batched envs of ``env_id`` (kwargs as for the gym env).

    Raises:
        ValueError: ``env_id`` has no batched dynamics.
    """
    if env_id not in BATCHED_ENVS:
        raise ValueError(f"no batched dynamics for env id {env_id!r}; available: {', '.join(sorted(BATCHED_ENVS))}")
    return BATCHED_ENVS[env_id](num_envs, seed=seed, device=device, **env_kwargs)


def register_gym_envs() -> None:
    """Register every id with gymnasium (guarded: calling it again neither warns nor fails).

    The envs truncate by themselves (``max_episode_steps`` kwarg): no TimeLimit wrapper on top.
    """
    for env_id, entry_point in GYM_ENTRY_POINTS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=entry_point)


register_gym_envs()
