"""The oracle study: every extraction method on exact Q-values, across FourRooms variants (or
any finite env of ``qworld_envs.FINITE_ENVS``: gymnasium's tabular envs, an MDP from a file)
and L.

No training: Q comes from exact policy iteration (:mod:`qworld.worldmodel.bellman`), so the study
checks the theory (Table 1 thresholds, where each method starts to recover P) and is the yardstick
for learned agents. One row per (variant, num_goals, method, task).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from qworld import metrics as K
from qworld.worldmodel.bellman import m_matrix, solve_goal_q
from qworld.worldmodel.planning import DEFAULT_TASK, SAFETY_TASKS, PlanningTask, task_name, task_optimal_plan
from qworld.worldmodel.plearn import finite
from qworld.worldmodel.plearn.diagnose import diagnose
from qworld.worldmodel.plearn.finite import METHODS, trained_q_mask
from qworld.worldmodel.scoring import extract_and_plan

DEFAULT_VARIANTS = ("deterministic", "windy", "teleport")
DEFAULT_NUM_GOALS = (1, 2, 4, 8, 17, 34, 51, 68)

# A modest P-learning budget: the study is a sweep over 24 cells, not a single fit
# (extract's own defaults reach p_mse < 1e-4 on windy FourRooms with L = 68).
SGD_OPTIONS = {"steps": 500, "batch_size": 1024, "lr": 0.3}

FOUR_ROOMS = "qworld/FourRooms-v0"  # qworld_envs.FOUR_ROOMS_ID (envs are imported lazily)

COLUMNS = (
    K.ENV,
    K.VARIANT,
    K.GOAL_TYPE,
    K.NUM_GOALS,
    K.SEED,
    K.METHOD,
    K.ORACLE,
    K.P_MSE,
    K.P_TV,
    K.P_MAX_ERR,
    K.P_ROWS_UNSCORED,
    K.M_RANK,
    K.M_COND,
    K.M_GAP,
    K.IDENTIFIABLE_CASE,
    K.TASK,
    K.PLAN_SUCCESS,
    K.PLAN_EXCESS_STEPS,
    K.UNSAFE_VISITS,
    K.PLAN_STEPS,
    K.PLAN_OPTIMAL_STEPS,
    K.FIT_SECONDS,
    K.ERROR,
)


def method_options(method: str, mdp, seed: int = 0) -> dict:
    """Options the oracle study passes to :func:`qworld.worldmodel.plearn.finite.extract`.

    What each method is given is :func:`qworld.worldmodel.plearn.finite.method_options` (sparse_search's
    ``max_support`` is 16 for teleport: C(68, 16) supports are too many to search, so it
    takes the NNLS / elimination path); sgd also gets ``SGD_OPTIONS`` and the study seed.

    Args:
        mdp: the true ``FiniteMDP``.
    """
    options = finite.method_options(method, mdp.P, mdp.coords)
    if method == "sgd":
        options.update(SGD_OPTIONS, seed=seed)
    return options


def diagnose_assumptions(method: str, P: np.ndarray) -> dict:
    """What the method may assume about P when :func:`diagnose` decides identifiability.

    pinv and sgd assume nothing; known_support knows the support, sparse_search its size;
    column_match relies on determinism, granted only when P is deterministic.
    """
    support = P > 0
    if method == "known_support":
        return {"max_support": int(support.sum(axis=-1).max()), "known_support": support}
    if method == "sparse_search":
        return {"max_support": int(support.sum(axis=-1).max())}
    if method == "column_match":
        return {"deterministic": bool(np.all(support.sum(axis=-1) == 1))}
    return {}


def _tasks_for(variant: str | None, tasks: str | Sequence[str | PlanningTask], four_rooms: bool = True) -> list:
    """The tasks of one case: ``default`` / ``all`` name FourRooms' own (none elsewhere)."""
    if tasks in ("default", "all"):
        if not four_rooms:
            return []
        if tasks == "default":
            return [DEFAULT_TASK[variant]]
        return [name for name, t in SAFETY_TASKS.items() if variant in t.variants]
    if tasks in ("none", None):
        return []
    unknown = [t for t in tasks if not isinstance(t, PlanningTask) and t not in SAFETY_TASKS]
    if unknown:
        raise ValueError(f"unknown safety tasks {unknown}; known: {', '.join(SAFETY_TASKS)} (or define one: "
                         "planning.PlanningTask)")
    return list(tasks)


def default_num_goals(num_states: int, four_rooms: bool) -> tuple[int, ...]:
    """The goal counts of the study: the paper's for FourRooms, else 1, 2, 4, ... below S, and S."""
    if four_rooms:
        return DEFAULT_NUM_GOALS
    counts = []
    L = 1
    while L < num_states:
        counts.append(L)
        L *= 2
    return (*counts, num_states)


