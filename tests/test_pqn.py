"""Goal-conditioned PQN on RLlib: config, Q(lambda) targets, module, learner, both runners,
checkpoints -> load_q. Real RLlib, num_env_runners=0, num_learners=0, tiny budgets.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from live import HANG_GUARD_S
import torch

from qworld import metrics as K
from qworld.agents.pqn import PQNConfig, build_train_rows, her_goals, q_lambda_targets
from qworld.agents.pqn import rollout as R
from qworld.agents.pqn.learner import TARGETS
from ray.rllib.core import DEFAULT_MODULE_ID

torch.set_num_threads(1)

from helpers import TINY, TINY_LAYOUT, flat  # noqa: E402
from tolerances import forward_atol, ulps  # noqa: E402

# the tiny PQN network: Linear, LayerNorm, Linear (then sigmoid), fan-in <= 32
PQN_DEPTH, PQN_WIDTH = 3, 32


def tiny_config(**training) -> PQNConfig:
    kw = dict(
        env_kwargs=TINY,
        num_envs=8,
        rollout_length=16,
        minibatch_size=32,
        hidden_sizes=[32],
        total_env_steps=5_000,
    )
    kw.update(training)
    return PQNConfig().training(**kw).debugging(seed=0, log_level="ERROR")


# ------------------------------------------------------------------ config validation
def test_validate_names_every_bad_field_and_its_allowed_values():
    config = PQNConfig().training(
        gamma=1.5,
        lambda_=-0.1,
        head="bogus",
        num_envs=0,
        optimizer="sgd",
        hidden_sizes=[],
        her_strategy="final",
        epsilon_end=2.0,
        q_output="tanh",
        minibatch_size=0,
        env_runner="turbo",
        fourier_features=-1,
        fourier_scale=0.0,
    )
    with pytest.raises(ValueError) as info:
        config.validate()
    msg = str(info.value)
    for field, allowed in [
        ("gamma", "(0, 1]"),
        ("lambda_", "[0, 1]"),
        ("head", "'all_goals', 'goal_input'"),
        ("num_envs", ">= 1"),
        ("optimizer", "'radam', 'adam'"),
        ("hidden_sizes", "non-empty list"),
        ("her_strategy", "'future', 'random_goal'"),
        ("epsilon_end", "[0, 1]"),
        ("q_output", "'auto', 'linear', 'sigmoid'"),
        ("minibatch_size", ">= 1"),
        ("env_runner", "'auto', 'fast', 'standard'"),
        ("fourier_features", "an int >= 0"),
        ("fourier_scale", "a number > 0"),
    ]:
        line = next((ln for ln in msg.splitlines() if ln.strip().startswith(f"- {field}=")), None)
        assert line is not None, f"{field} missing from:\n{msg}"
        assert allowed in line, line


def test_validate_rejects_bad_env_and_runner_combinations():
    with pytest.raises(ValueError, match="env_kwargs"):
        PQNConfig().training(env_kwargs={"variant": "nope"}).validate()
    with pytest.raises(ValueError, match="env_runner='fast'.*no batched dynamics"):
        PQNConfig().training(env_id="CartPole-v1", env_runner="fast").validate()
    with pytest.raises(ValueError, match="minibatch_size=.*<= num_envs \\* rollout_length"):
        PQNConfig().training(num_envs=2, rollout_length=4, minibatch_size=9).validate()
    with pytest.raises(ValueError, match="num_envs=.*multiple of num_env_runners=3"):
        PQNConfig().training(num_envs=4).env_runners(num_env_runners=3).validate()
    PQNConfig().training(env_kwargs=TINY).validate()  # the defaults are valid


# ------------------------------------------------------------------ RLlib's own settings
def test_rllib_env_config_is_the_env_pqn_trains(ray_session):
    """.environment(env_config=...) is honoured (PQN's env_kwargs left at its default follows it)."""
    config = (
        PQNConfig()
        .environment("qworld/FourRooms-v0", env_config={**TINY, "variant": "windy"})
        .training(num_envs=8, rollout_length=16, minibatch_size=32, hidden_sizes=[32], total_env_steps=5_000)
        .debugging(seed=0, log_level="ERROR")
    )
    algo = config.build_algo()
    try:
        assert algo.config.env_kwargs == {**TINY, "variant": "windy"}
        assert algo.env_runner.config.env_kwargs["variant"] == "windy"  # what the runner's envs are made from
        assert algo.config.qworld_config()[K.VARIANT] == "windy"  # what a checkpoint records
        algo.train()
    finally:
        algo.stop()
    # set once, the two stay one: a later env_kwargs moves env_config, and back
    config = PQNConfig().environment(env_config={"variant": "windy"})
    config.validate()
    config.training(env_kwargs={"variant": "teleport"})
    config.validate()
    assert config.env_config == {"variant": "teleport"}


@pytest.mark.parametrize("set_rllib,set_pqn,rllib,pqn,value", [
    (lambda c: c.environment(env_config={"variant": "windy"}), lambda c: c.training(env_kwargs={"variant": "teleport"}),
     "env_config", "env_kwargs", {"variant": "windy"}),
    (lambda c: c.environment("qworld/FourRooms-v0"), lambda c: c.training(env_id="qworld/MountainCar-v0"),
     "env", "env_id", "qworld/FourRooms-v0"),
    (lambda c: c.env_runners(rollout_fragment_length=16), lambda c: c.training(rollout_length=32),
     "rollout_fragment_length", "rollout_length", 16),
])
def test_rllibs_env_settings_are_the_storage_of_pqns_fields(set_rllib, set_pqn, rllib, pqn, value):
    """One setting under two names: set through either, the last one set is the one trained."""
    config = set_rllib(set_pqn(PQNConfig()))
    assert getattr(config, rllib) == getattr(config, pqn) == value
    config = set_pqn(set_rllib(PQNConfig()))
    assert getattr(config, rllib) == getattr(config, pqn) != value
    assert pqn in config.to_dict() and rllib in config.to_dict()  # Tune's trial config names both


def test_num_envs_is_the_total_rllibs_envs_per_runner_split_it():
    config = PQNConfig().training(num_envs=64).env_runners(num_envs_per_env_runner=16)
    assert config.num_envs == 16 and config.num_envs_per_env_runner == 16
    config = PQNConfig().env_runners(num_envs_per_env_runner=16).training(num_envs=64).env_runners(num_env_runners=4)
    assert config.num_envs == 64 and config.num_envs_per_env_runner == 16
    assert config.train_batch_size == 64 * 64 and config.train_batch_size_per_learner == 64 * 64


@pytest.mark.parametrize("make,names", [
    (lambda: PQNConfig().training(train_batch_size_per_learner=1000), ("train_batch_size_per_learner=1000", "num_envs=")),
    (lambda: PQNConfig().training(train_batch_size=1000), ("train_batch_size=1000", "rollout_length=")),
    (lambda: PQNConfig().training(env_runner="fast").env_runners(
        env_runner_cls=__import__("ray.rllib.env.single_agent_env_runner", fromlist=["_"]).SingleAgentEnvRunner),
     ("env_runner_cls=", "env_runner='fast'")),
    (lambda: PQNConfig().training(lr=[[0, 1e-3], [1000, 0.0]]), ("lr=[[0, 0.001], [1000, 0.0]]", "anneal_lr=True")),
    (lambda: PQNConfig().rl_module(model_config={"hidden_sizes": [8]}), ("model_config['hidden_sizes']=[8]",
                                                                        "hidden_sizes=[256, 256]")),
])
def test_a_conflicting_rllib_setting_is_refused_naming_both_fields(make, names):
    with pytest.raises(ValueError) as info:
        make().training(env_kwargs=TINY).validate() if "env_kwargs" not in names[1] else make().validate()
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_rllib_settings_left_by_pqn_at_their_defaults_are_adopted():
    config = PQNConfig().training(env_kwargs=TINY, minibatch_size=32).env_runners(
        num_env_runners=2, num_envs_per_env_runner=16, rollout_fragment_length=8
    )
    config.validate()
    assert (config.num_envs, config.rollout_length) == (32, 8)  # num_envs is the total over the runners
    assert config.train_batch_size_per_learner == 256
    # the settings PQN derives travel with the config (Tune dicts, checkpoints) without conflicts
    again = PQNConfig().update_from_dict(config.to_dict())
    again.training(num_envs=16)
    again.validate()
    assert again.num_envs_per_env_runner == 8
    # a whole config saved before PQN used RLlib's flags still shuffles and skips non-finite steps
    old = {k: v for k, v in config.to_dict().items() if k not in ("_pqn_derived", "_pqn_format")}
    old.update(shuffle_batch_per_epoch=False, torch_skip_nan_gradients=False)
    legacy = PQNConfig().update_from_dict(old)
    assert legacy.shuffle_batch_per_epoch and legacy.torch_skip_nan_gradients
    state = {k: v for k, v in config.get_state().items() if k not in ("_pqn_derived", "_pqn_format")}
    state.update(shuffle_batch_per_epoch=False, torch_skip_nan_gradients=False)
    legacy = PQNConfig.from_state(state)
    assert legacy.shuffle_batch_per_epoch and legacy.torch_skip_nan_gradients
    config = PQNConfig().training(env_kwargs=TINY, lr=[[0, 1e-3], [1000, 0.0]], anneal_lr=False)
    config.validate()
    assert config.lr_schedule() == [[0, 1e-3], [1000, 0.0]]  # RLlib's own schedule, as given


def test_a_config_saved_with_pqns_shadow_of_rllibs_settings_still_trains_what_it_says():
    """Tune trial configs and checkpoint states written before the fields were declared once
    kept PQN's own copy of RLlib's env settings and the RLlib values derived from them
    (``_pqn_derived``): those derived values are derived again, PQN's fields win."""
    from qworld.agents.pqn.fast_env_runner import BatchedEnvRunner

    base = PQNConfig().training(env_kwargs=TINY, minibatch_size=32)
    saved = {k: v for k, v in base.to_dict().items() if k != "_pqn_format"}
    derived = {"env": base.env_id, "env_config": dict(TINY), "rollout_fragment_length": 64,
               "num_envs_per_env_runner": 256, "train_batch_size": 256 * 64,
               "train_batch_size_per_learner": 256 * 64, "env_runner_cls": BatchedEnvRunner}
    saved.update({**derived, "_pqn_derived": derived, "_train_batch_size_per_learner": 256 * 64})
    saved.pop("train_batch_size_per_learner", None)
    saved.update(num_envs=8, rollout_length=16, env_kwargs={**TINY, "variant": "windy"})  # a sweep's axes
    trial = PQNConfig().update_from_dict(saved)
    trial.validate()
    assert (trial.num_envs, trial.rollout_length, trial.env_kwargs["variant"]) == (8, 16, "windy")
    assert trial.env_config == trial.env_kwargs and trial.rollout_fragment_length == 16
    assert trial.train_batch_size == trial.train_batch_size_per_learner == 8 * 16
    assert trial.num_envs_per_env_runner == 8 and trial.env_runner_cls is BatchedEnvRunner
    state = {**{k: v for k, v in base.get_state().items() if k != "_pqn_format"}, **derived,
             "_pqn_derived": derived, "_train_batch_size_per_learner": 256 * 64,
             "env_id": base.env_id, "env_kwargs": dict(TINY), "rollout_length": 64}
    restored = PQNConfig.from_state(state)
    restored.validate()
    assert restored.qworld_config() == base.qworld_config()
    restored.training(num_envs=16)  # derived again, not held at the saved values
    restored.validate()
    assert restored.train_batch_size == 16 * 64 and "_pqn_derived" not in vars(restored)


# ------------------------------------------------------------------ q_output "auto"
@pytest.mark.parametrize("env_id,env_kwargs,expected", [
    ("qworld/FourRooms-v0", {"goal_type": "indicator", "num_goals": 4}, "sigmoid"),
    ("qworld/FourRooms-v0", {**TINY, "goal_type": "indicator"}, "sigmoid"),
    ("qworld/FourRooms-v0", {"goal_type": "dense", "num_goals": 1}, "linear"),
    ("qworld/FourRooms-v0", {**TINY, "goal_type": "dense", "num_goals": 3}, "linear"),
    ("qworld/MountainCar-v0", {"goal_type": "position"}, "sigmoid"),  # sparse: 1 on arrival, terminal
    ("qworld/MountainCar-v0", {"goal_type": "gaussian"}, "linear"),  # never terminal: returns > 1
])
def test_q_output_auto_is_the_default_and_fits_the_goal_family(env_id, env_kwargs, expected):
    config = PQNConfig().training(env_id=env_id, env_kwargs=env_kwargs)
    assert config.q_output == "auto"
    assert config.resolved_q_output() == expected
    assert config.pqn_model_config()["q_output"] == expected  # what the module is built with
    assert config.qworld_config()["q_output"] == expected  # what a checkpoint records


def test_explicit_q_output_wins_over_the_goal_family():
    dense = {"goal_type": "dense", "num_goals": 2}
    assert PQNConfig().training(env_kwargs=dense, q_output="sigmoid").resolved_q_output() == "sigmoid"
    assert PQNConfig().training(env_kwargs={"num_goals": 2}, q_output="linear").resolved_q_output() == "linear"


def test_auto_linear_output_is_scaled_to_the_goal_familys_returns():
    import qworld_envs
    from qworld.agents.pqn.module import PQNTorchRLModule

    dense = {"goal_type": "dense", "num_goals": 2}
    config = PQNConfig().training(env_kwargs=dense, gamma=0.9)
    rewards = qworld_envs.make_finite_problem("qworld/FourRooms-v0", **config.env_kwargs).goals.rewards
    assert config.resolved_q_scale() == pytest.approx(np.abs(rewards).max() / (1 - 0.9))
    assert PQNConfig().training(env_kwargs=dense, q_output="linear").resolved_q_scale() == 1.0
    assert PQNConfig().training(env_kwargs={"num_goals": 2}).resolved_q_scale() == 1.0  # sigmoid
    mc = config.pqn_model_config()
    module = PQNTorchRLModule(model_config=mc)
    unscaled = PQNTorchRLModule(model_config={**mc, "q_scale": 1.0})
    unscaled.load_state_dict(module.state_dict())
    x = torch.randn(5, mc["obs_dim"])
    # the same float32 network output times the same q_scale (1.0 * y is y): equal
    assert torch.equal(module.q_all_goals(x), mc["q_scale"] * unscaled.q_all_goals(x))


def test_bad_q_output_names_the_field_and_the_allowed_values():
    errors = PQNConfig().training(q_output="tanh").qworld_errors()
    assert errors == ["q_output='tanh': must be one of 'auto', 'linear', 'sigmoid'"]


def test_dense_goals_checkpoint_records_linear_outputs(ray_session, tmp_path):
    from qworld.agents import load_q

    algo = tiny_config(env_kwargs={**TINY, "goal_type": "dense", "num_goals": 3}).build_algo()
    try:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    q = load_q(path)
    assert q.config["q_output"] == "linear" and q.module.q_output == "linear"
    assert q.config["goal_type"] == "dense"


def test_config_round_trips_through_a_tune_style_dict():
    config = PQNConfig().training(lambda_=0.65, optimizer="adam", head="goal_input", hidden_sizes=[8, 8])
    again = PQNConfig().update_from_dict(config.to_dict())
    for field in ("lambda_", "optimizer", "head", "hidden_sizes", "her_k", "env_id", "env_kwargs"):
        assert getattr(again, field) == getattr(config, field), field
    again.validate()


# ------------------------------------------------------------------ Q(lambda) targets
def test_q_lambda_targets_by_hand():
    g, lam = 0.9, 0.5
    # env 0: terminates at t=1 (no bootstrap), then a new episode at t=2, 3.
    # env 1: truncated at t=2 (bootstrap from next_q_max only, chain cut), new episode at t=3.
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
    d = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    tr = torch.tensor([[0, 0], [0, 0], [0, 1], [0, 0]], dtype=torch.bool)
    nq = torch.tensor([[0.2, 0.3], [0.4, 0.6], [0.1, 0.8], [0.7, 0.9]])
    out = q_lambda_targets(r, d, tr, nq, g, lam)
    # env 0, backwards: the last row bootstraps from next_q_max only.
    e0_3 = 0.0 + g * 0.7
    e0_2 = 0.0 + g * ((1 - lam) * 0.1 + lam * e0_3)
    e0_1 = 1.0  # terminal
    e0_0 = 0.0 + g * ((1 - lam) * 0.2 + lam * e0_1)
    # env 1
    e1_3 = g * 0.9
    e1_2 = 0.5 + g * 0.8  # truncated: cut
    e1_1 = 0.0 + g * ((1 - lam) * 0.6 + lam * e1_2)
    e1_0 = 0.0 + g * ((1 - lam) * 0.3 + lam * e1_1)
    expected = torch.tensor([[e0_0, e1_0], [e0_1, e1_1], [e0_2, e1_2], [e0_3, e1_3]], dtype=torch.float64)
    # against float64: 4 steps back, each ~4 float32 roundings of numbers < 2 (the error carried
    # back shrinks by gamma lambda < 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=ulps(16, 2.0))
    # lambda = 0: 1-step targets
    # the same float32 operations on the same numbers (the mask is 0 or 1): equal
    torch.testing.assert_close(q_lambda_targets(r, d, tr, nq, g, 0.0), r + g * (~d).float() * nq, rtol=0, atol=0)
    # lambda = 1 on env 0 after the termination: the discounted return to the rollout end
    full = q_lambda_targets(r, d, tr, nq, g, 1.0)
    # against float64: two steps back of ~3 float32 roundings at magnitude <= 1
    assert float(full[2, 0]) == pytest.approx(g * g * 0.7, rel=0, abs=ulps(6))
    assert float(full[0, 0]) == pytest.approx(g * 1.0, rel=0, abs=ulps(6))


def test_q_lambda_targets_batched_over_goals_equals_per_goal():
    gen = torch.Generator().manual_seed(0)
    T, N, L = 7, 3, 4
    r = torch.rand(T, N, L, generator=gen)
    d = torch.rand(T, N, L, generator=gen) < 0.2
    tr = torch.rand(T, N, generator=gen) < 0.2
    nq = torch.rand(T, N, L, generator=gen)
    out = q_lambda_targets(r, d, tr, nq, 0.95, 0.65)
    for g in range(L):
        # elementwise: the same float32 operations on the same numbers, equal
        torch.testing.assert_close(out[..., g], q_lambda_targets(r[..., g], d[..., g], tr, nq[..., g], 0.95, 0.65),
                                   rtol=0, atol=0)


def test_q_lambda_targets_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share one shape"):
        q_lambda_targets(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 3), 0.9, 0.0)


