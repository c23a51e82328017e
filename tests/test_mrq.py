"""Goal-conditioned MR.Q: its targets and losses by hand (no Ray), then a few iterations
through Ray on FourRooms, a checkpoint, and ``load_q`` without Ray."""

import json
import math

import numpy as np
import pytest
import torch

from qworld import metrics as K
from qworld.agents.mrq import losses as Lz

from helpers import TINY, TINY_LAYOUT, flat  # noqa: E402
from tolerances import forward_atol, ulps  # noqa: E402


# ------------------------------------------------------------------ pure targets / losses
def test_two_hot_splits_mass_so_the_expectation_is_the_value():
    bins = torch.tensor([0.0, 1.0, 2.0])
    th = Lz.two_hot(torch.tensor([0.25, 2.0, 5.0, -1.0]), bins)
    # dyadic weights of few bits: exact in float32
    torch.testing.assert_close(th, torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
                               rtol=0, atol=0)
    b = Lz.reward_bins(65)
    # float32 expm1 of the exact endpoint 10: one rounding (and expm1's own error), <= 2 spacings
    assert b.shape == (65,) and float(b[32]) == 0.0 and float(b[-1]) == pytest.approx(math.expm1(10.0), rel=ulps(2))
    x = torch.tensor([0.0, 1.0, 0.3, -2.5])
    # w_lo b_lo + w_hi b_hi in float32: ~4 roundings at the size of the two bins around x (< 4)
    torch.testing.assert_close((Lz.two_hot(x, b) * b).sum(-1), x, rtol=0, atol=ulps(4, 4.0))


