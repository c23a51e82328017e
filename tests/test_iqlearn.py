"""Offline IQ-Learn: the pure loss, the demonstrations file as RLlib reads it, training through
Ray's offline pipeline on deterministic FourRooms, a checkpoint restored by ``load_q``
without Ray, and imitation of the demonstrator."""

import json
import math

import numpy as np
import pytest
import torch

import qworld_envs
from qworld import metrics as K
from tolerances import ulps

FOUR_ROOMS = "qworld/FourRooms-v0"
DETERMINISTIC_4 = {"variant": "deterministic", "num_goals": 4, "goal_type": "indicator"}


def flat(result, prefix=""):
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------ the pure loss
def test_iq_loss_matches_a_hand_computed_case():
    from qworld.agents.iqlearn import losses as Lz

    # Row 0: Q(s) = [0, 0], expert a = 0, Q(s') = [0, 0], not terminated.
    # Row 1: Q(s) = [log 3, 0], expert a = 0, terminated (V(s') must not count).
    q = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    q_next = torch.tensor([[0.0, 0.0], [5.0, -2.0]])
    actions = torch.tensor([0, 0])
    terminated = torch.tensor([False, True])
    gamma, alpha, temperature = 0.5, 0.5, 1.0
    out = Lz.iq_learn_loss(q, q_next, actions, terminated, gamma, alpha, temperature)
    log2, log3 = math.log(2), math.log(3)
    # V = logsumexp: V(s_0) = V(s'_0) = log 2, V(s_1) = log 4; rewards r = Q(s, a) - gamma (1 - d) V(s')
    r = [0.0 - 0.5 * log2, log3]
    expert_reward = sum(r) / 2
    value_term = ((log2 - 0.5 * log2) + 2 * log2) / 2
    chi2 = (r[0] ** 2 + r[1] ** 2) / 2 / (4 * alpha)
    # float32 against float64: each term is ~5 roundings (a logsumexp, a product, a difference,
    # a mean) of numbers below 2, each at most half a spacing (EPS32 / 2); the loss adds three
    assert out[Lz.EXPERT_REWARD].item() == pytest.approx(expert_reward, rel=0, abs=ulps(4))
    assert out[Lz.VALUE_TERM].item() == pytest.approx(value_term, rel=0, abs=ulps(4))
    assert out[Lz.CHI2].item() == pytest.approx(chi2, rel=0, abs=ulps(4))
    assert out[Lz.LOSS].item() == pytest.approx(-expert_reward + value_term + chi2, rel=0, abs=ulps(8))
    # The case discriminates: bootstrapping through the terminal row would give another loss.
    wrong = Lz.iq_learn_loss(q, q_next, actions, torch.tensor([False, False]), gamma, alpha, temperature)
    assert abs(wrong[Lz.LOSS].item() - out[Lz.LOSS].item()) > 0.1


def test_iq_loss_gradient_raises_the_experts_action():
    from qworld.agents.iqlearn import losses as Lz

    q = torch.zeros(3, 4, requires_grad=True)
    out = Lz.iq_learn_loss(q, torch.zeros(3, 4), torch.tensor([1, 2, 3]), torch.zeros(3), 0.9, 0.5, 0.5)
    out[Lz.LOSS].backward()
    grad = q.grad.numpy()
    # descent raises Q of the expert's action and lowers the others'
    assert (grad[np.arange(3), [1, 2, 3]] < 0).all()
    assert (grad[0, [0, 2, 3]] > 0).all()


