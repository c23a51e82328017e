"""The families benchmark (issue 24, item 3): which learner family's Q encodes the world best?

    .venv/bin/python benchmarks/families.py run --budget steps          # equal env steps (first)
    .venv/bin/python benchmarks/families.py run --budget time           # equal wall time per trial
    .venv/bin/python benchmarks/families.py table                       # the BENCHMARKS.md tables

Each (env, family) is one ``qworld sweep`` of 3 runs, written to ``<out>/specs/`` and run as a
user runs it, all against one local Ray head this script starts (2 CPUs, its own temp dir,
127.0.0.1, token auth; stopped at the end), so the sweeps' trials share the machine's cores
one trial per core (``cpus_per_trial: 1``). Envs:

- ``fourrooms``: windy FourRooms, L = 4 indicator goals; run i has goal seed i and trial seed i
  (3 goal draws); extracted with ``moves`` (the best honest method) and ``pinv``; planned on
  the two windy safety tasks (their goals and forbidden cells never trained on).
- ``mountaincar``: MountainCar, L = 4 position goals, exploring starts; trial seeds 0, 1, 2;
  successor P-learning (smoothed goal indicators) and the three unseen goals (R_WM / R*); D3G
  also scores its own forward model.

Budgets:

- ``steps``: every family gets ``--env-steps`` env steps (default 10,240: what MR.Q, one
  gradient step per env step at ~35 ms a step, affords in about 6 min of one core here);
  each family keeps its own sampling and update schedule (PQN with 16 envs x 32 steps per
  iteration so that it takes 20 iterations, not one).
- ``time``: every family gets ``--seconds`` of training time per trial (Tune's
  ``time_total_s``, the only stop), with its exploration schedule (``total_env_steps``) sized
  to the env steps it reaches in that time: its throughput measured first, here, by one
  trial of the same settings for 20 s (``families_<env>_calibrate_<family>``, run one at a
  time so that each has a core to itself); PQN and D3G use their
  CPU-sized vectorised settings (tune_configs/mountaincar_cpu.yaml, fourrooms_demo.yaml,
  explicit_mountaincar_d3g.yaml).

``table`` reads every experiment under ``--out`` (``qworld_analysis.load_many``), takes each
trial's last checkpoint and prints, per env, budget and family, the median [min, max] over
the 3 runs of: env steps reached, Q error (``q_nmse``), the world-model error (FourRooms:
``p_mse`` of moves and of pinv; MountainCar: interior Delta v NMSE of the successor model),
safe-plan success (FourRooms, mean over tasks) or R_WM / R* (MountainCar, mean over the
unseen goals), and the agent's own success on its goals (``policy_success``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENVS = ("fourrooms", "mountaincar")
BUDGETS = ("steps", "time")
FAMILIES = {"fourrooms": ("pqn", "dqn", "mrq"), "mountaincar": ("pqn", "dqn", "mrq", "d3g")}  # d3g: continuous only
SEEDS = (0, 1, 2)
CALIBRATION_S = 20.0  # training seconds of the one trial that measures a family's throughput
TIME = "time_total_s"  # Tune's training seconds of a trial (the result.json line of its checkpoint)

ENV = {
    "fourrooms": {"env": {"id": "qworld/FourRooms-v0", "variant": "windy"},
                  "goals": {"goal_type": "indicator", "num_goals": 4},
                  "extract": {"methods": ["moves", "pinv"], "tasks": ["corner_9_1_doorway", "corner_9_9_doorway"]}},
    "mountaincar": {"env": {"id": "qworld/MountainCar-v0", "start_states": "uniform"},
                    "goals": {"goal_type": "position", "num_goals": 4},
                    "extract": {"methods": ["successor"], "tasks": ["fast_car", "gentle_car", "shortest_path"],
                                "options": {"successor": {"steps": 1000, "batch_size": 512, "lr": 0.002,
                                                          "smooth": 0.1}}}},
}
# Per family and budget, its agent keywords (defaults: the family's config). "steps" keeps
# each family's own schedule except PQN's batch of envs, which would spend the budget in one
# iteration; "time" gives PQN and D3G the vectorised settings they were sized with on CPU.
PQN_FOURROOMS = {"head": "all_goals", "lr": 0.001, "hidden_sizes": [256, 256], "minibatch_size": 256, "num_epochs": 2}
PQN_MOUNTAINCAR = {"head": "all_goals", "gamma": 0.99, "lambda_": 0.0, "lr": 0.001, "optimizer": "radam",
                   "grad_clip": 10.0, "epsilon_end": 0.1, "epsilon_decay_fraction": 0.5, "hidden_sizes": [256, 256],
                   "fourier_features": 64, "fourier_scale": 0.5, "q_output": "sigmoid", "minibatch_size": 512,
                   "num_epochs": 1}
AGENT = {
    ("fourrooms", "pqn", "steps"): {**PQN_FOURROOMS, "num_envs": 16, "rollout_length": 32, "minibatch_size": 128},
    ("fourrooms", "pqn", "time"): {**PQN_FOURROOMS, "num_envs": 256, "rollout_length": 32},
    ("mountaincar", "pqn", "steps"): {**PQN_MOUNTAINCAR, "num_envs": 16, "rollout_length": 32, "minibatch_size": 128},
    ("mountaincar", "pqn", "time"): {**PQN_MOUNTAINCAR, "num_envs": 256, "rollout_length": 64},
    ("mountaincar", "d3g", "time"): {"num_envs": 64, "rollout_length": 256, "updates_per_iteration": 64,
                                     "lr": 0.0003, "buffer_capacity": 200000},
}


def spec_for(env: str, family: str, budget: str, env_steps: int, seconds: float, rate: float | None) -> dict:
    """The sweep file of one (env, family, budget); budget "calibrate": one short trial of
    the time budget's settings, to measure their throughput (nothing scored)."""
    base = ENV[env]
    agent = {"algorithm": family, **AGENT.get((env, family, "steps" if budget == "steps" else "time"), {})}
    if budget == "steps":
        stop = {"env_steps": int(env_steps)}
    elif budget == "calibrate":
        stop = {"time_total_s": CALIBRATION_S}
    else:  # time alone stops it; the exploration schedule refers to the steps it will reach (measured)
        stop = {"time_total_s": float(seconds)}
        agent["total_env_steps"] = int(math.ceil(rate * seconds))
    if budget == "calibrate":
        sweep = {"seed": [0]}
    elif env == "fourrooms":
        sweep = {"cases": [{"goal_seed": s, "seed": s} for s in SEEDS]}
    else:
        sweep = {"seed": list(SEEDS)}
    extract = json.loads(json.dumps(base["extract"]))
    if family == "d3g":
        extract["methods"] = [*extract["methods"], "forward_model"]
    return {"name": f"families_{env}_{budget}_{family}", "env": base["env"], "goals": base["goals"], "agent": agent,
            "sweep": sweep, "stop": stop, "checkpoint": {"every": 100000, "at_end": budget != "calibrate"},
            "extract": extract,
            "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "plearn_actors": 1},
            "wandb": {"project": "qworld", "mode": "disabled"}}