def test_all_goals_lambda_traces_follow_only_greedy_actions_of_each_goal():
    """lambda=1: goal g's target chains on only while the next action is greedy for g."""
    module = _tiny_module(tiny_config())
    gen = torch.Generator().manual_seed(1)
    T, N, S, L = 6, 4, 15, 15
    states = torch.randint(S, (T + 1, N), generator=gen)
    eye = torch.eye(S)
    terminals = torch.rand(T, N, L, generator=gen) < 0.1
    ro = {
        R.OBS: eye[states[:-1]],
        R.NEXT_OBS: eye[states[1:]],
        R.ACTIONS: torch.randint(4, (T, N), generator=gen),
        R.GOAL: torch.zeros(T, N, dtype=torch.long),
        R.REWARDS: terminals.float(),
        R.TERMINALS: terminals,
        R.REWARD: terminals[..., 0].float(),
        R.TERMINATED: terminals[..., 0],
        R.TRUNCATED: torch.zeros(T, N, dtype=torch.bool),
    }
    g = 0.9
    rows = build_train_rows(module, ro, gamma=g, lam=1.0)
    tgt = rows["targets"].reshape(T, N, L)
    with torch.no_grad():
        q_next = module.q_all_goals(ro[R.NEXT_OBS].reshape(T * N, S)).reshape(T, N, L, 4)
    nq, greedy = q_next.max(-1)
    one_step = ro[R.REWARDS] + g * (~terminals).float() * nq
    # one step of the recursion (~3 float32 roundings at magnitude <= 1), after a forward pass
    # that build_train_rows may batch otherwise
    tol = forward_atol(q_next, PQN_DEPTH, PQN_WIDTH) + ulps(3)
    for t in range(T):
        for n in range(N):
            for k in range(L):
                ended = bool(ro[R.TERMINATED][t, n])
                chain = t < T - 1 and not ended and int(ro[R.ACTIONS][t + 1, n]) == int(greedy[t, n, k])
                want = (ro[R.REWARDS][t, n, k] + g * (~terminals[t, n, k]).float() * tgt[t + 1, n, k]) if chain else one_step[t, n, k]
                torch.testing.assert_close(tgt[t, n, k], want, rtol=0, atol=tol)


