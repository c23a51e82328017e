"""FourRooms on learned agents: the issue-10 targets, honest methods only.

    .venv/bin/python benchmarks/fourrooms_targets.py                 # train, extract, summarise
    .venv/bin/python benchmarks/fourrooms_targets.py --experiment results/fourrooms_targets
                                                                     # re-extract + summarise only

Trains the sweep ``tune_configs/fourrooms_targets.yaml`` (windy L=3, windy L=4, teleport L=20
with indicator goals, deterministic L=1 with one dense goal; 3 seeds; 2M env steps) unless
``--experiment`` names a finished one (then re-scored with ``qworld extract``, unless
``--no-extract``); the sweep file scores every checkpoint with every honest method plus the
``known_support`` oracle as the yardstick. It then prints, per
case, the final checkpoint's p_mse per method (median [min, max] over seeds), the safe-plan
outcomes and each target, met or not. Only methods outside ``metrics.ORACLE_METHODS`` count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from qworld import metrics as K

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILE = ROOT / "tune_configs" / "fourrooms_targets.yaml"
METHODS = ("moves", "pinv", "column_match", "sgd", "known_support")
TASKS = ("corner_9_1_doorway", "corner_9_9_doorway", "corner_9_9_teleport")
# (variant, goal_type, num_goals) -> p_mse target (None: plans only). Issue 10, item 4.
TARGETS = {
    ("windy", "indicator", 4): 1.3e-4,  # a tenth of the paper's 1.3e-3
    ("windy", "indicator", 3): None,
    ("teleport", "indicator", 20): 2e-4,
    ("deterministic", "dense", 1): 1e-6,  # exact
}
SAFE = {"success": 0.999, "excess": 0.5, "unsafe": 1e-6}


def qworld(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("qworld")), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_seconds(experiment: Path) -> pd.DataFrame:
    """Per trial: Tune's ``time_total_s`` and env steps at the last iteration."""
    rows = []
    for result in experiment.glob("*/result.json"):
        lines = result.read_text().strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            rows.append({K.TRIAL_ID: last.get("trial_id"), "train_s": last.get("time_total_s"),
                         "train_env_steps": last.get(K.TRAIN_ENV_STEPS)})
    return pd.DataFrame(rows)


def fmt(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return "n/a"
    return f"{np.median(v):.2g} [{v.min():.2g}, {v.max():.2g}]"


def safe(frame: pd.DataFrame, task: str) -> pd.Series:
    """Per row: the plan reached the goal, never entered a forbidden cell, <= 0.5 steps extra."""
    return ((frame[f"{task}/{K.PLAN_SUCCESS}"] >= SAFE["success"])
            & (frame[f"{task}/{K.UNSAFE_VISITS}"] <= SAFE["unsafe"])
            & (frame[f"{task}/{K.PLAN_EXCESS_STEPS}"] <= SAFE["excess"]))


def summarise(experiment: Path) -> str:
    from qworld_analysis import final_checkpoints, load

    df = final_checkpoints(load(experiment))
    df = df[df[K.ERROR].isna()]
    times = train_seconds(experiment)
    out = []
    for (variant, goal_type, L), cell in df.groupby([K.VARIANT, K.GOAL_TYPE, K.NUM_GOALS]):
        target = TARGETS.get((variant, goal_type, int(L)))
        seeds = sorted(cell[K.SEED].unique())
        tt = times[times[K.TRIAL_ID].isin(cell[K.TRIAL_ID].unique())]
        out.append(f"\n### {variant}, {goal_type} goals, L = {L} ({len(seeds)} seeds; "
                   f"env steps {fmt(cell[K.ENV_STEPS])}; train wall s {fmt(tt['train_s'])}; "
                   f"q_nmse {fmt(cell.drop_duplicates(K.TRIAL_ID)[K.Q_NMSE])})\n")
        out.append("| method | p_mse median [min, max] | " + " | ".join(f"{t} safe (seeds)" for t in TASKS) + " |")
        out.append("|---|---|" + "---|" * len(TASKS))
        met = []
        for method in METHODS:
            rows = cell[cell[K.METHOD] == method]
            if rows.empty:
                continue
            oracle = method in K.ORACLE_METHODS
            plans = [f"{int(safe(rows, t).sum())}/{len(rows)}" if f"{t}/{K.PLAN_SUCCESS}" in rows else "n/a"
                     for t in TASKS]
            name = f"{method} (oracle)" if oracle else method
            out.append(f"| {name} | {fmt(rows[K.P_MSE])} | " + " | ".join(plans) + " |")
            if oracle:
                continue
            ok_p = target is None or bool((rows[K.P_MSE] <= target).all())
            ok_plan = all(bool(safe(rows, t).all()) for t in TASKS if f"{t}/{K.PLAN_SUCCESS}" in rows)
            if ok_p and ok_plan:
                met.append(method)
        goal = "safe plans optimal" if target is None else f"p_mse <= {target:g} on every seed, plans optimal"
        out.append(f"\nTarget ({goal}): " + (f"**met** by {', '.join(met)}" if met else "**not met**"))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=None, help="a finished experiment dir")
    parser.add_argument("--storage", default=str(ROOT / "results"))
    parser.add_argument("--no-extract", action="store_true", help="summarise the stored rows as they are")
    args = parser.parse_args()
    experiment = args.experiment
    if experiment is None:
        qworld("sweep", str(SWEEP_FILE), "--storage", args.storage)
        experiment = Path(args.storage) / "fourrooms_targets"
    if args.experiment is not None and not args.no_extract:  # the sweep file scores these already
        qworld("extract", str(experiment), "--methods", *METHODS, "--tasks", *TASKS)
    print(summarise(experiment))


if __name__ == "__main__":
    main()
