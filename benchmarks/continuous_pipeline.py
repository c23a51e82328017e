"""The continuous pipeline end to end: train goal-conditioned PQN, extract a world model by
P-learning from its Q-network, score it, plan with it on goals the agent never saw.

Every stage is the code a sweep runs: RLlib PQN (``PQNConfig`` -> ``build_algo`` ->
``train``), ``algo.save_to_path`` -> ``qworld.agents.load_q`` (the checkpoint alone), and
``qworld.sweep.score.score_q`` (Q NMSE against the exact Q of the
agent's greedy policy on a grid, successor-network P-learning, NMSE of s' and of every
Delta s dim over states uniform on the box and over the interior transitions, the identity
and no-force baselines, and ``R_WM / R*`` per unseen goal from 512 resets).

Modes::

    python benchmarks/continuous_pipeline.py mountaincar [--seed 0]   # position goals
    python benchmarks/continuous_pipeline.py agree [--seed 0]         # position vs velocity goals
    python benchmarks/continuous_pipeline.py reacher [--seed 0]       # toy Reacher
    python benchmarks/continuous_pipeline.py mujoco [--seed 0]        # MuJoCo Reacher (batched MuJoCo, fast runner)
    python benchmarks/continuous_pipeline.py reacher --checkpoint CKPT --planner mpc   # re-score a trained agent

Each mode has the defaults recorded in BENCHMARKS.md; any PQN / P-learning setting can be
overridden (``--steps``, ``--hidden``, ``--lr``, ``--plearn-steps`` ...). Prints one JSON line
per trained agent (``"kind": "run"``) and, for ``agree``, one line comparing the two models.
``wall_s`` counts from the start of the process (imports and Ray start included), so it is
the wall time of the whole pipeline. One torch thread; Ray without its dashboard.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from qworld import metrics as K  # noqa: E402

ENV_IDS = {
    "mountaincar": "qworld/MountainCar-v0",
    "agree": "qworld/MountainCar-v0",
    "reacher": "qworld/Reacher-v0",
    "mujoco": "qworld/MujocoReacher-v0",
}
TASKS = {
    "qworld/MountainCar-v0": ["fast_car", "gentle_car", "shortest_path"],
    "qworld/Reacher-v0": ["far_fingertip", "target_angle", "target_velocity"],
    "qworld/MujocoReacher-v0": ["far_fingertip", "target_angle", "target_velocity"],
}
# Per mode: PQN settings (PQNConfig.training keywords), env kwargs, P-learning options and
# planning grid. The PQN rows are CPU-sized (the paper: 4x1024 MountainCar, 6x2048
# Reacher, on a GPU); see BENCHMARKS.md for what was tried.
DEFAULTS = {
    "mountaincar": dict(
        pqn=dict(total_env_steps=2_000_000, num_envs=256, rollout_length=64, minibatch_size=512, num_epochs=1,
                 hidden_sizes=[256, 256], fourier_features=64, fourier_scale=0.5, lr=1e-3, lambda_=0.0,
                 q_output="sigmoid", head="all_goals", epsilon_end=0.1, epsilon_decay_fraction=0.5),
        env_kwargs=dict(goal_type="position", num_goals=4, start_states="uniform"),
        plearn=dict(steps=1000, batch_size=512, lr=2e-3, smooth=0.1),
        grid_shape=None, q_grid=None,
    ),
    "reacher": dict(
        pqn=dict(total_env_steps=5_000_000, num_envs=256, rollout_length=64, minibatch_size=512, num_epochs=1,
                 hidden_sizes=[256, 256, 256], lr=1e-3, lambda_=0.0, q_output="sigmoid", head="all_goals",
                 epsilon_end=0.1, epsilon_decay_fraction=0.5),
        env_kwargs=dict(goal_type="fingertip", num_goals=4, start_states="uniform"),
        plearn=dict(steps=1000, batch_size=512, lr=2e-3),
        grid_shape=None, q_grid=[16, 16, 16, 16],
    ),
    "mujoco": dict(
        pqn=dict(total_env_steps=2_000_000, num_envs=256, rollout_length=64, minibatch_size=512,
                 num_epochs=1, hidden_sizes=[256, 256, 256], lr=1e-3, lambda_=0.0, q_output="sigmoid", head="all_goals",
                 epsilon_end=0.1, epsilon_decay_fraction=0.5),
        env_kwargs=dict(goal_type="fingertip", num_goals=4, start_states="uniform"),
        plearn=dict(steps=1000, batch_size=512, lr=2e-3),
        grid_shape=None, q_grid=None,
    ),
}
DEFAULTS["agree"] = DEFAULTS["mountaincar"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=sorted(ENV_IDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="PQN env-step budget (total_env_steps)")
    p.add_argument("--hidden", type=int, nargs="+", help="PQN hidden_sizes")
    p.add_argument("--lr", type=float, help="PQN lr")
    p.add_argument("--fourier-features", type=int, help="PQN fourier_features (0: raw state)")
    p.add_argument("--fourier-scale", type=float, help="PQN fourier_scale")
    p.add_argument("--lambda", dest="lambda_", type=float, help="PQN lambda_")
    p.add_argument("--num-epochs", type=int)
    p.add_argument("--num-envs", type=int)
    p.add_argument("--env-runner", choices=["auto", "fast", "standard"], help="PQN env_runner")
    p.add_argument("--rollout-length", type=int)
    p.add_argument("--minibatch-size", type=int)
    p.add_argument("--num-goals", type=int)
    p.add_argument("--goal-type", help="env goal_type (MountainCar: position, velocity, gaussian)")
    p.add_argument("--q-output", choices=["linear", "sigmoid"], help="PQN q_output (linear for gaussian goals)")
    p.add_argument("--start-states", choices=["reset", "uniform"])
    p.add_argument("--plearn-steps", type=int)
    p.add_argument("--plearn-batch", type=int)
    p.add_argument("--plearn-lr", type=float)
    p.add_argument("--plearn-hidden", type=int)
    p.add_argument("--plearn-anneal-noise", type=float)
    p.add_argument("--plearn-smooth", type=float, help="P-learning smooth: sigmoid temperature of the sparse goals, a fraction of their radius")
    p.add_argument("--grid", type=int, nargs="+", help="planning grid shape (default: the env's)")
    p.add_argument("--q-grid", type=int, nargs="+", help="ground-truth grid of the Q NMSE (0: skip)")
    p.add_argument("--tasks", nargs="*", help="unseen goals (default: all three of the env)")
    p.add_argument("--num-resets", type=int, default=512)
    p.add_argument("--checkpoint-dir", help="where to write the checkpoint (default: a temporary dir)")
    p.add_argument("--checkpoint", help="score this checkpoint instead of training one (its own env and agent)")
    p.add_argument("--planner", choices=["grid", "mpc"], help="unseen-goal planner (default grid; R* planned alike)")
    p.add_argument("--mpc-replan", type=int, help="MPC: search every k real steps (MPCConfig.replan)")
    return p.parse_args()


def settings(args: argparse.Namespace) -> dict:
    """The mode's defaults with the command-line overrides applied."""
    base = DEFAULTS[args.mode]
    pqn = dict(base["pqn"])
    for key, arg in [("total_env_steps", "steps"), ("hidden_sizes", "hidden"), ("lr", "lr"), ("lambda_", "lambda_"),
                     ("num_epochs", "num_epochs"), ("num_envs", "num_envs"), ("rollout_length", "rollout_length"),
                     ("minibatch_size", "minibatch_size"), ("env_runner", "env_runner"), ("q_output", "q_output"), ("fourier_features", "fourier_features"),
                     ("fourier_scale", "fourier_scale")]:
        if getattr(args, arg) is not None:
            pqn[key] = getattr(args, arg)
    env_kwargs = dict(base["env_kwargs"])
    if args.num_goals is not None:
        env_kwargs["num_goals"] = args.num_goals
    if args.goal_type is not None:
        env_kwargs["goal_type"] = args.goal_type
    if args.start_states is not None:
        env_kwargs["start_states"] = args.start_states
    plearn = dict(base["plearn"])
    for key, arg in [("steps", "plearn_steps"), ("batch_size", "plearn_batch"), ("lr", "plearn_lr"),
                     ("hidden", "plearn_hidden"), ("anneal_noise", "plearn_anneal_noise"),
                     ("smooth", "plearn_smooth")]:
        if getattr(args, arg) is not None:
            plearn[key] = getattr(args, arg)
    if args.planner is not None:
        plearn["planner"] = args.planner
    if args.mpc_replan is not None:
        plearn["mpc"] = {"replan": args.mpc_replan}
    grid = args.grid or base["grid_shape"]
    q_grid = args.q_grid if args.q_grid is not None else base["q_grid"]
    return dict(pqn=pqn, env_kwargs=env_kwargs, plearn=plearn, grid_shape=grid,
                q_grid=None if q_grid == [0] else q_grid)


