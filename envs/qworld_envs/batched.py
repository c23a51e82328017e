"""Batched goal-conditioned envs: N envs stepped as one tensor op (for the fast PQN runner).

Shapes: N envs, S states, A actions, L goals.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from qworld_envs.finite import inverse_cdf
from qworld_envs.goals import start_states
from qworld_envs.tasks import FINITE_ENVS, FiniteTask, make_finite_task


class BatchedGoalEnv:
    """Interface of N goal-conditioned envs stepped together on one torch device.

    Attributes:
        num_envs: N.
        num_actions: A (discrete actions).
        num_goals: L.
        obs_dim: size of one observation (without goal features).
        goal_dim: size of one goal's features.
        goal_features: ``[L, goal_dim]`` float tensor; the agent observes
            ``concat(obs, goal_features[goal])``.
        max_episode_steps: episodes are truncated after this many steps.
        device: torch device of every tensor.

    ``reset(seed=None)`` returns ``{"obs": [N, obs_dim] float, "goal": [N] long}``.

    ``step(actions [N] long)`` returns a dict of tensors; envs whose episode ended
    are reset at once:

    - ``obs [N, obs_dim]``: observation after auto-reset (what to act on next);
    - ``next_obs [N, obs_dim]``: the true next observation, before any reset;
    - ``goal [N]`` long: commanded goal for the *next* step (redrawn on reset);
    - ``rewards [N, L]``, ``terminals [N, L]`` bool: every goal's reward and
      termination for this transition (for learning all goals at once);
    - ``reward [N]``, ``terminated [N]`` bool: the commanded goal's;
    - ``truncated [N]`` bool: hit the time limit and not terminated;
    - ``episode_return [N]``, ``episode_length [N]``: of episodes that ended this
      step, 0 elsewhere;
    - ``success [N]`` bool: the commanded goal was reached this step.
    """

    num_envs: int
    num_actions: int
    num_goals: int
    obs_dim: int
    goal_dim: int
    goal_features: torch.Tensor
    max_episode_steps: int
    device: torch.device

    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _check_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """``actions`` as a ``[N]`` long tensor on the env's device, or a clear ValueError."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        actions = torch.as_tensor(actions, device=self.device).long()
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape [{self.num_envs}], got {tuple(actions.shape)}")
        # A bad action would silently index another state's row.
        lo, hi = torch.aminmax(actions)
        if lo < 0 or hi >= self.num_actions:
            raise ValueError(f"actions must lie in [0, {self.num_actions}), got [{int(lo)}, {int(hi)}]")
        return actions


