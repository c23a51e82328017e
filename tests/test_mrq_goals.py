"""MR.Q trained at a few goals per gradient step (issue 24): the drawn-goal losses are the
all-goals losses of those goals, ``load_q`` still gives Q of every goal, and the targets
are synced every ``target_update_freq`` gradient steps, also inside one update call.

No Ray: the RLModule and the Learner are built directly (``MRQConfig.build_learner``).
"""

import numpy as np
import pytest
import torch

from helpers import TINY  # noqa: E402

B, L, S, A = 8, 15, 15, 4  # windows per step; TINY: 15 states, 15 indicator goals, 4 actions


def small_config(**overrides):
    from qworld.agents.mrq import MRQConfig

    kw = dict(env_kwargs=TINY, batch_size=B, updates_per_iteration=4, target_update_freq=8, zs_dim=16,
              za_dim=8, zsa_dim=16, enc_hidden=[16], value_hidden=[16], num_bins=9)
    kw.update(overrides)
    cfg = MRQConfig().training(**kw).debugging(seed=0)
    cfg.validate()
    return cfg


def gym_env(cfg):
    import gymnasium as gym

    return gym.make(cfg.env_id, **cfg.env_kwargs)


def random_windows(num: int, horizon: int, seed: int = 0) -> dict:
    """Windows with every goal's indicator reward / termination of the (random) next states;
    a few windows end early (``valid`` a prefix)."""
    from qworld.agents.mrq.learner import ACTIONS, OBS, REWARDS, TERMINALS, VALID
    from qworld_envs import make_finite_problem

    goals = make_finite_problem("qworld/FourRooms-v0", **TINY).goals
    rng = np.random.default_rng(seed)
    states = rng.integers(S, size=(num, horizon + 1))
    valid = np.ones((num, horizon), bool)
    for i, m in enumerate(rng.integers(1, horizon + 1, size=num // 3)):
        valid[i, m:] = False
    nxt = states[:, 1:]
    return {
        OBS: np.eye(S, dtype=np.float32)[states],
        ACTIONS: rng.integers(A, size=(num, horizon)),
        REWARDS: goals.rewards.T[nxt].astype(np.float32),
        TERMINALS: goals.terminal.T[nxt].astype(np.float32),
        VALID: valid,
    }


def restricted(module, goals: torch.Tensor):
    """An all-goals MR.Q module of the goal set ``goals`` (of ``module``'s), holding exactly
    ``module``'s weights for those goals: its all-goals loss is the loss restricted to them."""
    from qworld.agents.mrq.module import MRQTorchRLModule

    mc = dict(module.model_config, num_goals=len(goals), goal_features=module.goal_features[goals].tolist())
    small = MRQTorchRLModule(observation_space=module.observation_space, action_space=module.action_space,
                             model_config=mc)
    state = module.state_dict()
    for prefix in ("", "target_"):
        enc = getattr(module, prefix + "encoder")
        rows = enc.model_rows(goals)
        state[f"{prefix}encoder.model.weight"] = enc.model.weight[rows]
        state[f"{prefix}encoder.model.bias"] = enc.model.bias[rows]
        for head in ("q1", "q2"):
            last = f"{prefix}value.{head}.{len(getattr(module.value, head)) - 1}"
            state[f"{last}.weight"] = state[f"{last}.weight"][goals]
            state[f"{last}.bias"] = state[f"{last}.bias"][goals]
    state["goal_features"] = module.goal_features[goals]
    small.load_state_dict(state)
    return small


def test_losses_at_drawn_goals_equal_the_all_goals_losses_restricted_to_them():
    from qworld.agents.mrq import learner as LR
    from qworld.agents.mrq import losses as Lz

    cfg = small_config()
    module = cfg.get_rl_module_spec(env=gym_env(cfg)).build()
    torch.manual_seed(1)
    with torch.no_grad():  # targets different from the online nets, scales != 1
        for p in list(module.target_encoder.parameters()) + list(module.target_value.parameters()):
            p.add_(0.1 * torch.randn_like(p))
        module.reward_scale.fill_(0.25)
        module.target_reward_scale.fill_(0.5)
    data = {k: torch.as_tensor(v) for k, v in random_windows(B, cfg.horizon).items()}
    bins = Lz.reward_bins(cfg.num_bins)
    for goals in (torch.tensor([0, 4, 9, 14]), torch.tensor([3]), Lz.draw_goals(L, 6, torch.Generator().manual_seed(2))):
        drawn = LR.mrq_losses(module, data, cfg, bins, goals)
        sub = dict(data, **{LR.REWARDS: data[LR.REWARDS][..., goals], LR.TERMINALS: data[LR.TERMINALS][..., goals]})
        reference = LR.mrq_losses(restricted(module, goals), sub, cfg, bins)
        for key in (LR.VALUE_LOSS_KEY, LR.REWARD_LOSS_KEY, LR.TERMINAL_LOSS_KEY, LR.DYNAMICS_LOSS_KEY,
                    LR.TOTAL_LOSS_KEY, LR.Q_MEAN_KEY):
            # the same rows of the same weights in the same order, the same shapes: equal bits
            torch.testing.assert_close(drawn[key], reference[key], rtol=0, atol=0, msg=key)
    # and goals=None is the all-goals loss; draw_goals gives None once k >= L
    assert Lz.draw_goals(L, L) is None and Lz.draw_goals(L, L + 3) is None
    every = LR.mrq_losses(module, data, cfg, bins, torch.arange(L))
    torch.testing.assert_close(every[LR.TOTAL_LOSS_KEY], LR.mrq_losses(module, data, cfg, bins)[LR.TOTAL_LOSS_KEY],
                               rtol=0, atol=0)


def test_draw_goals_is_uniform_without_replacement():
    from qworld.agents.mrq import losses as Lz

    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([Lz.draw_goals(L, 4, gen) for _ in range(3000)])
    assert all(len(set(d.tolist())) == 4 for d in draws[:50])
    counts = torch.bincount(draws.reshape(-1), minlength=L).double()
    # each goal drawn 3000 * 4 / 15 = 800 times in expectation (sd ~ 24); 6 sd either side
    assert counts.min() > 800 - 150 and counts.max() < 800 + 150


def learner_and_batch(num_steps: int, **overrides):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    cfg = small_config(**overrides)
    learner = cfg.build_learner(env=gym_env(cfg))
    batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(random_windows(num_steps * B, cfg.horizon))},
                            env_steps=num_steps * B)
    return learner, batch