# ------------------------------------------------------------------ HER relabelling
def test_her_future_picks_goals_achieved_later_in_the_same_episode():
    T, N, L = 4, 1, 3
    terminals = torch.zeros(T, N, L, dtype=torch.bool)
    terminals[1, 0, 2] = True  # goal 2 reached at t=1, the episode ends there
    terminals[3, 0, 1] = True  # goal 1 reached at t=3 (next episode)
    ro = {
        R.REWARDS: terminals.float(),
        R.TERMINALS: terminals,
        R.TERMINATED: torch.tensor([[False], [True], [False], [False]]),
        R.TRUNCATED: torch.zeros(T, N, dtype=torch.bool),
    }
    goals = her_goals(ro, 16, "future", torch.Generator().manual_seed(0))
    assert goals.shape == (16, T, N)
    assert (goals[:, 0:2, 0] == 2).all()  # t=0,1: the only future achievement of episode 1
    assert (goals[:, 2:4, 0] == 1).all()  # t=2,3: episode 2 achieves goal 1
    uniform = her_goals(ro, 64, "random_goal", torch.Generator().manual_seed(0))
    assert set(uniform.unique().tolist()) == {0, 1, 2}


# ------------------------------------------------------------------ RLlib: fast runner
@pytest.fixture(scope="module")
def trained_fast(ray_session, tmp_path_factory):
    algo = tiny_config().build_algo()
    results = [algo.train() for _ in range(3)]
    path = algo.save_to_path(str(tmp_path_factory.mktemp("pqn") / "ckpt"))
    yield algo, results, path
    algo.stop()