def throughput(out: Path, env: str, family: str) -> float:
    """Env steps per second of training time in the calibration run of the time settings."""
    exp = out / f"families_{env}_calibrate_{family}"
    rates = []
    for result in exp.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            last = lines[-1]
            steps = last.get("num_env_steps_sampled_lifetime") or last.get("env_runners", {}).get(
                "num_env_steps_sampled_lifetime")
            if steps and last.get("time_total_s"):
                rates.append(float(steps) / float(last["time_total_s"]))
    if not rates:
        raise SystemExit(f"no throughput for {env}/{family} in {exp}")
    return sorted(rates)[len(rates) // 2]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_head(temp_dir: Path) -> tuple[dict, str]:
    """A 2-CPU Ray head on 127.0.0.1 with token auth; returns (env for drivers, address)."""
    token = temp_dir / "token"
    token.write_text(secrets.token_hex(16))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONUNBUFFERED": "1"}
    gcs, dashboard, agent, metrics, client = _free_ports(5)
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                    f"--ray-client-server-port={client}", f"--num-cpus={os.cpu_count()}",
                    f"--temp-dir={temp_dir / 'ray'}", "--disable-usage-stats"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return env, f"127.0.0.1:{gcs}"


def stop_head(temp_dir: Path) -> None:
    """Stop the processes of this head only (those started with its temp dir, and their
    children), never ``ray stop``; SIGKILL what SIGTERM leaves (gcs_server may)."""
    import psutil

    procs = []
    for pid in subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split():
        try:
            proc = psutil.Process(int(pid))
            procs += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _write_specs(out: Path, args: argparse.Namespace, budget: str) -> list[Path]:
    specs = []
    for env in args.envs:
        for family in args.families or FAMILIES[env]:
            if family not in FAMILIES[env]:
                continue
            rate = throughput(out, env, family) if budget == "time" else None
            spec = spec_for(env, family, budget, args.env_steps, args.seconds, rate)
            path = out / "specs" / f"{spec['name']}.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            specs.append(path)
    return specs


def _sweep_all(specs: list[Path], out: Path, env: dict, address: str, parallel: int) -> None:
    """``qworld sweep`` each file against the head, ``parallel`` drivers at a time (Tune
    queues their trials for the head's CPUs)."""
    running: list[subprocess.Popen] = []
    for path in specs:
        while len([p for p in running if p.poll() is None]) >= parallel:
            time.sleep(1)
        log = open(out / "specs" / f"{path.stem}.log", "w")
        running.append(subprocess.Popen([str(BIN / "qworld"), "sweep", str(path), "--storage", str(out),
                                         "--address", address], env=env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=REPO))
        print(f"started {path.stem}", flush=True)
    for proc in running:
        proc.wait()


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    (out / "specs").mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="qworld-families-"))
    env, address = start_head(temp_dir)
    try:
        if args.budget == "time":  # first the throughput of each family's time settings, here
            _sweep_all(_write_specs(out, args, "calibrate"), out, env, address, parallel=1)
        _sweep_all(_write_specs(out, args, args.budget), out, env, address, args.parallel)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _fmt(values, integer: bool = False) -> str:
    """Median [min, max] of the runs."""
    v = sorted(float(x) for x in values if x == x)
    if not v:
        return "-"
    med = v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])

    def f(x):
        if integer:
            return f"{x:,.0f}"
        return f"{x:.2g}" if abs(x) < 0.01 or abs(x) >= 1000 else f"{x:.2f}"

    return f"{f(med)} [{f(v[0])}, {f(v[-1])}]" if len(v) > 1 else f(med)


