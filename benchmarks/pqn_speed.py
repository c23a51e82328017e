"""Throughput of our RLlib PQN against a bare torch PQN loop doing the same work.

Both train the all-goals PQN on FourRooms (all 68 indicator goals) with the batched
torch env: rollouts of ``num_envs x rollout_length`` steps, 1-step targets computed once
per rollout, ``num_epochs`` epochs of ``minibatch_size`` minibatches, RAdam (``foreach``),
global-norm clip, linear lr decay. The bare loop does what our fast runner and learner
do, and nothing else: Q of all goals at every s_t while sampling (their max over actions
is the target's max at s_{t+1} wherever the episode went on), one extra forward pass only
for the s_{t+1} that were followed by a reset (and the last step), no target pass over the
whole rollout. It has no Ray, no Algorithm/Learner/EnvRunner layers, no metrics, no
finiteness check of the gradients. Within a repeat the two alternate rollout by rollout
(one bare iteration, one ``PQN.train()``, ...), so that load from other processes on a
shared machine hits both alike; each repeat builds both afresh (seed = repeat).

Usage::

    python benchmarks/pqn_speed.py [--num-envs 256 --rollout-length 64 --iters 20 --repeats 5]

``--experience-capacity 0`` turns off the experience log that PQN keeps by default (the
bare loop keeps none), so the two runs differ by what the log costs.

Prints env-steps/s of both, their ratio (RLlib / bare) per repeat, the median and range of
the ratios, the standard-runner (gymnasium + SingleAgentEnvRunner) figure and the peak RSS
of this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from qworld.agents.pqn.module import PQNTorchRLModule
from qworld.agents.pqn.targets import q_lambda_targets


def bare_pqn(model_config: dict, args, seed: int):
    """A plain torch PQN loop (the work of our fast runner + learner): ``() -> env steps`` of one iteration."""
    import gymnasium as gym

    from qworld_envs import make_batched

    torch.manual_seed(seed)
    env = make_batched(args.env_id, args.num_envs, seed=seed, **args.env_kwargs)
    space = gym.spaces.Box(-np.inf, np.inf, (env.obs_dim + env.goal_dim,), np.float32)
    net = PQNTorchRLModule(
        observation_space=space,
        action_space=gym.spaces.Discrete(env.num_actions),
        model_config=model_config,
        inference_only=False,
    )
    # As PQNTorchLearner: RAdam with foreach (eps 1e-8, the PQNConfig default).
    opt = torch.optim.RAdam(net.parameters(), lr=args.lr, eps=1e-8, foreach=True)
    total = (args.iters + 1) * args.num_envs * args.rollout_length
    T, N, L = args.rollout_length, args.num_envs, env.num_goals
    state = env.reset(seed=seed)
    steps = 0
    rows = torch.arange(N)

    def one_iteration():
        nonlocal state, steps
        obs_b = torch.empty((T, N, env.obs_dim))
        next_b = torch.empty_like(obs_b)
        act_b = torch.empty((T, N), dtype=torch.long)
        rew_b = torch.empty((T, N, L))
        term_b = torch.empty((T, N, L), dtype=torch.bool)
        cut_b = torch.empty((T, N), dtype=torch.bool)
        q_max_b = torch.empty((T, N, L))
        eps = max(0.1, 1.0 - steps / (0.5 * total))
        with torch.no_grad():
            for t in range(T):
                q_all = net.q_all_goals(state["obs"])  # [N, L, A]: kept for the targets
                greedy = q_all[rows, state["goal"]].argmax(-1)
                a = torch.where(torch.rand(N) < eps, torch.randint(env.num_actions, (N,)), greedy)
                q_max_b[t] = q_all.amax(-1)
                out = env.step(a)
                obs_b[t], next_b[t], act_b[t] = state["obs"], out["next_obs"], a
                rew_b[t], term_b[t] = out["rewards"], out["terminals"]
                cut_b[t] = out["terminated"] | out["truncated"]
                state = {"obs": out["obs"], "goal": out["goal"]}
            # max_a Q(s_{t+1}): the next step's Q where the episode went on, one pass for the rest
            nq = torch.empty_like(q_max_b)
            nq[:-1] = q_max_b[1:]
            fresh = cut_b.clone()
            fresh[-1] = True
            nq[fresh] = net.q_all_goals(next_b[fresh]).amax(-1)
            targets = q_lambda_targets(rew_b, term_b, cut_b, nq, args.gamma, 0.0).reshape(T * N, L)
        obs_f, act_f = obs_b.reshape(T * N, -1), act_b.reshape(T * N)
        for _ in range(args.num_epochs):
            perm = torch.randperm(T * N)
            for i in range(T * N // args.minibatch_size):
                idx = perm[i * args.minibatch_size : (i + 1) * args.minibatch_size]
                q = net.q_all_goals(obs_f[idx])
                q_sa = q.gather(-1, act_f[idx].view(-1, 1, 1).expand(-1, L, 1)).squeeze(-1)
                loss = ((q_sa - targets[idx]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
                opt.step()
        steps += T * N
        for g in opt.param_groups:
            g["lr"] = args.lr * max(0.0, 1.0 - steps / total)
        return T * N

    return one_iteration


def rllib_pqn(args, seed: int, env_runner: str = "fast"):
    """``PQN.train()`` (num_env_runners=0, num_learners=0): the algorithm and ``() -> env steps``."""
    from qworld.agents.pqn import PQNConfig
    from qworld.metrics import TRAIN_ENV_STEPS

    total = (args.iters + 1) * args.num_envs * args.rollout_length
    config = (
        PQNConfig()
        .training(
            env_id=args.env_id,
            env_kwargs=args.env_kwargs,
            env_runner=env_runner,
            num_envs=args.num_envs,
            rollout_length=args.rollout_length,
            minibatch_size=args.minibatch_size,
            num_epochs=args.num_epochs,
            hidden_sizes=args.hidden_sizes,
            lr=args.lr,
            gamma=args.gamma,
            total_env_steps=total,
            experience_capacity=args.experience_capacity,
        )
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        .debugging(seed=seed, log_level="ERROR")
    )
    algo = config.build_algo()

    def one_iteration() -> int:
        before = algo.env_steps_sampled()
        return algo.train()[TRAIN_ENV_STEPS] - before

    return algo, one_iteration


def interleaved_sps(iterations, iters: int):
    """Env steps per second of each ``() -> env steps`` callable, run in turn ``iters`` times
    after one untimed warm-up each."""
    for it in iterations:
        it()
    seconds, steps = [0.0] * len(iterations), [0] * len(iterations)
    for _ in range(iters):
        for i, it in enumerate(iterations):
            t0 = time.perf_counter()
            steps[i] += it()
            seconds[i] += time.perf_counter() - t0
    return [n / t for n, t in zip(steps, seconds)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="qworld/FourRooms-v0")
    p.add_argument("--variant", default="deterministic")
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--rollout-length", type=int, default=64)
    p.add_argument("--minibatch-size", type=int, default=256)
    p.add_argument("--num-epochs", type=int, default=1)
    p.add_argument("--hidden-sizes", type=int, nargs="+", default=[256, 256])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--iters", type=int, default=20, help="timed iterations (rollouts) per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--standard-iters", type=int, default=3, help="timed iterations of the standard runner (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--experience-capacity", type=int, default=65536,
                   help="PQN's experience log (the default records every transition's count; 0: none). "
                        "The bare loop records nothing, so the ratio includes the log's cost")
    args = p.parse_args()
    args.env_kwargs = {"variant": args.variant}
    torch.set_num_threads(args.threads)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    from qworld.agents.pqn import PQNConfig

    model_config = (
        PQNConfig()
        .training(env_id=args.env_id, env_kwargs=args.env_kwargs, hidden_sizes=args.hidden_sizes)
        .pqn_model_config()
    )
    rows = []
    for r in range(args.repeats):
        algo, ours_iteration = rllib_pqn(args, seed=r)
        try:
            bare, ours = interleaved_sps([bare_pqn(model_config, args, seed=r), ours_iteration], args.iters)
        finally:
            algo.stop()
        rows.append({"repeat": r, "bare_sps": round(bare), "rllib_sps": round(ours), "ratio": round(ours / bare, 3)})
        print(json.dumps(rows[-1]), flush=True)
    ratios = sorted(x["ratio"] for x in rows)
    summary = {
        "median_ratio": round(float(np.median(ratios)), 3),
        "min_ratio": ratios[0],
        "max_ratio": ratios[-1],
    }
    if args.standard_iters > 0:
        algo, standard_iteration = rllib_pqn(args, seed=0, env_runner="standard")
        try:
            summary["standard_runner_sps"] = round(interleaved_sps([standard_iteration], args.standard_iters)[0])
        finally:
            algo.stop()
    summary["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary["settings"] = {
        k: getattr(args, k)
        for k in ("env_id", "variant", "num_envs", "rollout_length", "minibatch_size", "num_epochs", "hidden_sizes", "threads")
    }
    print(json.dumps(summary), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
