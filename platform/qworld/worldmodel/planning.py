"""Planning inside an extracted world model, and exact evaluation of the plan in the true MDP.

Shapes: S states, A actions. The safety experiment of the paper: value iteration inside
``P_hat`` for an unseen goal with unseen forbidden states, then the greedy plan is run on the
*true* dynamics. Everything is exact (Markov-chain propagation), no sampling. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qworld import metrics as K
from qworld.worldmodel.bellman import greedy_policy, solve_goal_q

DEFAULT_HORIZON = 1000
# Planning treats a model's next-state probabilities below this fraction of their row's
# largest as zero (see :func:`prune_model`).
PLAN_PRUNE = 0.05


def prune_model(P_model: np.ndarray, prune: float = PLAN_PRUNE) -> np.ndarray:
    """The model planning uses: entries below ``prune`` x their row's largest set to zero.

    A fitted model is rarely exactly sparse (a softmax never gives a zero, a projection
    leaves round-off), and with a catastrophic forbidden state a leak of mass ``e`` into it
    costs ``e`` x the penalty at every step of every route, which can outweigh the whole
    goal reward. Dropping what is small *relative to the row* keeps every real outcome of
    the MDPs we plan in (windy: 1/4 vs 1/2; teleport: uniform rows keep every entry) while
    removing such leaks; the rows are renormalised.

    Args:
        P_model: ``[S, A, S]`` rows are probability vectors.
        prune: relative threshold in [0, 1); 0 returns the model unchanged.

    Returns:
        ``[S, A, S]`` float64, rows are probability vectors.
    """
    P_model = np.asarray(P_model, dtype=np.float64)
    if not 0.0 <= prune < 1.0:
        raise ValueError(f"prune must lie in [0, 1), got {prune}")
    if prune == 0.0:
        return P_model
    kept = np.where(P_model >= prune * P_model.max(axis=-1, keepdims=True), P_model, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)


def _state_list(states, S: int, what: str) -> np.ndarray:
    """Normalise one state or a sequence of states to a ``[n]`` int64 array, checking the range."""
    arr = np.asarray(states, dtype=np.int64)
    if arr.ndim > 1 or np.any((arr < 0) | (arr >= S)):
        raise ValueError(f"{what} must be state indices in [0, {S}), got {states!r}")
    return arr.reshape(-1)


def plan(
    P_model: np.ndarray,
    reward: np.ndarray,
    gamma: float,
    forbidden: Sequence[int] = (),
    terminal: np.ndarray | Sequence[int] | None = None,
    prune: float = PLAN_PRUNE,
) -> np.ndarray:
    """Greedy optimal policy inside a model, with catastrophic forbidden states.

    Entering a forbidden state pays a penalty larger than any attainable return,
    ``-10 (1 + max|reward| / (1 - gamma))``, and ends the episode, so the plan avoids every
    forbidden state the model says is avoidable.

    Args:
        P_model: ``[S, A, S]`` model dynamics (rows are probability vectors).
        reward: ``[S]`` reward on arriving in s'.
        gamma: discount in [0, 1).
        forbidden: state indices that must not be entered.
        terminal: ``[S]`` bool, or a sequence of state indices, where the episode ends
            (e.g. the goal); None = none besides the forbidden states.
        prune: the model is first :func:`prune_model`-ed with this threshold (0: as is).

    Returns:
        ``policy[S, A]`` one-hot (ties to the lowest action).
    """
    P_model = prune_model(P_model, prune)
    S = P_model.shape[0]
    reward = np.asarray(reward, dtype=np.float64).copy()
    if reward.shape != (S,):
        raise ValueError(f"reward must have shape [S] = [{S}], got {reward.shape}")
    term = np.zeros(S, dtype=bool)
    if terminal is not None:
        terminal = np.asarray(terminal)
        if terminal.dtype == bool:
            if terminal.shape != (S,):
                raise ValueError(f"terminal must have shape [S] = [{S}], got {terminal.shape}")
            term |= terminal
        else:
            term[_state_list(terminal, S, "terminal")] = True
    forb = _state_list(forbidden, S, "forbidden")
    if len(forb):
        reward[forb] = -10.0 * (1.0 + np.abs(reward).max() / (1.0 - gamma))
        term[forb] = True
    Q, _ = solve_goal_q(P_model, reward[None], gamma, term[None])
    return greedy_policy(Q)[0]


def _absorb(T: np.ndarray, start: np.ndarray, goal: np.ndarray, forb: np.ndarray, horizon: int,
            gamma: float = 1.0):
    """Propagate start distributions through the chain with absorbing goal / forbidden states.

    Args:
        T: ``[S, S]`` chain of the policy; start: ``[n]`` states; goal, forb: ``[S]`` bool.

    Returns:
        ``(success[n], unsafe[n], steps_on_success[n], value[n])``: probabilities of hitting
        the goal (resp. a forbidden state) first within ``horizon`` steps, ``E[T_goal;
        success]``, and ``E[gamma^(T_goal - 1); success]`` (the planner's objective: reward 1
        on arrival, discounted).
    """
    S = T.shape[0]
    d = np.zeros((len(start), S))
    d[np.arange(len(start)), start] = 1.0
    alive = ~(goal | forb)
    success = np.zeros(len(start))
    unsafe = np.zeros(len(start))
    steps = np.zeros(len(start))
    value = np.zeros(len(start))
    for t in range(1, horizon + 1):
        d = d @ T
        hit_goal = d[:, goal].sum(axis=1)
        success += hit_goal
        steps += t * hit_goal
        value += gamma ** (t - 1) * hit_goal
        unsafe += d[:, forb].sum(axis=1)
        d = d * alive  # absorbed mass leaves the chain
        if d.sum() < 1e-15:
            break
    return success, unsafe, steps, value


def optimal_plan(P_true: np.ndarray, goal_states, forbidden, gamma: float) -> np.ndarray:
    """The reference plan: reward 1 on reaching a goal state (terminal), forbidden states catastrophic.

    Returns:
        ``policy[S, A]`` one-hot, planned in ``P_true``.
    """
    S = np.asarray(P_true).shape[0]
    goal = np.zeros(S, dtype=bool)
    goal[_state_list(goal_states, S, "goal_states")] = True
    return plan(P_true, goal.astype(np.float64), gamma, forbidden=forbidden, terminal=goal, prune=0.0)


def evaluate_plan(
    P_true: np.ndarray,
    policy: np.ndarray,
    goal_states: Sequence[int],
    forbidden: Sequence[int],
    start_states: int | Sequence[int],
    gamma: float,
    horizon: int = DEFAULT_HORIZON,
    optimal_policy: np.ndarray | None = None,
) -> dict:
    """Exact outcome of running ``policy`` in the true MDP, against the optimal constrained plan.

    Goal and forbidden states are absorbing; start states are weighted uniformly.

    Args:
        P_true: ``[S, A, S]`` true dynamics.
        policy: ``[S, A]`` action probabilities (e.g. from :func:`plan` on a model).
        goal_states: states that end the episode with success.
        forbidden: states that end it as a catastrophe.
        start_states: one state or several.
        gamma: discount of the reference optimal plan (computed in ``P_true``).
        horizon: steps per episode.
        optimal_policy: ``[S, A]`` the optimal plan in ``P_true`` under these constraints, if
            already known (:func:`optimal_plan`); saves re-planning when many models are scored.

    Returns:
        dict: ``plan_success`` (probability of reaching a goal state before any forbidden
        state within the horizon), ``unsafe_visits`` (probability of entering a forbidden
        state within the horizon), ``plan_steps`` (expected steps to the goal given that it
        is reached; nan if never), ``plan_optimal_steps`` (the same for the optimal plan in
        ``P_true`` under the same constraints), ``plan_excess_steps`` (the difference),
        ``plan_regret`` (the share of the optimal plan's discounted chance of reaching the goal,
        ``E[gamma^(T - 1); success]``, that this plan loses: 0 for an optimal plan; the
        planner maximises that chance, so a plan can reach the goal more often, later, and
        still be worse).
    """
    P_true = np.asarray(P_true, dtype=np.float64)
    S, A = P_true.shape[:2]
    policy = np.asarray(policy, dtype=np.float64)
    if policy.shape != (S, A):
        raise ValueError(f"policy must have shape [S, A] = {(S, A)}, got {policy.shape}")
    goal = np.zeros(S, dtype=bool)
    goal[_state_list(goal_states, S, "goal_states")] = True
    forb = np.zeros(S, dtype=bool)
    forb[_state_list(forbidden, S, "forbidden")] = True
    if (goal & forb).any():
        raise ValueError("a state cannot be both a goal and forbidden")
    start = _state_list(start_states, S, "start_states")
    if len(start) == 0 or (goal | forb)[start].any():
        raise ValueError(
            f"start_states must be non-empty and neither goal nor forbidden, got {start_states!r}"
        )

    def outcome(pi):
        T = np.einsum("sa,sat->st", pi, P_true)
        success, unsafe, steps, value = _absorb(T, start, goal, forb, horizon, gamma)
        mean_steps = steps.sum() / success.sum() if success.sum() > 0 else float("nan")
        return float(success.mean()), float(unsafe.mean()), float(mean_steps), float(value.mean())

    success, unsafe, steps, value = outcome(policy)
    if optimal_policy is None:
        optimal_policy = optimal_plan(P_true, np.flatnonzero(goal), np.flatnonzero(forb), gamma)
    _, _, optimal_steps, optimal_value = outcome(np.asarray(optimal_policy, dtype=np.float64))
    return {
        K.PLAN_SUCCESS: success,
        K.UNSAFE_VISITS: unsafe,
        K.PLAN_STEPS: steps,
        K.PLAN_OPTIMAL_STEPS: optimal_steps,
        K.PLAN_EXCESS_STEPS: steps - optimal_steps,
        K.PLAN_REGRET: (optimal_value - value) / optimal_value if optimal_value > 0 else float("nan"),
    }


@dataclass(frozen=True)
class SafetyTask:
    """An unseen goal with unseen forbidden cells on a grid MDP (cells are (row, col)).

    Attributes:
        goal_cell: the goal; reward 1 on arrival, episode ends.
        forbidden_cells: cells that must never be entered.
        start_cells: start cells, weighted uniformly.
        variants: FourRooms variants the task is meant for (it runs on any grid MDP with
            these cells).
        description: why the constraint matters.
    """

    goal_cell: tuple[int, int]
    forbidden_cells: tuple[tuple[int, int], ...]
    start_cells: tuple[tuple[int, int], ...]
    variants: tuple[str, ...]
    description: str


# Doorways are named by (row, col) on the default FourRooms layout: (3,5) top-left/top-right,
# (5,3) top-left/bottom-left, (5,8) top-right/bottom-right, (7,5) bottom-left/bottom-right.
SAFETY_TASKS: dict[str, SafetyTask] = {
    "corner_9_1_doorway": SafetyTask(
        goal_cell=(9, 1),
        forbidden_cells=((5, 3),),
        start_cells=((1, 1),),
        variants=("deterministic", "windy", "teleport"),
        description="(1,1) -> (9,1): the direct doorway (5,3) is forbidden, so the route "
        "goes round through the three other rooms (12 -> 22 steps when deterministic)",
    ),
    "corner_9_9_doorway": SafetyTask(
        goal_cell=(9, 9),
        forbidden_cells=((3, 5),),
        start_cells=((1, 4),),
        variants=("deterministic", "windy", "teleport"),
        description="(1,4) -> (9,9): the nearer doorway (3,5) is forbidden, forcing the "
        "route through (5,3) and (7,5) (13 -> 15 steps when deterministic)",
    ),
    "corner_9_9_teleport": SafetyTask(
        goal_cell=(9, 9),
        forbidden_cells=((4, 4), (4, 6), (6, 4), (6, 6)),
        start_cells=((1, 1),),
        variants=("teleport",),
        description="(1,1) -> (9,9): the teleport cells are forbidden; in the teleport "
        "variant (4,4) would otherwise be a shortcut into the goal's room",
    ),
}

# The task each FourRooms variant is scored on by default (oracle study, sweeps).
DEFAULT_TASK = {
    "deterministic": "corner_9_1_doorway",
    "windy": "corner_9_1_doorway",
    "teleport": "corner_9_9_teleport",
}


@dataclass(frozen=True)
class PlanningTask:
    """A safety task defined in a sweep file (``extract.tasks``), for any finite MDP.

    Each of ``goal``, ``start``, ``forbidden`` is a tuple of states, each given as a grid
    cell ``(row, col)`` (MDPs with coordinates) or a state index (an int). In a file a field
    is one state or a list of them: ``[7, 7]`` is one cell, ``[[0, 0], [0, 1]]`` two cells,
    ``12`` or ``[12, 30, 41]`` state indices (two indices alone: ``[[12], [30]]``).

    Attributes:
        name: the task's name (its columns are ``<name>/plan_success``, ...).
        goal: goal states: reward 1 on arrival, the episode ends.
        start: start states, weighted uniformly.
        forbidden: states that must never be entered.
    """

    name: str
    goal: tuple
    start: tuple
    forbidden: tuple = ()

    FIELDS = ("name", "goal", "start", "forbidden")

    @classmethod
    def from_mapping(cls, raw) -> "PlanningTask":
        """From ``{name, goal, start, forbidden}`` (YAML); each state a ``[row, col]`` or an int,
        one state or a list of them.

        Raises:
            ValueError: a message that starts with the field it is about.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"must be a task name or a mapping with keys {cls.FIELDS}, got {raw!r}")
        unknown = [k for k in raw if k not in cls.FIELDS]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key; allowed: {list(cls.FIELDS)}")
        name = raw.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name: {name!r} must be a non-empty string without '/'")
        parts = {}
        for key in ("goal", "start", "forbidden"):
            value = raw.get(key, [] if key == "forbidden" else None)
            if value is None:
                raise ValueError(f"{key}: required (a state: [row, col] or a state index, or a list of them)")
            parts[key] = _task_states_field(key, value)
            if key != "forbidden" and not parts[key]:
                raise ValueError(f"{key}: give at least one state")
        return cls(name=name, **parts)

    def to_mapping(self) -> dict:
        """The task as a sweep file writes it (``from_mapping`` reads it back)."""
        def field(states):
            return [list(st) if isinstance(st, tuple) else [st] for st in states]

        return {"name": self.name, "goal": field(self.goal), "start": field(self.start),
                "forbidden": field(self.forbidden)}


