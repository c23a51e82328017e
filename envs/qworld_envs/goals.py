"""Goal families for finite MDPs: rewards on arrival and terminal states per goal (and the
commanded goal of an episode, shared by every gymnasium env).

Shapes: S states, L goals. A goal g pays ``rewards[g, s']`` on the transition that
arrives in ``s'`` and ends the episode there when ``terminal[g, s']``; the episode is a
success when ``success[g, s']`` (the goal's own terminal states: an MDP's own terminal
states, e.g. FrozenLake's holes, end every goal's episode without success).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from qworld_envs.finite import FiniteMDP

GOAL_TYPES = ("indicator", "dense")


@dataclass(frozen=True)
class GoalSet:
    """L goals over the S states of one finite MDP.

    Attributes:
        rewards: ``[L, S]`` float64, reward for arriving in s' under goal g.
        terminal: ``[L, S]`` bool, the episode ends on arriving in s' under goal g.
        goal_states: ``[L]`` int64, the goal state of each goal (indicator goals),
            or None when goals are not states (dense goals).
        goal_type: one of ``GOAL_TYPES``.
        success: ``[L, S]`` bool, arriving in s' under goal g reaches the goal (a subset of
            ``terminal``); None means ``terminal``.
    """

    rewards: np.ndarray
    terminal: np.ndarray
    goal_states: np.ndarray | None
    goal_type: str
    success: np.ndarray | None = None

    def __post_init__(self):
        rewards = np.asarray(self.rewards, dtype=np.float64)
        terminal = np.asarray(self.terminal, dtype=bool)
        if rewards.ndim != 2 or rewards.shape[0] == 0:
            raise ValueError(f"rewards must have shape [L, S] with L >= 1, got {rewards.shape}")
        if terminal.shape != rewards.shape:
            raise ValueError(f"terminal must have the shape of rewards {rewards.shape}, got {terminal.shape}")
        goal_states = self.goal_states
        if goal_states is not None:
            goal_states = np.asarray(goal_states, dtype=np.int64)
            if goal_states.shape != (rewards.shape[0],):
                raise ValueError(f"goal_states must have shape [L] = [{rewards.shape[0]}], got {goal_states.shape}")
        success = terminal.copy() if self.success is None else np.asarray(self.success, dtype=bool)
        if success.shape != terminal.shape or (success & ~terminal).any():
            raise ValueError(f"success must be a [L, S] bool subset of terminal {terminal.shape}, got {success.shape}")
        for arr in (rewards, terminal, goal_states, success):
            if arr is not None:
                arr.setflags(write=False)
        # frozen dataclass: normalised arrays are stored through object.__setattr__
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "terminal", terminal)
        object.__setattr__(self, "goal_states", goal_states)
        object.__setattr__(self, "success", success)

    @property
    def num_goals(self) -> int:
        """L."""
        return self.rewards.shape[0]

    @property
    def num_states(self) -> int:
        """S."""
        return self.rewards.shape[1]


def start_states(terminal: np.ndarray) -> list[np.ndarray]:
    """Allowed start states of each goal: the states that are not terminal for it.

    Args:
        terminal: ``[L, S]`` bool.

    Returns:
        L int64 arrays of states.

    Raises:
        ValueError: a goal with every state terminal (no episode could start).
    """
    starts = [np.flatnonzero(~row) for row in terminal]
    empty = [g for g, s in enumerate(starts) if len(s) == 0]
    if empty:
        raise ValueError(f"goals {empty} have every state terminal: no start state")
    return starts


def _check_num_goals(num_goals) -> int:
    if isinstance(num_goals, bool) or not isinstance(num_goals, (int, np.integer)) or num_goals < 1:
        raise ValueError(f"num_goals must be a positive int, got {num_goals!r}")
    return int(num_goals)


def indicator_goals(
    mdp: FiniteMDP,
    num_goals: int | None = None,
    cells: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> GoalSet:
    """Sparse goals: reward 1 on arriving at the goal state, which is terminal.

    Goal states come from ``cells`` when given; else ``num_goals`` distinct states
    drawn with ``seed`` (a prefix of one random permutation, so for a fixed seed the
    goals of a smaller L are among those of a larger L); else all S states in order.

    Raises:
        ValueError: a cell that is not a state (wall, off-grid, or an MDP without
            coords), ``num_goals`` disagreeing with ``len(cells)``, or ``num_goals > S``.
    """
    S = mdp.num_states
    if cells is not None:
        cells = [tuple(int(x) for x in cell) for cell in cells]
        if not cells:
            raise ValueError("cells is empty: give at least one goal cell")
        if not mdp.cell_to_state:
            raise ValueError(f"{mdp!r} has no grid coords, so goal cells cannot be used")
        unknown = [cell for cell in cells if cell not in mdp.cell_to_state]
        if unknown:
            raise ValueError(f"goal cells {unknown} are not free cells of {mdp!r} (walls or off the grid)")
        if num_goals is not None and num_goals != len(cells):
            raise ValueError(f"num_goals={num_goals} but {len(cells)} goal cells were given")
        goal_states = np.array([mdp.cell_to_state[cell] for cell in cells], dtype=np.int64)
    elif num_goals is None:
        goal_states = np.arange(S, dtype=np.int64)
    else:
        num_goals = _check_num_goals(num_goals)
        if num_goals > S:
            raise ValueError(f"num_goals={num_goals} indicator goals need distinct states, but S={S}")
        goal_states = np.random.default_rng(seed).permutation(S)[:num_goals].astype(np.int64)
    L = len(goal_states)
    rewards = np.zeros((L, S))
    rewards[np.arange(L), goal_states] = 1.0
    return GoalSet(rewards=rewards, terminal=rewards > 0, goal_states=goal_states, goal_type="indicator")


def dense_goals(mdp: FiniteMDP, num_goals: int | None, seed: int = 0) -> GoalSet:
    """Generic dense goals: ``rewards[g, s'] ~ U(0, 1)`` i.i.d., no terminal state.

    Generic rewards make M invertible almost surely once L >= S (the stochastic
    case of the paper's Table 1). ``num_goals=None`` means L = S.
    """
    num_goals = mdp.num_states if num_goals is None else _check_num_goals(num_goals)
    rewards = np.random.default_rng(seed).uniform(0.0, 1.0, size=(num_goals, mdp.num_states))
    return GoalSet(
        rewards=rewards, terminal=np.zeros(rewards.shape, dtype=bool), goal_states=None, goal_type="dense"
    )


def make_goals(
    mdp: FiniteMDP,
    goal_type: str,
    num_goals: int | None,
    seed: int,
    cells: Sequence[tuple[int, int]] | None = None,
) -> GoalSet:
    """Build a goal set by ``goal_type`` (one of ``GOAL_TYPES``).

    ``num_goals=None`` means all S states (indicator) or L = S (dense). The MDP's own
    terminal states (``mdp.terminal``: FrozenLake's holes, ...) end every goal's episode
    (paying that goal's arrival reward) without counting as its success.
    """
    if goal_type == "indicator":
        goals = indicator_goals(mdp, num_goals=num_goals, cells=cells, seed=seed)
    elif goal_type == "dense":
        if cells is not None:
            raise ValueError("goal cells are only meaningful for goal_type='indicator', not 'dense'")
        goals = dense_goals(mdp, num_goals, seed=seed)
    else:
        raise ValueError(f"unknown goal_type {goal_type!r} for finite MDPs; allowed: {', '.join(GOAL_TYPES)}")
    return with_env_terminals(goals, mdp.terminal)


def with_env_terminals(goals: GoalSet, env_terminal: np.ndarray) -> GoalSet:
    """``goals`` whose episodes also end on the env's terminal states ``env_terminal [S]``
    (success stays the goals' own); ``goals`` itself when there are none."""
    env_terminal = np.asarray(env_terminal, dtype=bool)
    if not env_terminal.any():
        return goals
    return GoalSet(rewards=goals.rewards, terminal=goals.terminal | env_terminal[None], goal_states=goals.goal_states,
                   goal_type=goals.goal_type, success=goals.success)


def commanded_goal(np_random: np.random.Generator, num_goals: int, options: dict[str, Any]) -> int:
    """The goal an episode is commanded: ``options["goal"]`` if given, else uniform."""
    goal = options.get("goal")
    if goal is None:
        return int(np_random.integers(num_goals))
    if not 0 <= int(goal) < num_goals:
        raise ValueError(f"options['goal']={goal} is not in [0, {num_goals})")
    return int(goal)