def test_fast_runner_trains_and_reports_qworld_metrics(trained_fast):
    algo, results, _ = trained_fast
    assert type(algo.env_runner).__name__ == "BatchedEnvRunner"
    last = flat(results[-1])
    for key in (K.TRAIN_LOSS, K.TRAIN_Q_MEAN, K.TRAIN_EPSILON, K.TRAIN_LR, K.TRAIN_EPISODE_RETURN,
                K.TRAIN_EPISODE_SUCCESS, K.TRAIN_EPISODE_LENGTH, K.TRAIN_ENV_STEPS):
        assert key in last, key
    assert np.isfinite(last[K.TRAIN_LOSS])
    # every iteration is one rollout of num_envs x rollout_length env steps
    assert [r[K.TRAIN_ENV_STEPS] for r in results] == [128, 256, 384]
    assert last["env_runners/num_env_steps_sampled_lifetime"] == 384
    # schedules move with env steps: epsilon from 1 towards 0.1 over half the budget, lr to 0
    assert last[K.TRAIN_EPSILON] == pytest.approx(1.0 - 0.9 * 256 / 2500)
    assert last[K.TRAIN_LR] == pytest.approx(1e-4 * (1 - 384 / 5000), rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.65])
def test_fast_runner_q_at_next_states_equals_the_learners_own_target_pass(trained_fast, lam):
    algo, _, _ = trained_fast
    runner = algo.env_runner
    assert R.NEXT_Q_ARGMAX not in runner.sample(epsilon=0.5)  # lambda_ = 0: 1-step targets need no argmax
    ro = runner.sample(epsilon=0.5, next_q_argmax=True)
    assert R.NEXT_Q_MAX in ro and ro[R.NEXT_Q_MAX].shape == ro[R.REWARDS].shape
    done = ro[R.TERMINATED] | ro[R.TRUNCATED]
    assert done[:-1].any(), "the check needs episodes ending inside the rollout"
    module = algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()
    handed = build_train_rows(module, ro, gamma=0.9, lam=lam)
    own = build_train_rows(module, {k: v for k, v in ro.items() if k not in (R.NEXT_Q_MAX, R.NEXT_Q_ARGMAX)},
                           gamma=0.9, lam=lam)
    # next-state Q from the runner's forward pass against the learner's own (another batch):
    # equal up to forward rounding, which the lambda-return passes on with total weight <= gamma
    # < 1; its own ~4 roundings a step at magnitude <= max|target| add up to 4 / (1 - gamma lambda)
    scale = float(own[TARGETS].abs().max())
    tol = forward_atol(own[TARGETS], PQN_DEPTH, PQN_WIDTH) + ulps(4 / (1 - 0.9 * lam), scale)
    torch.testing.assert_close(handed[TARGETS], own[TARGETS], rtol=0, atol=tol)
    greedy = module.q_all_goals(ro[R.NEXT_OBS].reshape(-1, ro[R.NEXT_OBS].shape[-1])).argmax(-1)
    assert (greedy.reshape(ro[R.NEXT_Q_ARGMAX].shape) == ro[R.NEXT_Q_ARGMAX]).float().mean() > 0.99