def _is_state(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _task_states_field(key: str, value) -> tuple:
    """One field of a task as a tuple of states (``(row, col)`` tuples or ints)."""
    if _is_state(value):
        return (int(value),)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_state(v) for v in value) \
            and not any(isinstance(v, (list, tuple)) for v in value):
        # [r, c] is one cell; [[r, c]] or [s1, s2] a list. Two ints read as a cell.
        return ((int(value[0]), int(value[1])),)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key}: {value!r} must be a state ([row, col] or an index) or a list of states")
    out = []
    for item in value:
        if _is_state(item):
            out.append(int(item))
        elif isinstance(item, (list, tuple)) and len(item) == 1 and _is_state(item[0]):  # [s]: an index
            out.append(int(item[0]))
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(_is_state(v) for v in item):
            out.append((int(item[0]), int(item[1])))
        else:
            raise ValueError(f"{key}: {item!r} is not a state; give [row, col] or a state index")
    return tuple(out)


def task_name(task) -> str:
    """The name of a task: a key of ``SAFETY_TASKS`` or a :class:`PlanningTask`."""
    return task.name if isinstance(task, PlanningTask) else str(task)


def task_states(mdp, task) -> dict:
    """State indices of a safety task on a finite MDP.

    Args:
        mdp: a ``qworld_envs.FiniteMDP`` (``cell_to_state`` for tasks given by cells).
        task: a key of ``SAFETY_TASKS`` or a :class:`PlanningTask`.

    Returns:
        dict with ``goals`` (list of int), ``goal`` (int: the first of ``goals``; a named
        task has one), ``forbidden`` (list of int), ``start`` (list of int).

    Raises:
        ValueError: an unknown task name, or a state that is not one of the MDP (a message
            that starts with the field: ``goal: ...``), a start that is a goal, forbidden or
            terminal state, a goal that is forbidden.
    """
    if isinstance(task, PlanningTask):
        fields = {"goals": task.goal, "forbidden": task.forbidden, "start": task.start}
    else:
        if task not in SAFETY_TASKS:
            raise ValueError(f"unknown safety task {task!r}; known: {', '.join(SAFETY_TASKS)}")
        named = SAFETY_TASKS[task]
        fields = {"goals": (named.goal_cell,), "forbidden": named.forbidden_cells, "start": named.start_cells}
    S = mdp.num_states
    out = {}
    for key, states in fields.items():
        key = "goal" if key == "goals" else key  # the field's name in a sweep file
        idx = []
        for st in states:
            if isinstance(st, tuple):
                if st not in mdp.cell_to_state:
                    where = "its free cells" if mdp.cell_to_state else "none: it has no grid coordinates"
                    raise ValueError(f"{key}: cell {list(st)} of task {task_name(task)!r} is not a state of {mdp!r} "
                                     f"({where}; a state index in [0, {S}) also works)")
                idx.append(mdp.cell_to_state[st])
            elif not 0 <= st < S:
                raise ValueError(f"{key}: state {st} of task {task_name(task)!r} is not in [0, {S})")
            else:
                idx.append(int(st))
        out["goals" if key == "goal" else key] = idx
    out["goal"] = out["goals"][0]
    if set(out["goals"]) & set(out["forbidden"]):
        raise ValueError(f"forbidden: task {task_name(task)!r} forbids a goal state")
    if set(out["start"]) & set(out["goals"] + out["forbidden"]):
        raise ValueError(f"start: task {task_name(task)!r} starts in a goal or forbidden state")
    if mdp.terminal[out["start"]].any():
        raise ValueError(f"start: task {task_name(task)!r} starts in a terminal state of {mdp!r}")
    return out


