"""``qworld oracle``: the exact-Q study (no training, no Ray) on FourRooms or any finite env."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qworld import metrics as K
from qworld.cli.common import bad_input

# Columns of the printed oracle table (the parquet keeps them all).
ORACLE_PRINT_COLUMNS = (
    K.VARIANT,
    K.NUM_GOALS,
    K.METHOD,
    K.P_MSE,
    K.P_MAX_ERR,
    K.P_ROWS_UNSCORED,
    K.M_RANK,
    K.IDENTIFIABLE_CASE,
    K.TASK,
    K.PLAN_SUCCESS,
    K.UNSAFE_VISITS,
    K.PLAN_EXCESS_STEPS,
    K.FIT_SECONDS,
)


def _add_oracle_args(p: argparse.ArgumentParser) -> None:
    from qworld.worldmodel.oracle import DEFAULT_VARIANTS, FOUR_ROOMS
    from qworld.worldmodel.plearn.finite import METHODS

    p.add_argument("--env", default=FOUR_ROOMS,
                   help="any finite env: a qworld id (qworld/FrozenLake-v1), a tabular gymnasium id "
                        "(FrozenLake-v1, CliffWalkingSlippery-v1, Taxi-v3) or an .npz MDP file")
    p.add_argument("--env-kwargs", default="{}", help='env kwargs as JSON, e.g. \'{"map_name": "8x8"}\'')
    p.add_argument("--variants", nargs="+", default=None, choices=list(DEFAULT_VARIANTS),
                   help=f"FourRooms variants (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--num-goals", nargs="+", type=int, default=None,
                   help="goal counts L (default: the paper's on FourRooms, else 1, 2, 4, ... and S)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="default: every method the MDP allows (moves needs grid coordinates)")
    p.add_argument("--goal-type", default="indicator", choices=["indicator", "dense"])
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0, help="goal draw and sgd seed")
    p.add_argument(
        "--tasks", nargs="+", default=["default"],
        help="safety tasks: default | all | none (FourRooms' own) | task names | a task as JSON, "
             '\'{"name": "safe", "start": [0, 0], "goal": [7, 7], "forbidden": [[5, 4]]}\'')
    p.add_argument("--out", type=Path, default=None,
                   help="parquet file to write (default: results/oracle.parquet for FourRooms, "
                        "results/oracle_<env>.parquet for another env, relative to the working directory)")


def _format_table(df) -> str:
    """Compact, readable table: few columns, short floats."""
    cols = [c for c in ORACLE_PRINT_COLUMNS if c in df]
    if K.ERROR in df and df[K.ERROR].notna().any():
        cols.append(K.ERROR)
    view = df[cols].rename(
        columns={K.NUM_GOALS: "L", K.IDENTIFIABLE_CASE: "case", K.PLAN_EXCESS_STEPS: "excess_steps",
                 K.P_ROWS_UNSCORED: "unscored"}
    )
    return view.to_string(index=False, float_format=lambda x: f"{x:.3g}", na_rep="-")


def _usage_error(message: str) -> int:
    return bad_input(message, "qworld oracle")


def default_oracle_out(env_id: str, env_kwargs: dict | None = None) -> Path:
    """``results/oracle.parquet`` (FourRooms) or ``results/oracle_<env or .npz name>.parquet``,
    so that studies of different envs do not overwrite each other; relative to the working
    directory."""
    from qworld.worldmodel.oracle import FOUR_ROOMS

    if env_id == FOUR_ROOMS:
        return Path("results/oracle.parquet")
    path = (env_kwargs or {}).get("path")
    name = Path(str(path)).stem if path else env_id.rsplit("/", 1)[-1]
    return Path("results") / f"oracle_{''.join(c if c.isalnum() or c in '-_' else '_' for c in name)}.parquet"


def _cmd_oracle(args: argparse.Namespace) -> int:
    import json

    from qworld.worldmodel.oracle import DEFAULT_VARIANTS, FOUR_ROOMS, coordinate_free_refusals, oracle_study
    from qworld.worldmodel.planning import PlanningTask, task_states
    from qworld.worldmodel.plearn.finite import METHODS
    from qworld_envs import make_finite_problem, resolve_finite_env

    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as exc:
        return _usage_error(f"--env-kwargs: not JSON ({exc}); e.g. '{{\"map_name\": \"8x8\"}}'")
    if not isinstance(env_kwargs, dict):
        return _usage_error(f"--env-kwargs: {args.env_kwargs!r} must be a JSON object of env kwargs")
    try:
        env_id, env_kwargs = resolve_finite_env(args.env, env_kwargs)
    except ValueError as exc:
        return _usage_error(f"--env: {exc}")
    if env_id != FOUR_ROOMS and args.variants is not None:
        return _usage_error(f"--variants: FourRooms variants; {env_id} takes its own kwargs (--env-kwargs)")
    variants = args.variants or list(DEFAULT_VARIANTS)
    try:
        mdps = [make_finite_problem(env_id, **env_kwargs, **({"variant": v} if env_id == FOUR_ROOMS else {})).mdp
                for v in (variants if env_id == FOUR_ROOMS else [None])]
    except (TypeError, ValueError) as exc:
        return _usage_error(f"--env-kwargs: {exc}")
    methods = list(args.methods or METHODS)
    refused = {m: why for mdp in mdps for m, why in coordinate_free_refusals(methods, mdp).items()}
    if refused and args.methods:
        method, why = next(iter(refused.items()))
        return _usage_error(f"--methods: {method!r} cannot run on {env_id}: {why}")
    if refused:
        print(f"(left out: {', '.join(refused)}: {env_id} has no grid coordinates)")
        methods = [m for m in methods if m not in refused]
    keyword = len(args.tasks) == 1 and args.tasks[0] in ("default", "all", "none")
    tasks = args.tasks[0] if keyword else []
    for i, item in enumerate([] if keyword else args.tasks):
        if not item.lstrip().startswith("{"):
            tasks.append(item)
            continue
        try:
            task = PlanningTask.from_mapping(json.loads(item))
            for mdp in mdps:
                task_states(mdp, task)
        except (json.JSONDecodeError, ValueError) as exc:
            return _usage_error(f"--tasks[{i}].{exc}")
        tasks.append(task)
    t0 = time.perf_counter()
    try:
        df = oracle_study(
            variants=variants,
            num_goals_list=args.num_goals,
            methods=methods,
            gamma=args.gamma,
            seed=args.seed,
            goal_type=args.goal_type,
            tasks=tasks,
            env_id=env_id,
            env_kwargs=env_kwargs,
        )
    except ValueError as exc:  # e.g. more indicator goals than states, an unknown task name
        return _usage_error(str(exc))
    seconds = time.perf_counter() - t0
    print(_format_table(df))
    out = args.out or default_oracle_out(env_id, env_kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False)
    print(f"\n{len(df)} rows in {seconds:.1f} s -> {out.resolve()}")
    return 1 if df[K.ERROR].notna().any() else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    help_text = ("extract P from exact Q with every method on FourRooms (or --env: any finite env), "
                 "score it, plan with it")
    p = sub.add_parser("oracle", help=help_text, description=help_text)
    _add_oracle_args(p)
    p.set_defaults(func=_cmd_oracle)