def train(env_id: str, env_kwargs: dict, pqn: dict, seed: int, checkpoint_dir: Path) -> tuple[str, dict]:
    """Train PQN within its env-step budget (never past it) and checkpoint it.

    Returns:
        The checkpoint path and ``{train_s, env_steps, success, iterations}``.
    """
    from qworld.agents.pqn import PQNConfig

    config = (PQNConfig().training(env_id=env_id, env_kwargs=env_kwargs, **pqn)
              .env_runners(num_env_runners=0).learners(num_learners=0)
              .debugging(seed=seed, log_level="ERROR"))
    t0 = time.perf_counter()
    algo = config.build_algo()
    build_s = time.perf_counter() - t0
    per_iteration = int(pqn["num_envs"]) * int(pqn["rollout_length"])
    steps, iterations, success = 0, 0, []
    t1 = time.perf_counter()
    try:
        while steps + per_iteration <= pqn["total_env_steps"]:
            result = algo.train()
            steps = int(result[K.TRAIN_ENV_STEPS])
            iterations += 1
            value = result.get("env_runners", {}).get("episode_success_mean")
            if value is not None and value == value:
                success.append(float(value))
        train_s = time.perf_counter() - t1
        path = algo.save_to_path(str(checkpoint_dir / f"checkpoint_{iterations:06d}"))
    finally:
        algo.stop()
    tail = success[-max(1, len(success) // 10):]  # the last tenth of training
    return path, {"build_s": build_s, "train_s": train_s, "env_steps": steps, "iterations": iterations,
                  "train_success": sum(tail) / len(tail) if tail else float("nan")}


def score(path: str, s: dict, tasks: list[str], num_resets: int) -> tuple[dict, object, object]:
    """``load_q`` + ``score_q`` (successor method) -> (row, fit, qfun)."""
    from qworld.agents import load_q
    from qworld.sweep.score import score_q

    qfun = load_q(path)
    options = {"successor": {**s["plearn"], "num_resets": num_resets}}
    if s["grid_shape"]:
        options["successor"]["grid_shape"] = list(s["grid_shape"])
    if s["q_grid"] is not None:
        options["q_nmse"] = {"grid_shape": list(s["q_grid"])}
    fits: dict = {}
    row = score_q(qfun, {}, ["successor"], tasks, options, world_models=fits)[0]
    if row.get("error"):
        raise RuntimeError(row["error"])
    return row, fits["successor"], qfun


SUMMARY_KEYS = (K.Q_NMSE, K.WM_NMSE, K.FIT_SECONDS)


def summarise(row: dict, tasks: list[str], state_names: tuple[str, ...]) -> dict:
    """The numbers BENCHMARKS.md reports, from a score row."""

    out = {k: row.get(k) for k in SUMMARY_KEYS}
    for prefix in ("", f"{K.INTERIOR}/"):
        for name in state_names:
            key = f"{prefix}{K.WM_DELTA_NMSE}_{name}"
            out[key] = row.get(key)
            for base in (K.BASELINE_IDENTITY, K.BASELINE_NO_FORCE):
                out[f"{prefix}{base}/{K.WM_DELTA_NMSE}_{name}"] = row.get(f"{prefix}{base}/{K.WM_DELTA_NMSE}_{name}")
    out[f"{K.BASELINE_IDENTITY}/{K.WM_NMSE}"] = row.get(f"{K.BASELINE_IDENTITY}/{K.WM_NMSE}")
    out[f"{K.INTERIOR}/{K.FRACTION}"] = row.get(f"{K.INTERIOR}/{K.FRACTION}")
    for t in tasks:
        for k in (K.RETURN_RATIO, K.RETURN_WM, K.RETURN_STAR, K.PLAN_SUCCESS):
            out[f"{t}/{k}"] = row.get(f"{t}/{k}")
    return out


def rounded(d: dict) -> dict:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in d.items()}


def run_one(env_id: str, s: dict, seed: int, tasks: list[str], num_resets: int, ckpt_root: Path) -> tuple[dict, object]:
    from qworld_envs import make_continuous_problem

    if s.get("checkpoint"):
        path, stats = s["checkpoint"], {"checkpoint": s["checkpoint"]}
    else:
        path, stats = train(env_id, s["env_kwargs"], s["pqn"], seed,
                            ckpt_root / f"{env_id.split('/')[-1]}_{s['env_kwargs'].get('goal_type')}_{seed}")
    t0 = time.perf_counter()
    row, fit, _ = score(path, s, tasks, num_resets)
    score_s = time.perf_counter() - t0
    names = make_continuous_problem(env_id, **s["env_kwargs"]).dynamics.state_names
    out = {"kind": "run", "env_id": env_id, "seed": seed, **stats, "score_s": score_s, **summarise(row, tasks, names)}
    return out, fit


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_s = time.perf_counter() - t0
    env_id = ENV_IDS[args.mode]
    tasks = TASKS[env_id] if args.tasks is None else args.tasks
    s = settings(args)
    s["checkpoint"] = args.checkpoint
    tmp = None if args.checkpoint_dir else tempfile.TemporaryDirectory(prefix="qworld_pipeline_")
    root = Path(args.checkpoint_dir or tmp.name)
    try:
        shown = {k: v for k, v in s.items() if not (args.checkpoint and k in ("pqn", "env_kwargs"))}  # the checkpoint's own
        print(json.dumps({"kind": "settings", "mode": args.mode, "env_id": env_id, **shown}), flush=True)
        if args.mode != "agree":
            out, _ = run_one(env_id, s, args.seed, tasks, args.num_resets, root)
            out.update(ray_s=ray_s, wall_s=time.perf_counter() - T_PROCESS,
                       peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            print(json.dumps(rounded(out)), flush=True)
            return
        # The paper's check: models extracted from position goals and from velocity goals agree.
        from qworld.worldmodel.scoring_continuous import model_agreement
        from qworld_envs import make_continuous_problem

        fits = {}
        for goal_type in ("position", "velocity"):
            sg = {**s, "env_kwargs": {**s["env_kwargs"], "goal_type": goal_type}}
            out, fits[goal_type] = run_one(env_id, sg, args.seed, tasks, args.num_resets, root)
            out.update(goal_type=goal_type, wall_s=time.perf_counter() - T_PROCESS)
            print(json.dumps(rounded(out)), flush=True)
        problem = make_continuous_problem(env_id)
        agree = model_agreement(fits["position"].step_fn(), fits["velocity"].step_fn(), problem, num_states=8192)
        print(json.dumps(rounded({"kind": "agree", "reference": "velocity-goal model", **agree,
                                  "ray_s": ray_s, "wall_s": time.perf_counter() - T_PROCESS})), flush=True)
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