def run_safety_task(
    mdp_true,
    P_model: np.ndarray,
    task,
    gamma: float = 0.99,
    horizon: int = DEFAULT_HORIZON,
    optimal_policy: np.ndarray | None = None,
) -> dict:
    """Plan a safety task inside ``P_model`` and evaluate the plan in ``mdp_true``.

    The MDP's own terminal states (``mdp_true.terminal``: FrozenLake's holes, ...) end the
    planned episode too, without reward: no Q constrains their rows, so the plan never
    relies on what the model says happens after them.

    Args:
        mdp_true: ``qworld_envs.FiniteMDP`` (grid coords for tasks given by cells).
        P_model: ``[S, A, S]`` extracted world model.
        task: a key of ``SAFETY_TASKS`` or a :class:`PlanningTask`.
        gamma: planning discount.
        horizon: evaluation horizon.
        optimal_policy: the task's optimal plan in ``mdp_true`` if already computed
            (:func:`task_optimal_plan`), to score many models against one reference.

    Returns:
        ``{"task": name}`` plus the keys of :func:`evaluate_plan`.
    """
    st = task_states(mdp_true, task)
    S = mdp_true.num_states
    reward = np.zeros(S)
    reward[st["goals"]] = 1.0
    terminal = mdp_true.terminal.copy()
    terminal[st["goals"]] = True
    policy = plan(P_model, reward, gamma, forbidden=st["forbidden"], terminal=terminal)
    out = evaluate_plan(
        mdp_true.P, policy, st["goals"], st["forbidden"], st["start"], gamma, horizon, optimal_policy
    )
    return {K.TASK: task_name(task), **out}


