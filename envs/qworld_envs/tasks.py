"""Env id + env kwargs -> true P and goal set: the one place where that happens.

The gymnasium env, the batched env and the P-learning actor all call
:func:`make_finite_task`, so they agree on the MDP and the goals by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from qworld_envs.finite import FiniteMDP
from qworld_envs.four_rooms import four_rooms
from qworld_envs.goals import GoalSet, make_goals

FOUR_ROOMS_ID = "qworld/FourRooms-v0"

# Kwargs every finite env takes, with their defaults.
GOAL_KWARGS: dict[str, Any] = {
    "goal_type": "indicator",  # qworld_envs.goals.GOAL_TYPES
    "num_goals": None,  # L; None = all S states (indicator) or L = S (dense)
    "goal_seed": 0,  # seed of random goal cells / dense rewards
    "goal_cells": None,  # list of (row, col) goal cells (indicator only)
    "max_episode_steps": 100,  # truncation of every episode
}


@dataclass(frozen=True)
class FiniteEnvSpec:
    """How to build one finite env's MDP.

    Attributes:
        build_mdp: called with the env-specific kwargs, returns the MDP.
        mdp_defaults: the env-specific kwargs and their defaults.
    """

    build_mdp: Callable[..., FiniteMDP]
    mdp_defaults: dict[str, Any]


# env id -> spec; later finite envs register here.
FINITE_ENVS: dict[str, FiniteEnvSpec] = {
    FOUR_ROOMS_ID: FiniteEnvSpec(
        build_mdp=four_rooms,
        mdp_defaults={"variant": "deterministic", "layout": None},
    ),
}


@dataclass(frozen=True)
class FiniteTask:
    """A finite MDP, its goal set, and the env id + resolved kwargs that made them.

    Attributes:
        mdp: the true dynamics.
        goals: rewards / terminal states of the L goals.
        env_id: a key of ``FINITE_ENVS``.
        env_kwargs: every kwarg with defaults filled in.
    """

    mdp: FiniteMDP
    goals: GoalSet
    env_id: str
    env_kwargs: dict[str, Any]

    @property
    def max_episode_steps(self) -> int:
        return self.env_kwargs["max_episode_steps"]


def _resolve(env_id: str, env_kwargs: dict[str, Any]) -> tuple[FiniteEnvSpec, dict[str, Any]]:
    """Look up the spec and fill defaults; reject unknown env ids and kwargs."""
    if env_id not in FINITE_ENVS:
        raise ValueError(f"unknown finite env id {env_id!r}; known: {', '.join(sorted(FINITE_ENVS))}")
    spec = FINITE_ENVS[env_id]
    defaults = {**spec.mdp_defaults, **GOAL_KWARGS}
    unknown = sorted(set(env_kwargs) - set(defaults))
    if unknown:
        raise TypeError(f"{env_id} got unknown kwargs {unknown}; allowed: {sorted(defaults)}")
    kw = {**defaults, **env_kwargs}
    steps = kw["max_episode_steps"]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"max_episode_steps must be a positive int, got {steps!r}")
    return spec, kw


def make_finite_task(env_id: str = FOUR_ROOMS_ID, **env_kwargs: Any) -> FiniteTask:
    """Build the true MDP and the goal set of a finite env.

    For ``"qworld/FourRooms-v0"`` the kwargs are ``variant`` ("deterministic"),
    ``layout`` (None), ``goal_type`` ("indicator"), ``num_goals`` (None),
    ``goal_seed`` (0), ``goal_cells`` (None), ``max_episode_steps`` (100).

    Raises:
        ValueError: unknown env id or a bad kwarg value.
        TypeError: unknown kwargs (named in the message).
    """
    spec, kw = _resolve(env_id, env_kwargs)
    mdp = spec.build_mdp(**{k: kw[k] for k in spec.mdp_defaults})
    goals = make_goals(mdp, kw["goal_type"], kw["num_goals"], kw["goal_seed"], cells=kw["goal_cells"])
    return FiniteTask(mdp=mdp, goals=goals, env_id=env_id, env_kwargs=kw)


def true_P(env_id: str = FOUR_ROOMS_ID, **env_kwargs: Any) -> np.ndarray:
    """``[S, A, S]`` true transition tensor of a finite env (goal kwargs are checked, then ignored)."""
    spec, kw = _resolve(env_id, env_kwargs)
    return spec.build_mdp(**{k: kw[k] for k in spec.mdp_defaults}).P