def coordinate_free_refusals(methods: Sequence[str], mdp) -> dict[str, str]:
    """method -> why it cannot run on ``mdp`` (e.g. ``moves`` needs grid coordinates and the
    MDP has none); empty when every method can. Read off ``plearn.finite.method_options``."""
    refused = {}
    for method in methods:
        try:
            finite.method_options(method, mdp.P, mdp.coords)
        except ValueError as exc:
            refused[method] = str(exc)
    return refused


def oracle_study(
    variants: Sequence[str] = DEFAULT_VARIANTS,
    num_goals_list: Sequence[int] | None = None,
    methods: Sequence[str] = METHODS,
    gamma: float = 0.99,
    seed: int = 0,
    goal_type: str = "indicator",
    tasks: str | Sequence[str | PlanningTask] = "default",
    env_id: str = FOUR_ROOMS,
    env_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Extract P from exact Q with every method and score it, for each variant and L.

    Args:
        variants: FourRooms variants (FourRooms only; another env is one case, its kwargs).
        num_goals_list: goal counts L (None: :func:`default_num_goals`); indicator goals are
            a seeded random subset of the states (all S at L = S), dense goals i.i.d. U(0, 1)
            rewards.
        methods: extraction methods (``qworld.worldmodel.plearn.finite.METHODS``).
        gamma: discount of the goals and of planning.
        seed: goal draw and sgd seed.
        goal_type: "indicator" or "dense".
        tasks: "default" (one task per variant, ``planning.DEFAULT_TASK``), "all" (every
            task meant for the variant, one row each), "none", or a list of task names and
            ``planning.PlanningTask``s; "default" and "all" are FourRooms' (none elsewhere).
        env_id: any finite env id (``qworld_envs.FINITE_ENVS``).
        env_kwargs: its env kwargs (e.g. ``{"map_name": "8x8"}``; not the goal kwargs).

    Returns:
        DataFrame with ``COLUMNS``: one row per (variant, num_goals, method, task). A method
        that raises leaves its metrics NaN and the message in ``error``. ``identifiable_case``
        is :func:`diagnose` under what that method may assume (:func:`diagnose_assumptions`):
        whether M determines P given that knowledge, not whether that method's algorithm is
        the one that recovers it (column_match on windy at L = 68 reads "stochastic"). The
        rows of the env's terminal states are left out of the scores (``p_rows_unscored``).
    """
    from qworld_envs import make_finite_problem  # envs depend on nothing in qworld

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {', '.join(METHODS)}")
    four_rooms = env_id == FOUR_ROOMS
    env_kwargs = dict(env_kwargs or {})
    cases = [{**env_kwargs, K.VARIANT: v} for v in variants] if four_rooms else [env_kwargs]
    rows = []
    for kw in cases:
        variant = kw.get(K.VARIANT)
        mdp = make_finite_problem(env_id, **kw).mdp
        P = mdp.P
        task_list = _tasks_for(variant, tasks, four_rooms)
        optimal = {t: task_optimal_plan(mdp, t, gamma) for t in task_list}  # one reference per task
        task_names = [task_name(t) for t in task_list]
        counts = default_num_goals(mdp.num_states, four_rooms) if num_goals_list is None else num_goals_list
        for L in counts:
            goals = make_finite_problem(env_id, **kw, goal_type=goal_type, num_goals=int(L), goal_seed=seed).goals
            Q, V = solve_goal_q(P, goals.rewards, gamma, goals.terminal)
            M = m_matrix(goals.rewards, V, gamma, goals.terminal)
            # Q at the MDP's terminal states is its absorbing convention, not its dynamics: as for
            # a learned agent (which never acts there), those equations are left out.
            q_mask = trained_q_mask(goals.terminal)
            diag_cache: dict[str, dict] = {}
            for method in methods:
                base = {
                    K.ENV: env_id,
                    K.VARIANT: variant,
                    K.GOAL_TYPE: goal_type,
                    K.NUM_GOALS: int(L),
                    K.SEED: seed,
                    K.METHOD: method,
                    K.ORACLE: method in K.ORACLE_METHODS,
                    K.ERROR: None,
                }
                assumptions = diagnose_assumptions(method, P)
                key = repr(sorted((k, type(v).__name__) for k, v in assumptions.items()))
                try:
                    if key not in diag_cache:
                        diag_cache[key] = diagnose(M, seed=seed, **assumptions)
                    d = diag_cache[key]
                    base.update({k: d[k] for k in (K.M_RANK, K.M_COND, K.M_GAP, K.IDENTIFIABLE_CASE)})
                    _, scores, by_task = extract_and_plan(Q, M, mdp, method, method_options(method, mdp, seed),
                                                          gamma, optimal, q_mask)
                    base.update(scores)
                    plans = [by_task[t] for t in task_names] or [{}]
                except Exception as e:  # one failing method must not sink the study
                    base[K.ERROR] = f"{type(e).__name__}: {e}"
                    plans = [{K.TASK: t} for t in task_names] or [{}]
                rows.extend({**base, **p} for p in plans)
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = np.nan
    df[K.ERROR] = df[K.ERROR].astype(object)
    return df[list(COLUMNS)]
