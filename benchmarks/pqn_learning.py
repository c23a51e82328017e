"""How well PQN learns FourRooms: Q NMSE against the exact Q of its own greedy policy, and
the greedy policy's success rate, over all 68 indicator goals, within a fixed env-step budget.

Agent: our RLlib PQN (fast batched runner, num_env_runners=0), all-goals head. At every
evaluation point the learned ``Q[L, S, A]`` is read with ``load_q``-equivalent code
(``PQN.q_function``), its greedy policy ``pi`` is evaluated exactly with
``qworld.worldmodel.bellman.solve_goal_q(P, rewards, gamma, terminal, policy=pi)`` and

- ``q_nmse`` = ``qworld.worldmodel.scoring.nmse(Q, Q_pi)`` over all (goal, state, action) entries
  (the sweep's scoring uses the same numbers);
- ``success`` = probability that the greedy policy reaches the goal within the episode
  limit (100 steps), averaged over goals and uniform non-terminal start states (exact,
  by propagating the state distribution through the true P);
- ``optimal_success``: the same for the optimal policy (windy: not 1 within 100 steps).

Usage::

    python benchmarks/pqn_learning.py --variant deterministic --total-env-steps 2000000 [--seeds 0 1]

Prints one JSON line per evaluation and a summary line per run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch


def greedy_success(P: np.ndarray, terminal: np.ndarray, policy: np.ndarray, horizon: int) -> float:
    """Mean probability of reaching the goal within ``horizon`` steps.

    Args:
        P: ``[S, A, S]``.
        terminal: ``[L, S]`` bool.
        policy: ``[L, S, A]`` probabilities.
        horizon: episode limit.

    Returns:
        Average over goals g and start states uniform over the non-terminal states of g.
    """
    L, S = terminal.shape
    P_pi = np.einsum("lsa,sat->lst", policy, P)  # [L, S, S]
    keep = (~terminal).astype(np.float64)  # absorbing: mass that arrived stops
    dist = np.broadcast_to(np.eye(S), (L, S, S)).copy()  # [L, start, state]
    reached = np.zeros((L, S))
    for _ in range(horizon):
        dist = np.einsum("lis,lst->lit", dist, P_pi)
        reached += np.einsum("lit,lt->li", dist, terminal.astype(np.float64))
        dist = dist * keep[:, None, :]
    starts = ~terminal
    return float(reached[starts].mean())


def evaluate(qfun, task, gamma: float) -> dict:
    from qworld.worldmodel.bellman import greedy_policy, solve_goal_q
    from qworld.worldmodel.scoring import nmse

    P, goals = task.mdp.P, task.goals
    Q = qfun.q_table()
    pi = greedy_policy(Q)
    Q_pi, _ = solve_goal_q(P, goals.rewards, gamma, goals.terminal, policy=pi)
    nonterminal = ~goals.terminal  # [L, S]: the (goal, state) pairs an episode can act in
    return {
        "q_nmse": nmse(Q, Q_pi),
        "q_nmse_nonterminal": nmse(Q[nonterminal], Q_pi[nonterminal]),
        "q_max_abs_err": float(np.abs(Q - Q_pi).max()),
        "success": greedy_success(P, goals.terminal, pi, task.max_episode_steps),
    }


def run(args, seed: int) -> dict:
    from qworld.agents.pqn import PQNConfig
    from qworld.worldmodel.bellman import greedy_policy, solve_goal_q
    from qworld.metrics import TRAIN_ENV_STEPS
    from qworld_envs import make_finite_problem

    env_kwargs = {"variant": args.variant}
    task = make_finite_problem("qworld/FourRooms-v0", **env_kwargs)
    Q_star, _ = solve_goal_q(task.mdp.P, task.goals.rewards, args.gamma, task.goals.terminal)
    optimal_success = greedy_success(task.mdp.P, task.goals.terminal, greedy_policy(Q_star), task.max_episode_steps)
    config = (
        PQNConfig()
        .training(
            env_id="qworld/FourRooms-v0",
            env_kwargs=env_kwargs,
            head="all_goals",
            num_envs=args.num_envs,
            rollout_length=args.rollout_length,
            minibatch_size=args.minibatch_size,
            num_epochs=args.num_epochs,
            hidden_sizes=args.hidden_sizes,
            q_output=args.q_output,
            lr=args.lr,
            optimizer=args.optimizer,
            gamma=args.gamma,
            lambda_=args.lambda_,
            epsilon_start=args.epsilon_start,
            epsilon_end=args.epsilon_end,
            epsilon_decay_fraction=args.epsilon_decay_fraction,
            total_env_steps=args.total_env_steps,
        )
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        .debugging(seed=seed, log_level="ERROR")
    )
    algo = config.build_algo()
    t0 = time.perf_counter()
    next_eval = args.eval_every
    per_iteration = args.num_envs * args.rollout_length
    try:
        while True:
            result = algo.train()
            steps = int(result[TRAIN_ENV_STEPS])
            done = steps + per_iteration > args.total_env_steps  # never exceed the budget
            if steps >= next_eval or done:
                next_eval += args.eval_every
                row = {"variant": args.variant, "seed": seed, "env_steps": steps,
                       "td_loss": float(result["learner"]["td_loss"]),
                       "wall_s": round(time.perf_counter() - t0, 1), **evaluate(algo.q_function(), task, args.gamma)}
                print(json.dumps(row), flush=True)
            if done:
                break
    finally:
        algo.stop()
    row.update(optimal_success=optimal_success, summary=True,
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="deterministic", choices=["deterministic", "windy", "teleport"])
    p.add_argument("--total-env-steps", type=int, default=2_000_000)
    p.add_argument("--eval-every", type=int, default=500_000)
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--rollout-length", type=int, default=64)
    p.add_argument("--minibatch-size", type=int, default=256)
    p.add_argument("--num-epochs", type=int, default=2)
    p.add_argument("--hidden-sizes", type=int, nargs="+", default=[256, 256])
    p.add_argument("--q-output", default="sigmoid", choices=["linear", "sigmoid"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="radam", choices=["radam", "adam"])
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.0)
    p.add_argument("--epsilon-start", type=float, default=1.0)
    p.add_argument("--epsilon-end", type=float, default=0.1)
    p.add_argument("--epsilon-decay-fraction", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [run(args, seed) for seed in args.seeds]
    for row in rows:
        print(json.dumps(row), flush=True)
    print(json.dumps({"args": vars(args)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
