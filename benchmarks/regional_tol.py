"""regional_moves' ``tol`` on learned agents: the last checkpoint of each trial re-scored.

    .venv/bin/python benchmarks/regional_tol.py results/frozenlake_learned --tol 0.005 0.01 0.03

For every trial of a finished ``qworld sweep`` experiment, its last checkpoint is scored
again (``qworld.sweep.score.score_checkpoint``, no Ray, nothing written) with
``regional_moves`` (``polish: false``) at each ``tol``, beside the agent's own relative
Bellman residual with the true P (``model_residual / residual_excess``: what ``tol`` should be
near). Prints p_mse and each task's plan success per (L, tol): median [min, max].
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qworld import metrics as K
from qworld.sweep.score import score_checkpoint
from qworld.sweep.spec import load_sweep
from qworld_analysis import load
from qworld_analysis.load import final_checkpoints

from finite_learned import cell  # the same median [min, max] cells as its tables (a sibling script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("--tol", type=float, nargs="+", default=[0.005, 0.01, 0.03])
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_sweep(Path(args.experiment) / "sweep.yaml")
    df = final_checkpoints(load(args.experiment))
    last = df[df[K.METHOD] == "regional_moves"]
    rows = []
    for _, r in last.iterrows():
        own = r[K.MODEL_RESIDUAL] / r[K.RESIDUAL_EXCESS]  # the true P's residual: the agent's own error
        for tol in args.tol:
            out = score_checkpoint(r[K.CHECKPOINT_PATH], sweep=spec.name, trial_id=r[K.TRIAL_ID],
                                   methods=["regional_moves"], tasks=spec.extract.tasks,
                                   options={"regional_moves": {"tol": tol, "polish": False}})[0]
            rows.append({"L": r[K.NUM_GOALS], "tol": tol, "own": own, **out})
    names = spec.extract.task_names
    print(f"\n{spec.name}: regional_moves (polish: false) at each tol, last checkpoints")
    print("\n| L | agent's relative residual (true P) | tol | p_mse | " + " | ".join(f"{n} plan_success" for n in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for L in sorted({r["L"] for r in rows}):
        for tol in args.tol:
            sel = [r for r in rows if r["L"] == L and r["tol"] == tol]
            print(f"| {L} | {cell([r['own'] for r in sel], '{:.2g}')} | {tol} | {cell([r.get(K.P_MSE) for r in sel])} | "
                  + " | ".join(cell([r.get(f'{n}/{K.PLAN_SUCCESS}') for r in sel], '{:.3f}') for n in names) + " |")


if __name__ == "__main__":
    main()
