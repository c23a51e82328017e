"""Continuous goal-conditioned envs: the pieces they share.

Shapes: N states (or envs), d state dims, k goal-feature dims, L goals, A actions.

A continuous env is a :class:`ContinuousProblem`: true dynamics (:class:`ContinuousDynamics`,
pure batched torch functions with the randomness passed in) and a goal family
(:class:`ContinuousGoals`, rewards on arrival at s' for all L goals at once). The gymnasium
env, the batched env, the grid ground truth and P-learning all build it with
:func:`qworld_envs.make_continuous_problem`, so they agree by construction.

The env modules (``mountain_car``, ``reacher``, ``mujoco_reacher``) import this one, never
the other way round; ``qworld_envs.registry`` maps the ids below to them (gymnasium ids,
problem and batched factories).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from qworld_envs.batched import BatchedGoalEnv
from qworld_envs.goals import commanded_goal
from qworld_envs.kwargs import REWARD_KINDS

MOUNTAIN_CAR_ID = "qworld/MountainCar-v0"
REACHER_ID = "qworld/Reacher-v0"
MUJOCO_REACHER_ID = "qworld/MujocoReacher-v0"
# The MuJoCo arm's links (body0 -> body1, body1 -> fingertip), here so that what is defined on
# its states (the unseen-goal tasks) needs no MuJoCo import (``mujoco_reacher`` loads it).
MUJOCO_REACHER_LINKS = (0.1, 0.11)


def wrap_angle(x: torch.Tensor) -> torch.Tensor:
    """Angles wrapped to ``[-pi, pi)`` (differentiable, gradient 1)."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def wrap_periodic(x: torch.Tensor, periodic: torch.Tensor | Sequence[bool]) -> torch.Tensor:
    """``x [..., d]`` wrapped to ``[-pi, pi)`` on the dims where ``periodic [d]`` is True."""
    periodic = torch.as_tensor(periodic, dtype=torch.bool, device=x.device)
    if not bool(periodic.any()):
        return x
    return torch.where(periodic, wrap_angle(x), x)


