"""The table of BENCHMARKS.md "Any finite MDP on learned agents" (issue 25, item 4).

    .venv/bin/python benchmarks/finite_learned.py results/frozenlake_learned \
        results/cliffwalking_learned results/fourrooms_one_room_wind

Reads finished ``qworld sweep`` experiments (``qworld_analysis.load`` +
``final_checkpoints``: each trial's last checkpoint) and prints, per (env, L), median [min,
max] over the trials of q_nmse and of every method's p_mse, then per task and method the
plan's success, excess steps over the optimal plan and regret (the share of the optimal plan's
discounted success it loses) (median [min, max]), and the optimal
plan's own success in the true MDP (``planning.run_safety_task`` handed the true P).
Nothing is trained here. ``--rescore`` scores each trial's last checkpoint again with the
code as it is now (``qworld.sweep.score.score_checkpoint``, the sweep file's methods, options
and tasks; nothing written) instead of reading the rows the sweep stored; ``--option
moves.action_weight=auto`` (repeatable) sets a method option over the file's for that rescore.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from qworld import metrics as K
from qworld.worldmodel.planning import run_safety_task, task_name
from qworld.sweep.score import score_checkpoint
from qworld.sweep.spec import load_sweep
from qworld_analysis import load
from qworld_analysis.load import final_checkpoints
from qworld_envs.registry import make_finite_problem

METHODS = ("regional_moves", "moves", "pinv", "sgd", "column_match", "supervised")


def cell(values, fmt: str = "{:.1e}") -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "n/a"
    return f"{fmt.format(np.median(v))} [{fmt.format(v.min())}, {fmt.format(v.max())}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--rescore", action="store_true", help="score the last checkpoints again with this code")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="with --rescore: a method option over the sweep file's (VALUE read as YAML), "
                             "e.g. moves.action_weight=auto")
    args = parser.parse_args()
    overrides: dict[str, dict] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (sep and dot and method and name) or not args.rescore:
            parser.error(f"--option {item!r}: give METHOD.KEY=VALUE, with --rescore")
        overrides.setdefault(method, {})[name] = yaml.safe_load(value)
    torch.set_num_threads(1)
    for exp in args.experiments:
        spec = load_sweep(Path(exp) / "sweep.yaml")
        df = final_checkpoints(load(exp))
        if args.rescore:
            options = {m: {**spec.extract.options.get(m, {}), **overrides.get(m, {})}
                       for m in {*spec.extract.options, *overrides}}
            last = df.drop_duplicates(K.TRIAL_ID)
            df = pd.DataFrame([row for _, r in last.iterrows()
                               for row in score_checkpoint(r[K.CHECKPOINT_PATH], sweep=spec.name, trial_id=r[K.TRIAL_ID],
                                                           methods=list(spec.extract.methods), tasks=spec.extract.tasks,
                                                           options=options, env_steps=r[K.ENV_STEPS])])
        mdp = make_finite_problem(spec.env.id, **dict(spec.env.kwargs)).mdp
        optimal = {task_name(t): run_safety_task(mdp, mdp.P, t)[K.PLAN_SUCCESS] for t in spec.extract.tasks}
        print(f"\n## {spec.name}: {spec.env.id} {json.dumps(dict(spec.env.kwargs))}; S = {mdp.num_states}, "
              f"unscored rows {int(df[K.P_ROWS_UNSCORED].dropna().iloc[0])}; optimal plan success "
              + ", ".join(f"{k} {v:.3f}" for k, v in optimal.items()))
        print("\n| L | trials | env steps | q_nmse | " + " | ".join(METHODS) + " |")
        print("|---|---|---|---|" + "---|" * len(METHODS))
        for L, g in df.groupby(K.NUM_GOALS):
            by = {m: g[g[K.METHOD] == m] for m in METHODS}
            steps = g[K.ENV_STEPS].dropna().unique()
            q = g.drop_duplicates(K.TRIAL_ID)[K.Q_NMSE]
            errors = {m: by[m][K.ERROR].dropna().tolist() for m in METHODS if K.ERROR in by[m]}
            print(f"| {L} | {g[K.TRIAL_ID].nunique()} | {int(steps.max()):,} | {cell(q)} | "
                  + " | ".join(cell(by[m][K.P_MSE]) for m in METHODS) + " |")
            for m, e in errors.items():
                if e:
                    print(f"  {m}: errors {e}")
        for t in spec.extract.tasks:
            print(f"\n{task_name(t)}: plan_success; plan_excess_steps; plan_regret (median [min, max])")
            print("\n| L | " + " | ".join(METHODS) + " |")
            print("|---|" + "---|" * len(METHODS))
            for L, g in df.groupby(K.NUM_GOALS):
                row = []
                for m in METHODS:
                    r = g[g[K.METHOD] == m]
                    regret = r.get(f"{task_name(t)}/{K.PLAN_REGRET}", pd.Series(dtype=float))  # older rows lack it
                    row.append(cell(r[f"{task_name(t)}/{K.PLAN_SUCCESS}"], "{:.3f}") + "; "
                               + cell(r[f"{task_name(t)}/{K.PLAN_EXCESS_STEPS}"], "{:.2f}") + "; "
                               + cell(regret, "{:.1e}"))
                print(f"| {L} | " + " | ".join(row) + " |")
        extra = [c for c in (K.RESIDUAL_EXCESS, K.MISSPECIFIED, K.MODEL_RESIDUAL) if c in df]
        if extra:
            print("\nmisspecification (median [min, max]): " + ", ".join(extra))
            for L, g in df.groupby(K.NUM_GOALS):
                for m in METHODS:
                    r = g[g[K.METHOD] == m]
                    print(f"  L={L} {m}: " + "; ".join(f"{c} {cell(r[c], '{:.2g}')}" for c in extra))


if __name__ == "__main__":
    main()
