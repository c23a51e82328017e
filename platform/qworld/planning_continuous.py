"""Planning with an extracted continuous world model on goals the agent never saw.

Shapes: N states, d state dims, A actions.

Value iteration inside the model on a grid (``qworld.bellman_grid``) gives a greedy policy
for the new goal; it is rolled out on the *true* dynamics from ``num_resets`` start states
drawn from the env's reset distribution, and its mean discounted return ``R_WM`` is compared
with ``R*``, the return of the policy planned the same way in the true dynamics:
``return_ratio = R_WM / R*``. Torch only, no Ray.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from qworld import metrics as K
from qworld.bellman_grid import Grid, GridQ, grid_q
from qworld_envs import MOUNTAIN_CAR_ID, MUJOCO_REACHER_ID, REACHER_ID, ContinuousProblem, make_continuous_problem
from qworld_envs.continuous import wrap_angle

StepFn = Callable[[torch.Tensor, torch.Tensor], Any]

DEFAULT_GRID_SHAPES = {MOUNTAIN_CAR_ID: (200, 200), REACHER_ID: (24, 24, 24, 24), MUJOCO_REACHER_ID: (16, 16, 16, 16)}
# Planning box (low, high) where it differs from the dynamics' state box. MuJoCo Reacher's
# velocity box (+-10 rad/s) is a sampling box; one full-torque step changes omega by 0.4,
# so the grid covers +-4 rad/s (spacing 0.53 at 16 points) and clamps beyond.
PLAN_BOXES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    MUJOCO_REACHER_ID: ((-math.pi, -3.0, -4.0, -4.0), (math.pi, 3.0, 4.0, 4.0)),
}


@dataclass(frozen=True)
class UnseenGoalTask:
    """A goal the agent was not trained on, over world-model states.

    Attributes:
        name: key in ``UNSEEN_GOAL_TASKS[env_id]``.
        description: one line.
        reward_fn: ``next_states [N, d] -> [N]`` reward on arrival.
        terminal_fn: ``next_states [N, d] -> [N]`` bool, the episode ends there.
    """

    name: str
    description: str
    reward_fn: Callable[[torch.Tensor], torch.Tensor]
    terminal_fn: Callable[[torch.Tensor], torch.Tensor]


# --- the tasks' reward / terminal functions (module level, so tasks pickle) -------------
def _ball(states: torch.Tensor, dims: Sequence[int], center: Sequence[float], radius: float,
          periodic: bool | Sequence[bool] = False) -> torch.Tensor:
    """``[N]`` bool: ``states[:, dims]`` within ``radius`` of ``center`` (differences wrapped
    on the periodic dims: all of them for ``True``, or one flag per dim)."""
    diff = states[:, list(dims)] - torch.as_tensor(center, dtype=states.dtype, device=states.device)
    wrap = torch.as_tensor(periodic, device=states.device).expand(len(dims))
    diff = torch.where(wrap, wrap_angle(diff), diff)
    return diff.square().sum(-1).sqrt() < radius


def _ball_reward(states, dims, center, radius, periodic=False):
    return _ball(states, dims, center, radius, periodic).to(states.dtype)


def _any_ball(states, dims, centers, radius):
    return functools.reduce(torch.logical_or, [_ball(states, dims, c, radius) for c in centers])


def _any_ball_reward(states, dims, centers, radius):
    return _any_ball(states, dims, centers, radius).to(states.dtype)


def _gentle_success(states: torch.Tensor) -> torch.Tensor:
    return _ball(states, (0,), (0.6,), 0.1) & (states[:, 1].abs() <= 0.05)


def _gentle_reward(states: torch.Tensor) -> torch.Tensor:
    return _gentle_success(states).to(states.dtype)


def _gentle_terminal(states: torch.Tensor) -> torch.Tensor:
    return _gentle_success(states) | (states[:, 1].abs() > 0.05)


def _fingertip_ball(states, center, radius, links=(1.0, 1.0)):
    from qworld_envs.reacher import fingertip

    tip = fingertip(states, *links)
    return (tip - torch.as_tensor(center, dtype=states.dtype, device=states.device)).norm(dim=-1) < radius


def _fingertip_reward(states, center, radius, links=(1.0, 1.0)):
    return _fingertip_ball(states, center, radius, links).to(states.dtype)


def _ball_task(name, description, dims, center, radius, periodic: bool | tuple = False) -> UnseenGoalTask:
    return UnseenGoalTask(
        name, description,
        functools.partial(_ball_reward, dims=tuple(dims), center=tuple(center), radius=radius, periodic=periodic),
        functools.partial(_ball, dims=tuple(dims), center=tuple(center), radius=radius, periodic=periodic),
    )


_SQRT2 = math.sqrt(2.0)
_MJ_LINKS = (0.1, 0.11)  # qworld_envs.mujoco_reacher LINK1, LINK2 (not imported: that module loads MuJoCo)
_MJ_FAR = sum(_MJ_LINKS) / _SQRT2  # the stretched arm's fingertip at 45 degrees
UNSEEN_GOAL_TASKS: dict[str, dict[str, UnseenGoalTask]] = {
    MOUNTAIN_CAR_ID: {
        "fast_car": _ball_task("fast_car", "reach velocity v = 0.06 (|v - 0.06| < 0.01); ends there",
                               (1,), (0.06,), 0.01),
        "gentle_car": UnseenGoalTask(
            "gentle_car",
            "reach p = 0.6 (|p - 0.6| < 0.1) keeping |v| <= 0.05: reward 1 there; |v| > 0.05 ends the episode with 0",
            _gentle_reward, _gentle_terminal),
        "shortest_path": UnseenGoalTask(
            "shortest_path", "reach the nearer of p = -1.0 and p = 0.4 (|p - c| < 0.1); ends there",
            functools.partial(_any_ball_reward, dims=(0,), centers=((-1.0,), (0.4,)), radius=0.1),
            functools.partial(_any_ball, dims=(0,), centers=((-1.0,), (0.4,)), radius=0.1)),
    },
    REACHER_ID: {
        "far_fingertip": UnseenGoalTask(
            "far_fingertip", "fingertip at (sqrt2, sqrt2), the arm stretched out (||tip - c|| < 0.2); ends there",
            functools.partial(_fingertip_reward, center=(_SQRT2, _SQRT2), radius=0.2),
            functools.partial(_fingertip_ball, center=(_SQRT2, _SQRT2), radius=0.2)),
        "target_angle": _ball_task("target_angle", "joint angles theta = (0, pi) (||wrap(theta - c)|| < 0.2); ends there",
                                   (0, 1), (0.0, math.pi), 0.2, periodic=True),
        "target_velocity": _ball_task("target_velocity", "joint velocities omega = (2, 2) (||omega - c|| < 0.2); ends there",
                                      (2, 3), (2.0, 2.0), 0.2),
    },
    # The toy Reacher's three goals carried over to MuJoCo's arm (links 0.1 + 0.11, radius
    # 0.02 = the env's goal radius; theta2 limited to [-3, 3], so the folded arm is 2.5;
    # one full-torque step changes omega by about 0.4 rad/s, hence the velocity radius 0.4).
    MUJOCO_REACHER_ID: {
        "far_fingertip": UnseenGoalTask(
            "far_fingertip", f"fingertip at ({_MJ_FAR:.4f}, {_MJ_FAR:.4f}), the arm stretched out (||tip - c|| < 0.02); ends there",
            functools.partial(_fingertip_reward, center=(_MJ_FAR, _MJ_FAR), radius=0.02, links=_MJ_LINKS),
            functools.partial(_fingertip_ball, center=(_MJ_FAR, _MJ_FAR), radius=0.02, links=_MJ_LINKS)),
        "target_angle": _ball_task("target_angle", "joint angles theta = (0, 2.5) (||theta - c|| < 0.2, theta1 wrapped); ends there",
                                   (0, 1), (0.0, 2.5), 0.2, periodic=(True, False)),
        "target_velocity": _ball_task("target_velocity", "joint velocities omega = (2, 2) (||omega - c|| < 0.4); ends there",
                                      (2, 3), (2.0, 2.0), 0.4),
    },
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


@torch.no_grad()
def rollout_returns(q: GridQ, dynamics: Any, task: UnseenGoalTask, starts: torch.Tensor, gamma: float,
                    horizon: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll the greedy policy of ``q`` (goal 0) out on the true ``dynamics``.

    Args:
        q: planned Q.
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
        a = q.greedy(s, 0)
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


_STAR_CACHE: dict[tuple, dict] = {}


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
    **vi_kwargs: Any,
) -> dict:
    """Plan for an unseen goal inside a world model and score it on the true dynamics.

    Args:
        problem: the env's ``ContinuousProblem`` or env id (default kwargs).
        task_name: a key of ``UNSEEN_GOAL_TASKS[env_id]``.
        model_step: the world model, ``(states [n, d], actions [n]) -> [n, d]`` (or
            weighted branches ``([K, n, d], [K])``), called on grid points.
        gamma: discount.
        grid_shape: planning grid (default ``DEFAULT_GRID_SHAPES[env_id]``, over
            ``PLAN_BOXES[env_id]`` where given, else the state box).
        num_resets: start states from the env's reset distribution.
        seed: of the start states and the true dynamics' noise.
        horizon: rollout length (default: the env's ``max_episode_steps``).
        **vi_kwargs: passed to :func:`qworld.bellman_grid.grid_q`.

    Returns:
        ``{return_wm, return_star, return_ratio, plan_success, "star/plan_success"}``
        (means over the resets; R* is cached per env, task, grid and seed).
    """
    if isinstance(problem, str):
        problem = make_continuous_problem(problem)
    env_tasks = UNSEEN_GOAL_TASKS.get(problem.env_id, {})
    if task_name not in env_tasks:
        raise ValueError(f"unknown unseen-goal problem {task_name!r} for {problem.env_id}; known: {sorted(env_tasks)}")
    goal_task = env_tasks[task_name]
    dyn = problem.dynamics
    grid = planning_grid(problem, grid_shape)
    grid_shape = grid.shape
    horizon = int(horizon or problem.max_episode_steps)

    def evaluate(q: GridQ) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(seed)
        starts = dyn.reset_states(num_resets, gen)
        ret, succ = rollout_returns(q, dyn, goal_task, starts, gamma, horizon, gen)
        return float(ret.mean()), float(succ.double().mean())

    # start_states only changes where training episodes start, not R*
    kwargs_key = repr(sorted((k, repr(v)) for k, v in problem.env_kwargs.items() if k != "start_states"))
    key = (problem.env_id, kwargs_key, task_name, grid_shape, float(gamma), num_resets, seed, horizon,
           repr(sorted(vi_kwargs.items())))
    if key not in _STAR_CACHE:
        def true_step(s, a):
            return dyn.branches(s, a)

        q_star = plan_in(true_step, goal_task, grid, gamma, dyn.num_actions, **vi_kwargs)
        r_star, succ_star = evaluate(q_star)
        _STAR_CACHE[key] = {K.RETURN_STAR: r_star, f"{K.STAR}/{K.PLAN_SUCCESS}": succ_star}
    star = _STAR_CACHE[key]
    q_wm = plan_in(model_step, goal_task, grid, gamma, dyn.num_actions, **vi_kwargs)
    r_wm, succ_wm = evaluate(q_wm)
    r_star = star[K.RETURN_STAR]
    return {K.RETURN_WM: r_wm, K.RETURN_STAR: r_star,
            K.RETURN_RATIO: r_wm / r_star if r_star > 0 else float("nan"),
            K.PLAN_SUCCESS: succ_wm, f"{K.STAR}/{K.PLAN_SUCCESS}": star[f"{K.STAR}/{K.PLAN_SUCCESS}"]}