def periodic_difference(a: torch.Tensor, b: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
    """``a - b`` over the last dim ``[..., d]``, wrapped to ``[-pi, pi)`` on the periodic dims."""
    diff = a - b
    if all(periodic):
        return wrap_angle(diff)
    if any(periodic):  # wrap only the periodic columns (no mask tensor: nothing copied to the device)
        cols = [wrap_angle(diff[..., j]) if p else diff[..., j] for j, p in enumerate(periodic)]
        diff = torch.stack(cols, -1)
    return diff


# --------------------------------------------------------------------------------------
# goals
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContinuousGoals:
    """L goals on a feature of the state, paying on arrival at s'.

    ``reward == "sparse"``: ``r_g(s') = 1[||feature(s') - g|| < threshold]`` and the
    episode ends there (``terminal_g(s') = r_g(s') == 1``).
    ``reward == "gaussian"``: ``r_g(s') = exp(-||(feature(s') - g) / sigma||^2 / 2)``,
    never terminal. Differences are wrapped on the ``periodic`` feature dims.

    Attributes:
        centers: ``[L, k]`` float64 goal centers g in feature space.
        feature_fn: ``states [N, d] -> [N, k]`` (torch, differentiable); a module-level
            function or a ``functools.partial`` of one, so the goals pickle.
        reward: one of ``REWARD_KINDS``.
        threshold: radius a of the sparse ball (also the ``success`` radius of gaussian goals).
        sigma: ``[k]`` per-feature scale of the gaussian reward.
        goal_type: the family's name (``position``, ``velocity``, ``fingertip``, ...).
        periodic: ``[k]`` bool, feature dims that are angles.
        feature_low, feature_high: ``[k]`` bounds of the goal features (observation space).
    """

    centers: torch.Tensor
    feature_fn: Callable[[torch.Tensor], torch.Tensor]
    reward: str
    threshold: float
    sigma: tuple[float, ...]
    goal_type: str
    periodic: tuple[bool, ...]
    feature_low: tuple[float, ...]
    feature_high: tuple[float, ...]

    def __post_init__(self):
        centers = torch.as_tensor(np.asarray(self.centers, dtype=np.float64))
        if centers.ndim == 1:
            centers = centers[:, None]
        if centers.ndim != 2 or centers.shape[0] == 0:
            raise ValueError(f"centers must have shape [L, k] with L >= 1, got {tuple(centers.shape)}")
        k = centers.shape[1]
        if self.reward not in REWARD_KINDS:
            raise ValueError(f"reward must be one of {REWARD_KINDS}, got {self.reward!r}")
        for name in ("sigma", "periodic", "feature_low", "feature_high"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"{name} must have {k} entries (one per feature dim), got {getattr(self, name)!r}")
        if not self.threshold > 0 or min(self.sigma) <= 0:
            raise ValueError(f"threshold and sigma must be positive, got {self.threshold}, {self.sigma}")
        object.__setattr__(self, "centers", centers)
        object.__setattr__(self, "_cache", {})  # (device, dtype) -> (centers, sigma): no copy per step on GPU

    def _constants(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = (self.centers.to(device=like.device, dtype=like.dtype),
                                torch.as_tensor(self.sigma, dtype=like.dtype, device=like.device))
        return self._cache[key]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def num_goals(self) -> int:
        """L."""
        return self.centers.shape[0]

    @property
    def goal_dim(self) -> int:
        """k."""
        return self.centers.shape[1]

    @property
    def features(self) -> torch.Tensor:
        """``[L, k]`` float32 goal features (the centers) the agent observes."""
        return self.centers.float()

    def _diff(self, states: torch.Tensor) -> torch.Tensor:
        """``[N, L, k]`` wrapped ``feature(s) - g``."""
        feat = self.feature_fn(states)  # [N, k]
        centers = self._constants(feat)[0]
        return periodic_difference(feat[:, None, :], centers[None], self.periodic)

    def distance(self, states: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` Euclidean distance of ``feature(states [N, d])`` to every goal center."""
        sq = self._diff(states).square().sum(-1)
        return sq.clamp_min(1e-30).sqrt()  # clamp: finite (zero) gradient at the center

    def success(self, states: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` bool: within ``threshold`` of each goal."""
        return self.distance(states) < self.threshold

    def rewards_terminals(
        self, states: torch.Tensor, smooth: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every goal's reward and termination on arriving in ``states``.

        Args:
            states: ``[N, d]`` next states s'.
            smooth: None for the true rewards; a temperature tau > 0, as a fraction of
                the goal radius a, replaces the sparse indicator by
                ``sigmoid((a - distance) / (tau a))`` in both outputs (a differentiable
                surrogate for P-learning, the same for goals of any radius; gaussian goals
                ignore it).

        Returns:
            ``rewards [N, L]`` (dtype of states), ``terminals [N, L]`` (bool; float when
            smoothed).
        """
        if self.reward == "gaussian":
            sigma = self._constants(states)[1]
            r = torch.exp(-0.5 * (self._diff(states) / sigma).square().sum(-1))
            return r, torch.zeros(r.shape, dtype=torch.bool, device=r.device)
        dist = self.distance(states)
        if smooth is not None and smooth > 0:
            soft = torch.sigmoid((self.threshold - dist) / (smooth * self.threshold))
            return soft, soft
        hit = dist < self.threshold
        return hit.to(states.dtype), hit


# --------------------------------------------------------------------------------------
# dynamics
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContinuousDynamics:
    """True dynamics of a continuous env, as pure batched functions.

    Randomness is always passed in, so the gym env (``np_random``) and the batched env
    (``torch.Generator``) share the same functions.

    Attributes:
        name: short env name.
        state_names: ``[d]`` names of the world-model state dims.
        low, high: ``[d]`` state box (periodic dims: the wrap interval; the box is the
            uniform sampling region and the grid extent).
        periodic: ``[d]`` bool, dims that are angles wrapped to ``[-pi, pi)``.
        num_actions: A.
        step_fn: ``(states [N, d], actions [N] long, noise [N, noise_dim] | None) -> [N, d]``.
        no_force_fn: ``(states [N, d], actions [N]) -> [N, d]``, the "no-force" baseline
            model (the dynamics with the action's effect removed).
        reset_fn: ``uniforms [N, reset_dim] in [0, 1) -> start states [N, d]``.
        reset_dim: number of uniforms per reset.
        observe_fn: ``states [N, d] -> obs [N, obs_dim]`` (differentiable).
        obs_low, obs_high: ``[obs_dim]`` observation bounds.
        noise_dim: standard normals per step (0: deterministic).
        differentiable: whether ``step_fn`` is a torch function (False for MuJoCo).
    """

    name: str
    state_names: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    periodic: tuple[bool, ...]
    num_actions: int
    step_fn: Callable[..., torch.Tensor]
    no_force_fn: Callable[..., torch.Tensor]
    reset_fn: Callable[[torch.Tensor], torch.Tensor]
    reset_dim: int
    observe_fn: Callable[[torch.Tensor], torch.Tensor]
    obs_low: tuple[float, ...]
    obs_high: tuple[float, ...]
    noise_dim: int = 0
    differentiable: bool = True

    @property
    def state_dim(self) -> int:
        """d."""
        return len(self.state_names)

    @property
    def obs_dim(self) -> int:
        return len(self.obs_low)

    @property
    def is_deterministic(self) -> bool:
        return self.noise_dim == 0

    def step(self, states: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[N, d]`` next states; noise (if any) drawn from ``generator``."""
        noise = None
        if self.noise_dim:
            noise = torch.randn(states.shape[0], self.noise_dim, generator=generator,
                                dtype=states.dtype, device=states.device)
        return self.step_fn(states, actions, noise)

    def branches(self, states: torch.Tensor, actions: torch.Tensor, num_points: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-state distribution as weighted branches (exact for deterministic dynamics).

        Stochastic dynamics use the Gauss-Hermite rule with ``num_points`` nodes per noise
        dim (a product rule), so expectations over s' become weighted sums.

        Returns:
            ``next_states [K, N, d]`` and ``weights [K]`` (sum 1).
        """
        if self.is_deterministic:
            return self.step_fn(states, actions, None)[None], torch.ones(1, dtype=states.dtype, device=states.device)
        nodes, weights = np.polynomial.hermite_e.hermegauss(num_points)  # probabilists': N(0, 1)
        weights = weights / weights.sum()
        grids = np.meshgrid(*([nodes] * self.noise_dim), indexing="ij")
        wgrids = np.meshgrid(*([weights] * self.noise_dim), indexing="ij")
        z = np.stack([g.ravel() for g in grids], -1)  # [K, noise_dim]
        w = np.prod(np.stack([g.ravel() for g in wgrids], -1), -1)  # [K]
        outs = []
        for zk in z:
            noise = torch.as_tensor(zk, dtype=states.dtype, device=states.device).expand(states.shape[0], -1)
            outs.append(self.step_fn(states, actions, noise))
        return torch.stack(outs), torch.as_tensor(w, dtype=states.dtype, device=states.device)

    def reset_states(self, n: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """``[n, d]`` start states drawn from the reset distribution."""
        u = torch.rand(n, self.reset_dim, generator=generator, dtype=dtype, device=device)
        return self.reset_fn(u)

    def uniform_states(self, n: int, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """``[n, d]`` states uniform over the box ``[low, high]``."""
        low = torch.as_tensor(self.low, dtype=dtype, device=device)
        high = torch.as_tensor(self.high, dtype=dtype, device=device)
        return low + (high - low) * torch.rand(n, self.state_dim, generator=generator, dtype=dtype, device=device)

    def delta(self, next_states: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` state change ``s' - s`` (wrapped on the periodic dims)."""
        return periodic_difference(next_states, states, self.periodic)

    def observe(self, states: torch.Tensor) -> torch.Tensor:
        return self.observe_fn(states)


@dataclass(frozen=True)
class ContinuousProblem:
    """A continuous env's true dynamics, its goal set, and the kwargs that made them.

    Attributes:
        dynamics: the true dynamics.
        goals: the L goals.
        env_id: a key of ``CONTINUOUS_ENVS``.
        env_kwargs: every kwarg with its default filled in.
    """

    dynamics: ContinuousDynamics
    goals: ContinuousGoals
    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def max_episode_steps(self) -> int:
        return int(self.env_kwargs["max_episode_steps"])

    def rewards_terminals(self, next_states: torch.Tensor, smooth: float | None = None):
        """Shortcut for ``goals.rewards_terminals``."""
        return self.goals.rewards_terminals(next_states, smooth)

    @property
    def uniform_starts(self) -> bool:
        """Whether episodes start uniformly over the state box (env kwarg
        ``start_states="uniform"``, exploring starts) instead of from the reset distribution."""
        return self.env_kwargs.get("start_states", "reset") == "uniform"

    def start_states(self, n: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """``[n, d]`` episode start states of the envs: ``dynamics.reset_states`` or, with
        ``start_states="uniform"``, ``dynamics.uniform_states``. Evaluations that compare
        with the paper (unseen goals) always start from ``dynamics.reset_states``."""
        if self.uniform_starts:
            return self.dynamics.uniform_states(n, generator, dtype, device)
        return self.dynamics.reset_states(n, generator, dtype, device)


# --------------------------------------------------------------------------------------
# gymnasium env
# --------------------------------------------------------------------------------------
class ContinuousGoalEnv(gymnasium.Env):
    """Goal-conditioned gymnasium env over a :class:`ContinuousProblem` (base of the
    MountainCar and toy-Reacher envs; see their docstrings for spaces and dynamics).

    Observation ``concat(observe(state), goal_features[goal])`` float32; ``info`` carries
    ``state`` (world-model state, float64), ``goal``, and after a step ``rewards [L]``,
    ``terminals [L]`` (every goal's) and ``success`` (commanded goal within its radius).
    ``reset(options={"goal": g, "state": s})`` fixes the commanded goal / start state.
    The dynamics run in float64 on CPU through the same torch functions as the batched env.
    A subclass sets ``make_problem`` (env kwargs -> its ``ContinuousProblem``), used when no
    ``problem`` is given.
    """

    metadata = {"render_modes": [], "render_fps": 30}
    make_problem: Callable[..., ContinuousProblem]

    def __init__(self, problem: ContinuousProblem | None = None, render_mode: str | None = None, **env_kwargs: Any):
        if problem is None:
            problem = self.make_problem(**env_kwargs)
        elif env_kwargs:
            raise TypeError(f"give either a problem or env kwargs, not both (got {sorted(env_kwargs)})")
        if render_mode is not None:
            raise ValueError(f"{type(self).__name__} does not render; render_mode must be None, got {render_mode!r}")
        self.problem = problem
        self.render_mode = None
        dyn, goals = problem.dynamics, problem.goals
        self.num_goals = goals.num_goals
        self.obs_dim = dyn.obs_dim
        self.goal_dim = goals.goal_dim
        self.max_episode_steps = problem.max_episode_steps
        self.goal_features = goals.features.numpy()
        low = np.concatenate([dyn.obs_low, goals.feature_low]).astype(np.float32)
        high = np.concatenate([dyn.obs_high, goals.feature_high]).astype(np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.Discrete(dyn.num_actions)
        self._state = np.zeros(dyn.state_dim)
        self._goal = 0
        self._t = 0

    def _obs(self) -> np.ndarray:
        obs = self.problem.dynamics.observe(torch.as_tensor(self._state)[None])[0].numpy()
        obs = np.concatenate([obs, self.goal_features[self._goal]]).astype(np.float32)
        return np.clip(obs, self.observation_space.low, self.observation_space.high)

    def _sample_start(self) -> np.ndarray:
        dyn = self.problem.dynamics
        if self.problem.uniform_starts:
            return np.asarray(dyn.low) + (np.asarray(dyn.high) - np.asarray(dyn.low)) * self.np_random.random(dyn.state_dim)
        u = self.np_random.random(dyn.reset_dim)
        return dyn.reset_fn(torch.as_tensor(u)[None])[0].numpy()

    def _advance(self, action: int) -> np.ndarray:
        """Next world-model state ``[d]`` after ``action`` (true dynamics)."""
        dyn = self.problem.dynamics
        noise = None
        if dyn.noise_dim:
            noise = torch.as_tensor(self.np_random.standard_normal(dyn.noise_dim))[None]
        s = torch.as_tensor(self._state)[None]
        return dyn.step_fn(s, torch.tensor([action]), noise)[0].numpy()

    def _set_state(self, state: np.ndarray) -> None:
        """Put the env in world-model state ``[d]`` (on reset)."""
        self._state = np.asarray(state, dtype=np.float64).copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        self._goal = commanded_goal(self.np_random, self.num_goals, options)
        state = options.get("state")
        if state is None:
            state = self._sample_start()
        else:
            state = np.asarray(state, dtype=np.float64)
            if state.shape != (self.problem.dynamics.state_dim,):
                raise ValueError(f"options['state'] must have shape [{self.problem.dynamics.state_dim}], got {state.shape}")
        self._set_state(state)
        self._t = 0
        return self._obs(), {"state": self._state.copy(), "goal": self._goal}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r} for {self.action_space}")
        self._state = self._advance(int(action))
        self._t += 1
        s2 = torch.as_tensor(self._state)[None]
        rewards, terminals = self.problem.goals.rewards_terminals(s2)
        rewards = rewards[0].numpy().astype(np.float32)
        terminals = terminals[0].numpy()
        success = bool(self.problem.goals.success(s2)[0, self._goal])
        terminated = bool(terminals[self._goal])
        truncated = self._t >= self.max_episode_steps and not terminated
        info = {"state": self._state.copy(), "goal": self._goal, "rewards": rewards,
                "terminals": terminals, "success": success}
        return self._obs(), float(rewards[self._goal]), terminated, truncated, info


# --------------------------------------------------------------------------------------
# batched env
# --------------------------------------------------------------------------------------
class BatchedContinuousEnv(BatchedGoalEnv):
    """N copies of a continuous goal-conditioned problem on one torch device, same semantics
    as :class:`ContinuousGoalEnv` (see ``BatchedGoalEnv`` for the step dict).

    ## Observation
    ``obs = observe(state)`` ``[N, obs_dim]`` float32; ``goal_features = goals.centers``.

    ## Dynamics
    The problem's ``step_fn`` on a float64 state ``[N, d]``; noise (stochastic variants),
    resets and goals drawn from a seeded ``torch.Generator``. Dynamics that are not torch
    functions (``differentiable=False``: MuJoCo, a python loop over rows) run on the CPU
    only; any other device is a ``ValueError``. MuJoCo Reacher's ``mujoco_reacher_step``
    simulates each row from a fresh ``MjData`` (20-40 us per env step); it agrees with the
    gymnasium env from the same state and actions to round-off, up to the constraint
    solver's warm start when joint 2 hits its limit (see ``tests/test_continuous.py``).

    ## Reward and episode end
    ``rewards[:, g] = r_g(s')``; terminated when the commanded goal is terminal at s'
    (sparse goals); truncated after ``max_episode_steps``. ``success``: the commanded
    goal is within its radius at s'.

    ## Start state
    On every reset the goal is uniform over the L goals and the state drawn from the
    env's reset distribution (uniform over the box with ``start_states="uniform"``).

    Attributes (besides ``BatchedGoalEnv``'s):
        problem: the ``ContinuousProblem``.
        state: ``[N, d]`` float64 world-model state (may be overwritten).
        goal: ``[N]`` long commanded goal.
    """

    def __init__(self, problem: ContinuousProblem, num_envs: int, seed: int = 0, device: str | torch.device = "cpu"):
        if not problem.dynamics.differentiable and torch.device(device).type != "cpu":
            raise ValueError(f"{problem.env_id} steps its dynamics on the CPU (numpy/MuJoCo, not torch), so its "
                             f"batched env needs device 'cpu', got {str(torch.device(device))!r}")
        super().__init__(num_envs, seed=seed, device=device)
        self.problem = problem
        dyn, goals = problem.dynamics, problem.goals
        self.num_actions = dyn.num_actions
        self.num_goals = goals.num_goals
        self.obs_dim = dyn.obs_dim
        self.goal_dim = goals.goal_dim
        self.max_episode_steps = problem.max_episode_steps
        self.goal_features = goals.features.to(self.device)

    def _draw_resets(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_envs
        goal = torch.randint(self.num_goals, (n,), generator=self._gen, device=self.device)
        return goal, self.problem.start_states(n, self._gen, torch.float64, self.device)

    def _transition(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s2 = self.problem.dynamics.step(self.state, actions, self._gen)
        return (s2, *self._draw_resets())

    def _outcomes(self, next_state: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, ...]:
        goals = self.problem.goals
        rewards, terminals = goals.rewards_terminals(next_state)
        rewards = rewards.float()
        reward = rewards.gather(1, goal[:, None]).squeeze(1)
        terminated = terminals.gather(1, goal[:, None]).squeeze(1)
        success = goals.success(next_state).gather(1, goal[:, None]).squeeze(1)
        return rewards, terminals, reward, terminated, success

    def _observe(self, states: torch.Tensor) -> torch.Tensor:
        return self.problem.dynamics.observe(states).float()
