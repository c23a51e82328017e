"""Goal-conditioned D3G: its targets and losses by hand (no Ray), then training through Ray
on MountainCar, a checkpoint and ``load_q`` without Ray, the forward model learning the
toy Reacher's dynamics, and the family registry."""

import json
import pathlib

import numpy as np
import pytest
import torch

from qworld import metrics as K
from qworld.agents.d3g import losses as Lz

from helpers import flat  # noqa: E402
from tolerances import EPS32, forward_atol, ulps  # noqa: E402

MOUNTAIN_CAR = "qworld/MountainCar-v0"
REACHER = "qworld/Reacher-v0"


# ------------------------------------------------------------------ pure targets / losses
def test_critic_target_takes_the_min_of_the_twins_and_stops_at_terminals():
    rewards = torch.tensor([[1.0, 0.0]])
    terminals = torch.tensor([[True, False]])
    q_next = torch.tensor([[[5.0, 3.0], [2.0, 4.0]]])  # [B=1, L=2, twins]
    target = Lz.critic_target(rewards, terminals, q_next, 0.5)
    torch.testing.assert_close(target, torch.tensor([[1.0, 0.5 * 2.0]]), rtol=0, atol=0)  # dyadic: exact
    # both twins regress on the same target: (5 - 1)^2 + (3 - 1)^2 for goal 0, (2 - 1)^2 + (4 - 1)^2 for goal 1
    assert Lz.critic_loss(q_next, target).item() == (16 + 4 + 1 + 9) / 2  # small integers: exact


def test_model_losses_are_zero_exactly_for_perfect_models():
    delta, scale = torch.tensor([[0.1, -0.002]]), torch.tensor([0.1, 0.01])
    assert Lz.forward_loss(delta, delta, scale).item() == 0.0
    # errors count per dim in units of the scale: 0.1 / 0.1 and 0.01 / 0.01 -> mean of 1 and 1
    # float32: the sum and difference (<= 0.6 spacing of 1 relative to the error), a division,
    # a square and a mean: <= 4 spacings
    assert Lz.forward_loss(delta + torch.tensor([[0.1, 0.01]]), delta, scale).item() == pytest.approx(1.0, rel=ulps(4))
    confident = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]])
    # true loss log(1 + 2 e^-50) = 4e-22; float32's logsumexp rounds once at magnitude 50
    assert Lz.inverse_loss(confident, torch.tensor([0, 2])).item() == pytest.approx(0.0, abs=ulps(1, 50.0))
    assert Lz.inverse_loss(confident, torch.tensor([1, 1])).item() > 10
    # proposal: a reachable proposal (gap 0) costs -Q only
    assert Lz.tau_loss(torch.tensor([[2.0]]), torch.zeros(1, 1, 2)).item() == -2.0
    assert Lz.tau_loss(torch.tensor([[2.0]]), torch.ones(1, 1, 2)).item() == 0.0


def test_soft_update_moves_targets_by_tau():
    online, target = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        online.weight.fill_(1.0), target.weight.fill_(0.0)
    Lz.soft_update(target, online, 0.25)
    assert target.weight.item() == 0.25  # 0.25 * 1 + 0.75 * 0: exact


def test_config_names_every_bad_field_and_refuses_finite_envs():
    from qworld.agents.d3g import D3GConfig

    cfg = D3GConfig().training(policy_delay=0, gamma=1.5, hidden_sizes=[], tau_polyak=0.0)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    for field in ("policy_delay", "gamma", "hidden_sizes", "tau_polyak"):
        assert field in str(e.value)
    errors = D3GConfig().training(env_id="qworld/FourRooms-v0").qworld_errors()
    assert errors == ["env_id: 'qworld/FourRooms-v0' is finite; d3g runs on continuous envs: "
                      "['qworld/MountainCar-v0', 'qworld/MujocoReacher-v0', 'qworld/Reacher-v0']"]
    assert D3GConfig().training(env_id=REACHER).qworld_errors() == []


