"""The model-predictive planner (``planner="mpc"``) of ``qworld.worldmodel.planning_continuous``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from qworld import metrics as K
from qworld.worldmodel.bellman_grid import Grid, GridQ
from qworld.worldmodel.planning_continuous import (MPCConfig, evaluate_unseen_goal, plan_and_rollout, plan_in,
                                                   planning_grid)
from qworld_envs import MOUNTAIN_CAR_ID, make_continuous_problem
from qworld_envs.continuous import ContinuousDynamics
from qworld_envs.continuous_tasks import UNSEEN_GOAL_TASKS, UnseenGoalTask, _ball

GAMMA = 0.99
DELTA = 0.1  # a point on [-1, 1] moves by -DELTA, 0 or +DELTA per step
CENTER, RADIUS = 0.33, 0.06  # the ball (0.27, 0.39): one lattice point x0 + k DELTA always lies in it
COARSE = Grid((-1.0,), (1.0,), (7,))  # spacing 0.33: few grid successors land in the ball


def _point_step(states, actions, noise=None):
    return (states + DELTA * (actions.to(states.dtype) - 1)[:, None]).clamp(-1.0, 1.0)


def _model(states, actions):
    return _point_step(states, actions)


POINT = ContinuousDynamics("point", ("x",), (-1.0,), (1.0,), (False,), 3, _point_step, lambda s, a: s,
                           lambda u: 2 * u - 1, 1, lambda s: s, (-1.0,), (1.0,))
BALL = UnseenGoalTask("ball", "|x - 0.33| < 0.06; ends there",
                      lambda s: _ball(s, (0,), (CENTER,), RADIUS).to(s.dtype), lambda s: _ball(s, (0,), (CENTER,), RADIUS))
STARTS = torch.linspace(-0.95, 0.95, 39, dtype=torch.float64)[:, None]


def _optimal_steps(starts: torch.Tensor) -> torch.Tensor:
    """Fewest steps into the ball (at least one: the reward is paid on arrival)."""
    k = torch.arange(-40, 41, dtype=torch.float64)
    inside = ((starts + DELTA * k) - CENTER).abs() < RADIUS
    return torch.where(inside, k.abs(), math.inf).amin(1).clamp_min(1)


def _steps(returns: torch.Tensor) -> torch.Tensor:
    """Steps to the goal read off a discounted sparse return (inf: never reached)."""
    return (torch.log(returns) / math.log(GAMMA) + 1).round()


def _point_q() -> GridQ:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_in(_model, BALL, COARSE, GAMMA, 3)


def test_mpc_reaches_a_ball_the_coarse_grid_misses_in_the_fewest_steps():
    q = _point_q()
    optimal = _optimal_steps(STARTS)
    ret_grid, succ_grid = plan_and_rollout(_model, POINT, BALL, COARSE, STARTS, GAMMA, 100, planner="grid", q=q)
    assert succ_grid.double().mean() < 0.5  # the grid's greedy policy misses the ball from most starts
    mpc = MPCConfig(horizon=4, samples=64, iterations=3, elites=8, replan=1)
    ret, succ = plan_and_rollout(_model, POINT, BALL, COARSE, STARTS, GAMMA, 100, planner="mpc", mpc=mpc, q=q)
    assert succ.all()
    # optimal from every start, including those up to 12 steps away: 3x the horizon, so the
    # grid's values beyond it must point the way
    assert optimal.max() >= 3 * mpc.horizon
    assert torch.equal(_steps(ret), optimal)
    # the same search without the grid's values (V = 0) stays where it is from far away
    zero_q = GridQ(torch.zeros_like(q.Q), COARSE)
    _, succ0 = plan_and_rollout(_model, POINT, BALL, COARSE, STARTS, GAMMA, 100, planner="mpc", mpc=mpc, q=zero_q)
    assert not succ0.all()
    # searching every other step only (the plan's second action in between) still gets there
    _, succ2 = plan_and_rollout(_model, POINT, BALL, COARSE, STARTS, GAMMA, 100, planner="mpc",
                                mpc=MPCConfig(horizon=4, samples=64, iterations=3, elites=8, replan=2), q=q)
    assert succ2.all()
    # deterministic given the seed
    again, _ = plan_and_rollout(_model, POINT, BALL, COARSE, STARTS, GAMMA, 100, planner="mpc", mpc=mpc, q=q)
    assert torch.equal(ret, again)


def test_sequence_returns_discount_reward_and_bootstrap_only_the_living():
    from qworld.worldmodel.planning_continuous import sequence_returns

    states = torch.tensor([[0.0], [0.1], [0.1]], dtype=torch.float64)
    actions = torch.tensor([[2, 2], [2, 2], [2, 0]])  # to 0.2; into the ball at 0.3 on step 2; to 0.2 and back

    def value(s):
        return s[:, 0] + 10

    ret = sequence_returns(_model, BALL, value, states, actions, GAMMA, torch.tensor([False]))
    expected = torch.tensor([GAMMA**2 * 10.2, GAMMA, GAMMA**2 * 10.1], dtype=torch.float64)
    assert torch.allclose(ret, expected)


def test_mpc_on_weighted_branches_takes_the_expectation():
    # two equally likely branches, one step apart: the ball is reached on average half the time
    def branches(s, a):
        nxt = _point_step(s, a)
        return torch.stack([nxt, (nxt + DELTA).clamp(-1, 1)]), torch.tensor([0.5, 0.5], dtype=s.dtype)

    q = _point_q()
    from qworld.worldmodel.planning_continuous import expected_step

    s = torch.tensor([[0.2]], dtype=torch.float64)
    mean, r, cont, (nxt, w) = expected_step(branches, BALL, s, torch.tensor([1]), torch.tensor([False]))
    assert nxt.shape == (2, 1, 1) and mean.item() == pytest.approx(0.25)
    assert r.item() == 0.5 and cont.item() == 0.5  # 0.2 misses the ball, 0.3 is inside
    ret, succ = plan_and_rollout(branches, POINT, BALL, COARSE, STARTS, GAMMA, 100, planner="mpc",
                                 mpc=MPCConfig(horizon=4, samples=32, iterations=2, elites=8, replan=1), q=q)
    assert succ.double().mean() > 0.9


def test_mpc_config_rejects_unknown_and_bad_fields():
    assert MPCConfig.from_options({"horizon": 5}).horizon == 5
    with pytest.raises(TypeError, match="unknown mpc options"):
        MPCConfig.from_options({"horizn": 5})
    with pytest.raises(ValueError):
        MPCConfig(samples=4, elites=8)
    with pytest.raises(ValueError):
        MPCConfig(horizon=2, replan=3)
    with pytest.raises(ValueError, match="unknown planner"):
        evaluate_unseen_goal(MOUNTAIN_CAR_ID, "fast_car", lambda s, a: s, planner="tree")


def test_mpc_return_ratio_true_model_is_one_wrong_model_lower():
    problem = make_continuous_problem(MOUNTAIN_CAR_ID)
    dyn = problem.dynamics
    opts = dict(grid_shape=(100, 100), num_resets=32, planner="mpc",
                mpc={"horizon": 4, "samples": 16, "iterations": 2, "elites": 4})
    # the grid planner's R* first: the mpc call must not read it from the cache
    grid = evaluate_unseen_goal(problem, "fast_car", lambda s, a: dyn.step_fn(s, a, None), grid_shape=(100, 100),
                                num_resets=32)
    true = evaluate_unseen_goal(problem, "fast_car", lambda s, a: dyn.step_fn(s, a, None), **opts)
    assert true[K.RETURN_RATIO] == pytest.approx(1.0)
    assert true[K.PLAN_SUCCESS] == 1.0
    task = UNSEEN_GOAL_TASKS[MOUNTAIN_CAR_ID]["fast_car"]
    gen = torch.Generator().manual_seed(0)
    starts = dyn.reset_states(32, gen)
    ret, _ = plan_and_rollout(lambda s, a: dyn.branches(s, a), dyn, task, planning_grid(problem, (100, 100)), starts,
                              GAMMA, problem.max_episode_steps, planner="mpc", mpc=opts["mpc"], generator=gen)
    assert true[K.RETURN_STAR] == pytest.approx(float(ret.mean()))
    assert true[K.RETURN_STAR] >= grid[K.RETURN_STAR] - 1e-3
    wrong = evaluate_unseen_goal(problem, "fast_car", dyn.no_force_fn, **opts)
    assert wrong[K.RETURN_RATIO] < 0.5
