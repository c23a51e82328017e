"""Planning with an extracted continuous world model on goals the agent never saw.

Shapes: N states, d state dims, A actions.

Value iteration inside the model on a grid (``qworld.worldmodel.bellman_grid``) gives a greedy
policy for the new goal (``planner="grid"``), or the grid's values serve as the terminal value of a
short-horizon search over action sequences in the model, re-planned at every step
(``planner="mpc"``, :class:`MPCConfig`), so the plan is not limited to what the grid's
spacing resolves; the policy is rolled out on the *true* dynamics from ``num_resets`` start states
drawn from the env's reset distribution, and its mean discounted return ``R_WM`` is compared
with ``R*``, the return of the policy planned the same way in the true dynamics:
``return_ratio = R_WM / R*``. The tasks themselves (``UNSEEN_GOAL_TASKS``) are defined beside
their envs, in :mod:`qworld_envs.continuous_tasks`. Torch only, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from qworld import metrics as K
from qworld.worldmodel.bellman_grid import Grid, GridQ, grid_q
from qworld_envs import MOUNTAIN_CAR_ID, MUJOCO_REACHER_ID, REACHER_ID, ContinuousProblem, make_continuous_problem
from qworld_envs.continuous import wrap_periodic
from qworld_envs.continuous_tasks import UNSEEN_GOAL_TASKS, UnseenGoalTask

StepFn = Callable[[torch.Tensor, torch.Tensor], Any]

DEFAULT_GRID_SHAPES = {MOUNTAIN_CAR_ID: (200, 200), REACHER_ID: (24, 24, 24, 24), MUJOCO_REACHER_ID: (16, 16, 16, 16)}
# Planning box (low, high) where it differs from the dynamics' state box. MuJoCo Reacher's
# velocity box (+-10 rad/s) is a sampling box; one full-torque step changes omega by 0.4,
# so the grid covers +-4 rad/s (spacing 0.53 at 16 points) and clamps beyond.
PLAN_BOXES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    MUJOCO_REACHER_ID: ((-math.pi, -3.0, -4.0, -4.0), (math.pi, 3.0, 4.0, 4.0)),
}


def default_grid_shape(env_id: str) -> tuple[int, ...] | None:
    """The planning / ground-truth grid of an env (None: no default)."""
    return DEFAULT_GRID_SHAPES.get(env_id)


def planning_grid(problem: ContinuousProblem, grid_shape: Sequence[int] | None = None) -> Grid:
    """The grid value iteration plans on: ``grid_shape`` (default ``DEFAULT_GRID_SHAPES``)
    over the env's ``PLAN_BOXES`` entry, else its state box."""
    dyn = problem.dynamics
    shape = tuple(grid_shape or DEFAULT_GRID_SHAPES[problem.env_id])
    low, high = PLAN_BOXES.get(problem.env_id, (dyn.low, dyn.high))
    return Grid(tuple(low), tuple(high), shape, tuple(dyn.periodic))


def plan_in(step_fn: StepFn, task: UnseenGoalTask, grid: Grid, gamma: float, num_actions: int, **kwargs: Any) -> GridQ:
    """Optimal Q of ``task`` inside the dynamics ``step_fn`` by grid value iteration (L = 1)."""
    Q = grid_q(step_fn, grid, lambda s: task.reward_fn(s)[:, None], lambda s: task.terminal_fn(s)[:, None],
               gamma, num_actions=num_actions, **kwargs)
    return GridQ(Q, grid)


# --- model-predictive planning on top of the grid ----------------------------------------
PLANNERS = ("grid", "mpc")
Policy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (states [N, d], alive [N] bool) -> actions [N]