def test_unobserve_inverts_each_continuous_envs_observation():
    import qworld_envs
    from qworld.agents.d3g.unobserve import round_trip_error

    for env_id in (MOUNTAIN_CAR, REACHER):
        # float32 observe then unobserve: ~2 roundings each way at |s| <= 4 (p in [-1.2, 0.6],
        # angles in [-pi, pi], speeds <= 3)
        assert round_trip_error(qworld_envs.make_continuous_problem(env_id)) < ulps(4, 4.0), env_id


# ------------------------------------------------------------------ through Ray
def restart_ray():
    """Ray as conftest's ``ray_session`` starts it (after a test shut it down)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}})


def tiny_config(**overrides):
    from qworld.agents.d3g import D3GConfig

    kw = dict(env_id=MOUNTAIN_CAR, num_envs=2, rollout_length=16, learning_starts=32, batch_size=16,
              updates_per_iteration=8, total_env_steps=2000, hidden_sizes=[32, 32])
    kw.update(overrides)
    return D3GConfig().training(**kw).debugging(seed=0)


def test_d3g_trains_checkpoints_and_load_q_restores_without_ray(ray_session, tmp_path):
    from qworld.agents import load_q
    from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer

    algo = tiny_config().build_algo()
    try:
        module = algo.live_module()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        results = [algo.train() for _ in range(3)]
        last = flat(results[-1])
        steps = last["env_runners/num_env_steps_sampled_lifetime"]
        assert 96 <= steps <= 100 and algo.env_steps_sampled() == steps  # 3 x 2 envs x 16 steps
        assert isinstance(algo.replay_buffer, EpisodeReplayBuffer) and algo.replay_buffer.get_num_timesteps() == steps
        for key in (K.TRAIN_LOSS, K.TRAIN_Q_MEAN, K.TRAIN_EPSILON):
            assert key in last and np.isfinite(last[key]), key
        for key in ("forward_loss", "inverse_loss", "tau_loss"):
            assert np.isfinite(last[f"learners/default_policy/{key}"]), key
        state = module.state_dict()
        for name in ("critic.q1.0.weight", "tau.0.weight", "forward_model.0.weight", "inverse_model.0.weight",
                     "target_critic.q2.0.weight", "target_tau.0.weight"):
            assert not torch.equal(state[name], before[name]), name
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        live = algo.q_function()
        rng = np.random.default_rng(0)
        obs = rng.uniform(-1, 1, size=(6, 2)).astype(np.float32)
        goals = np.array([0, 1, 2, 3, 0, 1])
        states = torch.as_tensor(rng.uniform([-1.2, -0.07], [0.6, 0.07], size=(6, 2)))
        actions = torch.tensor([0, 1, 2, 0, 1, 2])
        q_live, qg_live = live.q(obs), live.q(obs, goals)
        model_live = live.module.forward_model_states(states, actions)
    finally:
        algo.stop()
    ray_session.shutdown()
    try:
        q = load_q(path)
        assert not ray_session.is_initialized()
    finally:
        restart_ray()
    np.testing.assert_array_equal(q.q(obs), q_live)
    np.testing.assert_array_equal(q.q(obs, goals), qg_live)
    assert q.q(obs).shape == (6, 4, 3) and np.isfinite(q_live).all()
    # the critic on [B, A] rows against [B, L, A] (the forward model runs on the same batch):
    # 3 Linear layers, fan-in <= 32, summed in another order (tolerances.forward_atol)
    np.testing.assert_allclose(q.q(obs, goals), q_live[np.arange(6), goals], rtol=0,
                               atol=forward_atol(q_live, depth=3, width=32))
    model = q.module.forward_model_states(states, actions)
    torch.testing.assert_close(model, model_live, rtol=0, atol=0)
    assert model.shape == (6, 2) and model.dtype == torch.float64
    c = q.config
    assert c["algorithm"] == "d3g" and c["env_id"] == MOUNTAIN_CAR and c["finite"] is False
    assert c["num_goals"] == 4 and c["env_steps"] == steps and c["policy_delay"] == 2
    json.dumps(c)

    # the trial's experience: every sampled transition, true dynamics from info["state"]
    from qworld.worldmodel.experience import load_experience
    from qworld.worldmodel.scoring_continuous import true_mean_fn
    from qworld.sweep.score import score_checkpoint
    from qworld_envs import make_continuous_problem

    log = load_experience(path)
    assert log.num_transitions == steps and len(log.states) == steps
    dyn = make_continuous_problem(MOUNTAIN_CAR).dynamics
    true_next = true_mean_fn(dyn)(torch.as_tensor(log.states, dtype=torch.float64), torch.as_tensor(log.actions))
    # the log keeps float32: s' rounded once (half a spacing of |s'|) and s rounded once before
    # the float64 step, which passes it on with gain <= 1.0075 (p' = p + v', v' has 0.0075
    # sin 3p): <= 2 spacings at each dimension's own magnitude
    true_next = true_next.numpy()
    worst = np.abs(log.next_states - true_next).max(axis=0) / (EPS32 * np.abs(true_next).max(axis=0))
    assert (worst <= 2).all(), worst  # in spacings at each dimension's magnitude
    ckpt = tmp_path / "checkpoint_000000"
    pathlib.Path(path).rename(ckpt)
    rows = score_checkpoint(ckpt, sweep="s", trial_id="t", methods=["forward_model", "supervised"],
                            options={K.Q_NMSE: {"grid_shape": None}, "supervised": {"steps": 20, "batch_size": 64}})
    by = {r[K.METHOD]: r for r in rows}
    assert all(r[K.ERROR] is None for r in rows), [r[K.ERROR] for r in rows]
    assert by["forward_model"][K.ALGORITHM] == "d3g" and np.isfinite(by["forward_model"][K.WM_NMSE])
    # rare states: the scorer's 4096 uniform states (seed 0) with no experienced state within
    # 5% of the box; 96 steps from MountainCar's reset (p in [-0.6, -0.4], v near 0) cover a
    # few % of the box, so nearly all of them, but not all, are rare
    from qworld.worldmodel.experience import rare_state_mask

    uniform = dyn.uniform_states(4096, torch.Generator().manual_seed(0))
    rare = rare_state_mask(uniform, log.states, dyn.low, dyn.high).mean()
    assert by["supervised"][f"{K.RARE}/{K.FRACTION}"] == pytest.approx(rare, rel=0, abs=1 / 4096)
    assert 0.9 < rare < 1.0


def test_forward_model_learns_the_true_dynamics(ray_session):
    """~250 gradient steps on the toy Reacher: the Delta-s error of f on fresh true
    transitions from the reset distribution falls well below the identity model's."""
    import qworld_envs

    dyn = qworld_envs.make_continuous_problem(REACHER).dynamics
    gen = torch.Generator().manual_seed(1)
    s = dyn.reset_states(512, gen)
    a = torch.randint(dyn.num_actions, (512,), generator=gen)
    true_delta = dyn.delta(dyn.step(s, a), s)
    algo = tiny_config(env_id=REACHER, num_envs=4, learning_starts=64, batch_size=64, updates_per_iteration=32,
                       total_env_steps=100_000, hidden_sizes=[64, 64]).build_algo()
    try:
        module = algo.live_module()
        scale = module.delta_scale.double()

        def mse(pred_delta):
            return float(((pred_delta - true_delta) / scale).square().mean())

        identity = mse(torch.zeros_like(true_delta))
        for _ in range(9):
            algo.train()
        learned = mse(dyn.delta(module.forward_model_states(s, a), s))
    finally:
        algo.stop()
    assert learned < 0.25 * identity, (learned, identity)


