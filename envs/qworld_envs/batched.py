"""Batched goal-conditioned envs: N envs stepped as one tensor op (for the fast PQN runner).

:class:`BatchedGoalEnv` writes the step contract once (auto-reset, episode bookkeeping, the
step dict); :class:`BatchedFiniteEnv` and ``continuous.BatchedContinuousEnv`` provide only
their dynamics. Env ids -> batched envs: ``qworld_envs.registry``.

Shapes: N envs, S states, A actions, L goals.
"""

from __future__ import annotations

import numpy as np
import torch

from qworld_envs.finite import inverse_cdf
from qworld_envs.goals import start_states
from qworld_envs.problems import FiniteProblem


class BatchedGoalEnv:
    """N goal-conditioned envs stepped together on one torch device: the step contract.

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
        state: ``[N, ...]`` current state of each env (may be overwritten, e.g. to probe P).
        goal: ``[N]`` long, current commanded goal of each env.

    ``reset(seed=None)`` returns ``{"obs": [N, obs_dim] float, "goal": [N] long}``.

    ``step(actions [N] long)`` returns a dict of tensors; envs whose episode ended
    are reset at once:

    - ``obs [N, obs_dim]``: observation after auto-reset (what to act on next);
    - ``next_obs [N, obs_dim]``: the true next observation, before any reset;
    - ``next_state [N, ...]``: the true next state, before any reset (``state`` before the
      step is the state acted in: the pair is a transition of the true dynamics);
    - ``goal [N]`` long: commanded goal for the *next* step (redrawn on reset);
    - ``rewards [N, L]``, ``terminals [N, L]`` bool: every goal's reward and
      termination for this transition (for learning all goals at once);
    - ``reward [N]``, ``terminated [N]`` bool: the commanded goal's;
    - ``truncated [N]`` bool: hit the time limit and not terminated;
    - ``episode_return [N]``, ``episode_length [N]``: of episodes that ended this
      step, 0 elsewhere;
    - ``success [N]`` bool: the commanded goal was reached this step.

    ``reset`` and ``step`` (auto-reset, episode bookkeeping, the dict) are written here
    once; a subclass sets the attributes above and provides the dynamics only:
    ``_draw_resets``, ``_transition``, ``_outcomes`` and ``_observe``.
    """

    num_envs: int
    num_actions: int
    num_goals: int
    obs_dim: int
    goal_dim: int
    goal_features: torch.Tensor
    max_episode_steps: int
    device: torch.device

    def __init__(self, num_envs: int, seed: int = 0, device: str | torch.device = "cpu"):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = int(num_envs)
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(int(seed))
        self.state: torch.Tensor | None = None
        self.goal: torch.Tensor | None = None
        self._length: torch.Tensor | None = None
        self._return: torch.Tensor | None = None

    # ---- dynamics: provided by subclasses ---------------------------------------------
    def _draw_resets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh ``(goal [N], start state [N, ...])`` for every env, from ``self._gen``."""
        raise NotImplementedError

    def _transition(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(next state, reset goal, reset state)``: every env's true next state after
        ``actions`` and a fresh reset for every env (kept only where the episode ends),
        drawn from ``self._gen``."""
        raise NotImplementedError

    def _outcomes(self, next_state: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(rewards [N, L] float32, terminals [N, L] bool, reward [N] float32,
        terminated [N] bool, success [N] bool)`` of arriving in ``next_state`` with
        commanded ``goal [N]``."""
        raise NotImplementedError

    def _observe(self, states: torch.Tensor) -> torch.Tensor:
        """``[N, obs_dim]`` float32 observation of ``states``."""
        raise NotImplementedError

    # ---- the contract -----------------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict[str, torch.Tensor]:
        if seed is not None:
            self._gen.manual_seed(int(seed))
        self.goal, self.state = self._draw_resets()
        self._length = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._return = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        return {"obs": self._observe(self.state), "goal": self.goal}

    def step(self, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        actions = self._check_actions(actions)
        # A reset is drawn for every env (no data-dependent shapes) and kept only where done.
        s2, new_goal, new_state = self._transition(actions)
        goal = self.goal
        rewards, terminals, reward, terminated, success = self._outcomes(s2, goal)
        length = self._length + 1
        ret = self._return + reward
        truncated = (length >= self.max_episode_steps) & ~terminated
        done = terminated | truncated
        self.state = torch.where(done.view(-1, *([1] * (s2.dim() - 1))), new_state, s2)
        self.goal = torch.where(done, new_goal, goal)
        self._length = length.masked_fill(done, 0)
        self._return = ret.masked_fill(done, 0.0)
        not_done = ~done
        return {
            "obs": self._observe(self.state),
            "next_obs": self._observe(s2),
            "next_state": s2,
            "goal": self.goal,
            "rewards": rewards,
            "terminals": terminals,
            "reward": reward,
            "terminated": terminated,
            "truncated": truncated,
            "episode_return": ret.masked_fill(not_done, 0.0),
            "episode_length": length.masked_fill(not_done, 0),
            "success": success,
        }

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
    """N copies of a finite goal-conditioned problem, same semantics as ``FourRoomsGoalEnv``.

    ## Observation
    ``obs = one_hot(state)`` ``[N, S]`` float32; ``goal_features = eye(L)``.

    ## Dynamics
    ``s' ~ problem.mdp.P[s, a]`` by inverse-CDF sampling on the precomputed row CDFs,
    with a seeded ``torch.Generator``.

    ## Reward and episode end
    ``rewards[:, g] = problem.goals.rewards[g, s']``; terminated when ``s'`` is terminal
    for the commanded goal (its own goal states and the MDP's terminal states), a success
    when ``problem.goals.success``; truncated after ``problem.max_episode_steps`` steps.

    ## Start state
    On every reset the goal is uniform over the L goals and the start state uniform
    over the states that are not terminal for it.

    Attributes (besides ``BatchedGoalEnv``'s):
        problem: the ``FiniteProblem``.
        state: ``[N]`` long, current state of each env.
    """

    def __init__(self, problem: FiniteProblem, num_envs: int, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(num_envs, seed=seed, device=device)
        mdp, goals = problem.mdp, problem.goals
        S, A, L = mdp.num_states, mdp.num_actions, goals.num_goals
        self.problem = problem
        self.num_actions = A
        self.num_goals = L
        self.obs_dim = S
        self.goal_dim = L
        self.max_episode_steps = int(problem.max_episode_steps)
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
        # success = the goal's own terminal states (an env's holes end episodes without it)
        self._success_t = None if np.array_equal(goals.success, goals.terminal) else \
            torch.as_tensor(goals.success.T.copy(), device=dev)  # [S, L]

        # Start states: goal g starts at start_table[g, k], k uniform in [0, count[g]).
        starts = start_states(goals.terminal)
        table = np.zeros((L, S), dtype=np.int64)
        for g, st in enumerate(starts):
            table[g, : len(st)] = st
        self._start_table = torch.as_tensor(table.reshape(-1), device=dev)
        counts = np.array([len(st) for st in starts])
        self._start_count = torch.as_tensor(counts, dtype=torch.float32, device=dev)
        self._start_last = torch.as_tensor(counts - 1, dtype=torch.long, device=dev)

    def _resets_from(self, u_goal: torch.Tensor, u_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New goals and start states from two ``[N]`` uniforms in [0, 1)."""
        # clamps guard against float32 rounding u * n up to n
        goal = (u_goal * self.num_goals).long().clamp_(max=self.num_goals - 1)
        k = torch.minimum((u_start * self._start_count.take(goal)).long(), self._start_last.take(goal))
        return goal, self._start_table.take(goal * self.obs_dim + k)

    def _draw_resets(self) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(2, self.num_envs, generator=self._gen, device=self.device)
        return self._resets_from(u[0], u[1])

    def _transition(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One draw for the transition and both reset choices keeps the stream simple.
        u = torch.rand(3, self.num_envs, generator=self._gen, device=self.device)
        row = self.state * self.num_actions + actions
        if self._deterministic:
            s2 = self._next_table.take(row)
        else:
            s2 = torch.searchsorted(self._cdf.index_select(0, row), u[0].unsqueeze(1), right=True).squeeze(1)
        return (s2, *self._resets_from(u[1], u[2]))

    def _outcomes(self, next_state: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rewards = self._rewards_t.index_select(0, next_state)  # [N, L]
        terminals = self._terminals_t.index_select(0, next_state)  # [N, L]
        flat = next_state * self.num_goals + goal
        terminated = self._terminals_t.take(flat)
        success = terminated if self._success_t is None else self._success_t.take(flat)
        return rewards, terminals, self._rewards_t.take(flat), terminated, success

    def _observe(self, states: torch.Tensor) -> torch.Tensor:
        return self._eye.index_select(0, states)
