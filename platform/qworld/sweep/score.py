"""Score one checkpoint: Q out of it, P extracted by every method, scored and planned with.

No Ray here: the P-learning actor, ``qworld extract`` and tests all call
:func:`score_checkpoint`. It returns one row per extraction method; a method that fails
gives a row with its ``error`` filled in, and a checkpoint that cannot be read gives one
row with ``method = "load"`` and the error, so a sweep goes on past a corrupt checkpoint.
"""

from __future__ import annotations

import re
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qworld import metrics as K

LOAD_METHOD = "load"  # the method column of the row reporting an unreadable checkpoint


def checkpoint_index(checkpoint_path: str | Path) -> int:
    """Tune names checkpoints ``checkpoint_000007``; the number is the index."""
    match = re.search(r"checkpoint_(\d+)", str(checkpoint_path))
    if not match:
        raise ValueError(f"cannot read a checkpoint index from {checkpoint_path!r}")
    return int(match.group(1))


def grid_columns(sweep: str, trial_id: str, config: Mapping[str, Any], seed: Any = None) -> dict:
    """The grid-cell columns of a row, read from a trial's resolved config."""
    env_kwargs = dict(config.get("env_kwargs") or {})

    def pick(key):  # the resolved value (e.g. num_goals=None resolved to L) wins
        value = config.get(key)
        return env_kwargs.get(key) if value is None else value

    return {
        K.SWEEP: sweep,
        K.TRIAL_ID: trial_id,
        K.ENV: config.get("env_id"),
        K.VARIANT: pick(K.VARIANT),
        K.GOAL_TYPE: pick(K.GOAL_TYPE),
        K.NUM_GOALS: pick(K.NUM_GOALS),
        K.HEAD: config.get("head"),
        K.SEED: seed if seed is not None else config.get("seed"),
    }


def score_checkpoint(
    checkpoint_path: str | Path,
    *,
    sweep: str,
    trial_id: str,
    methods: Sequence[str],
    tasks: Sequence[str] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    env_steps: int | None = None,
    seed: Any = None,
    world_models: dict | None = None,
) -> list[dict]:
    """Rows of (trial, checkpoint, method) with world-model, diagnosis and planning metrics.

    ``world_models``, when given, receives method -> ``P_hat[S, A, S]`` of every successful
    extraction (finite envs), for ``store.write_world_models``.
    """
    options = options or {}
    index = checkpoint_index(checkpoint_path)
    base = {K.SWEEP: sweep, K.TRIAL_ID: trial_id, K.CHECKPOINT_INDEX: index,
            K.ENV_STEPS: env_steps, "checkpoint_path": str(checkpoint_path)}
    try:
        from qworld.agents import load_q

        qfun = load_q(checkpoint_path)
        config = dict(qfun.config)
    except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint is data, not a crash
        return [{**base, K.METHOD: LOAD_METHOD, K.ERROR: _error_text(exc)}]
    base = {**grid_columns(sweep, trial_id, config, seed), **base}
    from qworld_envs import FINITE_ENVS

    if config.get("env_id") in FINITE_ENVS:
        return _score_finite(qfun, config, base, methods, tasks, options, world_models)
    from qworld.plearn.continuous import score_checkpoint_continuous

    return score_checkpoint_continuous(qfun, config, base, methods, tasks, options)


def _score_finite(qfun, config, base, methods, tasks, options, world_models=None) -> list[dict]:
    from qworld.bellman import greedy_policy, m_matrix, solve_goal_q
    from qworld.planning import run_safety_task, task_optimal_plan
    from qworld.plearn.finite import diagnose, extract, method_options
    from qworld.scoring import nmse, score_p
    from qworld_envs import make_finite_task

    task = make_finite_task(config["env_id"], **config["env_kwargs"])
    P, goals = task.mdp.P, task.goals
    gamma = float(config["gamma"])
    Q = np.asarray(qfun.q_table(), dtype=np.float64)  # [L, S, A]
    V = Q.max(axis=-1)  # greedy V, the reference code's choice
    M = m_matrix(goals.rewards, V, gamma, goals.terminal)
    # The agent's Q is scored against the exact Q of its own greedy policy.
    Q_pi, _ = solve_goal_q(P, goals.rewards, gamma, goals.terminal, policy=greedy_policy(Q))
    # Identifiability of this case from this agent: the case's structure (deterministic or
    # not) is read off the true P, and M is known only up to the agent's Q error, so columns
    # closer than twice that error count as equal (the column-matching margin).
    deterministic = bool(np.all((P > 0).sum(-1) == 1))
    diag = diagnose(M, deterministic=deterministic, gap_tol=2.0 * float(np.abs(Q - Q_pi).max()))
    shared = {**base, K.Q_NMSE: float(nmse(Q, Q_pi)),
              **{k: diag[k] for k in (K.M_RANK, K.M_COND, K.M_GAP, K.IDENTIFIABLE_CASE, K.IDENTIFIABLE_REASON)}}

    # The reference plan of each task in the true MDP: once per checkpoint, not per method.
    optimal = {t: task_optimal_plan(task.mdp, t, gamma) for t in tasks}
    rows = []
    for method in methods:
        row = {**shared, K.METHOD: method, K.ORACLE: method in K.ORACLE_METHODS, K.ERROR: None}
        try:
            start = time.perf_counter()
            opts = {**method_options(method, P, task.mdp.coords), **options.get(method, {})}
            P_hat = extract(Q, M, method, **opts)
            if world_models is not None:
                world_models[method] = P_hat
            row[K.FIT_SECONDS] = time.perf_counter() - start
            row.update(score_p(P_hat, P))
            for task_name in tasks:
                plan = run_safety_task(task.mdp, P_hat, task_name, gamma=gamma,
                                       optimal_policy=optimal[task_name])
                row.update({f"{task_name}/{k}": v for k, v in plan.items()})
        except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
            row[K.ERROR] = _error_text(exc)
        rows.append(row)
    return rows


def _error_text(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:2000]