# ------------------------------------------------------------------ family registry
def test_family_d3g_builds_and_refuses_a_finite_env():
    from qworld.agents.d3g import D3G, D3GConfig
    from qworld.agents.families import family

    fam = family("d3g")
    assert fam.algo_class() is D3G and fam.config_class() is D3GConfig
    assert {"policy_delay", "tau_polyak", "hidden_sizes", "gamma", "lr"} <= set(fam.keywords())
    cfg = fam.build_config(REACHER, {"num_goals": 3}, {"policy_delay": 3}, total_env_steps=5000)
    assert cfg.qworld_errors() == [] and cfg.total_env_steps == 5000
    assert cfg.qworld_config()["num_goals"] == 3 and cfg.qworld_config()["algorithm"] == "d3g"
    bad = fam.build_config("qworld/FourRooms-v0", {}, {})
    assert any("is finite; d3g runs on continuous envs" in e for e in bad.qworld_errors())


def test_config_round_trips_through_a_tune_style_dict():
    from qworld.agents.d3g import D3G, D3GConfig

    cfg = D3GConfig().training(env_id=REACHER, policy_delay=3, hidden_sizes=(64, 32), gamma=0.9, lr=1e-3)
    back = D3G.get_default_config().update_from_dict(cfg.debugging(seed=3).to_dict())
    assert back.qworld_config() == cfg.qworld_config()
    assert back.policy_delay == 3 and back.hidden_sizes == [64, 32] and back.gamma == 0.9 and back.lr == 1e-3
    assert back.env_id == REACHER and back.seed == 3