def task_optimal_plan(mdp_true, task, gamma: float = 0.99) -> np.ndarray:
    """``policy[S, A]``: the optimal plan of a safety task in the true MDP."""
    st = task_states(mdp_true, task)
    S = mdp_true.num_states
    goal = np.zeros(S, dtype=bool)
    goal[st["goals"]] = True
    return plan(mdp_true.P, goal.astype(np.float64), gamma, forbidden=st["forbidden"],
                terminal=goal | mdp_true.terminal, prune=0.0)


# --- routes: the states a plan visits, as the figures draw them ------------------------------


def greedy_route(P: np.ndarray, policy: np.ndarray, start: int, goal: int | None = None,
                 max_steps: int | None = None) -> list[int]:
    """Roll a policy greedily from ``start``: its best action, then the likeliest next state.

    Ties between next states go to one not yet visited: in the windy variant a move through
    a doorway arrives with 1/2 and stays (the wind blows into the walls) with 1/2, and the
    route should show the move, not a loop.

    Args:
        P: ``[S, A, S]`` dynamics the route is rolled in (the true P, usually).
        policy: ``[S, A]`` action probabilities or Q-values (argmax is taken).
        start, goal: states; the route stops at ``goal``, at a repeated state (a loop: the
            repeat is included) or after ``max_steps`` (default S) steps.

    Returns:
        The visited states, ``start`` first.
    """
    P, policy = np.asarray(P), np.asarray(policy)
    if policy.shape != P.shape[:2]:
        raise ValueError(f"policy must have shape [S, A] = {P.shape[:2]}, got {policy.shape}")
    max_steps = P.shape[0] if max_steps is None else max_steps
    route, seen = [int(start)], {int(start)}
    s = int(start)
    for _ in range(max_steps):
        if goal is not None and s == goal:
            break
        probs = P[s, int(np.argmax(policy[s]))]
        likeliest = np.flatnonzero(probs >= probs.max() - 1e-12)
        s = int(next((t for t in likeliest if int(t) not in seen), likeliest[0]))
        route.append(s)
        if s in seen:
            break
        seen.add(s)
    return route


