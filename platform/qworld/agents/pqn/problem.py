"""What a PQN trial is trained on: env id + env kwargs -> sizes and goal features.

The RLModule needs ``obs_dim``, ``goal_dim``, ``num_goals``, ``num_actions`` and the goal
features before any env runner exists (the Learner builds its module from the config),
so the config probes the problem once per process (cached) and copies the answer into the
module's ``model_config``; a checkpoint then says by itself what it was trained on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ProblemInfo:
    """Sizes and goal set of a goal-conditioned problem.

    Attributes:
        env_id: gymnasium / batched env id.
        env_kwargs: the kwargs as given, with the env's defaults filled in where the
            env exposes them (finite tasks).
        obs_dim: size of the state observation (without goal features).
        goal_dim: size of one goal's features.
        num_goals: L.
        num_actions: A (discrete).
        goal_features: ``[L][goal_dim]`` nested lists (JSON-able).
        max_episode_steps: time limit of an episode (None if unknown).
        batched: whether ``qworld_envs.has_batched(env_id)``.
        finite: whether ``make_finite_problem(env_id, ...)`` works (tabular Q available).
        goal_states: ``[L]`` state of each indicator goal (finite tasks), else None.
        goal_type: the goal family, if known.
    """

    env_id: str
    env_kwargs: dict[str, Any]
    obs_dim: int
    goal_dim: int
    num_goals: int
    num_actions: int
    goal_features: list = field(repr=False)
    max_episode_steps: int | None
    batched: bool
    finite: bool
    goal_states: list | None = None
    goal_type: str | None = None

    def trial_config(self) -> dict[str, Any]:
        """The problem's part of a trial config (``qworld_config.json``), the same for every
        learner family: resolved env kwargs, grid-cell keys, sizes and the goal set."""
        from qworld import metrics as K

        return {
            "env_kwargs": self.env_kwargs,
            K.VARIANT: self.env_kwargs.get(K.VARIANT),
            K.GOAL_TYPE: self.goal_type or self.env_kwargs.get(K.GOAL_TYPE),
            K.NUM_GOALS: self.num_goals,
            "obs_dim": self.obs_dim,
            "goal_dim": self.goal_dim,
            "num_actions": self.num_actions,
            "finite": self.finite,
            "goal_states": self.goal_states,
            "goal_features": self.goal_features,
        }


def jsonable(x: Any) -> Any:
    """Numpy scalars/arrays and tuples -> plain JSON types (recursively), for configs and
    checkpoints."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


@functools.lru_cache(maxsize=32)
def _probe(env_id: str, kwargs_json: str) -> ProblemInfo:
    import qworld_envs

    env_kwargs = json.loads(kwargs_json)
    finite = env_id in getattr(qworld_envs, "FINITE_ENVS", {})
    goal_states = goal_type = None
    resolved = dict(env_kwargs)
    if finite:
        problem = qworld_envs.make_finite_problem(env_id, **env_kwargs)
        resolved = dict(problem.env_kwargs)
        goal_type = problem.goals.goal_type
        if problem.goals.goal_states is not None:
            goal_states = [int(s) for s in problem.goals.goal_states]
    elif env_id in qworld_envs.CONTINUOUS_ENVS:  # continuous: defaults filled, goal family named
        ctask = qworld_envs.make_continuous_problem(env_id, **env_kwargs)
        resolved = dict(ctask.env_kwargs)
        goal_type = ctask.goals.goal_type
    if qworld_envs.has_batched(env_id):
        env = qworld_envs.make_batched(env_id, 1, seed=0, device="cpu", **env_kwargs)
        info = dict(
            obs_dim=int(env.obs_dim),
            goal_dim=int(env.goal_dim),
            num_goals=int(env.num_goals),
            num_actions=int(env.num_actions),
            goal_features=env.goal_features.detach().cpu().numpy().astype(np.float32).tolist(),
            max_episode_steps=int(env.max_episode_steps),
            batched=True,
        )
    else:
        import gymnasium as gym

        env = gym.make(env_id, **env_kwargs)
        try:
            base = env.unwrapped
            missing = [a for a in ("obs_dim", "goal_dim", "num_goals", "goal_features") if not hasattr(base, a)]
            if missing:
                raise ValueError(
                    f"env {env_id!r} is not a qworld goal env: its unwrapped env lacks {missing} "
                    "(CONTRACTS.md: obs = concat(obs, goal_features[goal]), info rewards/terminals [L])"
                )
            if not isinstance(env.action_space, gym.spaces.Discrete):
                raise ValueError(f"PQN needs a Discrete action space, env {env_id!r} has {env.action_space}")
            steps = getattr(base, "max_episode_steps", None) or (env.spec.max_episode_steps if env.spec else None)
            info = dict(
                obs_dim=int(base.obs_dim),
                goal_dim=int(base.goal_dim),
                num_goals=int(base.num_goals),
                num_actions=int(env.action_space.n),
                goal_features=np.asarray(base.goal_features, dtype=np.float32).tolist(),
                max_episode_steps=None if steps is None else int(steps),
                batched=False,
            )
        finally:
            env.close()
    return ProblemInfo(
        env_id=env_id,
        env_kwargs=jsonable(resolved),
        finite=finite,
        goal_states=goal_states,
        goal_type=goal_type,
        **info,
    )


def probe_problem(env_id: str, env_kwargs: dict[str, Any] | None = None) -> ProblemInfo:
    """Sizes and goal features of ``env_id`` built with ``env_kwargs`` (cached per process).

    Raises:
        ValueError / TypeError: from the env for a bad id or bad kwargs, or when the env
            is not a qworld goal env.
    """
    kwargs_json = json.dumps(jsonable(dict(env_kwargs or {})), sort_keys=True)
    return _probe(env_id, kwargs_json)


PROBLEM_KEYS = ("obs_dim", "goal_dim", "num_goals", "num_actions", "goal_features")


def setup_problem_attributes(module: Any, model_config: dict, required: tuple = PROBLEM_KEYS) -> None:
    """What every family's RLModule reads of its problem from ``model_config`` (filled by its
    config from :class:`ProblemInfo`): ``obs_dim``, ``goal_dim``, ``num_goals``, ``num_actions``
    and the ``goal_features [L, goal_dim]`` buffer; ValueError naming the missing keys."""
    import torch

    missing = [k for k in required if k not in model_config]
    if missing:
        name = type(module).__name__
        raise ValueError(f"{name} model_config lacks {missing} (its AlgorithmConfig fills them from the problem)")
    module.obs_dim = int(model_config["obs_dim"])
    module.goal_dim = int(model_config["goal_dim"])
    module.num_goals = int(model_config["num_goals"])
    module.num_actions = int(model_config["num_actions"])
    module.register_buffer(
        "goal_features",
        torch.as_tensor(model_config["goal_features"], dtype=torch.float32).reshape(module.num_goals, module.goal_dim),
    )
