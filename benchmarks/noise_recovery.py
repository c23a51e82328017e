"""Noise scale recovered from a trained agent's Q by the reparameterised sampler (issue 16).

    .venv/bin/python benchmarks/noise_recovery.py results/mountaincar_noise [--steps 1500 4000]

For each trial's last checkpoint of a finished stochastic sweep (e.g.
``tune_configs/mountaincar_noise.yaml``): the ``sampler`` method re-fitted at each P-learning
budget in ``--steps`` (the sweep file's other sampler options kept), scored without planning
tasks: ``noise_std_ratio_<dim>`` (recovered / true std of s' on the interior transitions) and
``interior/wm_delta_nmse_<dim>``. Prints one line per (trial, steps) and the median [min, max]
over trials per budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

import qworld_analysis as qa
from qworld import metrics as K
from qworld.agents import load_q
from qworld.sweep.run import load_spec_of
from qworld.sweep.score import score_q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--steps", type=int, nargs="+", default=[1500])
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_spec_of(args.experiment)
    base_opts = dict(spec.extract.options.get("sampler", {}))
    final = qa.final_checkpoints(qa.load(args.experiment))
    rows = []
    for (trial_id, path), part in final.groupby([K.TRIAL_ID, K.CHECKPOINT_PATH]):
        qfun = load_q(path)
        for steps in args.steps:
            opts = {"sampler": {**base_opts, "steps": steps}, K.Q_NMSE: {"grid_shape": None}}
            [row] = score_q(qfun, {K.TRIAL_ID: trial_id, K.SEED: part[K.SEED].iloc[0]}, ["sampler"], [], opts)
            keep = {k: row.get(k) for k in (K.TRIAL_ID, K.SEED, K.FIT_SECONDS, K.ERROR)}
            keep.update({k: v for k, v in row.items() if k.startswith(K.NOISE_STD_RATIO)
                         or k.startswith(f"{K.INTERIOR}/{K.WM_DELTA_NMSE}_")})
            rows.append({"steps": steps, **keep})
            print(json.dumps(keep | {"steps": steps}, default=float), flush=True)
    out = pd.DataFrame(rows)
    cols = [c for c in out.columns if c.startswith((K.NOISE_STD_RATIO, f"{K.INTERIOR}/"))]

    def med_range(v: pd.Series) -> str:
        v = v.dropna()
        return "-" if v.empty else f"{v.median():.3g} [{v.min():.3g}, {v.max():.3g}] n={len(v)}"

    print(out.groupby("steps")[cols].agg(med_range).T.to_string())


if __name__ == "__main__":
    main()