def test_checkpoint_holds_the_config_and_load_q_matches_the_live_module(trained_fast):
    algo, _, path = trained_fast
    from qworld.agents import load_q

    live = algo.q_function()
    q = load_q(path)
    np.testing.assert_array_equal(q.q_table(), live.q_table())
    assert q.q_table().shape == (15, 15, 4)
    c = q.config
    assert c["env_id"] == "qworld/FourRooms-v0" and c["env_kwargs"]["layout"] == TINY_LAYOUT
    assert c["variant"] == "deterministic" and c["goal_type"] == "indicator" and c["num_goals"] == 15
    assert c["head"] == "all_goals" and c["gamma"] == 0.99 and c["hidden_sizes"] == [32]
    assert len(c["goal_states"]) == 15 and c["env_steps"] == 384
    assert c["q_output"] == "sigmoid" and q.module.q_output == "sigmoid"  # "auto", indicator goals
    # a batch of states x goal indices, and all goals at once
    obs = np.eye(15, dtype=np.float32)[[0, 3, 7]]
    # 3 states against all 15: one float32 network summed in another order (tolerances.forward_atol)
    table = q.q_table()
    np.testing.assert_allclose(q.q(obs, np.array([1, 2, 3])), table[[1, 2, 3], [0, 3, 7]], rtol=0,
                               atol=forward_atol(table, PQN_DEPTH, PQN_WIDTH))
    assert q.q(obs).shape == (3, 15, 4)


