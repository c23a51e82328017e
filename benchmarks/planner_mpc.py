"""Unseen-goal planning: grid value iteration against MPC on top of it (issue 16 item 1).

    PYTHONPATH=platform:envs .venv/bin/python benchmarks/planner_mpc.py [--envs reacher mountaincar]
        [--num-resets 512] [--horizon 4 --samples 64 --iterations 3 --elites 8 --replan 4] [--short 0.9]
        [--q-cache DIR]

For every unseen-goal task: R* (the plan made in the TRUE dynamics, rolled out on them from
the env's resets) with ``planner="grid"`` (greedy in the grid's Q) and ``planner="mpc"``
(``qworld.worldmodel.planning_continuous.MPCConfig``), its plan success, and the seconds of the rollout
(planning included; the grid's value iteration is timed apart, ``vi_s``, and shared by both
planners; 0 when read from ``--q-cache``). With ``--short f`` a deliberately wrong model (every state change scaled by f,
wrapped on angles) is planned in as well: ``R_WM / R*`` per planner. One torch thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from qworld.worldmodel.bellman_grid import GridQ
from qworld.worldmodel.planning_continuous import MPCConfig, plan_and_rollout, plan_in, planning_grid
from qworld_envs import MOUNTAIN_CAR_ID, REACHER_ID, make_continuous_problem
from qworld_envs.continuous import wrap_angle
from qworld_envs.continuous_tasks import UNSEEN_GOAL_TASKS

ENVS = {"reacher": REACHER_ID, "mountaincar": MOUNTAIN_CAR_ID}


def short_model(dyn, factor: float):
    """``(states, actions) -> next`` whose change is ``factor`` times the true one."""
    per = torch.as_tensor(dyn.periodic, dtype=torch.bool)

    def step(s, a):
        nxt = dyn.step_fn(s, a, None)
        out = s + factor * dyn.delta(nxt, s)
        return torch.where(per, wrap_angle(out), out)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    ap.add_argument("--tasks", nargs="*", default=None, help="default: all of the env's")
    ap.add_argument("--num-resets", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gamma", type=float, default=0.99)
    ap.add_argument("--planners", nargs="+", default=["grid", "mpc"])
    ap.add_argument("--horizon", type=int, default=MPCConfig.horizon)
    ap.add_argument("--samples", type=int, default=MPCConfig.samples)
    ap.add_argument("--iterations", type=int, default=MPCConfig.iterations)
    ap.add_argument("--elites", type=int, default=MPCConfig.elites)
    ap.add_argument("--replan", type=int, default=MPCConfig.replan)
    ap.add_argument("--short", type=float, default=0.0, help="also plan in a model whose changes are this fraction of the truth's")
    ap.add_argument("--q-cache", default=None, help="folder keeping the true dynamics' grid Q per env and task (value "
                    "iteration on the toy Reacher's 24^4 grid takes minutes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mpc = MPCConfig(horizon=args.horizon, samples=args.samples, iterations=args.iterations, elites=args.elites,
                    replan=args.replan)
    print(f"mpc: {mpc}")
    print("| env | task | planner | R* | plan_success | seconds | vi_s | short model R_WM/R* | short s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for env in args.envs:
        problem = make_continuous_problem(ENVS[env])
        dyn = problem.dynamics
        grid = planning_grid(problem)

        def true_step(s, a):
            return dyn.branches(s, a)

        for name in args.tasks or UNSEEN_GOAL_TASKS[problem.env_id]:
            task = UNSEEN_GOAL_TASKS[problem.env_id][name]
            t0 = time.perf_counter()
            cached = Path(args.q_cache or ".") / f"{env}_{name}_{'x'.join(map(str, grid.shape))}_{args.gamma}.pt"
            if args.q_cache and cached.exists():
                q_star = GridQ(torch.load(cached), grid)
            else:
                q_star = plan_in(true_step, task, grid, args.gamma, dyn.num_actions)
                if args.q_cache:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(q_star.Q, cached)
            vi_s = time.perf_counter() - t0
            q_short = None
            for planner in args.planners:
                def run(step_fn, q):
                    gen = torch.Generator().manual_seed(args.seed)
                    starts = dyn.reset_states(args.num_resets, gen)
                    start = time.perf_counter()
                    ret, succ = plan_and_rollout(step_fn, dyn, task, grid, starts, args.gamma, problem.max_episode_steps,
                                                 planner=planner, mpc=mpc, seed=args.seed, generator=gen, q=q)
                    return float(ret.mean()), float(succ.double().mean()), time.perf_counter() - start

                r_star, succ, secs = run(true_step, q_star)
                short = ""
                if args.short:
                    model = short_model(dyn, args.short)
                    if q_short is None:
                        q_short = plan_in(model, task, grid, args.gamma, dyn.num_actions)
                    r_wm, _, s_secs = run(model, q_short)
                    short = f"{r_wm / r_star:.3f} | {s_secs:.1f}"
                else:
                    short = "- | -"
                print(f"| {env} | {name} | {planner} | {r_star:.3f} | {succ:.3f} | {secs:.1f} | {vi_s:.1f} | {short} |",
                      flush=True)


if __name__ == "__main__":
    main()