def update(learner, batch, num_steps: int, reward_scale: float = 0.5):
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from qworld.agents.mrq import learner as LR

    return learner.update(batch=batch, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: 1000, LR.GRAD_STEPS_KEY: num_steps,
                                                  LR.BUFFER_REWARD_SCALE_KEY: reward_scale},
                          num_epochs=1, minibatch_size=B, shuffle_batch_per_epoch=False)


@pytest.mark.parametrize("freq", [1, 3, 10])
def test_targets_sync_every_target_update_freq_gradient_steps(freq):
    U, updates = 4, 3  # 4 gradient steps per update call, 12 in all
    learner, batch = learner_and_batch(U, target_update_freq=freq)
    module = learner.module["default_policy"].unwrapped()
    synced_before = []
    sync = module.sync_targets

    def counting_sync():
        synced_before.append(learner._grad_steps)
        sync()

    module.sync_targets = counting_sync
    for i in range(updates):
        update(learner, batch, U, reward_scale=0.5 + i)
    assert learner._grad_steps == U * updates
    # before gradient steps 0, f, 2f, ... < 12: freq 1 -> 12 syncs, 3 -> 4, 10 (above one update) -> 2
    assert synced_before == list(range(0, U * updates, freq))
    # r <- the buffer's mean |reward| handed to the update call of the last sync
    last_update = synced_before[-1] // U
    assert float(module.reward_scale) == 0.5 + last_update


def test_load_q_gives_every_goal_after_training_at_a_few(tmp_path):
    import json

    from qworld.agents import load_q
    from qworld.layout import CHECKPOINT_CONFIG_FILE, MODULE_SUBDIR

    U = 4
    learner, batch = learner_and_batch(U, goals_per_step=2)
    module = learner.module["default_policy"].unwrapped()
    update(learner, batch, U)
    assert learner.config.goals_per_step == 2 < module.num_goals == L
    # the Algorithm's checkpoint layout: the learner under learner_group/, the config at the root
    learner.save_to_path(str(tmp_path.joinpath(*MODULE_SUBDIR[:2])))
    config = learner.config.qworld_config()
    assert config["goals_per_step"] == 2
    (tmp_path / CHECKPOINT_CONFIG_FILE).write_text(json.dumps(config))
    q = load_q(str(tmp_path))
    table = q.q_table()  # [L, S, A]
    assert table.shape == (L, S, A) and np.isfinite(table).all()
    with torch.no_grad():
        live = module.q_all_goals(torch.eye(S)).numpy()  # [S, L, A]
    np.testing.assert_array_equal(table, live.transpose(1, 0, 2))
    # each goal's Q is its own head output (not one goal's copied): columns differ
    assert len({table[g].tobytes() for g in range(L)}) == L