@dataclass(frozen=True)
class MPCConfig:
    """Settings of the model-predictive planner (``planner="mpc"``): at every real step,
    categorical CEM over action sequences rolled through the model, scored by their
    discounted reward plus ``gamma^H`` times the grid's value at the last state.

    Attributes:
        horizon: H, steps of each action sequence.
        samples: N sequences scored per state and CEM round (the first round's include the
            grid policy's own sequence in the model and the previous step's plan, shifted).
        iterations: CEM rounds; each refits the per-step categorical distributions to the elites.
        elites: best sequences the distributions are refitted to.
        smoothing: weight of the old distribution in a refit (keeps some exploration).
        replan: real steps between searches (the plan's next actions are executed in
            between): 1 re-plans at every step; k divides the planning cost by k.
    """

    # Toy Reacher, true dynamics, 512 resets, R* far fingertip / target angle (grid alone
    # 0.699 / 0.680): these 0.706 / 0.688; replan 1 0.709 / 0.691 at 4x the cost (H = 8,
    # N = 128: 0.713 / 0.692 at 10x). A learned 2x256 successor costs ~20x the true step, so
    # replan 1 would take ~10 min per model on 2 CPU cores, replan 4 about 3.
    horizon: int = 4
    samples: int = 64
    iterations: int = 3
    elites: int = 8
    smoothing: float = 0.1
    replan: int = 4

    def __post_init__(self):
        if min(self.horizon, self.samples, self.iterations, self.elites, self.replan) < 1:
            raise ValueError(f"horizon, samples, iterations, elites and replan must be >= 1, got {self}")
        if self.replan > self.horizon:
            raise ValueError(f"replan ({self.replan}) cannot exceed the horizon ({self.horizon})")
        if self.elites > self.samples:
            raise ValueError(f"elites ({self.elites}) cannot exceed samples ({self.samples})")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")

    @classmethod
    def from_options(cls, options: "MPCConfig | dict | None") -> "MPCConfig":
        """From a dict (a sweep file's ``mpc:``), rejecting unknown keys."""
        if isinstance(options, cls):
            return options
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown mpc options {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**options)