def test_load_q_needs_no_ray_and_no_algorithm(trained_fast):
    _, _, path = trained_fast
    from qworld.agents import load_q

    code = (
        "import json, sys, ray; from qworld.agents import load_q; "
        f"q = load_q({path!r}); t = q.q_table(); "
        "assert not ray.is_initialized(); "
        "print(json.dumps({'table': t.tolist(), 'shape': list(t.shape), 'head': q.config['head']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shape"] == [15, 15, 4] and got["head"] == "all_goals"
    # entry by entry (float64 JSON round-trips exactly); the other process may run torch on
    # more threads, so the kernels may sum in another order
    table = load_q(path).q_table()
    np.testing.assert_allclose(np.array(got["table"]), table, rtol=0, atol=forward_atol(table, PQN_DEPTH, PQN_WIDTH))


def test_algorithm_restores_from_its_checkpoint(trained_fast):
    algo, _, path = trained_fast
    from ray.rllib.algorithms.algorithm import Algorithm

    restored = Algorithm.from_checkpoint(path)
    try:
        np.testing.assert_array_equal(restored.q_function().q_table(), algo.q_function().q_table())
        restored.train()
    finally:
        restored.stop()


def test_same_seed_same_q(trained_fast):
    algo, _, _ = trained_fast
    again = tiny_config().build_algo()
    try:
        for _ in range(3):
            again.train()
        np.testing.assert_array_equal(again.q_function().q_table(), algo.q_function().q_table())
    finally:
        again.stop()


def test_fast_runner_works_as_a_remote_env_runner(ray_session):
    algo = tiny_config().env_runners(num_env_runners=1).build_algo()
    try:
        result = flat(algo.train())
        assert result[K.TRAIN_ENV_STEPS] == 128 and np.isfinite(result[K.TRAIN_LOSS])
        # the remote runner got the learner's weights after the update
        learner_q = algo.q_function().q(np.eye(15, dtype=np.float32))
        remote = algo.env_runner_group.foreach_env_runner(
            lambda er: er.module.q_all_goals(torch.eye(15)).detach().numpy(), local_env_runner=False
        )
        # the same weights in another process: float32 sums possibly in another order
        np.testing.assert_allclose(remote[0], learner_q, rtol=0, atol=forward_atol(learner_q, PQN_DEPTH, PQN_WIDTH))
    finally:
        algo.stop()