class BatchedFiniteEnv(BatchedGoalEnv):
    """N copies of a finite goal-conditioned task, same semantics as ``FourRoomsGoalEnv``.

    ## Observation
    ``obs = one_hot(state)`` ``[N, S]`` float32; ``goal_features = eye(L)``.

    ## Dynamics
    ``s' ~ task.mdp.P[s, a]`` by inverse-CDF sampling on the precomputed row CDFs,
    with a seeded ``torch.Generator``.

    ## Reward and episode end
    ``rewards[:, g] = task.goals.rewards[g, s']``; terminated when ``s'`` is terminal
    for the commanded goal; truncated after ``task.max_episode_steps`` steps.

    ## Start state
    On every reset the goal is uniform over the L goals and the start state uniform
    over the states that are not terminal for it.

    Attributes (besides ``BatchedGoalEnv``'s):
        task: the ``FiniteTask``.
        state: ``[N]`` long, current state of each env (may be overwritten, e.g. to probe P).
        goal: ``[N]`` long, current commanded goal of each env.
    """

    def __init__(self, task: FiniteTask, num_envs: int, seed: int = 0, device: str | torch.device = "cpu"):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        mdp, goals = task.mdp, task.goals
        S, A, L = mdp.num_states, mdp.num_actions, goals.num_goals
        self.task = task
        self.num_envs = int(num_envs)
        self.num_actions = A
        self.num_goals = L
        self.obs_dim = S
        self.goal_dim = L
        self.max_episode_steps = int(task.max_episode_steps)
        self.device = torch.device(device)
        dev = self.device
        self.goal_features = torch.eye(L, dtype=torch.float32, device=dev)
        self._eye = torch.eye(S, dtype=torch.float32, device=dev)

        # Every gather below uses index_select / take: on CPU they are several times
        # faster than advanced indexing (x[idx]), which dominated the step time.
        # Transitions: rows indexed by s * A + a.
        self._cdf = torch.as_tensor(inverse_cdf(mdp.P).reshape(S * A, S), dtype=torch.float32, device=dev)
        self._deterministic = mdp.is_deterministic
        self._next_table = torch.as_tensor(mdp.P.reshape(S * A, S).argmax(-1), dtype=torch.long, device=dev)

        # Goal tables [S, L]: row s' gives every goal at once, flat s' * L + g the commanded one.
        self._rewards_t = torch.as_tensor(goals.rewards.T.copy(), dtype=torch.float32, device=dev)  # [S, L]
        self._terminals_t = torch.as_tensor(goals.terminal.T.copy(), device=dev)  # [S, L]

        # Start states: goal g starts at start_table[g, k], k uniform in [0, count[g]).
        starts = start_states(goals.terminal)
        table = np.zeros((L, S), dtype=np.int64)
        for g, st in enumerate(starts):
            table[g, : len(st)] = st
        self._start_table = torch.as_tensor(table.reshape(-1), device=dev)
        counts = np.array([len(st) for st in starts])
        self._start_count = torch.as_tensor(counts, dtype=torch.float32, device=dev)
        self._start_last = torch.as_tensor(counts - 1, dtype=torch.long, device=dev)

        self._gen = torch.Generator(device=dev)
        self._gen.manual_seed(int(seed))
        self.state: torch.Tensor | None = None
        self.goal: torch.Tensor | None = None
        self._length: torch.Tensor | None = None
        self._return: torch.Tensor | None = None

    def _draw_resets(self, u_goal: torch.Tensor, u_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New goals and start states from two ``[N]`` uniforms in [0, 1)."""
        # clamps guard against float32 rounding u * n up to n
        goal = (u_goal * self.num_goals).long().clamp_(max=self.num_goals - 1)
        k = torch.minimum((u_start * self._start_count.take(goal)).long(), self._start_last.take(goal))
        return goal, self._start_table.take(goal * self.obs_dim + k)

    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        if seed is not None:
            self._gen.manual_seed(int(seed))
        u = torch.rand(2, self.num_envs, generator=self._gen, device=self.device)
        self.goal, self.state = self._draw_resets(u[0], u[1])
        self._length = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._return = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        return {"obs": self._eye.index_select(0, self.state), "goal": self.goal}

    def step(self, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        actions = self._check_actions(actions)

        # One draw for the transition and both reset choices keeps the stream simple.
        u = torch.rand(3, self.num_envs, generator=self._gen, device=self.device)
        row = self.state * self.num_actions + actions
        if self._deterministic:
            s2 = self._next_table.take(row)
        else:
            s2 = torch.searchsorted(self._cdf.index_select(0, row), u[0].unsqueeze(1), right=True).squeeze(1)
        goal = self.goal
        rewards = self._rewards_t.index_select(0, s2)  # [N, L]
        terminals = self._terminals_t.index_select(0, s2)  # [N, L]
        flat = s2 * self.num_goals + goal
        reward = self._rewards_t.take(flat)
        terminated = self._terminals_t.take(flat)
        length = self._length + 1
        ret = self._return + reward
        truncated = (length >= self.max_episode_steps) & ~terminated
        done = terminated | truncated

        # Draw a reset for every env (no data-dependent shapes); keep it only where done.
        new_goal, new_state = self._draw_resets(u[1], u[2])
        self.state = torch.where(done, new_state, s2)
        self.goal = torch.where(done, new_goal, goal)
        self._length = length.masked_fill(done, 0)
        self._return = ret.masked_fill(done, 0.0)
        not_done = ~done
        return {
            "obs": self._eye.index_select(0, self.state),
            "next_obs": self._eye.index_select(0, s2),
            "goal": self.goal,
            "rewards": rewards,
            "terminals": terminals,
            "reward": reward,
            "terminated": terminated,
            "truncated": truncated,
            "episode_return": ret.masked_fill(not_done, 0.0),
            "episode_length": length.masked_fill(not_done, 0),
            "success": terminated,
        }


# env id -> factory(num_envs, seed, device, **env_kwargs); continuous envs register here too.
BATCHED_ENVS: dict[str, Callable[..., BatchedGoalEnv]] = {}


def _finite_factory(env_id: str) -> Callable[..., BatchedGoalEnv]:
    def factory(num_envs: int, seed: int = 0, device: str | torch.device = "cpu", **env_kwargs: Any):
        return BatchedFiniteEnv(make_finite_task(env_id, **env_kwargs), num_envs, seed=seed, device=device)

    return factory


for _env_id in FINITE_ENVS:
    BATCHED_ENVS[_env_id] = _finite_factory(_env_id)


# Batched envs whose step runs on the CPU only (MuJoCo in a Python loop).
CPU_ONLY_BATCHED: set[str] = set()


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
