"""p_mse of every honest extraction method on exact Q, on MDPs whose structure differs (issue 25).

    .venv/bin/python benchmarks/structured_moves.py [--draws 3]

Exact Q (policy iteration, ``qworld.worldmodel.bellman``), indicator goals drawn at random (goal seed =
draw; the random MDPs are drawn with the same seed), L = 4, 16 (17 on FourRooms), S. Prints
one row per (MDP, L): the median p_mse over the draws and its range [min, max], per method,
and whether regional_moves is no worse than the best generic method in every draw (two
p_mse below 1e-20, round-off of exact models, count as a tie).
Terminal states (FrozenLake's holes and goal, CliffWalking's goal: ``qworld_envs.tabular``)
are absorbing and their rows are not identifiable from Q: they are left out of p_mse.
sgd runs with the oracle study's budget (``qworld.worldmodel.oracle.SGD_OPTIONS``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qworld.worldmodel.bellman import m_matrix, solve_goal_q
from qworld.worldmodel.oracle import SGD_OPTIONS
from qworld.worldmodel.plearn.finite import extract, method_options
from qworld.worldmodel.plearn.moves import grid_neighbours
from qworld_envs import FiniteMDP, four_rooms, indicator_goals
from qworld_envs.tabular import mdp_from_gymnasium

GAMMA = 0.99
METHODS = ("regional_moves", "moves", "pinv", "sgd", "column_match")
GENERIC = ("pinv", "sgd", "column_match")


def one_room_wind() -> FiniteMDP:
    """FourRooms windy in its first room only (16 of 68 cells), deterministic elsewhere."""
    det, windy = four_rooms("deterministic"), four_rooms("windy")
    room = det.meta["rooms"][0]
    P = det.P.copy()
    P[room] = windy.P[room]
    return FiniteMDP(P, coords=det.coords, name="FourRooms-one-room-wind")


def random_dense(seed: int, rows: int = 5, cols: int = 5, A: int = 4) -> FiniteMDP:
    """Every (s, a) a Dirichlet(1) over all S states; the states on a grid (no structure)."""
    P = np.random.default_rng(seed).dirichlet(np.ones(rows * cols), size=(rows * cols, A))
    return FiniteMDP(P, coords=np.argwhere(np.ones((rows, cols))), name="random-dense-5x5")


def random_local(seed: int, rows: int = 5, cols: int = 5, A: int = 4) -> FiniteMDP:
    """Every (s, a) its own Dirichlet(1) over the cell and its grid neighbours (local, not shared)."""
    coords = np.argwhere(np.ones((rows, cols)))
    nbr, rng = grid_neighbours(coords), np.random.default_rng(seed)
    P = np.zeros((len(coords), A, len(coords)))
    for s in range(len(coords)):
        t = nbr[s][nbr[s] >= 0]
        for a in range(A):
            np.add.at(P[s, a], t, rng.dirichlet(np.ones(len(t))))
    return FiniteMDP(P, coords=coords, name="random-local-5x5")


MDPS = {
    "FourRooms deterministic": lambda seed: four_rooms("deterministic"),
    "FourRooms windy": lambda seed: four_rooms("windy"),
    "FourRooms teleport": lambda seed: four_rooms("teleport"),
    "FourRooms wind in one room": lambda seed: one_room_wind(),
    "FrozenLake 8x8 slippery": lambda seed: mdp_from_gymnasium("FrozenLake-v1", map_name="8x8", is_slippery=True),
    "CliffWalking-v1": lambda seed: mdp_from_gymnasium("CliffWalking-v1"),
    "random dense 5x5": random_dense,
    "random local 5x5": random_local,
}


def scores(mdp: FiniteMDP, L: int, seed: int) -> dict[str, tuple[float, float]]:
    """method -> (p_mse, p_max_err) on the identifiable rows, for one goal draw."""
    goals = indicator_goals(mdp, L, seed=seed)
    Q, V = solve_goal_q(mdp.P, goals.rewards, GAMMA, goals.terminal)
    M = m_matrix(goals.rewards, V, GAMMA, goals.terminal)
    keep = ~np.asarray(mdp.meta.get("terminal", np.zeros(mdp.num_states, dtype=bool)), dtype=bool)
    out = {}
    for method in METHODS:
        options = method_options(method, mdp.P, mdp.coords)
        if method == "sgd":
            options.update(SGD_OPTIONS, seed=seed)
        err = extract(Q, M, method, **options)[keep] - mdp.P[keep]
        out[method] = (float(np.mean(err**2)), float(np.abs(err).max()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=3, help="goal draws (seeds 0..draws-1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    print("| MDP | L | " + " | ".join(METHODS) + " | best generic | regional_moves <= best generic |")
    print("|---|---|" + "---|" * (len(METHODS) + 2))
    for name, build in MDPS.items():
        S = build(0).num_states
        for L in (4, 17 if name.startswith("FourRooms") else 16, S):
            runs = [scores(build(seed), L, seed) for seed in range(args.draws)]
            mse = {m: np.array([r[m][0] for r in runs]) for m in METHODS}
            cells = [f"{np.median(v):.1e} [{v.min():.0e}, {v.max():.0e}]" for v in mse.values()]
            best = np.min([mse[m] for m in GENERIC], axis=0)  # per draw
            ok = bool(np.all(mse["regional_moves"] <= np.maximum(best, 1e-20)))  # both exact: a tie
            exact = "" if L < S else f" (p_max_err {max(r['regional_moves'][1] for r in runs):.0e})"
            print(f"| {name} | {L} | " + " | ".join(cells) + f" | {np.median(best):.1e} | {ok}{exact} |", flush=True)
    print(f"\n{args.draws} goal draws; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
