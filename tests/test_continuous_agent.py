"""PQN on the continuous envs, end to end at tiny budgets: build, train, checkpoint,
``load_q``, then ``score_q`` on the checkpoint (Q NMSE, world-model
scores with their baselines, an unseen goal). Real RLlib, one local Ray session.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qworld import metrics as K
from qworld.agents.pqn import PQNConfig
from qworld_envs import MOUNTAIN_CAR_ID, MUJOCO_REACHER_ID, REACHER_ID, make_continuous_problem
from tolerances import ulps

torch.set_num_threads(1)

TINY = dict(num_envs=16, rollout_length=8, minibatch_size=64, hidden_sizes=[32], q_output="sigmoid",
            lr=1e-3, total_env_steps=2_000)


def tiny(env_id: str, env_kwargs: dict | None = None, **training) -> PQNConfig:
    kw = {**TINY, **training}
    return (PQNConfig().training(env_id=env_id, env_kwargs=env_kwargs or {}, **kw)
            .env_runners(num_env_runners=0).learners(num_learners=0).debugging(seed=0, log_level="ERROR"))


def train_and_save(config: PQNConfig, path, iterations: int = 2):
    from qworld.agents import load_q

    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(iterations)]
        ckpt = algo.save_to_path(str(path))
    finally:
        algo.stop()
    return results, load_q(ckpt)


def world_model_keys(dims) -> list[str]:
    keys = [K.WM_NMSE] + [f"{K.WM_DELTA_NMSE}_{d}" for d in dims]
    return keys + [f"{p}/{k}" for p in (K.BASELINE_IDENTITY, K.BASELINE_NO_FORCE, K.INTERIOR) for k in keys]


@pytest.fixture(scope="module")
def mountain_car_agent(ray_session, tmp_path_factory):
    config = tiny(MOUNTAIN_CAR_ID, {"goal_type": "position", "start_states": "uniform"})
    results, qfun = train_and_save(config, tmp_path_factory.mktemp("mc") / "checkpoint_000001")
    return results, qfun


def test_mountain_car_trains_through_the_fast_runner_and_loads(mountain_car_agent):
    results, qfun = mountain_car_agent
    assert results[-1]["num_env_steps_sampled_lifetime"] == 2 * 16 * 8
    assert np.isfinite(results[-1]["learner"]["td_loss"])
    c = qfun.config
    assert c["env_id"] == MOUNTAIN_CAR_ID and c["env_runner"] == "fast" and c["gamma"] == 0.99
    assert c["goal_type"] == "position" and c["num_goals"] == 4 and c["env_kwargs"]["start_states"] == "uniform"
    q = qfun.q(np.zeros((5, 2), np.float32))
    assert q.shape == (5, 4, 3) and ((q > 0) & (q < 1)).all()  # sigmoid Q


def test_fourier_encoder_features():
    from qworld.agents.pqn.module import FourierEncoder

    enc = FourierEncoder(2, 5, scale=0.5, seed=3)
    x = torch.tensor([[0.1, -0.4], [0.0, 0.0]])
    z = 2 * math.pi * (x @ enc.B)
    out = enc(x)
    assert out.shape == (2, enc.out_dim) == (2, 12)
    # the same float32 operations on the same numbers: equal
    torch.testing.assert_close(out, torch.cat([x, torch.sin(z), torch.cos(z)], -1), rtol=0, atol=0)
    assert not torch.equal(enc.B, FourierEncoder(2, 5, scale=0.5, seed=4).B)  # seeded
    torch.testing.assert_close(enc.B.std(), torch.tensor(0.5), atol=0.35, rtol=0)


def test_fourier_feature_agent_trains_and_its_checkpoint_holds_the_features(ray_session, tmp_path):
    config = tiny(MOUNTAIN_CAR_ID, {"goal_type": "position"}, fourier_features=8, fourier_scale=0.5)
    algo = config.build_algo()
    try:
        algo.train()
        live = algo.q_function()
        ckpt = algo.save_to_path(str(tmp_path / "checkpoint_000001"))
    finally:
        algo.stop()
    from qworld.agents import load_q

    qfun = load_q(ckpt)
    assert qfun.config["fourier_features"] == 8 and qfun.config["fourier_scale"] == 0.5
    assert torch.equal(qfun.module.encoder.B, live.module.encoder.B)  # restored, not recomputed
    obs = np.random.default_rng(0).uniform(-1, 1, (6, 2)).astype(np.float32)
    np.testing.assert_array_equal(qfun.q(obs), live.q(obs))  # the same weights, batch and process
    # the features are part of the differentiable Q that P-learning steps through
    s = torch.zeros(3, 2, requires_grad=True)
    qfun.module.q_all_goals(s).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_agent_q_fn_matches_load_q_and_is_differentiable_in_the_state(mountain_car_agent):
    from qworld.agents.adapter import agent_q_fn

    _, qfun = mountain_car_agent
    problem = make_continuous_problem(MOUNTAIN_CAR_ID)
    q_fn = agent_q_fn(qfun, problem)
    states = problem.dynamics.uniform_states(7, torch.Generator().manual_seed(0)).float().requires_grad_(True)
    q_all = q_fn(states, None)  # [B, L, A]
    # q_fn observes the float32 states in float32, the envs observe in float64 and round once:
    # a difference and a division against one rounding, <= 2 spacings at |obs| <= 1
    obs = problem.dynamics.observe(states.detach()).numpy()
    np.testing.assert_allclose(obs, problem.dynamics.observe(states.detach().double()).float().numpy(),
                               rtol=0, atol=ulps(2))
    # on those observations q_fn runs load_q's float32 forward pass on the same batch: equal
    np.testing.assert_array_equal(q_all.detach().numpy(), qfun.q(obs))
    goal = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    np.testing.assert_array_equal(q_fn(states, goal).detach().numpy(), qfun.q(obs, goal.numpy()))
    q_all.sum().backward()
    assert states.grad is not None and states.grad.abs().sum() > 0
    # the agent's own module is left alone: no gradients, training mode unchanged
    assert all(p.grad is None for p in qfun.module.parameters())
    with pytest.raises(ValueError):
        agent_q_fn(qfun, make_continuous_problem(MOUNTAIN_CAR_ID, num_goals=3))


def test_a_tiny_agent_on_stochastic_mountain_car_gives_a_noise_scale(ray_session, tmp_path):
    """Force noise (sigma 3): PQN trains on the noisy env, and the sampler's row carries the
    recovered noise scale of v' against the true one; the deterministic successor's has none."""
    from qworld.sweep.score import score_q

    config = tiny(MOUNTAIN_CAR_ID, {"goal_type": "position", "start_states": "uniform", "action_noise": 3.0})
    _, qfun = train_and_save(config, tmp_path / "checkpoint_000001")
    assert qfun.config["env_kwargs"]["action_noise"] == 3.0
    fit = {"steps": 30, "batch_size": 64, "lr": 2e-3, "grid_shape": [20, 20], "num_resets": 16}
    sampler, successor = score_q(qfun, {}, ["sampler", "successor"], [],
                                 {"sampler": fit, "successor": fit, "q_nmse": {"grid_shape": None}})
    assert sampler[K.ERROR] is None and successor[K.ERROR] is None
    assert 0 < sampler[f"{K.NOISE_STD_RATIO}_v"] < 100
    assert f"{K.NOISE_STD_RATIO}_v" not in successor


def test_score_q_on_a_mountain_car_checkpoint(mountain_car_agent):
    from qworld.sweep.score import score_q

    _, qfun = mountain_car_agent
    base = {K.TRIAL_ID: "t0", K.CHECKPOINT_INDEX: 1}
    options = {"successor": {"steps": 30, "batch_size": 64, "lr": 2e-3, "grid_shape": [40, 40], "num_resets": 32},
               "q_nmse": {"grid_shape": [40, 40]}}
    fits = {}
    rows = score_q(qfun, base, ["successor"], ["fast_car"], options, world_models=fits)
    assert len(rows) == 1
    row = rows[0]
    assert row[K.ERROR] is None and row[K.METHOD] == "successor" and row[K.TRIAL_ID] == "t0"
    assert np.isfinite(row[K.Q_NMSE]) and row[K.FIT_SECONDS] > 0
    for key in world_model_keys(("p", "v")):
        assert np.isfinite(row[key]), key
    # the baselines do not depend on the agent: identity's Delta NMSE is about 1, no-force's small
    assert row[f"{K.BASELINE_IDENTITY}/{K.WM_DELTA_NMSE}_v"] == pytest.approx(1.0, abs=0.05)
    assert row[f"{K.INTERIOR}/{K.BASELINE_NO_FORCE}/{K.WM_DELTA_NMSE}_v"] < 0.5
    assert 0.9 < row[f"{K.INTERIOR}/{K.FRACTION}"] < 1.0  # a few per cent hit the walls or the speed limit
    for key in (K.RETURN_RATIO, K.RETURN_WM, K.RETURN_STAR, K.PLAN_SUCCESS):
        assert np.isfinite(row[f"fast_car/{key}"]), key
    assert row[f"fast_car/{K.RETURN_STAR}"] > 0
    assert set(fits) == {"successor"}

    # W&B gets every score of the row: the world-model errors and the return ratio included
    # (catches a W&B history built from a fixed list of finite-env columns).
    import pandas as pd

    from qworld.sweep.callbacks import worldmodel_history

    bookkeeping = {*K.GRID_COLUMNS, K.CHECKPOINT_INDEX, K.CHECKPOINT_PATH, K.ENV_STEPS, K.METHOD, K.ORACLE, K.ERROR}
    scores = {k for k, v in row.items() if k not in bookkeeping and isinstance(v, (int, float))}
    assert scores and all(K.is_row_metric(k) for k in scores), sorted(k for k in scores if not K.is_row_metric(k))
    [point] = worldmodel_history(pd.DataFrame([{**row, K.ENV_STEPS: 256}]))
    assert {f"successor/{k}" for k in scores} <= set(point), sorted({f"successor/{k}" for k in scores} - set(point))
    assert {f"successor/{K.WM_NMSE}", f"successor/{K.WM_DELTA_NMSE}_v", f"successor/fast_car/{K.RETURN_RATIO}"} <= set(point)


def test_sweep_score_checkpoint_routes_continuous_envs(ray_session, tmp_path):
    from qworld.sweep.score import score_checkpoint

    config = tiny(REACHER_ID, {"num_goals": 4})
    algo = config.build_algo()
    try:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "checkpoint_000003"))
    finally:
        algo.stop()
    options = {"successor": {"steps": 10, "batch_size": 32, "grid_shape": [6, 6, 6, 6], "num_resets": 16},
               "q_nmse": {"grid_shape": [6, 6, 6, 6]}}
    rows = score_checkpoint(path, sweep="s", trial_id="r0", methods=["successor"], tasks=["far_fingertip"],
                            options=options)
    assert len(rows) == 1 and rows[0][K.ERROR] is None, rows[0].get(K.ERROR)
    row = rows[0]
    assert row[K.ENV] == REACHER_ID and row[K.GOAL_TYPE] == "fingertip" and row[K.CHECKPOINT_INDEX] == 3
    for key in world_model_keys(("theta1", "theta2", "omega1", "omega2")):
        assert np.isfinite(row[key]), key
    assert f"far_fingertip/{K.RETURN_RATIO}" in row and np.isfinite(row[K.Q_NMSE])


def test_mujoco_reacher_trains_through_the_standard_runner_and_scores(ray_session, tmp_path):
    from qworld.sweep.score import score_q

    config = tiny(MUJOCO_REACHER_ID, {}, env_runner="standard", num_envs=4, rollout_length=8, minibatch_size=16)
    results, qfun = train_and_save(config, tmp_path / "checkpoint_000000", iterations=2)
    assert qfun.config["env_runner"] == "standard" and qfun.config["env_id"] == MUJOCO_REACHER_ID
    assert results[-1]["num_env_steps_sampled_lifetime"] >= 2 * 4 * 8
    assert qfun.q(np.zeros((2, 6), np.float32)).shape == (2, 4, 9)
    options = {"successor": {"steps": 5, "batch_size": 32, "grid_shape": [4, 4, 4, 4], "num_resets": 8}}
    rows = score_q(qfun, {}, ["successor"], ["target_velocity"], options)
    row = rows[0]
    assert row[K.ERROR] is None, row[K.ERROR]
    assert K.Q_NMSE not in row  # MuJoCo: no ground-truth grid unless asked for
    for key in world_model_keys(("theta1", "theta2", "omega1", "omega2")):
        assert np.isfinite(row[key]), key
    assert f"target_velocity/{K.RETURN_RATIO}" in row and math.isfinite(row[f"target_velocity/{K.RETURN_STAR}"])


def test_mujoco_reacher_trains_through_the_fast_runner(ray_session):
    config = tiny(MUJOCO_REACHER_ID, {"start_states": "uniform"}, num_envs=4, rollout_length=8, minibatch_size=16)
    assert config.env_runner == "auto" and config.resolved_env_runner() == "fast"
    algo = config.build_algo()
    try:
        assert type(algo.env_runner).__name__ == "BatchedEnvRunner"
        results = [algo.train() for _ in range(3)]
        cfg = algo.q_function().config
    finally:
        algo.stop()
    steps = [r["num_env_steps_sampled_lifetime"] for r in results]
    assert steps == [4 * 8, 2 * 4 * 8, 3 * 4 * 8]
    assert all(np.isfinite(r["learner"]["td_loss"]) for r in results)
    assert cfg["env_runner"] == "fast" and cfg["env_id"] == MUJOCO_REACHER_ID and cfg["num_actions"] == 9


@pytest.mark.parametrize("goal_type", ["velocity", "gaussian"])
def test_mountain_car_goal_families_build_and_train(ray_session, goal_type):
    q_output = "linear" if goal_type == "gaussian" else "sigmoid"  # gaussian returns exceed 1
    algo = tiny(MOUNTAIN_CAR_ID, {"goal_type": goal_type}, q_output=q_output).build_algo()
    try:
        result = algo.train()
        cfg = algo.q_function().config
    finally:
        algo.stop()
    assert result["num_env_steps_sampled_lifetime"] == 16 * 8
    assert cfg["goal_type"] == goal_type and cfg["goal_dim"] == (2 if goal_type == "gaussian" else 1)


def test_auto_runner_keeps_cpu_only_mujoco_off_a_gpu_learner():
    from qworld.agents.pqn import PQNConfig

    cfg = PQNConfig().training(env_id="qworld/MujocoReacher-v0")
    assert cfg.resolved_env_runner() == "fast"
    cfg.learners(num_gpus_per_learner=1)
    assert cfg.resolved_env_runner() == "standard"
    cfg = PQNConfig().training(env_id="qworld/MountainCar-v0").learners(num_gpus_per_learner=1)
    assert cfg.resolved_env_runner() == "fast"