def expected_step(step_fn: StepFn, task: UnseenGoalTask, states: torch.Tensor, actions: torch.Tensor,
                  periodic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One model step with the task's reward and termination, expected over the branches.

    Args:
        step_fn: ``(states [M, d], actions [M]) -> [M, d]`` or ``([K, M, d], [K])``.
        task: reward and termination on arrival.
        states: ``[M, d]`` (float64); actions ``[M]`` long.
        periodic: ``[d]`` bool, dims wrapped to ``[-pi, pi)``.

    Returns:
        ``next [M, d]`` (the branches' weighted mean, taken over wrapped differences on
        periodic dims; exact for deterministic models), ``reward [M]`` and ``continue [M]``
        (probability of not terminating), and the branches ``([K, M, d], [K])``.
    """
    out = step_fn(states, actions)
    if isinstance(out, tuple):
        nxt, w = out[0].to(states.dtype), torch.as_tensor(out[1], dtype=states.dtype)
    else:
        nxt, w = out.to(states.dtype)[None], torch.ones(1, dtype=states.dtype)
    K, M = nxt.shape[:2]
    flat = nxt.reshape(K * M, -1)
    reward = (task.reward_fn(flat).to(states.dtype).reshape(K, M) * w[:, None]).sum(0)
    cont = ((~task.terminal_fn(flat).bool()).to(states.dtype).reshape(K, M) * w[:, None]).sum(0)
    if K == 1:
        mean = nxt[0]
    else:  # a certainty-equivalent state: the branches' mean, wrapped so angles average locally
        diff = wrap_periodic(nxt - nxt[0], periodic)
        mean = wrap_periodic(nxt[0] + (diff * w[:, None, None]).sum(0), periodic)
    return mean, reward, cont, (nxt, w)


def sequence_returns(step_fn: StepFn, task: UnseenGoalTask, value_fn: Callable[[torch.Tensor], torch.Tensor],
                     states: torch.Tensor, actions: torch.Tensor, gamma: float, periodic: torch.Tensor) -> torch.Tensor:
    """Model-predicted return of action sequences:
    ``sum_t gamma^t r(s_{t+1}) + gamma^H V(s_H)``, each term weighted by the probability of
    not having terminated before it (terminal states get no bootstrap).

    Args:
        step_fn: the model (see :func:`expected_step`).
        value_fn: ``states [M, d] -> [M]`` the value beyond the horizon.
        states: ``[M, d]`` start states; actions ``[M, H]`` long.

    Returns:
        ``[M]`` float64.
    """
    s = states
    ret = torch.zeros(s.shape[0], dtype=s.dtype)
    alive = torch.ones_like(ret)
    disc = 1.0
    for t in range(actions.shape[1]):
        s, r, cont, (nxt, w) = expected_step(step_fn, task, s, actions[:, t], periodic)
        ret += disc * alive * r
        if t == actions.shape[1] - 1:  # the bootstrap is expected over the branches too
            K, M = nxt.shape[:2]
            done = task.terminal_fn(nxt.reshape(K * M, -1)).bool().reshape(K, M)
            v = value_fn(nxt.reshape(K * M, -1)).to(s.dtype).reshape(K, M)
            ret += disc * gamma * alive * (w[:, None] * (~done).to(s.dtype) * v).sum(0)
        alive = alive * cont
        disc *= gamma
    return ret


def _policy_sequence(step_fn: StepFn, task: UnseenGoalTask, policy: Callable[[torch.Tensor], torch.Tensor],
                     states: torch.Tensor, horizon: int, periodic: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` actions of a state policy followed in the model from ``states [B, d]``."""
    s, out = states, []
    for _ in range(horizon):
        a = policy(s)
        out.append(a)
        s = expected_step(step_fn, task, s, a, periodic)[0]
    return torch.stack(out, 1)


@torch.no_grad()
def mpc_plan(step_fn: StepFn, task: UnseenGoalTask, value_fn: Callable[[torch.Tensor], torch.Tensor],
             guide_fn: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, gamma: float, config: MPCConfig,
             num_actions: int, periodic: torch.Tensor, generator: torch.Generator,
             warm: torch.Tensor | None = None) -> torch.Tensor:
    """Best action sequence from each state by categorical CEM in the model.

    Args:
        step_fn: the model.
        task: rewards and termination.
        value_fn: ``states [M, d] -> [M]``, the value beyond the horizon (the grid plan's).
        guide_fn: ``states [M, d] -> [M]`` long, a policy whose sequence in the model is
            always a candidate (the grid plan's greedy one).
        states: ``[B, d]`` float64.
        config: H, N, rounds, elites, smoothing.
        num_actions: A.
        periodic: ``[d]`` bool.
        generator: draws the samples (the plan is deterministic given its state).
        warm: ``[B, H]`` long candidate sequences (the previous plan shifted), or None.

    Returns:
        ``[B, H]`` long: the best-scoring sequence seen (ties keep the earlier candidate,
        so the guide's sequence wins when nothing scores better).
    """
    B, H, N, A = states.shape[0], config.horizon, config.samples, num_actions
    fixed = [_policy_sequence(step_fn, task, guide_fn, states, H, periodic)]
    if warm is not None:
        fixed.append(warm)
    fixed = torch.stack(fixed, 1)  # [B, F, H]
    probs = torch.full((B, H, A), 1.0 / A, dtype=torch.float64)
    best_score = torch.full((B,), -math.inf, dtype=torch.float64)
    best = fixed[:, 0]
    for it in range(config.iterations):
        n = max(N - fixed.shape[1], 1) if it == 0 else N
        # inverse-CDF draws: many times faster than torch.multinomial on CPU
        cdf = probs.cumsum(-1)
        u = torch.rand(B, H, n, generator=generator, dtype=torch.float64) * cdf[..., -1:]
        seqs = torch.searchsorted(cdf, u).clamp_max(A - 1).transpose(1, 2)  # [B, n, H]
        if it == 0:
            seqs = torch.cat([fixed, seqs], 1)
        m = seqs.shape[1]
        score = sequence_returns(step_fn, task, value_fn, states.repeat_interleave(m, 0), seqs.reshape(B * m, H),
                                 gamma, periodic).reshape(B, m)
        top, idx = score.topk(min(config.elites, m), dim=1, sorted=True)
        # topk does not promise the first of equal scores: the earliest index among the maxima
        first = torch.where(score == top[:, :1], torch.arange(m).expand(B, m), m).amin(1)
        better = top[:, 0] > best_score
        best = torch.where(better[:, None], seqs[torch.arange(B), first], best)
        best_score = torch.where(better, top[:, 0], best_score)
        elite = seqs.gather(1, idx[..., None].expand(-1, -1, H))  # [B, E, H]
        freq = torch.nn.functional.one_hot(elite, A).to(torch.float64).mean(1)  # [B, H, A]
        probs = config.smoothing * probs + (1 - config.smoothing) * freq
    return best


def greedy_policy(q: GridQ) -> Policy:
    """The grid plan's greedy policy (goal 0), as a :data:`Policy`."""
    def act(states: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        return q.greedy(states, 0)

    return act


def mpc_policy(step_fn: StepFn, task: UnseenGoalTask, q: GridQ, gamma: float, config: MPCConfig,
               periodic: Sequence[bool], seed: int = 0) -> Policy:
    """A :data:`Policy` that plans with :func:`mpc_plan` every ``config.replan`` steps (only
    for the alive rows) and executes the plan's next action; it keeps each row's plan (to
    warm-start the next search), so make one per rollout."""
    per = torch.as_tensor(tuple(periodic), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    q = q.to(dtype=torch.float64)  # once, not a float32 -> float64 copy of the table per call
    v_table = q.table.reshape(q.grid.size, q.num_goals, q.num_actions)[:, 0].amax(-1, keepdim=True)  # [n, 1]

    def value_fn(s: torch.Tensor) -> torch.Tensor:
        # V interpolated from its grid values, as value iteration itself reads V(s')
        return q.grid.interpolate(v_table, s)[:, 0]

    def guide_fn(s: torch.Tensor) -> torch.Tensor:
        return q.greedy(s, 0)

    held: dict[str, Any] = {"step": 0}

    def act(states: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        N = states.shape[0]
        if "plan" not in held:
            held["plan"] = torch.zeros(N, config.horizon, dtype=torch.long)
            held["warm"] = torch.zeros(N, dtype=torch.bool)
        rows = alive.nonzero().flatten()
        actions = torch.zeros(N, dtype=torch.long)
        held["step"] += 1
        if (held["step"] - 1) % config.replan:
            actions[rows] = held["plan"][rows, 0]
            held["plan"][rows] = torch.cat([held["plan"][rows, 1:], held["plan"][rows, -1:]], 1)
        elif len(rows):
            warm = held["plan"][rows] if bool(held["warm"][rows].all()) else None
            plan = mpc_plan(step_fn, task, value_fn, guide_fn, states[rows].double(), gamma, config, q.num_actions,
                            per, gen, warm)
            actions[rows] = plan[:, 0]
            held["plan"][rows] = torch.cat([plan[:, 1:], plan[:, -1:]], 1)
            held["warm"][rows] = True
        return actions

    return act


@torch.no_grad()
def rollout_returns(policy: Policy, dynamics: Any, task: UnseenGoalTask, starts: torch.Tensor, gamma: float,
                    horizon: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll a policy out on the true ``dynamics``.

    Args:
        policy: ``(states [N, d], alive [N] bool) -> [N]`` long actions
            (:func:`greedy_policy` or :func:`mpc_policy`).
        dynamics: a ``ContinuousDynamics`` (the truth; noise drawn from ``generator``).
        task: rewards and termination.
        starts: ``[N, d]`` start states.
        gamma: discount.
        horizon: steps before truncation.

    Returns:
        ``returns [N]`` (discounted, float64) and ``success [N]`` bool (a reward > 0 was
        collected, which for the sparse tasks means the goal was reached).
    """
    s = starts.double()
    N = s.shape[0]
    ret = torch.zeros(N, dtype=torch.float64)
    success = torch.zeros(N, dtype=torch.bool)
    alive = torch.ones(N, dtype=torch.bool)
    disc = 1.0
    for _ in range(horizon):
        a = policy(s, alive)
        s2 = dynamics.step(s, a, generator)
        r = task.reward_fn(s2)
        ret += torch.where(alive, disc * r, torch.zeros_like(r))
        success |= alive & (r > 0)
        alive &= ~task.terminal_fn(s2)
        disc *= gamma
        s = s2
        if not alive.any():
            break
    return ret, success


def plan_and_rollout(model_step: StepFn, dynamics: Any, task: UnseenGoalTask, grid: Grid, starts: torch.Tensor,
                     gamma: float, horizon: int, *, planner: str = "grid", mpc: MPCConfig | dict | None = None,
                     seed: int = 0, generator: torch.Generator | None = None, q: GridQ | None = None,
                     **vi_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan ``task`` in ``model_step`` with ``planner`` and roll it out on the true ``dynamics``.

    Args:
        model_step: the model planned in.
        dynamics: the truth (its ``periodic`` and ``num_actions`` are used for the model too).
        grid: the value-iteration grid.
        starts: ``[N, d]``.
        planner: ``"grid"`` (the grid plan's greedy policy) or ``"mpc"`` (:func:`mpc_policy`
            on top of the grid plan).
        mpc: :class:`MPCConfig` or its fields.
        seed: of the planner's samples.
        generator: of the true dynamics' noise.
        q: the grid plan of ``model_step`` if already made.
        **vi_kwargs: passed to :func:`plan_in`.

    Returns:
        ``returns [N]``, ``success [N]`` as :func:`rollout_returns`.
    """
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; known: {PLANNERS}")
    if q is None:
        q = plan_in(model_step, task, grid, gamma, dynamics.num_actions, **vi_kwargs)
    if planner == "grid":
        policy = greedy_policy(q)
    else:
        policy = mpc_policy(model_step, task, q, gamma, MPCConfig.from_options(mpc), dynamics.periodic, seed)
    return rollout_returns(policy, dynamics, task, starts, gamma, horizon, generator)


_STAR_CACHE: dict[tuple, dict] = {}
_Q_STAR: dict[tuple, GridQ] = {}  # the last true-dynamics grid plan: planners compared on one task share it


def evaluate_unseen_goal(
    problem: ContinuousProblem | str,
    task_name: str,
    model_step: StepFn,
    *,
    gamma: float = 0.99,
    grid_shape: Sequence[int] | None = None,
    num_resets: int = 512,
    seed: int = 0,
    horizon: int | None = None,
    planner: str = "grid",
    mpc: MPCConfig | dict | None = None,
    **vi_kwargs: Any,
) -> dict:
    """Plan for an unseen goal inside a world model and score it on the true dynamics.

    Args:
        problem: the env's ``ContinuousProblem`` or env id (default kwargs).
        task_name: a key of ``UNSEEN_GOAL_TASKS[env_id]``.
        model_step: the world model, ``(states [n, d], actions [n]) -> [n, d]`` (or
            weighted branches ``([K, n, d], [K])``), called on grid points (and, with
            ``planner="mpc"``, on the sampled sequences' states).
        gamma: discount.
        grid_shape: planning grid (default ``DEFAULT_GRID_SHAPES[env_id]``, over
            ``PLAN_BOXES[env_id]`` where given, else the state box).
        num_resets: start states from the env's reset distribution.
        seed: of the start states, the true dynamics' noise and the MPC samples.
        horizon: rollout length (default: the env's ``max_episode_steps``).
        planner: ``"grid"`` (greedy in the grid's Q) or ``"mpc"`` (re-planned every step
            by CEM over action sequences in the model, the grid's value beyond them); R*
            is planned the same way in the true dynamics.
        mpc: :class:`MPCConfig` or a dict of its fields (``planner="mpc"`` only).
        **vi_kwargs: passed to :func:`qworld.worldmodel.bellman_grid.grid_q`.

    Returns:
        ``{return_wm, return_star, return_ratio, plan_success, "star/plan_success"}``
        (means over the resets; R* is cached per env, task, grid, planner and seed).
    """
    if isinstance(problem, str):
        problem = make_continuous_problem(problem)
    env_tasks = UNSEEN_GOAL_TASKS.get(problem.env_id, {})
    if task_name not in env_tasks:
        raise ValueError(f"unknown unseen-goal problem {task_name!r} for {problem.env_id}; known: {sorted(env_tasks)}")
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; known: {PLANNERS}")
    mpc_config = MPCConfig.from_options(mpc) if planner == "mpc" else None
    goal_task = env_tasks[task_name]
    dyn = problem.dynamics
    grid = planning_grid(problem, grid_shape)
    grid_shape = grid.shape
    horizon = int(horizon or problem.max_episode_steps)

    def evaluate(step_fn: StepFn, q: GridQ | None = None) -> tuple[float, float, GridQ]:
        if q is None:
            q = plan_in(step_fn, goal_task, grid, gamma, dyn.num_actions, **vi_kwargs)
        gen = torch.Generator().manual_seed(seed)
        starts = dyn.reset_states(num_resets, gen)
        ret, succ = plan_and_rollout(step_fn, dyn, goal_task, grid, starts, gamma, horizon, planner=planner,
                                     mpc=mpc_config, seed=seed, generator=gen, q=q)
        return float(ret.mean()), float(succ.double().mean()), q

    # start_states only changes where training episodes start, not R*
    kwargs_key = repr(sorted((k, repr(v)) for k, v in problem.env_kwargs.items() if k != "start_states"))
    q_key = (problem.env_id, kwargs_key, task_name, grid_shape, float(gamma), repr(sorted(vi_kwargs.items())))
    key = (*q_key, num_resets, seed, horizon, planner, mpc_config)
    if key not in _STAR_CACHE:
        def true_step(s, a):
            return dyn.branches(s, a)

        r_star, succ_star, q_star = evaluate(true_step, _Q_STAR.get(q_key))
        _Q_STAR.clear()
        _Q_STAR[q_key] = q_star
        _STAR_CACHE[key] = {K.RETURN_STAR: r_star, f"{K.STAR}/{K.PLAN_SUCCESS}": succ_star}
    star = _STAR_CACHE[key]
    r_wm, succ_wm, _ = evaluate(model_step)
    r_star = star[K.RETURN_STAR]
    return {K.RETURN_WM: r_wm, K.RETURN_STAR: r_star,
            K.RETURN_RATIO: r_wm / r_star if r_star > 0 else float("nan"),
            K.PLAN_SUCCESS: succ_wm, f"{K.STAR}/{K.PLAN_SUCCESS}": star[f"{K.STAR}/{K.PLAN_SUCCESS}"]}


@dataclass(frozen=True)
class _TrainingGoal:
    """Goal ``g`` of the problem's own goal family, as a task (reward and end on arrival)."""

    goals: Any  # ContinuousGoals
    g: int

    def reward_fn(self, states: torch.Tensor) -> torch.Tensor:
        return self.goals.rewards_terminals(states)[0][:, self.g]

    def terminal_fn(self, states: torch.Tensor) -> torch.Tensor:
        return self.goals.rewards_terminals(states)[1][:, self.g]


@torch.no_grad()
def policy_returns(q_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], problem: ContinuousProblem,
                   gamma: float, num_resets: int = 512, seed: int = 0, horizon: int | None = None) -> dict:
    """The agent's own greedy policy on each of its training goals, on the true dynamics.

    The agent return of the paper's architecture study: no world model is involved.

    Args:
        q_fn: ``(states [N, d], goal [N] long) -> Q [N, A]`` (``qworld.agents.adapter.agent_q_fn``).
        problem: the env's ``ContinuousProblem`` (its goals are the agent's L training goals).
        gamma: discount.
        num_resets: start states from the env's reset distribution (the same for every goal).
        seed: of the start states and the true dynamics' noise.
        horizon: rollout length (default: the env's ``max_episode_steps``).

    Returns:
        ``{policy_return, policy_success}``: the mean discounted return and the share of
        rollouts that reach their goal, over goals and resets.
    """
    dyn, L = problem.dynamics, problem.goals.num_goals
    horizon = int(horizon or problem.max_episode_steps)
    returns, successes = [], []
    for g in range(L):
        gen = torch.Generator().manual_seed(seed)
        starts = dyn.reset_states(num_resets, gen)

        def act(states: torch.Tensor, alive: torch.Tensor, g: int = g) -> torch.Tensor:
            goal = torch.full((states.shape[0],), g, dtype=torch.long)
            return q_fn(states.float(), goal).argmax(-1).long()

        ret, succ = rollout_returns(act, dyn, _TrainingGoal(problem.goals, g), starts, gamma, horizon, gen)
        returns.append(ret.mean())
        successes.append(succ.double().mean())
    return {K.POLICY_RETURN: float(torch.stack(returns).mean()),
            K.POLICY_SUCCESS: float(torch.stack(successes).mean())}