# ------------------------------------------------------------------ checkpoint: buffer and counters
def test_restored_d3g_goes_on_exactly_as_the_uninterrupted_run(ray_session, tmp_path):
    """Save after 2 iterations, restore into a fresh Algorithm (``from_checkpoint``) and hand it
    the episodes the uninterrupted run sampled next (RLlib keeps no env state): its next 2
    iterations' losses are the uninterrupted run's, bit for bit (the same float32 operations
    on the same values in the same order). Needs the buffer with its sampling generator and
    the gradient-step count: with ``policy_delay`` 3 the proposal steps are 18, 21, ... after
    the 16 steps before the save (a count restarted at 0 would step it at 0, 3, ...). With
    ``checkpoint_replay_buffer`` False the checkpoint leaves the buffer out (the counters
    stay) and the restored trial starts with an empty one."""
    import copy

    from qworld.agents.d3g import D3G
    from qworld.agents.d3g import learner as LR

    keys = (LR.TOTAL_LOSS_KEY, LR.CRITIC_LOSS_KEY, LR.FORWARD_LOSS_KEY, LR.INVERSE_LOSS_KEY, LR.TAU_LOSS_KEY,
            LR.Q_MEAN_KEY)

    def losses(result):
        out = {k: flat(result).get(f"learners/default_policy/{k}") for k in keys}
        assert all(v is not None for v in out.values()), out
        return out

    algo = tiny_config(policy_delay=3).build_algo()
    rollouts: list = []
    try:
        for _ in range(2):
            algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        held = algo.replay_buffer.get_num_timesteps()
        real = algo.sample_episodes

        def recorded():
            out = real()
            rollouts.append(copy.deepcopy(out))
            return out

        algo.sample_episodes = recorded
        want = [losses(algo.train()) for _ in range(2)]
    finally:
        algo.stop()
    restored = D3G.from_checkpoint(path)
    try:
        assert restored.replay_buffer.get_num_timesteps() == held >= 64
        queue = iter(rollouts)
        restored.sample_episodes = lambda: copy.deepcopy(next(queue))
        got = [losses(restored.train()) for _ in range(2)]
    finally:
        restored.stop()
    assert got == want

    # the knob: no buffer in the checkpoint, the counters still there
    algo = tiny_config(policy_delay=3, checkpoint_replay_buffer=False).build_algo()
    try:
        for _ in range(2):
            algo.train()
        light = algo.save_to_path(str(tmp_path / "light"))
    finally:
        algo.stop()
    restored = D3G.from_checkpoint(light)
    try:
        assert restored.replay_buffer.get_num_timesteps() == 0
        assert [r.get() for r in restored.learner_group.foreach_learner(lambda l: l._grad_steps)] == [16]
    finally:
        restored.stop()
    state_bytes = lambda p: (pathlib.Path(p) / "algorithm_state.pkl").stat().st_size  # noqa: E731
    # >= 64 rows of a 2-float32 state, an int32 action, 4 float32 rewards, 4 bool terminals,
    # an int32 successor and an int64 stamp (44 bytes) more with the buffer
    assert state_bytes(path) - state_bytes(light) >= 64 * 44