def table(args: argparse.Namespace) -> None:
    sys.path[:0] = [str(REPO / "analysis"), str(REPO / "platform"), str(REPO / "envs")]
    import pandas as pd

    from qworld import metrics as K
    from qworld_analysis import final_checkpoints, load_many

    out = Path(args.out)
    dirs = sorted(p for p in out.glob("families_*") if (p / "sweep.yaml").exists())
    df = final_checkpoints(load_many(dirs))
    df = df[df[K.METHOD] != K.LOAD_METHOD]
    for env in ENVS:
        for budget in BUDGETS:
            print(f"\n### {env}, equal {'env steps' if budget == 'steps' else 'wall time'}\n")
            if env == "fourrooms":
                cols = ["runs", "env steps", "train s", "q_nmse", "p_mse moves", "p_mse pinv",
                        "safe-plan success (moves)", "policy_success"]
            else:
                cols = ["runs", "env steps", "train s", "q_nmse", "interior Delta v NMSE", "wm_nmse", "R_WM/R*",
                        "policy_success", "policy_return"]
            print("| family | " + " | ".join(cols) + " |")
            print("|---" * (len(cols) + 1) + "|")
            for family in FAMILIES[env]:
                part = df[df["experiment"] == f"families_{env}_{budget}_{family}"]
                if part.empty:
                    continue

                def per_trial(method, col):
                    rows = part[part[K.METHOD] == method]
                    return rows.groupby(K.TRIAL_ID)[col].first() if col in rows else pd.Series(dtype=float)

                first = part.groupby(K.TRIAL_ID).first()
                if env == "fourrooms":
                    tasks = ENV[env]["extract"]["tasks"]
                    moves = part[part[K.METHOD] == "moves"]
                    safe = moves[[f"{t}/{K.PLAN_SUCCESS}" for t in tasks]].mean(axis=1)
                    cells = [len(first), _fmt(first[K.ENV_STEPS], integer=True), _fmt(first[TIME], integer=True),
                             _fmt(first[K.Q_NMSE]), _fmt(per_trial("moves", K.P_MSE)), _fmt(per_trial("pinv", K.P_MSE)), _fmt(safe),
                             _fmt(first.get(K.POLICY_SUCCESS, pd.Series(dtype=float)))]
                else:
                    tasks = ENV[env]["extract"]["tasks"]
                    succ = part[part[K.METHOD] == "successor"]
                    ratio = succ[[f"{t}/{K.RETURN_RATIO}" for t in tasks]].mean(axis=1)
                    cells = [len(first), _fmt(first[K.ENV_STEPS], integer=True), _fmt(first[TIME], integer=True),
                             _fmt(first[K.Q_NMSE]), _fmt(per_trial("successor", f"{K.INTERIOR}/{K.WM_DELTA_NMSE}_v")),
                             _fmt(per_trial("successor", K.WM_NMSE)), _fmt(ratio),
                             _fmt(first.get(K.POLICY_SUCCESS, pd.Series(dtype=float))),
                             _fmt(first.get(K.POLICY_RETURN, pd.Series(dtype=float)))]
                print(f"| {family} | " + " | ".join(map(str, cells)) + " |")
                if family == "d3g":
                    fm = part[part[K.METHOD] == "forward_model"]
                    if not fm.empty:
                        r = fm[[f"{t}/{K.RETURN_RATIO}" for t in ENV[env]["extract"]["tasks"]]].mean(axis=1)
                        print(f"| d3g (its forward model) | {len(fm)} | | | | "
                              f"{_fmt(fm[f'{K.INTERIOR}/{K.WM_DELTA_NMSE}_v'])} | {_fmt(fm[K.WM_NMSE])} | "
                              f"{_fmt(r)} | | |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--budget", choices=BUDGETS, required=True)
    p_run.add_argument("--envs", nargs="+", choices=ENVS, default=list(ENVS))
    p_run.add_argument("--families", nargs="+", default=None)
    p_run.add_argument("--env-steps", type=int, default=10_240)
    p_run.add_argument("--seconds", type=float, default=120.0)
    p_run.add_argument("--parallel", type=int, default=3, help="sweep drivers at a time")
    p_run.add_argument("--out", default=str(REPO / "results" / "families"))
    p_tab = sub.add_parser("table")
    p_tab.add_argument("--out", default=str(REPO / "results" / "families"))
    args = parser.parse_args(argv)
    run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    main()
