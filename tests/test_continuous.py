"""Continuous envs (MountainCar, toy Reacher, MuJoCo Reacher), grid ground truth,
P-learning of a successor network from ground-truth Q, and planning on unseen goals."""

from __future__ import annotations

import math
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from qworld import metrics as K
from qworld.worldmodel.planning_continuous import evaluate_unseen_goal, policy_returns
from qworld.worldmodel.bellman_grid import Grid, GridQ, grid_q, grid_q_for_problem
from qworld.worldmodel.plearn.continuous import GaussianSuccessor, PLearnConfig, SuccessorNet, m_values, p_learn
from qworld.worldmodel.scoring_continuous import noise_std_scores, score_successor, score_world_model
from qworld_envs import MOUNTAIN_CAR_ID, MUJOCO_REACHER_ID, REACHER_ID, has_batched, make_batched, make_continuous_problem
from qworld_envs.continuous_tasks import UNSEEN_GOAL_TASKS
from qworld_envs.mountain_car import mountain_car_step
from qworld_envs.mujoco_reacher import mujoco_reacher_step
from qworld_envs.reacher import fingertip, reacher_step
from tolerances import EPS32, ulps

torch.set_num_threads(1)
GAMMA = 0.99


@pytest.fixture(scope="module")
def mc_problem():
    return make_continuous_problem(MOUNTAIN_CAR_ID)


@pytest.fixture(scope="module")
def mc_grid_q(mc_problem):
    Q, grid = grid_q_for_problem(mc_problem, (200, 200), GAMMA)
    return Q, grid


# --------------------------------------------------------------------------------------
# envs
# --------------------------------------------------------------------------------------
def test_mountain_car_step_matches_gymnasium():
    env = gymnasium.make("MountainCar-v0").unwrapped
    rng = np.random.default_rng(0)
    n = 3000
    states = np.stack([rng.uniform(-1.2, 0.6, n), rng.uniform(-0.07, 0.07, n)], 1)
    states[:30, 0], states[30:60, 0] = -1.2, 0.6  # both walls
    states[60:90, 1], states[90:120, 1] = 0.07, -0.07  # both speed limits
    states[120:150] = [-1.19, -0.05]  # hits the left wall moving left: v set to 0
    actions = rng.integers(0, 3, n)
    ref = np.empty_like(states)
    for i in range(n):
        env.state = states[i].copy()
        env.step(int(actions[i]))
        ref[i] = env.state
    out = mountain_car_step(torch.as_tensor(states), torch.as_tensor(actions)).numpy()
    # torch.cos and math.cos may differ in the last bit of a few results
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-15)
    assert (out[120:150, 1] == 0).all() and (out[120:150, 0] == -1.2).all()

    # whole episodes from gymnasium's own reset agree too
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        s = torch.as_tensor(np.asarray(env.state, dtype=np.float64))[None]
        for t in range(200):
            a = int(rng.integers(3))
            env.step(a)
            s = mountain_car_step(s, torch.tensor([a]))
            np.testing.assert_allclose(s[0].numpy(), np.asarray(env.state, dtype=np.float64), rtol=0, atol=1e-12)


