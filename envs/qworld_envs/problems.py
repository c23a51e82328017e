"""Finite problems: env kwargs -> true P and goal set, for one finite env spec.

The gymnasium env, the batched env and the P-learning actor all build their problem with
``qworld_envs.make_finite_problem`` (the registry looks the env id up and calls
:func:`build_finite_problem`), so they agree on the MDP and the goals by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qworld_envs.finite import FiniteMDP
from qworld_envs.goals import GoalSet, make_goals
from qworld_envs.kwargs import resolve_kwargs

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
        max_episode_steps: the env's default time limit (``GOAL_KWARGS``' when None).
    """

    build_mdp: Callable[..., FiniteMDP]
    mdp_defaults: dict[str, Any]
    max_episode_steps: int | None = None

    def resolve(self, env_id: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every kwarg (env-specific and ``GOAL_KWARGS``) with defaults filled in."""
        defaults = {**self.mdp_defaults, **GOAL_KWARGS}
        if self.max_episode_steps is not None:
            defaults["max_episode_steps"] = int(self.max_episode_steps)
        return resolve_kwargs(env_id, defaults, env_kwargs)

    def mdp(self, kw: dict[str, Any]) -> FiniteMDP:
        """The MDP of resolved kwargs ``kw``."""
        return self.build_mdp(**{k: kw[k] for k in self.mdp_defaults})


@dataclass(frozen=True)
class FiniteProblem:
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


def build_finite_problem(env_id: str, spec: FiniteEnvSpec, env_kwargs: dict[str, Any]) -> FiniteProblem:
    """The true MDP and goal set of finite env ``env_id`` (built by ``spec``) from its kwargs.

    Raises:
        ValueError: a bad kwarg value.
        TypeError: unknown kwargs (named in the message).
    """
    kw = spec.resolve(env_id, env_kwargs)
    mdp = spec.mdp(kw)
    goals = make_goals(mdp, kw["goal_type"], kw["num_goals"], kw["goal_seed"], cells=kw["goal_cells"])
    return FiniteProblem(mdp=mdp, goals=goals, env_id=env_id, env_kwargs=kw)