# ------------------------------------------------------------------ demonstrations
def test_demonstrations_are_optimal_episodes_in_rllibs_format(ray_session, tmp_path):
    import ray.data
    from ray.rllib.core.columns import Columns

    from qworld.demonstrations import DEMONSTRATIONS_FILE, DEMONSTRATIONS_META, optimal_actions, write_demonstrations

    meta = write_demonstrations(tmp_path, FOUR_ROOMS, {**DETERMINISTIC_4, "variant": "windy"}, num_episodes=30,
                                gamma=0.99, seed=1)
    frame = ray.data.read_parquet(str(tmp_path / DEMONSTRATIONS_FILE)).to_pandas()
    expected = {Columns.EPS_ID, Columns.OBS, Columns.ACTIONS, Columns.REWARDS, Columns.NEXT_OBS,
                Columns.TERMINATEDS, Columns.TRUNCATEDS, Columns.T}
    assert set(frame.columns) == expected and len(frame) == meta["num_transitions"]
    assert json.loads((tmp_path / DEMONSTRATIONS_META).read_text())["num_episodes"] == 30
    problem = qworld_envs.make_finite_problem(FOUR_ROOMS, **{**DETERMINISTIC_4, "variant": "windy"})
    S, L = problem.mdp.num_states, problem.goals.num_goals
    obs, new_obs = np.stack(frame[Columns.OBS]), np.stack(frame[Columns.NEXT_OBS])
    assert obs.shape == (len(frame), S + L) and (obs.sum(1) == 2).all()
    s, g, s2 = obs[:, :S].argmax(1), obs[:, S:].argmax(1), new_obs[:, :S].argmax(1)
    assert (new_obs[:, S:].argmax(1) == g).all()
    np.testing.assert_array_equal(frame[Columns.ACTIONS], optimal_actions(problem, 0.99)[g, s])
    assert (problem.mdp.P[s, frame[Columns.ACTIONS], s2] > 0).all()  # true transitions
    np.testing.assert_array_equal(frame[Columns.TERMINATEDS], problem.goals.terminal[g, s2])
    np.testing.assert_allclose(frame[Columns.REWARDS], problem.goals.rewards[g, s2])
    # every episode ends once, on its goal or the time limit, and its steps chain
    for _, ep in frame.groupby(Columns.EPS_ID, sort=False):
        ends = (ep[Columns.TERMINATEDS] | ep[Columns.TRUNCATEDS]).to_numpy()
        assert ends[-1] and not ends[:-1].any()
        np.testing.assert_array_equal(ep[Columns.T], np.arange(len(ep)))
        idx = ep.index.to_numpy()
        np.testing.assert_array_equal(s[idx[1:]], s2[idx[:-1]])


def test_demos_command_writes_and_names_a_bad_field(tmp_path, capsys):
    from qworld.cli import main

    out = tmp_path / "demos"
    assert main(["demos", "--variant", "windy", "--num-goals", "4", "--goal-type", "indicator", "--episodes", "5",
                 "--seed", "0", "--out", str(out)]) == 0
    assert json.loads((out / "demonstrations.json").read_text())["env_kwargs"]["variant"] == "windy"
    assert main(["demos", "--env", "qworld/MountainCar-v0", "--out", str(out)]) == 2
    assert "env_id" in capsys.readouterr().err
    assert main(["demos", "--episodes", "0", "--out", str(out)]) == 2
    assert "num_episodes" in capsys.readouterr().err


# ------------------------------------------------------------------ config
def test_config_names_every_bad_field_and_refuses_continuous_envs(tmp_path):
    from qworld.agents.families import family
    from qworld.agents.iqlearn import IQLearn, IQLearnConfig

    fam = family("iqlearn")
    assert fam.algo_class() is IQLearn and fam.config_class() is IQLearnConfig
    assert {"demonstrations", "num_demonstrations", "alpha", "temperature", "batch_size"} <= set(fam.keywords())
    bad = fam.build_config("qworld/MountainCar-v0", {}, {"alpha": 0, "batch_size": 0})
    errors = bad.qworld_errors()
    assert any(e.startswith("env_id=") and "continuous" in e and FOUR_ROOMS in e for e in errors), errors
    assert any(e.startswith("alpha=") for e in errors) and any(e.startswith("batch_size=") for e in errors)
    with pytest.raises(ValueError, match="env_id="):
        bad.validate()
    missing = fam.build_config(FOUR_ROOMS, {}, {"demonstrations": str(tmp_path / "nowhere")})
    assert any(e.startswith("demonstrations=") for e in missing.qworld_errors())
    good = fam.build_config(FOUR_ROOMS, DETERMINISTIC_4, {"demonstrations": str(tmp_path)}, total_env_steps=10)
    good.validate()
    assert good.input_ == str(tmp_path) and good.train_batch_size_per_learner == 256 * 16
    assert good.qworld_config()["algorithm"] == "iqlearn" and good.qworld_config()["num_goals"] == 4


def test_config_round_trips_through_a_tune_style_dict():
    from qworld.agents.iqlearn import IQLearn, IQLearnConfig

    cfg = IQLearnConfig().training(env_id=FOUR_ROOMS, env_kwargs=DETERMINISTIC_4, alpha=0.25, hidden_sizes=(64, 32),
                                   num_demonstrations=7, gamma=0.9, lr=1e-3)
    back = IQLearn.get_default_config().update_from_dict(cfg.debugging(seed=3).to_dict())
    assert back.qworld_config() == cfg.qworld_config()
    assert back.alpha == 0.25 and back.hidden_sizes == [64, 32] and back.num_demonstrations == 7 and back.seed == 3