def test_n_step_returns_stop_per_goal_at_its_terminal_and_at_the_windows_end():
    gamma = 0.5
    # row 0: 3 valid steps; goal 0 rewarded and terminated at step 1, goal 1 never terminates
    # row 1: only the first step is valid (the episode ended)
    rewards = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [7.0, 2.0]],
                            [[0.0, 1.0], [9.0, 5.0], [9.0, 5.0]]])
    terminals = torch.tensor([[[False, False], [True, False], [False, False]],
                              [[False, False], [False, False], [False, False]]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    ret, disc, m = Lz.n_step_returns(rewards, terminals, valid, gamma)
    # sums of small integers times powers of 1/2: exact in float32
    torch.testing.assert_close(ret, torch.tensor([[0.5, 1.0 + 0.25 * 2.0], [0.0, 1.0]]), rtol=0, atol=0)
    torch.testing.assert_close(disc, torch.tensor([[0.0, 0.125], [0.5, 0.5]]), rtol=0, atol=0)
    assert m.tolist() == [3, 1]


def test_value_target_clipped_double_q_and_huber_by_hand():
    # two heads, L=1, A=2: min over heads [1, 3] -> max over actions 3
    q_t = torch.tensor([[[[1.0, 4.0]], [[2.0, 3.0]]]])  # [B=1, 2, L=1, A=2]
    assert Lz.greedy_target_value(q_t).tolist() == [[3.0]]
    # (R + disc * Qbar * r') / r = (1 + 0.25 * 3 * 2) / 0.5 = 5
    tgt = Lz.value_target(torch.tensor([[1.0]]), torch.tensor([[0.25]]), torch.tensor([[3.0]]), 0.5, 2.0)
    assert tgt.item() == 5.0  # dyadic: exact in float32
    # Huber: |err| 0 -> 0, |err| 3 -> 3 - 0.5 = 2.5; mean over the two heads 1.25
    q = torch.tensor([[[5.0], [2.0]]])  # [B=1, 2, L=1]
    assert Lz.value_loss(q, tgt).item() == 1.25  # exact


def test_encoder_losses_by_hand_masked_by_valid_steps():
    B, H, Z, L, K_ = 1, 2, 3, 2, 3
    bins = torch.tensor([-1.0, 0.0, 1.0])
    out = Lz.encoder_losses(
        pred_zs=torch.ones(B, H, Z), target_zs=torch.zeros(B, H, Z),
        reward_logits=torch.zeros(B, H, L, K_), rewards=torch.tensor([[[1.0, 0.0], [5.0, 5.0]]]),
        pred_terminal=torch.full((B, H, L), 0.5), terminals=torch.tensor([[[True, False], [True, True]]]),
        valid=torch.tensor([[True, False]]), bins=bins,
    )
    assert out["dynamics"].item() == 1.0  # (1 - 0)^2, one valid step: exact
    # uniform logits over 3 bins: one float32 log of 3 and a mean, <= 2 spacings
    assert out["reward"].item() == pytest.approx(math.log(3.0), rel=ulps(2))
    assert out["terminal"].item() == 0.25  # (0.5 - 1)^2 and (0.5 - 0)^2: exact
    # a perfect reward prediction costs the two-hot target's entropy only
    logits = torch.log(Lz.two_hot(torch.tensor([[[1.0, 0.0]]]), bins).clamp(min=1e-12))
    perfect = Lz.encoder_losses(torch.zeros(1, 1, Z), torch.zeros(1, 1, Z), logits, torch.tensor([[[1.0, 0.0]]]),
                                torch.zeros(1, 1, L), torch.zeros(1, 1, L), torch.tensor([[True]]), bins)
    # true value log(1 + 2e-12); float32's logsumexp of logits <= 0 rounds at magnitude 1
    assert perfect["reward"].item() == pytest.approx(0.0, abs=ulps(2))


def test_config_names_every_bad_field():
    from qworld.agents.mrq import MRQConfig

    cfg = MRQConfig().training(n_step=0, gamma=1.5, enc_hidden=[], epsilon_end=2.0)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    for field in ("n_step", "gamma", "enc_hidden", "epsilon_end"):
        assert field in str(e.value)


# ------------------------------------------------------------------ through Ray
def tiny_config():
    from qworld.agents.mrq import MRQConfig

    return MRQConfig().training(
        env_kwargs=TINY, num_envs=2, rollout_length=16, learning_starts=32, batch_size=16,
        updates_per_iteration=8, target_update_freq=8, total_env_steps=2000, zs_dim=32, za_dim=8,
        zsa_dim=32, enc_hidden=[32], value_hidden=[32],
    ).debugging(seed=0)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    algo = tiny_config().build_algo()
    module = algo.learner_group._learner.module["default_policy"].unwrapped()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    results = [algo.train() for _ in range(3)]
    path = algo.save_to_path(str(tmp_path_factory.mktemp("mrq") / "ckpt"))
    yield algo, results, path, before
    algo.stop()


def test_mrq_trains_through_rllib_with_its_replay_buffer(trained):
    algo, results, _, before = trained
    from ray.rllib.utils.replay_buffers.episode_replay_buffer import EpisodeReplayBuffer

    assert isinstance(algo.replay_buffer, EpisodeReplayBuffer)
    last = flat(results[-1])
    steps = last["env_runners/num_env_steps_sampled_lifetime"]
    assert 96 <= steps <= 100  # 3 x 2 envs x 16 steps (RLlib's runner may add a step at an episode end)
    assert algo.replay_buffer.get_num_timesteps() == steps == algo.env_steps_sampled()
    for key in (K.TRAIN_LOSS, K.TRAIN_Q_MEAN, K.TRAIN_EPSILON):
        assert key in last and np.isfinite(last[key]), key
    module = algo.learner_group._learner.module["default_policy"].unwrapped()
    state = module.state_dict()
    assert not torch.equal(state["value.q1.0.weight"], before["value.q1.0.weight"])
    assert not torch.equal(state["encoder.zs_mlp.0.weight"], before["encoder.zs_mlp.0.weight"])
    # 24 gradient steps (iterations 1-3), targets hard-copied before steps 0, 8 and 16
    assert not torch.equal(state["target_value.q1.0.weight"], before["target_value.q1.0.weight"])
    # reward scale: mean |reward| of every goal over the buffer (indicator goals: rare 1s)
    assert 0.0 < float(module.reward_scale) < 1.0
    assert float(module.reward_scale) == pytest.approx(algo.buffer_reward_scale(), rel=0.5)


def test_checkpoint_holds_the_config_and_load_q_matches_the_live_module(trained):
    algo, _, path, _ = trained
    from qworld.agents import load_q

    live = algo.q_function()
    q = load_q(path)
    np.testing.assert_array_equal(q.q_table(), live.q_table())
    assert q.q_table().shape == (15, 15, 4) and np.isfinite(q.q_table()).all()
    c = q.config
    assert c["algorithm"] == "mrq" and c["head"] == "all_goals" and c["env_id"] == "qworld/FourRooms-v0"
    assert c["env_kwargs"]["layout"] == TINY_LAYOUT and c["num_goals"] == 15
    assert c["env_steps"] == algo.env_steps_sampled() >= 96
    assert c["goal_type"] == "indicator" and len(c["goal_states"]) == 15 and c["n_step"] == 3
    json.dumps(c)
    obs = np.eye(15, dtype=np.float32)[[0, 3, 7]]
    # 3 states against all 15: the same float32 network (8 accumulations deep, fan-in <= 40)
    # summed in another order, so equal up to rounding at the scale of Q (tolerances.forward_atol)
    table = q.q_table()
    np.testing.assert_allclose(q.q(obs, np.array([1, 2, 3])), table[[1, 2, 3], [0, 3, 7]], rtol=0,
                               atol=forward_atol(table, depth=8, width=40))
    assert q.q(obs).shape == (3, 15, 4)
    # its experience, from the episodes' info["state"]: every sampled transition, all true ones
    from qworld.worldmodel.experience import load_experience
    from qworld_envs import make_finite_problem

    log = load_experience(path)
    assert log.finite and log.num_transitions == log.counts.sum() == c["env_steps"]
    P = make_finite_problem("qworld/FourRooms-v0", **c["env_kwargs"]).mdp.P
    assert ((log.counts > 0) <= (P > 0)).all()


def test_continuous_env_trains_and_restores(ray_session, tmp_path):
    from qworld.agents import load_q

    cfg = tiny_config().training(env_id="qworld/MountainCar-v0", env_kwargs={})
    algo = cfg.build_algo()
    try:
        results = [algo.train() for _ in range(2)]
        assert np.isfinite(flat(results[-1])[K.TRAIN_LOSS])
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        live = algo.q_function()
    finally:
        algo.stop()
    q = load_q(path)
    assert q.config["algorithm"] == "mrq" and q.config["finite"] is False and q.num_goals == 4
    obs = np.random.default_rng(0).uniform(-1, 1, size=(5, q.module.obs_dim)).astype(np.float32)
    np.testing.assert_array_equal(q.q(obs), live.q(obs))
    assert q.q(obs).shape == (5, 4, 3)


def test_config_round_trips_through_a_tune_style_dict():
    import inspect

    from qworld.agents.mrq import MRQ, MRQConfig

    cfg = MRQConfig().training(env_kwargs=TINY, n_step=2, enc_hidden=(64, 32), gamma=0.9).debugging(seed=3)
    back = MRQ.get_default_config().update_from_dict(cfg.to_dict())
    assert back.qworld_config() == cfg.qworld_config()
    assert back.n_step == 2 and back.enc_hidden == [64, 32] and back.gamma == 0.9 and back.seed == 3
    keywords = inspect.signature(MRQConfig.training).parameters
    assert {"env_id", "n_step", "zs_dim", "epsilon_end"} <= set(keywords)


# ------------------------------------------------------------------ replay buffer (no Ray)
def runner_chunks(seed=0, envs=3, iterations=12, steps=4, max_len=9, L=2):
    """Episode chunks as RLlib's runner hands them over (per iteration, per env: the rest of
    an episode, then the next ones, cut after ``steps`` transitions), and the truth: episode
    serial -> (observations [n+1, 3], actions, rewards [n, L], terminals [n, L], ended).
    Observation ``[serial, t, env]`` names its episode and step."""
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    rng = np.random.default_rng(seed)
    truth, batches, serial = {}, [], 0

    def new_episode(env):
        nonlocal serial
        serial += 1
        n = int(rng.integers(1, max_len + 1))
        truth[serial] = dict(obs=np.array([[serial, t, env] for t in range(n + 1)], np.float32),
                             actions=rng.integers(0, 4, n), rewards=rng.normal(size=(n, L)).astype(np.float32),
                             terminals=rng.random((n, L)) < 0.3, end=rng.choice(["terminated", "truncated"]),
                             emitted=0, id=f"ep{serial}")
        return serial

    current = [new_episode(e) for e in range(envs)]
    for _ in range(iterations):
        batch = []
        for env in range(envs):
            left = steps
            while left > 0:
                ep = truth[current[env]]
                n, t = len(ep["actions"]), ep["emitted"]
                k = min(left, n - t)
                done = t + k == n
                infos = [{"rewards": [0.0] * L, "terminals": [False] * L}] + [
                    {"rewards": ep["rewards"][i].tolist(), "terminals": ep["terminals"][i].tolist()}
                    for i in range(t, t + k)]
                batch.append(SingleAgentEpisode(
                    id_=ep["id"], observations=list(ep["obs"][t : t + k + 1]), actions=list(ep["actions"][t : t + k]),
                    rewards=[0.0] * k, infos=infos, terminated=done and ep["end"] == "terminated",
                    truncated=done and ep["end"] == "truncated", len_lookback_buffer=0))
                ep["emitted"] += k
                left -= k
                if done:
                    current[env] = new_episode(env)
        batches.append(batch)
    return batches, truth


def expected_window(truth, serial, t, T):
    """Window of T transitions from step t of an episode, as RLlib's slices gave them: valid
    while the episode has a known transition, padded after (last observation repeated)."""
    ep = truth[serial]
    n = ep["emitted"]
    L = ep["rewards"].shape[1]
    j = np.arange(T)
    valid = t + j < n
    out = dict(obs=ep["obs"][np.minimum(t + np.arange(T + 1), n)], valid=valid,
               actions=np.where(valid, ep["actions"][np.minimum(t + j, len(ep["actions"]) - 1)], 0),
               rewards=np.zeros((T, L), np.float32), terminals=np.zeros((T, L), np.float32))
    out["rewards"][valid] = ep["rewards"][t + j[valid]]
    out["terminals"][valid] = ep["terminals"][t + j[valid]]
    return out


@pytest.mark.parametrize("capacity", [1000, 37, 13])
def test_window_buffer_draws_the_windows_rllibs_slices_gave_within_one_episode(capacity):
    """Every window of every stored transition is its episode's next T steps, ending where the
    episode ends (terminated or truncated alike) or where its data ends, padded after; also
    after the ring wrapped (capacity 37 < the 144 transitions added; 13, about one iteration's
    rows: a continuing episode's last row is among those its next chunk overwrites, so the
    chunk starts afresh)."""
    from qworld.agents.replay_buffer import WindowEpisodeReplayBuffer

    batches, truth = runner_chunks()
    buf = WindowEpisodeReplayBuffer(capacity=capacity, seed=0)
    for batch in batches:
        buf.add(batch)
    total = sum(t["emitted"] for t in truth.values())
    rows = np.flatnonzero(buf._a["next"][: buf.get_num_rows()] >= 0)
    assert len(rows) == buf.get_num_timesteps() > 0
    if capacity > total + len(truth):
        assert buf.get_num_timesteps() == total == 144
    else:
        assert buf.get_num_rows() == capacity and buf.get_num_timesteps() < capacity
    T = 5
    got = buf.windows(rows, T)
    ended = 0
    for i, row in enumerate(rows):
        serial, t, _ = buf._a["obs"][row].astype(int)
        want = expected_window(truth, serial, t, T)
        for key in ("obs", "valid", "actions", "rewards", "terminals"):
            np.testing.assert_array_equal(got[key][i], want[key], err_msg=f"{key} of row {row} (episode {serial}, t {t})")
        ended += not want["valid"].all()
    assert ended > 0  # some windows do meet an episode's end
    # sampling draws transition rows only, uniformly (each row's share ~ 1 / rows)
    draws = buf._draw(20000)
    assert (buf._a["next"][draws] >= 0).all()
    counts = np.bincount(draws, minlength=buf.get_num_rows())[rows]
    assert counts.min() > 0.5 * 20000 / len(rows) and counts.max() < 1.6 * 20000 / len(rows)


def test_window_buffer_state_round_trips_and_goes_on_identically():
    from qworld.agents.replay_buffer import WindowEpisodeReplayBuffer

    batches, _ = runner_chunks(seed=1, iterations=10)
    a = WindowEpisodeReplayBuffer(capacity=50, seed=3)
    for batch in batches[:6]:
        a.add(batch)
    a.sample(batch_size_B=7, batch_length_T=4)  # the generator has moved
    b = WindowEpisodeReplayBuffer(capacity=50, seed=99)
    b.set_state(a.get_state())
    for batch in batches[6:]:  # open episodes continue in both (their last rows are restored)
        a.add(batch)
        b.add(batch)
        wa, wb = a.sample(batch_size_B=16, batch_length_T=4), b.sample(batch_size_B=16, batch_length_T=4)
        for key in wa:
            np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)
    assert a.get_num_timesteps() == b.get_num_timesteps() and a.get_state()["open"] == b.get_state()["open"]


# ------------------------------------------------------------------ checkpoint: buffer, counters, reward statistics
def learner_losses(result: dict) -> dict:
    """The learner's losses (and Q mean, reward scale) of one iteration's result."""
    from qworld.agents.mrq import learner as LR

    keys = (LR.TOTAL_LOSS_KEY, LR.VALUE_LOSS_KEY, LR.DYNAMICS_LOSS_KEY, LR.REWARD_LOSS_KEY, LR.TERMINAL_LOSS_KEY,
            LR.Q_MEAN_KEY, LR.REWARD_SCALE_KEY)
    out = {k: flat(result).get(f"learners/default_policy/{k}") for k in keys}
    assert all(v is not None for v in out.values()), out
    return out


def record_rollouts(algo, into: list) -> None:
    """Make ``algo`` keep a copy of every rollout it samples."""
    import copy

    real = algo.sample_episodes

    def recorded():
        out = real()
        into.append(copy.deepcopy(out))
        return out

    algo.sample_episodes = recorded


def replay_rollouts(algo, rollouts: list) -> None:
    """Make ``algo`` train on these rollouts instead of sampling its envs."""
    import copy

    queue = iter(rollouts)
    algo.sample_episodes = lambda: copy.deepcopy(next(queue))


def test_restored_mrq_goes_on_exactly_as_the_uninterrupted_run(ray_session, tmp_path):
    """Save after 2 iterations, restore into a fresh Algorithm (``from_checkpoint``) and hand it
    the episodes the uninterrupted run sampled next (RLlib keeps no env state: the rollouts
    are the one thing a restore cannot reproduce): its next 2 iterations' losses are the
    uninterrupted run's, bit for bit (the same float32 operations on the same values in the
    same order). What that needs from the checkpoint: the buffer and its sampling generator
    (which windows), the learner's gradient-step count (which goals a step draws, when the
    targets sync: steps 0, 20, 40 here, so step 20 falls inside iteration 3 and a count
    restarted at 0 would sync at once) and the reward statistics (the scale set at that sync)."""
    from qworld.agents.mrq import MRQ

    # 4 goals of the 15 states: the mean |reward| depends on the data (with a goal at every
    # state it is 1 / L whatever the data)
    algo = tiny_config().training(target_update_freq=20, env_kwargs={**TINY, "num_goals": 4}).build_algo()
    rollouts: list = []
    try:
        for _ in range(2):
            algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        held = algo.replay_buffer.get_num_timesteps()
        stats = (algo._abs_reward_total, algo._reward_count)
        record_rollouts(algo, rollouts)
        want = [learner_losses(algo.train()) for _ in range(2)]
    finally:
        algo.stop()
    restored = MRQ.from_checkpoint(path)
    try:
        assert restored.replay_buffer.get_num_timesteps() == held >= 64
        assert (restored._abs_reward_total, restored._reward_count) == stats and stats[1] > 0
        replay_rollouts(restored, rollouts)
        got = [learner_losses(restored.train()) for _ in range(2)]
    finally:
        restored.stop()
    assert got == want