def test_reacher_step_and_fingertip():
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.pi - 0.01, 0.0, 1.0, 0.0], [0.0, 0.0, 2.99, -2.99]], dtype=torch.float64)
    a = torch.tensor([8, 4, 8])  # (+1, +1), (0, 0), (+1, +1)
    s2 = reacher_step(s, a)
    np.testing.assert_allclose(s2[0].numpy(), [0.0025, 0.0025, 0.05, 0.05], atol=1e-15)
    assert -math.pi <= s2[1, 0] < -math.pi + 0.05  # wrapped
    assert s2[2, 2] == 3.0 and s2[2, 3] == pytest.approx(-2.94)  # clipped at max_speed 3
    np.testing.assert_allclose(fingertip(s)[0].numpy(), [2.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("env_id", [MOUNTAIN_CAR_ID, REACHER_ID, MUJOCO_REACHER_ID])
def test_check_env(env_id):
    env = gymnasium.make(env_id)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*infinity.*")  # MuJoCo's velocities are unbounded
        check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, r, term, trunc, info = env.step(0)
    L = env.unwrapped.num_goals
    assert info["rewards"].shape == (L,) and info["terminals"].shape == (L,)
    assert r == info["rewards"][info["goal"]] and term == info["terminals"][info["goal"]]
    env.close()


def test_mountain_car_goals_episode_end(mc_problem):
    goals = mc_problem.goals
    np.testing.assert_allclose(goals.centers[:, 0].numpy(), np.linspace(-1.2, 0.6, 4))
    env = gymnasium.make(MOUNTAIN_CAR_ID)
    # goal 3 (p = 0.6) is reached from (0.45, 0.06): sparse reward 1, terminated
    obs, _ = env.reset(seed=0, options={"goal": 3, "state": [0.45, 0.06]})
    obs, r, term, trunc, info = env.step(2)
    assert r == 1.0 and term and info["success"] and info["terminals"][3]
    # no termination at p = 0.5 for another goal, and truncation at 200 steps
    env.reset(seed=0, options={"goal": 0, "state": [-0.5, 0.0]})
    steps = 0
    term = trunc = False
    while not (term or trunc):
        _, _, term, trunc, _ = env.step(1)
        steps += 1
    assert trunc and not term and steps == 200
    # velocity / gaussian variants: documented scales, gaussian never terminates
    vel = make_continuous_problem(MOUNTAIN_CAR_ID, goal_type="velocity", reward="gaussian")
    assert vel.goals.threshold == 0.01 and vel.goals.sigma[0] == pytest.approx(0.1 * 0.14 / 1.8)
    r, done = vel.goals.rewards_terminals(torch.tensor([[0.0, 0.07]], dtype=torch.float64))
    assert r[0, 3] == pytest.approx(1.0) and not done.any()
    with pytest.raises(TypeError):
        make_continuous_problem(MOUNTAIN_CAR_ID, bogus=1)


@pytest.mark.parametrize("env_id", [MOUNTAIN_CAR_ID, REACHER_ID, MUJOCO_REACHER_ID])
def test_batched_matches_gym_env(env_id):
    assert has_batched(env_id)
    n = 6
    benv = make_batched(env_id, n, seed=0)
    out = benv.reset(seed=1)
    assert out["obs"].shape == (n, benv.obs_dim) and benv.goal_features.shape == (benv.num_goals, benv.goal_dim)
    start, goal = benv.state.clone(), benv.goal.clone()
    gym_envs = [gymnasium.make(env_id) for _ in range(n)]
    # Observations and rewards are float32 roundings of float64 values: where both envs run the
    # same torch functions those agree, and two roundings of them lie within one spacing
    # (rtol EPS32); MuJoCo's float64 states agree to 1e-6 (its constraint solver, see
    # test_batched_mujoco_matches_gym_env_states), passed on with gain <= 1
    tol = dict(rtol=EPS32, atol=1e-6 if env_id == MUJOCO_REACHER_ID else 0.0)
    for i, e in enumerate(gym_envs):
        obs, _ = e.reset(seed=i, options={"goal": int(goal[i]), "state": start[i].numpy()})
        np.testing.assert_allclose(obs[: benv.obs_dim], out["obs"][i].numpy(), **tol)
    rng = np.random.default_rng(0)
    alive = np.ones(n, bool)
    for _ in range(60):
        acts = rng.integers(benv.num_actions, size=n)
        step = benv.step(torch.as_tensor(acts))
        for i, e in enumerate(gym_envs):
            if not alive[i]:
                continue
            obs, r, term, trunc, info = e.step(int(acts[i]))
            np.testing.assert_allclose(obs[: benv.obs_dim], step["next_obs"][i].numpy(), **tol)
            np.testing.assert_allclose(info["rewards"], step["rewards"][i].numpy(), **tol)
            np.testing.assert_array_equal(info["terminals"], step["terminals"][i].numpy())
            assert (r, term, trunc) == (float(step["reward"][i]), bool(step["terminated"][i]), bool(step["truncated"][i]))
            alive[i] = not (term or trunc)


@pytest.mark.parametrize("start_states", ["reset", "uniform"])
def test_batched_mujoco_matches_gym_env_states(start_states):
    # Gaussian goals never terminate and the time limit is out of reach, so benv.state is
    # s' of every env at every step and the float64 states can be compared directly.
    kw = dict(reward="gaussian", start_states=start_states, max_episode_steps=1000)
    n, steps = 8, 60
    benv = make_batched(MUJOCO_REACHER_ID, n, seed=0, **kw)
    benv.reset(seed=1)
    assert benv.state.dtype == torch.float64 and benv.device.type == "cpu"
    gym_envs = [gymnasium.make(MUJOCO_REACHER_ID, **kw) for _ in range(n)]
    for i, e in enumerate(gym_envs):
        e.reset(seed=i, options={"goal": int(benv.goal[i]), "state": benv.state[i].numpy()})
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(steps):
        acts = rng.integers(benv.num_actions, size=n)
        step = benv.step(torch.as_tensor(acts))
        assert not (step["terminated"] | step["truncated"]).any()
        for i, e in enumerate(gym_envs):
            _, r, _, _, info = e.step(int(acts[i]))
            diff = np.abs(info["state"] - benv.state[i].numpy())
            diff[0] = min(diff[0], 2 * np.pi - diff[0])  # theta1 is an angle
            worst = max(worst, float(diff.max()))
            np.testing.assert_allclose(info["rewards"], step["rewards"][i].numpy(), atol=1e-6)
            assert r == pytest.approx(float(step["reward"][i]), abs=1e-6)
    # Both simulate Reacher-v5 from the set state with the same float32 torques: equal up to
    # round-off (measured 4e-15 from reset starts); joint-limit hits of uniform starts go
    # through the constraint solver, whose warm start differs (measured 1.4e-7 in 60 steps).
    assert worst < 1e-6, worst
    for e in gym_envs:
        e.close()


def test_batched_mujoco_is_cpu_only():
    with pytest.raises(ValueError, match="device 'cpu', got 'cuda:0'"):
        make_batched(MUJOCO_REACHER_ID, 2, device="cuda:0")


def test_batched_auto_reset_and_goal_features():
    benv = make_batched(MOUNTAIN_CAR_ID, 64, seed=3, max_episode_steps=5)
    benv.reset()
    for t in range(5):
        out = benv.step(torch.full((64,), 2))
    assert out["truncated"].sum() + out["terminated"].sum() > 0
    ended = out["truncated"] | out["terminated"]
    assert (out["episode_length"][ended] > 0).all() and (out["episode_length"][~ended] == 0).all()
    p0 = benv.state[ended, 0]
    assert ((p0 >= -0.6) & (p0 <= -0.4)).all() and (benv.state[ended, 1] == 0).all()


def test_mujoco_step_function_matches_env():
    env = gymnasium.make(MUJOCO_REACHER_ID)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = torch.as_tensor(env.unwrapped._state)[None]
        a = int(rng.integers(9))
        _, _, term, trunc, info = env.step(a)
        pred = mujoco_reacher_step(s, torch.tensor([a]))[0].numpy()
        np.testing.assert_allclose(pred, info["state"], atol=1e-6)
        if term or trunc:
            env.reset()
    tip = make_continuous_problem(MUJOCO_REACHER_ID).goals.feature_fn(torch.as_tensor(info["state"])[None])[0]
    # MuJoCo's body positions are from the kinematics at the start of the last substep: close, not equal
    np.testing.assert_allclose(tip.numpy(), env.unwrapped._raw.get_body_com("fingertip")[:2], atol=1e-5)


# --------------------------------------------------------------------------------------
# grid ground truth
# --------------------------------------------------------------------------------------
def test_grid_interpolation_linear_periodic_and_gradient():
    grid = Grid((-1.0, -math.pi), (2.0, math.pi), (7, 12), (False, True))
    pts = grid.points()
    table = (3 * pts[:, :1] - 2.0)  # linear in the non-periodic dim: reproduced exactly
    s = torch.tensor([[0.123, 0.4], [1.9, -3.1], [-0.7, 3.14]], dtype=torch.float64, requires_grad=True)
    val = grid.interpolate(table, s)
    np.testing.assert_allclose(val[:, 0].detach().numpy(), 3 * s[:, 0].detach().numpy() - 2, atol=1e-12)
    val.sum().backward()
    np.testing.assert_allclose(s.grad[:, 0].numpy(), 3.0, atol=1e-12)
    # periodic: theta and theta + 2 pi interpolate alike
    t2 = torch.randn(grid.size, 3, dtype=torch.float64)
    q = torch.tensor([[0.5, 3.0]], dtype=torch.float64)
    np.testing.assert_allclose(grid.interpolate(t2, q).numpy(), grid.interpolate(t2, q + torch.tensor([0.0, 2 * math.pi], dtype=torch.float64)).numpy(), atol=1e-12)


def test_grid_q_bellman_equation(mc_problem, mc_grid_q):
    Q, grid = mc_grid_q
    assert Q.shape == (4, 200, 200, 3) and float(Q.max()) <= 1.0 + 1e-6
    q = GridQ(Q.double(), grid)
    pts = grid.points()
    dyn, goals = mc_problem.dynamics, mc_problem.goals
    for a in range(3):
        s2 = dyn.step_fn(pts, torch.full((len(pts),), a), None)
        m = m_values(q, goals, s2, None, GAMMA)  # [n, L]
        resid = (m - Q.permute(1, 2, 0, 3).reshape(-1, 4, 3)[:, :, a].double()).abs()
        # exact up to interpolating max_a Q instead of the grid's max_a Q: small, sparse
        assert float(resid.mean()) < 1e-4 and float(resid.max()) < 0.01
    # Q of the greedy policy of Q* is Q* again; a fixed policy satisfies its own equation
    greedy = Q.argmax(-1)
    Q_pi = grid_q(lambda s, a: dyn.step_fn(s, a, None), grid, lambda s: goals.rewards_terminals(s)[0],
                  lambda s: goals.rewards_terminals(s)[1], GAMMA, policy=greedy, num_actions=3)
    assert float((Q_pi - Q).abs().max()) < 1e-3
    right = torch.full((4, 200, 200), 2)
    info = {}
    Q_r = grid_q(lambda s, a: dyn.step_fn(s, a, None), grid, lambda s: goals.rewards_terminals(s)[0],
                 lambda s: goals.rewards_terminals(s)[1], GAMMA, policy=right, num_actions=3, info=info)
    assert info["residual"] < 1e-6 and bool((Q_r <= Q + 1e-5).all())
    s2 = dyn.step_fn(pts, torch.full((len(pts),), 0), None)
    r, done = goals.rewards_terminals(s2)
    v_right = GridQ(Q_r.double(), grid)(s2)[..., 2]  # [n, L]
    lhs = Q_r.permute(1, 2, 0, 3).reshape(-1, 4, 3)[:, :, 0].double()
    np.testing.assert_allclose(lhs.numpy(), (r + GAMMA * (~done) * v_right).numpy(), atol=1e-4)


def test_grid_q_stochastic_branches_and_gridq_goal_index(mc_grid_q):
    Q, grid = mc_grid_q
    q = GridQ(Q, grid)
    s = torch.tensor([[-0.5, 0.0], [0.3, 0.02]], dtype=torch.float64)
    full = q(s)
    np.testing.assert_allclose(q(s, 2).numpy(), full[:, 2].numpy())
    np.testing.assert_allclose(q(s, torch.tensor([1, 3])).numpy(), full[[0, 1], [1, 3]].numpy())
    noisy = make_continuous_problem(MOUNTAIN_CAR_ID, action_noise=1.0)
    nxt, w = noisy.dynamics.branches(s, torch.tensor([2, 2]), 5)
    assert nxt.shape == (5, 2, 2) and float(w.sum()) == pytest.approx(1.0)
    mean_v = (w[:, None] * nxt[..., 1]).sum(0)
    det = mountain_car_step(s, torch.tensor([2, 2]))
    np.testing.assert_allclose(mean_v.numpy(), det[:, 1].numpy(), atol=1e-12)  # noise is symmetric, no clipping here


# --------------------------------------------------------------------------------------
# P-learning
# --------------------------------------------------------------------------------------
def _interior_states(n: int, seed: int = 1) -> torch.Tensor:
    """MountainCar states away from the walls (p in [-1.1, 0.5]): no position clipping."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    return u * torch.tensor([1.6, 0.14], dtype=torch.float64) + torch.tensor([-1.1, -0.07], dtype=torch.float64)


def test_successor_net_starts_at_identity():
    net = SuccessorNet((-1.0, -math.pi), (1.0, math.pi), (False, True), 3)
    s = torch.tensor([[0.2, 3.1], [-0.5, -3.1]])
    out = net(s, torch.tensor([0, 2]))
    assert float((out - s).detach().abs().max()) < 1e-2
    samp = GaussianSuccessor((-1.0, -1.0), (1.0, 1.0), (False, False), 3, init_std=0.1)
    x = samp.sample(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 5)
    assert x.shape == (5, 4, 2) and samp.scale_tril(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)).shape == (4, 2, 2)


def test_p_learning_recovers_mountain_car_dynamics(mc_problem, mc_grid_q):
    Q, grid = mc_grid_q
    q = GridQ(Q.float(), grid)
    cfg = PLearnConfig(steps=600, batch_size=256, lr=2e-3, seed=0)
    fit = p_learn(q, mc_problem, GAMMA, cfg)
    scores = score_world_model(fit.step_fn(), mc_problem, states=_interior_states(4096))
    dv = f"{K.WM_DELTA_NMSE}_v"
    assert scores[dv] < 0.5 * scores[f"{K.BASELINE_NO_FORCE}/{dv}"]
    assert scores[dv] < 0.5 * scores[f"{K.BASELINE_IDENTITY}/{dv}"]
    assert scores[K.WM_NMSE] < scores[f"{K.BASELINE_IDENTITY}/{K.WM_NMSE}"]


def test_p_learning_with_annealed_noise_recovers_mountain_car_dynamics(mc_problem, mc_grid_q):
    Q, grid = mc_grid_q
    cfg = PLearnConfig(steps=600, batch_size=256, lr=2e-3, seed=0, anneal_noise=1.0)
    fit = p_learn(GridQ(Q.float(), grid), mc_problem, GAMMA, cfg)
    scores = score_world_model(fit.step_fn(), mc_problem, states=_interior_states(4096))
    dv = f"{K.WM_DELTA_NMSE}_v"
    assert scores[dv] < 0.5 * scores[f"{K.BASELINE_NO_FORCE}/{dv}"]
    assert scores[K.WM_NMSE] < scores[f"{K.BASELINE_IDENTITY}/{K.WM_NMSE}"]
    for bad in (dict(anneal_noise=-1.0), dict(anneal_fraction=0.0), dict(anneal_fraction=1.5)):
        with pytest.raises(ValueError, match="anneal"):
            PLearnConfig(**bad)


def test_smoothed_indicator_scales_with_the_goal_radius():
    for goal_type, dim in (("position", 0), ("velocity", 1)):
        goals = make_continuous_problem(MOUNTAIN_CAR_ID, goal_type=goal_type).goals
        a = float(goals.threshold)
        c = goals.centers[1].double()
        s = torch.zeros(3, 2, dtype=torch.float64)
        s[:, 1 - dim] = 0.0 if dim == 0 else -0.5  # the other coordinate is masked out of the distance
        s[:, dim] = c[0] + torch.tensor([0.0, a, 0.9 * a], dtype=torch.float64)
        r, done = goals.rewards_terminals(s, smooth=0.1)
        expect = torch.sigmoid(torch.tensor([10.0, 0.0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(r[:, 1], expect)
        torch.testing.assert_close(done[:, 1], expect)


def test_smoothed_p_learning_fits_mountain_car_closer(mc_problem, mc_grid_q):
    Q, grid = mc_grid_q
    states = _interior_states(4096)
    dv = f"{K.WM_DELTA_NMSE}_v"
    got = {}
    for smooth in (None, 0.1):
        cfg = PLearnConfig(steps=600, batch_size=256, lr=2e-3, seed=0, smooth=smooth)
        fit = p_learn(GridQ(Q.float(), grid), mc_problem, GAMMA, cfg)
        got[smooth] = score_world_model(fit.step_fn(), mc_problem, states=states)
    assert got[0.1][dv] < 0.1 * got[0.1][f"{K.BASELINE_NO_FORCE}/{dv}"]
    assert got[0.1][dv] < got[None][dv], got


def test_sampler_recovers_mountain_car_force_noise():
    # force noise std 3 x 0.001: v' gets N(0, 0.003^2) on top of the mean step
    problem = make_continuous_problem(MOUNTAIN_CAR_ID, action_noise=3.0)
    Q, grid = grid_q_for_problem(problem, (100, 100), GAMMA)  # 5-point Gauss-Hermite over the noise
    cfg = PLearnConfig(steps=600, batch_size=256, lr=2e-3, loss="l2", seed=0)
    fit = p_learn(GridQ(Q.float(), grid), problem, GAMMA, cfg, stochastic=True)
    states = _interior_states(4096)
    scores = score_world_model(fit.step_fn(), problem, states=states)
    dv = f"{K.WM_DELTA_NMSE}_v"
    assert scores[dv] < scores[f"{K.BASELINE_NO_FORCE}/{dv}"]
    ratio = noise_std_scores(fit.model.std, problem)[f"{K.NOISE_STD_RATIO}_v"]
    assert 0.3 < ratio < 2.0  # measured 0.65 at this budget, 1.1 with 1500 steps on 200 x 200
    # the score reads the model's scale: a model 3x too noisy is 3x off
    assert noise_std_scores(lambda s, a: 3 * fit.model.std(s, a), problem)[f"{K.NOISE_STD_RATIO}_v"] == \
        pytest.approx(3 * ratio, rel=ulps(1))  # 3 x float32 std rounds once (EPS32 / 2), then float64


def test_score_successor_keys_and_perfect_model(mc_problem):
    dyn = mc_problem.dynamics
    s = _interior_states(512)
    a = torch.randint(3, (512,), generator=torch.Generator().manual_seed(0))
    true = lambda x, u: dyn.step_fn(x, u, None)  # noqa: E731
    out = score_successor(true, true, s, a, no_force_fn=dyn.no_force_fn, state_names=dyn.state_names)
    assert out[K.WM_NMSE] == 0 and out[f"{K.WM_DELTA_NMSE}_v"] == 0
    assert out[f"{K.BASELINE_IDENTITY}/{K.WM_DELTA_NMSE}_v"] > 0.9
    assert 0 < out[f"{K.BASELINE_NO_FORCE}/{K.WM_DELTA_NMSE}_v"] < 1


# --------------------------------------------------------------------------------------
# planning on unseen goals
# --------------------------------------------------------------------------------------
def test_unseen_goal_return_ratio(mc_problem):
    assert set(UNSEEN_GOAL_TASKS[MOUNTAIN_CAR_ID]) == {"fast_car", "gentle_car", "shortest_path"}
    assert set(UNSEEN_GOAL_TASKS[REACHER_ID]) == {"far_fingertip", "target_angle", "target_velocity"}
    dyn = mc_problem.dynamics
    true = evaluate_unseen_goal(mc_problem, "fast_car", lambda s, a: dyn.step_fn(s, a, None), num_resets=128)
    assert true[K.RETURN_RATIO] == pytest.approx(1.0)
    assert true[K.PLAN_SUCCESS] == 1.0
    # R* is pinned to the planning grid's own value at the same start states (catches R* read
    # off a wrong rollout: another horizon, discount or start distribution); paper: R* = 0.436.
    from qworld.worldmodel.planning_continuous import plan_in, planning_grid

    fast_car = UNSEEN_GOAL_TASKS[MOUNTAIN_CAR_ID]["fast_car"]
    q_star = plan_in(lambda s, a: dyn.branches(s, a), fast_car, planning_grid(mc_problem), GAMMA, dyn.num_actions)
    starts = dyn.reset_states(128, torch.Generator().manual_seed(0))
    v_star = q_star(starts, torch.zeros(128, dtype=torch.long)).amax(-1).mean()
    assert true[K.RETURN_STAR] == pytest.approx(float(v_star), rel=0.03)
    wrong = evaluate_unseen_goal(mc_problem, "fast_car", dyn.no_force_fn, num_resets=128)
    assert wrong[K.RETURN_RATIO] < 0.5
    # a model with the push reversed plans badly too
    flipped = evaluate_unseen_goal(mc_problem, "shortest_path", lambda s, a: dyn.step_fn(s, 2 - a, None), num_resets=128)
    assert flipped[K.RETURN_RATIO] < 0.9


def test_policy_returns_is_the_value_of_the_agent_s_own_greedy_policy(mc_problem, mc_grid_q):
    Q, grid = mc_grid_q
    q = GridQ(Q, grid)
    out = policy_returns(q, mc_problem, GAMMA, num_resets=128)
    # the exact Q's greedy policy reaches every one of the 4 goals from every reset, and its
    # return is the grid's own V* at the same starts (catches a wrong goal per rollout, another
    # discount, horizon or start distribution)
    assert out[K.POLICY_SUCCESS] == 1.0
    starts = mc_problem.dynamics.reset_states(128, torch.Generator().manual_seed(0))
    v_star = float(q.values(starts.double()).mean())  # mean over resets and goals
    assert out[K.POLICY_RETURN] == pytest.approx(v_star, rel=0.03)
    # each goal is commanded with its own index: goal 3's policy run for every goal fails some
    wrong_goal = policy_returns(lambda s, g: q(s, torch.full_like(g, 3)), mc_problem, GAMMA, num_resets=128)
    assert wrong_goal[K.POLICY_SUCCESS] < 0.9
    # never pushing (action 1) cannot climb to the far goals
    idle = policy_returns(lambda s, g: torch.nn.functional.one_hot(torch.ones_like(g), 3).float(),
                          mc_problem, GAMMA, num_resets=128)
    assert idle[K.POLICY_RETURN] < 0.5 * out[K.POLICY_RETURN]


# --------------------------------------------------------------------------------------
# goal families, start states, interior transitions, model agreement, MuJoCo unseen goals
# --------------------------------------------------------------------------------------
def test_mountain_car_observation_is_scaled_and_gaussian_goals_cover_the_box():
    problem = make_continuous_problem(MOUNTAIN_CAR_ID)
    corners = torch.tensor([[-1.2, -0.07], [0.6, 0.07], [-0.3, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(problem.dynamics.observe(corners).numpy(), [[-1, -1], [1, 1], [0, 0]], atol=1e-12)
    gauss = make_continuous_problem(MOUNTAIN_CAR_ID, goal_type="gaussian", num_goals=5)
    g = gauss.goals
    assert g.goal_type == "gaussian" and g.reward == "gaussian" and g.centers.shape == (5, 2)
    assert ((g.centers[:, 0] > -1.2) & (g.centers[:, 0] < 0.6) & (g.centers[:, 1].abs() < 0.07)).all()
    r, done = g.rewards_terminals(g.centers)  # each center pays 1 to its own goal, never terminal
    np.testing.assert_allclose(torch.diagonal(r).numpy(), 1.0)
    assert not done.any() and float(r.max()) <= 1.0
    # one sigma step along p (0.1) or along v (0.00778) pays exp(-1/2)
    step = g.centers[:1] + torch.tensor([[0.1, 0.0]], dtype=torch.float64)
    assert float(g.rewards_terminals(step)[0][0, 0]) == pytest.approx(math.exp(-0.5))
    with pytest.raises(ValueError):
        make_continuous_problem(MOUNTAIN_CAR_ID, goal_type="gaussian", reward="sparse")
    env = gymnasium.make(MOUNTAIN_CAR_ID, goal_type="gaussian", num_goals=3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,) and env.observation_space.contains(obs)


@pytest.mark.parametrize("env_id", [MOUNTAIN_CAR_ID, REACHER_ID])
def test_uniform_start_states_cover_the_box(env_id):
    benv = make_batched(env_id, 2000, seed=0, start_states="uniform")
    benv.reset()
    dyn = benv.problem.dynamics
    low, high = torch.tensor(dyn.low, dtype=torch.float64), torch.tensor(dyn.high, dtype=torch.float64)
    frac = (benv.state - low) / (high - low)
    assert ((frac >= 0) & (frac <= 1)).all() and (frac.mean(0) - 0.5).abs().max() < 0.05
    env = gymnasium.make(env_id, start_states="uniform")
    starts = np.stack([env.reset(seed=i)[1]["state"] for i in range(200)])
    assert starts[:, 0].std() > 0.2 * (dyn.high[0] - dyn.low[0])  # the reset range alone is much narrower for MountainCar
    with pytest.raises(ValueError):
        make_continuous_problem(env_id, start_states="everywhere")


def test_interior_mask_and_model_agreement(mc_problem):
    from qworld.worldmodel.scoring_continuous import interior_mask, model_agreement

    dyn = mc_problem.dynamics
    s = torch.tensor([[-1.19, -0.05], [-0.5, 0.0], [0.59, 0.05], [-0.5, 0.0699]], dtype=torch.float64)
    a = torch.tensor([0, 1, 2, 2])
    assert interior_mask(dyn, s, a).tolist() == [False, True, False, False]  # left wall, free, right wall, speed limit
    true = lambda x, u: dyn.step_fn(x, u, None)  # noqa: E731
    same = model_agreement(true, true, mc_problem, num_states=1024)
    assert same[K.WM_NMSE] == 0 and same[f"{K.INTERIOR}/{K.WM_DELTA_NMSE}_v"] == 0
    other = model_agreement(dyn.no_force_fn, true, mc_problem, num_states=1024)
    assert 0.1 < other[f"{K.INTERIOR}/{K.WM_DELTA_NMSE}_v"] < 0.3  # the force is about 1/6 of Delta v's variance inside
    assert other[f"{K.WM_DELTA_NMSE}_v"] < other[f"{K.INTERIOR}/{K.WM_DELTA_NMSE}_v"]  # wall bounces dominate the box


def test_mujoco_unseen_goals_and_planning_grid():
    from qworld.worldmodel.planning_continuous import PLAN_BOXES, planning_grid

    problem = make_continuous_problem(MUJOCO_REACHER_ID)
    tasks = UNSEEN_GOAL_TASKS[MUJOCO_REACHER_ID]
    assert set(tasks) == {"far_fingertip", "target_angle", "target_velocity"}
    grid = planning_grid(problem, (4, 4, 4, 4))
    assert (grid.low, grid.high) == PLAN_BOXES[MUJOCO_REACHER_ID] and grid.periodic == (True, False, False, False)
    s = torch.tensor([[math.pi / 4, 0.0, 0.0, 0.0],  # stretched at 45 degrees: the far fingertip
                      [2 * math.pi - 0.05, 2.45, 0.0, 0.0],  # theta1 wraps to -0.05: the target angle
                      [0.0, 0.0, 2.1, 1.8]], dtype=torch.float64)
    hits = torch.stack([tasks[n].terminal_fn(s) for n in ("far_fingertip", "target_angle", "target_velocity")])
    assert hits.tolist() == [[True, False, False], [False, True, False], [False, False, True]]