# ------------------------------------------------------------------ learner: RLlib's hooks
def _learner_module(algo):
    return algo.learner_group._learner.module[DEFAULT_MODULE_ID].unwrapped()


def test_nonfinite_gradient_steps_are_skipped_counted_and_reported(ray_session):
    """torch_skip_nan_gradients (PQN's default): a NaN step never reaches the weights or RAdam."""
    algo = tiny_config().build_algo()
    try:
        assert algo.config.torch_skip_nan_gradients
        algo.train()
        runner = algo.env_runner
        sample = runner.sample

        def poisoned(**kwargs):
            ro = sample(**kwargs)
            ro[R.REWARDS] = torch.full_like(ro[R.REWARDS], float("nan"))  # every target NaN
            return ro

        module = _learner_module(algo)
        weights = {k: v.clone() for k, v in module.state_dict().items()}
        optim = algo.learner_group._learner.get_optimizer()
        steps = {id(p): float(st["step"]) for p, st in optim.state.items()}
        runner.sample = poisoned
        bad = flat(algo.train())
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
        assert {id(p): float(st["step"]) for p, st in optim.state.items()} == steps
        # 8 envs x 16 steps / minibatch 32: 4 steps, all skipped, reported per iteration
        assert bad[K.TRAIN_NONFINITE_STEPS_SKIPPED] == 4
        assert bad[f"learners/{DEFAULT_MODULE_ID}/num_nonfinite_steps_skipped"] == 4
        runner.sample = sample
        good = flat(algo.train())
        assert good[K.TRAIN_NONFINITE_STEPS_SKIPPED] == 0
        assert good[K.TRAIN_NONFINITE_STEPS_SKIPPED_LIFETIME] == 4
        assert np.isfinite(good[K.TRAIN_LOSS])
        assert all(torch.isfinite(v).all() for v in module.state_dict().values())
        assert any(not torch.equal(v, weights[k]) for k, v in module.state_dict().items())
    finally:
        algo.stop()


def test_two_learners_train_in_sync_on_cpu(ray_session):
    """num_learners=2 (DDP on CPU): both train, stay equal, sync to the runner, report as one."""
    algo = tiny_config().learners(num_learners=2).build_algo()
    try:
        assert not algo.learner_group.is_local
        eye = np.eye(15, dtype=np.float32)
        before = algo.q_function().q(eye)
        results = [flat(algo.train()) for _ in range(2)]
        last = results[-1]
        assert np.isfinite(last[K.TRAIN_LOSS]) and last[K.TRAIN_ENV_STEPS] == 256
        assert last[K.TRAIN_NONFINITE_STEPS_SKIPPED] == 0
        # each learner builds its rows from its half of the columns: 4 envs x 16 steps
        assert last[f"learners/{DEFAULT_MODULE_ID}/num_train_rows"] == 64
        after = algo.q_function().q(eye)
        assert not np.allclose(after, before)
        tables = algo.learner_group.foreach_learner(
            lambda learner: learner.module[DEFAULT_MODULE_ID].unwrapped().q_all_goals(torch.eye(15)).detach().numpy()
        )
        tables = [t.get() if hasattr(t, "get") else t for t in tables]
        assert len(tables) == 2
        np.testing.assert_array_equal(tables[0], tables[1])  # DDP: one set of weights
        runner_q = algo.env_runner.module.q_all_goals(torch.eye(15)).detach().numpy()
        np.testing.assert_allclose(runner_q, after, rtol=0, atol=forward_atol(after, PQN_DEPTH, PQN_WIDTH))  # as above
    finally:
        algo.stop()
    local = tiny_config().build_algo()
    try:
        ref = flat(local.train())
    finally:
        local.stop()
    qworld_keys = {k for k in ref if k.startswith(("learner/", "env_runners/", "learners/"))}
    assert qworld_keys <= set(last), sorted(qworld_keys - set(last))


# ------------------------------------------------------------------ standard runner
def test_standard_runner_trains_with_the_same_module_and_learner(ray_session):
    algo = tiny_config(env_runner="standard").build_algo()
    try:
        assert type(algo.env_runner).__name__ == "SingleAgentEnvRunner"
        assert type(algo.learner_group._learner).__name__ == "PQNTorchLearner"
        assert type(algo.env_runner.module).__name__ == "PQNTorchRLModule"
        for _ in range(2):
            result = flat(algo.train())
        assert np.isfinite(result[K.TRAIN_LOSS])
        assert result[K.TRAIN_ENV_STEPS] >= 2 * 128
    finally:
        algo.stop()


