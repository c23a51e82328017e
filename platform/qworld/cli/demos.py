"""``qworld demos``: optimal demonstrations of a finite task as RLlib offline data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

from qworld.cli.common import bad_input


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demos", help="write optimal demonstrations of a finite task as RLlib offline data (parquet)")
    p.add_argument("--env", default="qworld/FourRooms-v0", help="finite env id")
    p.add_argument("--variant", default=None, help="env variant (FourRooms: deterministic | windy | teleport)")
    p.add_argument("--num-goals", type=int, default=None, help="goal count L (default: the env's)")
    p.add_argument("--goal-type", default="indicator", help="goal family (indicator | dense)")
    p.add_argument("--goal-seed", type=int, default=0, help="seed of the goal placement")
    p.add_argument("--episodes", type=int, default=500, help="episodes to roll out")
    p.add_argument("--gamma", type=float, default=0.99, help="discount of the exact solution")
    p.add_argument("--seed", type=int, default=0, help="seed of the goal, start and transition draws")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.set_defaults(func=_cmd_demos)


def _cmd_demos(args: argparse.Namespace) -> int:
    from qworld.demonstrations import DEMONSTRATIONS_FILE, write_demonstrations

    env_kwargs: Dict[str, Any] = {"goal_type": args.goal_type, "goal_seed": args.goal_seed}
    if args.variant is not None:
        env_kwargs["variant"] = args.variant
    if args.num_goals is not None:
        env_kwargs["num_goals"] = args.num_goals
    try:
        meta = write_demonstrations(args.out, args.env, env_kwargs, num_episodes=args.episodes,
                                    gamma=args.gamma, seed=args.seed)
    except (ValueError, TypeError) as e:  # the env's and our own messages name the field
        return bad_input(str(e))
    print(f"{meta['num_transitions']} transitions of {meta['num_episodes']} episodes -> {Path(args.out) / DEMONSTRATIONS_FILE}")
    return 0
