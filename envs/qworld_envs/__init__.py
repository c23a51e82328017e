"""qworld environments: finite MDPs, goal families, gymnasium and batched torch envs.

Importing this package registers the gymnasium env ``qworld/FourRooms-v0``; it never
imports Ray.
"""

import gymnasium

from qworld_envs.batched import BATCHED_ENVS, BatchedFiniteEnv, BatchedGoalEnv, has_batched, make_batched
from qworld_envs.finite import FiniteMDP
from qworld_envs.four_rooms import FOUR_ROOMS_LAYOUT, VARIANTS, four_rooms
from qworld_envs.goals import GOAL_TYPES, GoalSet, dense_goals, indicator_goals, make_goals
from qworld_envs.gym_env import FourRoomsGoalEnv
from qworld_envs.tasks import FINITE_ENVS, FOUR_ROOMS_ID, FiniteTask, make_finite_task, true_P

# Guarded: re-importing (e.g. importlib.reload in a notebook) must not warn or fail.
if FOUR_ROOMS_ID not in gymnasium.registry:
    gymnasium.register(id=FOUR_ROOMS_ID, entry_point="qworld_envs.gym_env:FourRoomsGoalEnv")

__all__ = [
    "BATCHED_ENVS",
    "FINITE_ENVS",
    "FOUR_ROOMS_ID",
    "FOUR_ROOMS_LAYOUT",
    "GOAL_TYPES",
    "VARIANTS",
    "BatchedFiniteEnv",
    "BatchedGoalEnv",
    "FiniteMDP",
    "FiniteTask",
    "FourRoomsGoalEnv",
    "GoalSet",
    "dense_goals",
    "four_rooms",
    "has_batched",
    "indicator_goals",
    "make_batched",
    "make_finite_task",
    "make_goals",
    "true_P",
]
from qworld_envs import continuous  # noqa: E402,F401 - registers the continuous envs (gymnasium ids, batched factories)
