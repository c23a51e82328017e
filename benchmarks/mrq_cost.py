"""CPU cost of one MR.Q gradient step against the number of goals L (issue 24).

Builds MR.Q's Learner directly (``MRQConfig.build_learner``: no Ray, no env runners, no
replay buffer) on windy FourRooms with L indicator goals, hands it windows of random-walk
transitions of the true MDP (every goal's reward and termination, as the replay gives
them), and times ``Learner.update`` of ``--steps`` gradient steps of ``batch_size``
windows each (process CPU time, one torch thread). L = 4 and L = 68 alternate, one update
each, ``--repeats`` times, so that load from other processes hits both alike.

Usage::

    python benchmarks/mrq_cost.py [--goals 4 68 --steps 16 --repeats 5 --batch-size 256]

Prints ms per gradient step of each L (median and range over repeats) and the ratio of
the medians to the first L. Defaults are MRQConfig's (batch 256, enc_horizon 5,
n_step 3, widths 128, 65 reward bins).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

torch.set_num_threads(1)


def windows(problem, num: int, horizon: int, rng: np.random.Generator) -> dict:
    """``num`` windows of ``horizon`` random-walk transitions of ``problem``'s true MDP."""
    from qworld.agents.mrq.learner import ACTIONS, OBS, REWARDS, TERMINALS, VALID

    P = problem.mdp.P
    S, A = P.shape[0], P.shape[1]
    cum = P.cumsum(-1)
    states = np.zeros((num, horizon + 1), np.int64)
    states[:, 0] = rng.integers(S, size=num)
    actions = rng.integers(A, size=(num, horizon))
    for k in range(horizon):
        u = rng.random(num)[:, None]
        states[:, k + 1] = np.minimum((cum[states[:, k], actions[:, k]] < u).sum(-1), S - 1)
    nxt = states[:, 1:]
    return {
        OBS: np.eye(S, dtype=np.float32)[states],
        ACTIONS: actions,
        REWARDS: problem.goals.rewards.T[nxt].astype(np.float32),  # [num, H, L]
        TERMINALS: problem.goals.terminal.T[nxt].astype(np.float32),
        VALID: np.ones((num, horizon), bool),
    }


def build(num_goals: int, args):
    """``(learner, batch, timesteps)`` for L = ``num_goals``."""
    import gymnasium as gym
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from qworld.agents.mrq import MRQConfig
    from qworld.agents.mrq import learner as LR
    from qworld_envs import make_finite_problem

    kwargs = {"variant": "windy", "num_goals": num_goals}
    cfg = MRQConfig().training(env_kwargs=kwargs, batch_size=args.batch_size,
                               updates_per_iteration=args.steps).debugging(seed=0)
    cfg.validate()
    learner = cfg.build_learner(env=gym.make(cfg.env_id, **kwargs))
    problem = make_finite_problem(cfg.env_id, **kwargs)
    assert problem.goals.rewards.shape[0] == num_goals
    data = windows(problem, args.steps * args.batch_size, cfg.horizon, np.random.default_rng(0))
    batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(data)}, env_steps=args.steps * args.batch_size)
    timesteps = {NUM_ENV_STEPS_SAMPLED_LIFETIME: 10_000, LR.GRAD_STEPS_KEY: args.steps,
                 LR.BUFFER_REWARD_SCALE_KEY: float(np.abs(data[LR.REWARDS]).mean()) or 1.0}
    return learner, batch, timesteps


def timed_update(learner, batch, timesteps, args) -> float:
    """CPU ms per gradient step of one ``Learner.update`` of ``args.steps`` steps."""
    t0 = time.process_time()
    learner.update(batch=batch, timesteps=timesteps, num_epochs=1, minibatch_size=args.batch_size,
                   shuffle_batch_per_epoch=False)
    return (time.process_time() - t0) * 1e3 / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--goals", type=int, nargs="+", default=[4, 68])
    parser.add_argument("--steps", type=int, default=16, help="gradient steps per timed update")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    runs = {L: build(L, args) for L in args.goals}
    for L, run in runs.items():  # warm-up (first-call allocations)
        timed_update(*run, args)
    times = {L: [] for L in args.goals}
    for _ in range(args.repeats):
        for L, run in runs.items():
            times[L].append(timed_update(*run, args))
    base = float(np.median(times[args.goals[0]]))
    print(f"MR.Q gradient step, windy FourRooms, batch {args.batch_size}, {args.steps} steps per update, "
          f"{args.repeats} repeats, 1 torch thread, process CPU time")
    for L in args.goals:
        t = np.asarray(times[L])
        print(f"  L = {L:3d}: {np.median(t):7.1f} ms/step (range {t.min():.1f}-{t.max():.1f}), "
              f"ratio to L = {args.goals[0]}: {np.median(t) / base:.2f}")


if __name__ == "__main__":
    main()