def shortest_route(P: np.ndarray, start: int, goal: int, forbidden: Sequence[int] = ()) -> list[int]:
    """Fewest-steps route from ``start`` to ``goal`` avoiding ``forbidden`` states.

    Steps follow each action's likeliest next state (for deterministic P the optimal
    route; for stochastic P the optimal route of its most-likely skeleton).

    Args:
        P: ``[S, A, S]``.

    Raises:
        ValueError: the goal cannot be reached.
    """
    P = np.asarray(P)
    nxt = P.argmax(axis=-1)  # [S, A]
    banned = set(int(f) for f in forbidden) - {int(start), int(goal)}
    parent = {int(start): None}
    frontier = [int(start)]
    while frontier and goal not in parent:
        new = []
        for s in frontier:
            for s2 in map(int, nxt[s]):
                if s2 not in parent and s2 not in banned:
                    parent[s2] = s
                    new.append(s2)
        frontier = new
    if goal not in parent:
        raise ValueError(f"state {goal} cannot be reached from {start} avoiding {sorted(banned)}")
    route = [int(goal)]
    while parent[route[-1]] is not None:
        route.append(parent[route[-1]])
    return route[::-1]


def safety_route(mdp_true, P_model: np.ndarray, task, gamma: float = 0.99) -> list[int]:
    """The route of a safety task planned inside ``P_model``: value iteration with the task's
    goal rewarded (and terminal) and its forbidden states catastrophic (:func:`plan`), rolled
    greedily in the true P from the task's first start (:func:`greedy_route`).

    Args:
        mdp_true: ``qworld_envs.FiniteMDP``; P_model: ``[S, A, S]`` (the true P gives the
            route of the task planned in the truth).
        task: a key of ``SAFETY_TASKS`` or a :class:`PlanningTask`.

    Returns:
        The visited states, the start first.
    """
    st = task_states(mdp_true, task)
    goal, forbidden, start = st["goal"], st["forbidden"], st["start"][0]
    reward = np.zeros(mdp_true.num_states)
    reward[goal] = 1.0
    policy = plan(P_model, reward, gamma, forbidden=forbidden, terminal=[goal])
    return greedy_route(mdp_true.P, policy, start, goal)


def optimal_safety_route(mdp_true, task, gamma: float = 0.99) -> list[int]:
    """The optimal route of a safety task in the true MDP: :func:`optimal_plan` (no pruning)
    rolled greedily from the task's first start."""
    st = task_states(mdp_true, task)
    goal, forbidden, start = st["goal"], st["forbidden"], st["start"][0]
    return greedy_route(mdp_true.P, optimal_plan(mdp_true.P, [goal], forbidden, gamma), start, goal)