# ------------------------------------------------------------------ through Ray
def restart_ray():
    """Ray as conftest's ``ray_session`` starts it (after a test shut it down)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}})


# Measured (deterministic FourRooms, 4 indicator goals, 40 episodes = 317 transitions, seed 0,
# batch 64, lr 3e-3): the greedy action of the demonstrated (state, goal) pairs agrees with the
# demonstrator on 0.956 of them after 12 iterations, 0.997 after 20, 1.0 after 30 (lr 1e-3:
# 0.87 / 0.94 / 0.98); 0.9 after 20 leaves margin.
MIN_AGREEMENT = 0.9
NUM_ITERATIONS = 20
# The imitator's own greedy policy, from every start state: 0.62 measured (the demonstrator's
# 1.0; the greedy policy of a random Q table 0.03 on average, at most 0.09 in 200 draws).
MIN_POLICY_SUCCESS = 0.4


def test_iqlearn_trains_offline_checkpoints_and_imitates(ray_session, tmp_path):
    from ray.rllib.core.columns import Columns

    from qworld.agents import load_q
    from qworld.agents.iqlearn import IQLearnConfig
    from qworld.agents.iqlearn.iqlearn import NUM_DEMONSTRATION_TRANSITIONS
    from qworld.demonstrations import DEMONSTRATIONS_FILE

    config = IQLearnConfig().training(env_id=FOUR_ROOMS, env_kwargs=DETERMINISTIC_4, num_demonstrations=40,
                                      batch_size=64, updates_per_iteration=4, hidden_sizes=[64, 64], lr=3e-3).debugging(seed=0)
    algo = config.build_algo()  # demonstrations=None: written into the Algorithm's log dir
    try:
        import pandas as pd

        demos = pd.read_parquet(f"{algo.config.input_}/{DEMONSTRATIONS_FILE}")
        assert algo.config.input_.startswith(str(algo.logdir))
        module = algo.live_module()
        before = {k: v.clone() for k, v in module.state_dict().items()}
        results = [flat(algo.train()) for _ in range(NUM_ITERATIONS)]
        last = results[-1]
        assert np.isfinite([r[K.TRAIN_LOSS] for r in results]).all()
        assert 0 < last[NUM_DEMONSTRATION_TRANSITIONS] <= 4 * 64
        steps = [r[K.TRAIN_ENV_STEPS] for r in results]  # demonstration transitions consumed
        assert steps[-1] == algo.env_steps_sampled() == sum(r[NUM_DEMONSTRATION_TRANSITIONS] for r in results)
        assert np.isfinite(last["learners/default_policy/chi2_regulariser"])
        state = module.state_dict()
        assert not torch.equal(state["q_net.0.weight"], before["q_net.0.weight"])
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        q_live = algo.q_function().q_table()
    finally:
        algo.stop()
    ray_session.shutdown()
    try:
        q = load_q(path)
        assert not ray_session.is_initialized()
        q_table = q.q_table()
    finally:
        restart_ray()
    np.testing.assert_array_equal(q_table, q_live)
    assert q.config["algorithm"] == "iqlearn" and q.config[K.ENV_STEPS] == steps[-1]
    # imitation: greedy action of every demonstrated (state, goal) vs the demonstrator's
    S = q_table.shape[1]
    obs = np.stack(demos[Columns.OBS])
    s, g = obs[:, :S].argmax(1), obs[:, S:].argmax(1)
    agreement = (q_table[g, s].argmax(-1) == demos[Columns.ACTIONS].to_numpy()).mean()
    assert agreement >= MIN_AGREEMENT, agreement
    # the P-learning actor's rows: soft M, the rewards IQ-Learn recovered, its policy against the
    # demonstrator's; a checkpoint whose demonstrations moved away scores without them
    from qworld.sweep.score import score_q

    [row] = score_q(q, {}, ["moves"])
    assert row[K.ERROR] is None
    assert row[f"{K.DEMONSTRATIONS}/{K.REWARD_PEARSON}"] > 0.5
    assert np.isfinite(row[f"{K.RECOVERED}/{K.P_MSE}"]) and np.isfinite(row[K.P_MSE])
    assert row[f"{K.STAR}/{K.POLICY_SUCCESS}"] == pytest.approx(1.0)
    # the agent's own greedy policy in the true MDP, from every start state (not only the
    # demonstrated ones): the row is that of this Q, and the imitator reaches its goals
    from qworld.worldmodel.scoring import policy_success

    problem = qworld_envs.make_finite_problem(FOUR_ROOMS, **DETERMINISTIC_4)
    own = np.nanmean(policy_success(problem.mdp.P, q_table, problem.goals.terminal, problem.max_episode_steps))
    assert row[K.POLICY_SUCCESS] == pytest.approx(own, rel=0, abs=1e-12)
    assert own >= MIN_POLICY_SUCCESS, own