def test_episodes_convert_to_consistent_rollouts(ray_session):
    """The standard runner's episodes become columns whose rewards/terminals match the env."""
    config = tiny_config(env_runner="standard")
    algo = config.build_algo()
    try:
        problem = config.problem()
        episodes = algo.env_runner.sample(num_timesteps=200, explore=True)
        ro = R.episodes_to_rollout(episodes, problem.obs_dim, np.asarray(problem.goal_features))
    finally:
        algo.stop()
    mask = ro[R.MASK]
    assert int(mask.sum()) == sum(len(e) for e in episodes)
    T, N = mask.shape
    # one-hot states; next_obs[t] == obs[t+1] inside a column
    inner = mask[1:] & mask[:-1]
    assert torch.equal(ro[R.NEXT_OBS][:-1][inner], ro[R.OBS][1:][inner])
    # the commanded goal's reward/termination is that goal's entry of rewards/terminals
    idx = ro[R.GOAL].unsqueeze(-1)
    assert torch.equal(ro[R.REWARDS].gather(-1, idx).squeeze(-1)[mask], ro[R.REWARD][mask])
    # terminations only at a column's last valid step; chunk ends are cut (truncated)
    last = mask & ~torch.cat([mask[1:], torch.zeros(1, N, dtype=torch.bool)])
    assert not (ro[R.TERMINATED] & ~last).any()
    assert ((ro[R.TERMINATED] | ro[R.TRUNCATED]) | ~last).all()
    # and the learner's rows: padding dropped, one target per goal
    rows = build_train_rows(_tiny_module(config), ro, gamma=0.9, lam=0.0)
    assert rows["targets"].shape == (int(mask.sum()), 15)


def _tiny_module(config: PQNConfig):
    spec = config.get_default_rl_module_spec()
    import gymnasium as gym

    problem = config.problem()
    spec.observation_space = gym.spaces.Box(0, 1, (problem.obs_dim + problem.goal_dim,), np.float32)
    spec.action_space = gym.spaces.Discrete(problem.num_actions)
    return spec.build()


# ------------------------------------------------------------------ goal_input head + HER
@pytest.mark.parametrize("strategy", ["future", "random_goal"])
def test_goal_input_head_with_her_trains(ray_session, strategy):
    algo = tiny_config(head="goal_input", her_k=2, her_strategy=strategy).build_algo()
    try:
        for _ in range(2):
            result = flat(algo.train())
        assert np.isfinite(result[K.TRAIN_LOSS])
        # commanded goal + 2 relabels per transition
        assert result["learners/default_policy/num_train_rows"] == 3 * 128
        q = algo.q_function()
        assert q.q_table().shape == (15, 15, 4)
        feats = q.goal_features[[4, 5]]
        obs = np.eye(15, dtype=np.float32)[[0, 1]]
        # q_goals looks the features up and runs the same float32 pass on the same batch: equal
        np.testing.assert_array_equal(q.q(obs, feats), q.q(obs, np.array([4, 5])))
    finally:
        algo.stop()


# ------------------------------------------------------------------ both runners learn alike
def _greedy_success(qf, max_steps: int) -> float:
    """Fraction of (goal, start) pairs whose greedy path reaches the goal (deterministic MDP)."""
    from qworld_envs import make_finite_problem

    problem = make_finite_problem(qf.config["env_id"], **qf.config["env_kwargs"])
    P, term = problem.mdp.P, problem.goals.terminal
    nxt = P.argmax(-1)  # deterministic
    pol = qf.q_table().argmax(-1)  # [L, S]
    L, S = pol.shape
    s = np.tile(np.arange(S), (L, 1))
    reached = np.zeros((L, S), bool)
    goals = np.arange(L)[:, None]
    for _ in range(max_steps):
        s = np.where(reached, s, nxt[s, pol[goals, s]])
        reached |= term[goals, s]
    starts = ~term
    return float(reached[starts].mean())


def _learning_curve(runner: str, seed: int):
    config = tiny_config(
        env_runner=runner, num_epochs=4, lr=3e-3, gamma=0.9, q_output="sigmoid",
        total_env_steps=6_000, hidden_sizes=[64],
    ).debugging(seed=seed)
    algo = config.build_algo()
    try:
        losses, mid = [], None
        while True:
            result = algo.train()
            losses.append(result["learner"]["td_loss"])
            if mid is None and result[K.TRAIN_ENV_STEPS] >= 2_000:
                mid = _greedy_success(algo.q_function(), 20)
            if result[K.TRAIN_ENV_STEPS] >= 6_000:
                return float(np.mean(losses[:10])), mid, _greedy_success(algo.q_function(), 20)
    finally:
        algo.stop()


def test_fast_and_standard_runners_give_the_same_learning_curves(ray_session):
    seeds = range(3)
    fast = np.array([_learning_curve("fast", s) for s in seeds])
    std = np.array([_learning_curve("standard", s) for s in seeds])
    early_loss_f, early_loss_s = fast[:, 0].mean(), std[:, 0].mean()
    assert abs(early_loss_f - early_loss_s) <= 0.15 * max(early_loss_f, early_loss_s), (fast, std)
    assert abs(fast[:, 1].mean() - std[:, 1].mean()) <= 0.25, (fast, std)  # mid-training success
    assert fast[:, 2].min() >= 0.95 and std[:, 2].min() >= 0.95, (fast, std)  # both learn the task
