"""Time the full oracle study: 3 FourRooms variants x 8 goal counts x 5 methods, one CPU thread.

    .venv/bin/python benchmarks/oracle_study.py [--repeats 1]

Prints the wall-clock seconds of each run and the number of rows (one per variant, L, method
and default safety task). The target is under 60 s on the 2-core dev machine.
"""

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the study is single-threaded by design: compare like with like
    from qworld.worldmodel.oracle import oracle_study

    for i in range(args.repeats):
        t0 = time.perf_counter()
        df = oracle_study()
        seconds = time.perf_counter() - t0
        errors = int(df["error"].notna().sum())
        per_method = df.groupby("method")["fit_seconds"].sum().round(2).to_dict()
        print(f"run {i}: {seconds:.1f} s, {len(df)} rows, {errors} errors")
        print(f"  fit seconds by method: {per_method}")


if __name__ == "__main__":
    main()
