"""Expert demonstrations of a finite goal task, in RLlib's offline data format.

``write_demonstrations`` solves the task exactly (``qworld.worldmodel.bellman.solve_goal_q``), rolls the
optimal greedy policy out in the true MDP and writes one parquet row per transition with
RLlib's column names (``ray.rllib.core.columns.Columns``), the schema RLlib's
``OfflinePreLearner._map_to_episodes`` reads with ``config.offline_data(input_=DIR)``:

==============  ======================================================================
column          value
==============  ======================================================================
``eps_id``      str, one id per episode
``obs``         float32 ``[S + L]``: ``concat(one_hot(s) [S], one_hot(goal) [L])``
``actions``     int64, the optimal action (lowest index among ties)
``rewards``     float32, the true reward ``rewards[goal, s']`` (RLlib needs the column;
                IQ-Learn never reads it)
``new_obs``     float32 ``[S + L]``: ``concat(one_hot(s'), one_hot(goal))``
``terminateds`` bool, s' is a terminal state of the goal
``truncateds``  bool, the env's time limit ended the episode at s'
``t``           int64, step index within the episode (0 for the first transition)
==============  ======================================================================

The observation layout is the gymnasium env's own (``qworld/FourRooms-v0`` observes
``concat(one_hot(state), goal_features[goal])`` with one-hot goal features), so the goal
travels through RLlib's pipeline untouched and a learner splits it off again.

Episodes: the goal is drawn uniformly from the goal set, the start state uniformly from
the states that are not terminal for it (the env's start distribution); an episode ends on
a terminal state of its goal or after ``max_episode_steps`` steps (the env's time limit).

Beside the parquet file, ``demonstrations.json`` records how it was made (env id and
resolved kwargs, gamma, counts, seed, obs layout). No Ray at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np

DEMONSTRATIONS_FILE = "demonstrations.parquet"
DEMONSTRATIONS_META = "demonstrations.json"
OBS_LAYOUT = "concat(one_hot(state) [S], one_hot(goal) [L])"

# RLlib's column names (ray.rllib.core.columns.Columns), spelled out so this module needs no Ray.
EPS_ID, OBS, ACTIONS, REWARDS, NEXT_OBS = "eps_id", "obs", "actions", "rewards", "new_obs"
TERMINATEDS, TRUNCATEDS, T = "terminateds", "truncateds", "t"
COLUMNS = (EPS_ID, OBS, ACTIONS, REWARDS, NEXT_OBS, TERMINATEDS, TRUNCATEDS, T)


def optimal_actions(problem: Any, gamma: float) -> np.ndarray:
    """``[L, S]`` int64 greedy actions of the exact optimal goal-conditioned Q."""
    from qworld.worldmodel.bellman import greedy_policy, solve_goal_q

    Q, _ = solve_goal_q(problem.mdp.P, problem.goals.rewards, gamma, terminal=problem.goals.terminal)
    return greedy_policy(Q).argmax(-1).astype(np.int64)


def rollout_demonstrations(problem: Any, gamma: float, num_episodes: int, seed: int) -> Dict[str, np.ndarray]:
    """Roll the optimal policy out ``num_episodes`` times in the true MDP.

    Returns:
        ``{episode [N], goal [N], state [N], action [N], next_state [N], reward [N],
        terminated [N], truncated [N], t [N]}`` over the N transitions, in episode order.
    """
    from qworld_envs.goals import start_states

    policy = optimal_actions(problem, gamma)  # [L, S]
    rewards, terminal = problem.goals.rewards, problem.goals.terminal
    starts = start_states(terminal)
    L, horizon = problem.goals.num_goals, int(problem.max_episode_steps)
    rng = np.random.default_rng(seed)
    rows: Dict[str, list] = {k: [] for k in ("episode", "goal", "state", "action", "next_state", "reward",
                                            "terminated", "truncated", "t")}
    for episode in range(int(num_episodes)):
        goal = int(rng.integers(L))
        s = int(rng.choice(starts[goal]))
        for t in range(horizon):
            a = int(policy[goal, s])
            s2 = problem.mdp.sample_next(s, a, rng)
            done = bool(terminal[goal, s2])
            for key, value in (("episode", episode), ("goal", goal), ("state", s), ("action", a),
                               ("next_state", s2), ("reward", rewards[goal, s2]), ("terminated", done),
                               ("truncated", not done and t + 1 >= horizon), ("t", t)):
                rows[key].append(value)
            s = s2
            if done:
                break
    dtypes = {"reward": np.float32, "terminated": bool, "truncated": bool}
    return {k: np.asarray(v, dtype=dtypes.get(k, np.int64)) for k, v in rows.items()}


def demo_obs(states: np.ndarray, goals: np.ndarray, num_states: int, num_goals: int) -> np.ndarray:
    """``[N, S + L]`` float32 ``concat(one_hot(state), one_hot(goal))`` (see module doc)."""
    obs = np.zeros((len(states), num_states + num_goals), dtype=np.float32)
    rows = np.arange(len(states))
    obs[rows, states] = 1.0
    obs[rows, num_states + goals] = 1.0
    return obs


def write_demonstrations(out_dir: str | Path, env_id: str, env_kwargs: Mapping[str, Any] | None = None,
                         num_episodes: int = 500, gamma: float = 0.99, seed: int = 0) -> Dict[str, Any]:
    """Write ``num_episodes`` optimal episodes of a finite task as RLlib offline data.

    Args:
        out_dir: directory for ``demonstrations.parquet`` and ``demonstrations.json``
            (created; ``config.offline_data(input_=out_dir)`` reads it).
        env_id: a finite env id (``qworld_envs.FINITE_ENVS``).
        env_kwargs: its kwargs (variant, goal_type, num_goals, ...).
        num_episodes: episodes to roll out.
        gamma: discount of the exact solution the demonstrator follows.
        seed: seed of the goal, start-state and transition draws.

    Returns:
        The metadata written to ``demonstrations.json``.

    Raises:
        ValueError: a non-finite env id, bad kwargs, ``num_episodes < 1`` or gamma outside [0, 1).
    """
    import pandas as pd
    import qworld_envs

    if env_id not in qworld_envs.FINITE_ENVS:
        raise ValueError(f"env_id={env_id!r}: demonstrations need a finite env; allowed: {sorted(qworld_envs.FINITE_ENVS)}")
    if isinstance(num_episodes, bool) or not isinstance(num_episodes, (int, np.integer)) or num_episodes < 1:
        raise ValueError(f"num_episodes={num_episodes!r}: must be an int >= 1")
    if not 0 <= float(gamma) < 1:
        raise ValueError(f"gamma={gamma!r}: must be a number in [0, 1)")
    problem = qworld_envs.make_finite_problem(env_id, **dict(env_kwargs or {}))
    S, L = problem.mdp.num_states, problem.goals.num_goals
    d = rollout_demonstrations(problem, float(gamma), int(num_episodes), int(seed))
    frame = pd.DataFrame({
        EPS_ID: [f"{seed}-{e}" for e in d["episode"]],
        OBS: list(demo_obs(d["state"], d["goal"], S, L)),
        ACTIONS: d["action"],
        REWARDS: d["reward"],
        NEXT_OBS: list(demo_obs(d["next_state"], d["goal"], S, L)),
        TERMINATEDS: d["terminated"],
        TRUNCATEDS: d["truncated"],
        T: d["t"],
    })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / DEMONSTRATIONS_FILE, index=False)
    from qworld.agents.pqn.problem import jsonable

    meta = {
        "env_id": env_id,
        "env_kwargs": jsonable(problem.env_kwargs),
        "gamma": float(gamma),
        "num_episodes": int(num_episodes),
        "num_transitions": int(len(frame)),
        "seed": int(seed),
        "num_states": int(S),
        "num_goals": int(L),
        "obs_layout": OBS_LAYOUT,
        "columns": list(COLUMNS),
    }
    (out / DEMONSTRATIONS_META).write_text(json.dumps(meta, indent=1))
    return meta


def read_demonstrations(demo_dir: str | Path) -> Dict[str, np.ndarray]:
    """The transitions of a :func:`write_demonstrations` directory, decoded from the obs layout.

    Returns:
        ``{goal, state, action, next_state [N] int64, reward [N] float64, terminated [N] bool}``.
    """
    import pandas as pd

    demo_dir = Path(demo_dir)
    meta = json.loads((demo_dir / DEMONSTRATIONS_META).read_text())
    S = int(meta["num_states"])
    frame = pd.read_parquet(demo_dir / DEMONSTRATIONS_FILE, columns=[OBS, ACTIONS, REWARDS, NEXT_OBS, TERMINATEDS])
    obs, nxt = np.stack(frame[OBS].to_numpy()), np.stack(frame[NEXT_OBS].to_numpy())
    return {"goal": obs[:, S:].argmax(1).astype(np.int64), "state": obs[:, :S].argmax(1).astype(np.int64),
            "action": frame[ACTIONS].to_numpy(np.int64), "next_state": nxt[:, :S].argmax(1).astype(np.int64),
            "reward": frame[REWARDS].to_numpy(np.float64), "terminated": frame[TERMINATEDS].to_numpy(bool)}
