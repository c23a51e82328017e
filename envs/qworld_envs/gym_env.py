"""Goal-conditioned gymnasium env over a finite problem (registered as ``qworld/FourRooms-v0``)."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from qworld_envs.four_rooms import make_four_rooms_problem
from qworld_envs.goals import commanded_goal, start_states
from qworld_envs.problems import FiniteProblem


class FourRoomsGoalEnv(gymnasium.Env):
    """Goal-conditioned FourRooms (or any finite problem built by ``make_finite_problem``).

    ## Action space
    ``Discrete(A)``; for FourRooms 0 up, 1 right, 2 down, 3 left.

    ## Observation space
    ``Box(0, 1, (S + L,), float32)``: ``concat(one_hot(state) [S], goal_features[goal] [L])``
    with ``goal_features`` the one-hot rows of the L goals.

    ## Dynamics
    ``s' ~ problem.mdp.P[s, a]``, drawn with ``self.np_random`` (see ``four_rooms`` for the
    deterministic / windy / teleport variants).

    ## Reward
    ``problem.goals.rewards[goal, s']`` for the commanded goal; ``info["rewards"]`` holds
    the reward of every goal for the same transition.

    ## Starting state
    The commanded goal is uniform over the L goals (or ``options={"goal": g}``); the
    start state is uniform over the states that are not terminal for that goal (or
    ``options={"state": s}``, which must not be terminal for it).

    ## Episode end
    Terminated on arriving in a terminal state of the commanded goal (indicator goals:
    the goal cell; dense goals never terminate) or of the MDP (``mdp.terminal``, e.g.
    FrozenLake's holes: no success); truncated after
    ``problem.max_episode_steps`` steps.

    ## Info
    ``state``, ``goal`` (ints); after a step also ``rewards [L]`` float32,
    ``terminals [L]`` bool (every goal's), ``success`` (commanded goal reached).

    Args:
        problem: a ``FiniteProblem``; None to build one from ``env_kwargs``.
        render_mode: None or "ansi" (a text picture of the grid).
        **env_kwargs: passed to ``make_problem`` (``make_finite_problem(FOUR_ROOMS_ID, ...)``)
            when ``problem`` is None.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}
    make_problem = staticmethod(make_four_rooms_problem)  # env kwargs -> FiniteProblem

    def __init__(self, problem: FiniteProblem | None = None, render_mode: str | None = None, **env_kwargs: Any):
        if problem is None:
            problem = self.make_problem(**env_kwargs)
        elif env_kwargs:
            raise TypeError(f"give either a problem or env kwargs, not both (got {sorted(env_kwargs)})")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.problem = problem
        self.render_mode = render_mode
        mdp, goals = problem.mdp, problem.goals
        self.obs_dim = mdp.num_states
        self.goal_dim = goals.num_goals
        self.num_goals = goals.num_goals
        self.max_episode_steps = problem.max_episode_steps
        self.goal_features = np.eye(self.num_goals, dtype=np.float32)
        self._rewards = goals.rewards.astype(np.float32)
        self._terminal = goals.terminal
        self._success = goals.success
        self._starts = start_states(goals.terminal)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(self.obs_dim + self.goal_dim,), dtype=np.float32)
        self.action_space = spaces.Discrete(mdp.num_actions)
        self._state = 0
        self._goal = 0
        self._t = 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.obs_dim + self.goal_dim, dtype=np.float32)
        obs[self._state] = 1.0
        obs[self.obs_dim + self._goal] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        self._goal = commanded_goal(self.np_random, self.num_goals, options)
        state = options.get("state")
        if state is None:
            state = int(self.np_random.choice(self._starts[self._goal]))
        elif not 0 <= int(state) < self.obs_dim or self._terminal[self._goal, int(state)]:
            raise ValueError(f"options['state']={state} is not a non-terminal state of goal {self._goal}")
        self._state = int(state)
        self._t = 0
        return self._obs(), {"state": self._state, "goal": self._goal}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r} for {self.action_space}")
        s2 = self.problem.mdp.sample_next(self._state, int(action), self.np_random)
        self._state = s2
        self._t += 1
        reward = float(self._rewards[self._goal, s2])
        terminated = bool(self._terminal[self._goal, s2])
        truncated = self._t >= self.max_episode_steps and not terminated
        info = {
            "state": s2,
            "goal": self._goal,
            "rewards": self._rewards[:, s2].copy(),
            "terminals": self._terminal[:, s2].copy(),
            "success": bool(self._success[self._goal, s2]),
        }
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        mdp = self.problem.mdp
        if mdp.coords is None or "layout" not in mdp.meta:
            return f"state {self._state}, goal {self._goal}"
        rows = [list(line) for line in mdp.meta["layout"].splitlines()]
        goal_state = self.problem.goals.goal_states
        if goal_state is not None:
            r, c = mdp.coords[goal_state[self._goal]]
            rows[r][c] = "G"
        r, c = mdp.coords[self._state]
        rows[r][c] = "A"
        return "\n".join("".join(row) for row in rows) + "\n"
