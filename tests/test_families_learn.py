"""Each learner family learns the right thing (issue 24, item 2).

A family's own tests check shapes, finiteness and "weights changed"; here each one is
trained briefly on a task whose exact Q is known and scored against it:

- PQN, DQN (RLlib's), MR.Q: the tiny 3x5 room (``helpers.TINY``, 15 indicator goals,
  deterministic), gamma 0.9, exact Q from ``bellman.solve_goal_q``;
- D3G refuses finite envs (its config's env check: its networks live in the world-model
  state space), so it runs on the smallest continuous env with a ground truth: MountainCar
  (2-d state, 3 actions), exact Q by grid value iteration (``bellman_grid``), exploring
  starts, two position goals;
- IQ-Learn (offline imitation): greedy-action agreement with its optimal demonstrator on
  the demonstrated (state, goal) pairs.

Scores: ``agreement``, the fraction of the (goal, state) pairs where the agent acts
(``~terminal``) whose greedy action is optimal under the exact Q (ties allowed), and
``q_nmse = scoring.nmse(Q, Q*)`` on the same pairs. Every test trains twice with one seed:
as shipped, and with the family's target broken once (monkeypatched in this process, where
RLlib's local learner computes the loss); the thresholds lie between the two runs' measured
scores, so they pass for the working loss and fail for the broken one. Training is seeded
and sized in iterations, never in time (IQ-Learn's offline batches come through Ray Data's
shuffled reads and vary from run to run; its margins allow for that). The whole file trains
for about 90 s on the 2-core machine (pytest --durations=0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qworld_envs
from qworld.agents.families import family
from qworld.worldmodel.bellman import solve_goal_q
from qworld.worldmodel.scoring import nmse

from helpers import TINY  # noqa: E402

pytestmark = pytest.mark.ray

FOUR_ROOMS = qworld_envs.FOUR_ROOMS_ID
MOUNTAIN_CAR = qworld_envs.MOUNTAIN_CAR_ID
GAMMA = 0.9  # action gaps of ~10% of Q (gamma 0.99: ~1%, too fine for a short run)
TIE_TOL = 1e-9  # exact Q is float64 from one linear solve per goal: ties equal to round-off


# ------------------------------------------------------------------ scores
def finite_truth(env_kwargs: dict, gamma: float):
    """``(Q* [L, S, A], acting [L, S])`` of the problem: exact optimal Q and the pairs where
    an agent acts for goal g (not at g's terminal states, where its episode has ended)."""
    problem = qworld_envs.make_finite_problem(FOUR_ROOMS, **env_kwargs)
    goals = problem.goals
    q_star, _ = solve_goal_q(problem.mdp.P, goals.rewards, gamma, goals.terminal)
    return q_star, ~np.asarray(goals.terminal, dtype=bool)


def agreement(q: np.ndarray, q_star: np.ndarray, where: np.ndarray) -> float:
    """Fraction of ``where`` whose greedy action under ``q`` is optimal under ``q_star``
    (any of the tied optimal actions counts). ``q``, ``q_star``: ``[..., A]``."""
    chosen = np.take_along_axis(q_star, q.argmax(-1)[..., None], -1)[..., 0]
    best = q_star.max(-1)
    tol = TIE_TOL * max(1.0, float(np.abs(q_star).max()))
    return float((chosen >= best - tol)[where].mean())


def finite_scores(q: np.ndarray, q_star: np.ndarray, acting: np.ndarray) -> dict:
    return {"agreement": agreement(q, q_star, acting), "q_nmse": nmse(q[acting], q_star[acting])}


def train(config, iterations: int, read=lambda qfun: qfun.q_table()):
    """Build, train ``iterations`` times; ``read`` of the learner's ``QFunction`` (the live
    module, read before the algorithm stops)."""
    algo = config.build_algo()
    try:
        for _ in range(iterations):
            algo.train()
        return read(algo.q_function())
    finally:
        algo.stop()


class _Discount:
    """A learner's config seen with another ``gamma`` (everything else delegated)."""

    def __init__(self, config, gamma: float):
        self._config, self.gamma = config, gamma

    def __getattr__(self, name):
        return getattr(self._config, name)


# ------------------------------------------------------------------ the broken targets
# Each drops the bootstrap from the family's TD target (discount 0 in the target only): Q
# learns the next reward alone, the bug a target that loses its "gamma * V(s')" term makes.
def break_pqn(monkeypatch):
    from qworld.agents.pqn import learner

    original = learner.q_lambda_targets
    monkeypatch.setattr(learner, "q_lambda_targets",
                        lambda rewards, dones, truncs, next_q_max, gamma, lam:
                        original(rewards, dones, truncs, next_q_max, 0.0, lam))


def break_dqn(monkeypatch):
    from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner

    original = DQNTorchLearner.compute_loss_for_module

    def broken(self, *, module_id, config, batch, fwd_out):
        return original(self, module_id=module_id, config=_Discount(config, 0.0), batch=batch, fwd_out=fwd_out)

    monkeypatch.setattr(DQNTorchLearner, "compute_loss_for_module", broken)


def break_mrq(monkeypatch):
    from qworld.agents.mrq import losses

    original = losses.n_step_returns
    monkeypatch.setattr(losses, "n_step_returns",
                        lambda rewards, terminals, valid, gamma: original(rewards, terminals, valid, 0.0))


def break_d3g(monkeypatch):
    from qworld.agents.d3g import losses

    original = losses.critic_target
    monkeypatch.setattr(losses, "critic_target",
                        lambda rewards, terminals, q_next, gamma: original(rewards, terminals, q_next, 0.0))


# ------------------------------------------------------------------ the finite families
# family -> (agent keywords, total_env_steps, iterations), sized for a 2-core CPU. Off-policy
# learners explore as they can afford: DQN's one commanded goal per episode sees an
# (s, g, a) only when it acts there, so it behaves uniformly at random (epsilon 1
# throughout; Q-learning is off-policy) and replays 16 transitions per one sampled
# (RLlib's training_intensity). MR.Q trains all 15 goals per step (goals_per_step = L).
FINITE_RUNS = {
    "pqn": (dict(num_envs=16, rollout_length=16, minibatch_size=32, num_epochs=4, hidden_sizes=[64], lr=3e-3,
                 lambda_=0.65, epsilon_decay_fraction=0.5), 16 * 16 * 60, 60),
    "dqn": (dict(num_envs=8, rollout_length=4, minibatch_size=64, hidden_sizes=[64], lr=1e-3, learning_starts=256,
                 target_update_freq=256, epsilon_start=1.0, epsilon_end=1.0, training_intensity=16), 3000, 3),
    "mrq": (dict(num_envs=4, rollout_length=16, learning_starts=128, batch_size=32, updates_per_iteration=32,
                 target_update_freq=8, n_step=5, enc_horizon=5, goals_per_step=15, enc_lr=1e-3, value_lr=3e-3,
                 zs_dim=64, za_dim=16, zsa_dim=64, enc_hidden=[64], value_hidden=[64], epsilon_decay_fraction=0.3),
            64 * 40, 40),
}
BREAK = {"pqn": break_pqn, "dqn": break_dqn, "mrq": break_mrq, "d3g": break_d3g}
# Measured on this machine (seed 0), agreement and q_nmse, working / target broken. Var(Q*)
# is 0.012 here, so q_nmse 1 is an RMS error of 0.11; Q = 0 scores 0.36 and 50.3, the broken
# target's own fixed point (Q = next reward) 0.52 and 45.9:
#   pqn  1.000 / 0.757   0.0074 / 45.0
#   dqn  0.69  / 0.65    4.1-4.4 / 40.8-41.2   (two runs: RLlib's DQN varies slightly)
#   mrq  1.000 / 0.695   7.99   / 48.9
# DQN's greedy actions are no better than the broken run's at this budget (its Q plateaus
# near mean 0.6 against the exact 0.77 in runs twice as long, while PQN on the same gymnasium
# env and RLlib runner converges), so only its Q error is held to a threshold. MR.Q's Q is
# still growing towards Q* (3.2 after 60 iterations): its threshold says "much nearer Q*
# than Q = 0 or the broken target", not "converged".
MIN_AGREEMENT = {"pqn": 0.95, "dqn": None, "mrq": 0.9}
MAX_Q_NMSE = {"pqn": 0.05, "dqn": 15.0, "mrq": 20.0}


def finite_config(name: str):
    agent, total, _ = FINITE_RUNS[name]
    return family(name).build_config(FOUR_ROOMS, TINY, {**agent, "gamma": GAMMA}, total_env_steps=total).debugging(seed=0)


@pytest.mark.parametrize("name", sorted(FINITE_RUNS))
def test_finite_family_learns_exact_q_and_a_broken_target_does_not(name, ray_session, monkeypatch):
    q_star, acting = finite_truth(TINY, GAMMA)
    iterations = FINITE_RUNS[name][2]
    q = train(finite_config(name), iterations)
    assert q.shape == q_star.shape
    good = finite_scores(q, q_star, acting)
    with monkeypatch.context() as patch:
        BREAK[name](patch)
        q_broken = train(finite_config(name), iterations)
    bad = finite_scores(q_broken, q_star, acting)
    print(f"{name}: working {good}, broken {bad}")
    assert good["q_nmse"] <= MAX_Q_NMSE[name] < bad["q_nmse"], (good, bad)
    if MIN_AGREEMENT[name] is not None:
        assert good["agreement"] >= MIN_AGREEMENT[name] > bad["agreement"], (good, bad)


# ------------------------------------------------------------------ D3G on MountainCar
# Two sparse position goals (the left wall, the hilltop), exploring starts so every state is
# visited. On most of MountainCar's box the three actions are worth almost the same (one step
# moves v by 0.001), so agreement is counted on the states where the choice matters: where
# the exact Q's actions span more than D3G_DECISIVE, an action within half of that of the
# best counts as optimal.
D3G_ENV = {"goal_type": "position", "num_goals": 2, "start_states": "uniform"}
D3G_GRID = (200, 200)  # planning_continuous.DEFAULT_GRID_SHAPES for MountainCar
D3G_AGENT = dict(num_envs=4, rollout_length=16, learning_starts=256, batch_size=64, updates_per_iteration=32,
                 hidden_sizes=[64, 64], lr=1e-3, tau_polyak=0.05, epsilon_decay_fraction=0.3)
D3G_TOTAL, D3G_ITERATIONS = 64 * 40, 40
D3G_DECISIVE = 0.01  # 14% of the box's states (Q* spans [0, 1])
# measured (seed 0; working / broken): agreement 0.961 / 0.878, q_nmse 0.299 / 0.828
D3G_MIN_AGREEMENT, D3G_MAX_Q_NMSE = 0.92, 0.5


def continuous_scores(qfun, problem, gamma: float) -> dict:
    from qworld.agents.adapter import agent_q_fn
    from qworld.worldmodel.bellman_grid import GridQ, grid_q_for_problem

    q_star_grid, grid = grid_q_for_problem(problem, D3G_GRID, gamma)
    states = problem.dynamics.uniform_states(4096, torch.Generator().manual_seed(0))
    with torch.no_grad():
        q_star = GridQ(q_star_grid, grid)(states.double()).numpy()  # [B, L, A]
        q = agent_q_fn(qfun, problem)(states.float(), None).double().numpy()
    decisive = q_star.max(-1) - q_star.min(-1) > D3G_DECISIVE
    chosen = np.take_along_axis(q_star, q.argmax(-1)[..., None], -1)[..., 0]
    near_best = chosen >= q_star.max(-1) - D3G_DECISIVE / 2
    return {"agreement": float(near_best[decisive].mean()), "decisive": float(decisive.mean()),
            "q_nmse": nmse(q, q_star)}


def d3g_config():
    return family("d3g").build_config(MOUNTAIN_CAR, D3G_ENV, {**D3G_AGENT, "gamma": GAMMA},
                                      total_env_steps=D3G_TOTAL).debugging(seed=0)


def test_d3g_refuses_the_finite_mdp_and_learns_mountain_cars_exact_q(ray_session, monkeypatch):
    assert any("is finite; d3g runs on continuous envs" in e
               for e in family("d3g").build_config(FOUR_ROOMS, TINY, {}).qworld_errors())
    problem = qworld_envs.make_continuous_problem(MOUNTAIN_CAR, **D3G_ENV)
    good = train(d3g_config(), D3G_ITERATIONS, lambda qfun: continuous_scores(qfun, problem, GAMMA))
    with monkeypatch.context() as patch:
        break_d3g(patch)
        bad = train(d3g_config(), D3G_ITERATIONS, lambda qfun: continuous_scores(qfun, problem, GAMMA))
    print(f"d3g: working {good}, broken {bad}")
    assert good["agreement"] >= D3G_MIN_AGREEMENT > bad["agreement"], (good, bad)
    assert good["q_nmse"] <= D3G_MAX_Q_NMSE < bad["q_nmse"], (good, bad)


# ------------------------------------------------------------------ IQ-Learn imitates
IQ_AGENT = dict(num_demonstrations=60, batch_size=64, updates_per_iteration=4, hidden_sizes=[64], lr=3e-3)
IQ_ITERATIONS = 10
# measured (seed 0; working / broken): 1.0 / 0.45 and 0.993 / 0.26 (Ray Data's shuffled
# reads make IQ-Learn's batches, and so its numbers, vary from run to run)
IQ_MIN_AGREEMENT = 0.9


def break_iqlearn(monkeypatch):
    """The loss pairs each state with another transition's action (a misaligned column)."""
    from qworld.agents.iqlearn import losses

    original = losses.iq_learn_loss
    monkeypatch.setattr(losses, "iq_learn_loss",
                        lambda q, q_next, actions, terminated, *args: original(q, q_next, actions.roll(1), terminated, *args))


def imitation(iterations: int) -> float:
    """Greedy-action agreement with the demonstrator on the demonstrated (state, goal) pairs."""
    import pandas as pd
    from ray.rllib.core.columns import Columns

    from qworld.demonstrations import DEMONSTRATIONS_FILE

    config = family("iqlearn").build_config(FOUR_ROOMS, TINY, {**IQ_AGENT, "gamma": GAMMA}).debugging(seed=0)
    algo = config.build_algo()  # writes its optimal demonstrations (seed 0) into its log dir
    try:
        demos = pd.read_parquet(f"{algo.config.input_}/{DEMONSTRATIONS_FILE}")
        for _ in range(iterations):
            algo.train()
        q = algo.q_function().q_table()  # [L, S, A]
    finally:
        algo.stop()
    obs = np.stack(demos[Columns.OBS])
    S = q.shape[1]
    s, g = obs[:, :S].argmax(1), obs[:, S:].argmax(1)
    return float((q[g, s].argmax(-1) == demos[Columns.ACTIONS].to_numpy()).mean())


def test_iqlearn_imitates_its_demonstrator_and_a_broken_loss_does_not(ray_session, monkeypatch):
    good = imitation(IQ_ITERATIONS)
    with monkeypatch.context() as patch:
        break_iqlearn(patch)
        bad = imitation(IQ_ITERATIONS)
    print(f"iqlearn: agreement working {good}, broken {bad}")
    assert good >= IQ_MIN_AGREEMENT > bad, (good, bad)
