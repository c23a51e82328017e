"""qworld environments: finite MDPs, goal families, gymnasium and batched torch envs.

Importing this package registers the gymnasium ids of every env (``qworld_envs.registry``:
``qworld/FourRooms-v0``, ``qworld/MountainCar-v0``, ``qworld/Reacher-v0``,
``qworld/MujocoReacher-v0``, gymnasium's tabular envs as ``qworld/FrozenLake-v1``, ...,
and ``qworld/TabularMDP-v0``, any MDP from an ``.npz``: ``qworld_envs.tabular``); it never imports Ray, and MuJoCo only once a MuJoCo env is built.
"""

from qworld_envs import registry
from qworld_envs.batched import BatchedFiniteEnv, BatchedGoalEnv
from qworld_envs.continuous import (
    MOUNTAIN_CAR_ID,
    MUJOCO_REACHER_ID,
    REACHER_ID,
    BatchedContinuousEnv,
    ContinuousDynamics,
    ContinuousGoalEnv,
    ContinuousGoals,
    ContinuousProblem,
)
from qworld_envs.finite import FiniteMDP
from qworld_envs.four_rooms import FOUR_ROOMS_ID, FOUR_ROOMS_LAYOUT, VARIANTS, four_rooms
from qworld_envs.goals import GOAL_TYPES, GoalSet, dense_goals, indicator_goals, make_goals
from qworld_envs.gym_env import FourRoomsGoalEnv
from qworld_envs.kwargs import resolve_kwargs
from qworld_envs.registry import (
    BATCHED_ENVS,
    CONTINUOUS_ENVS,
    CPU_ONLY_BATCHED,
    FINITE_ENVS,
    has_batched,
    make_batched,
    make_continuous_problem,
    make_finite_problem,
    resolve_finite_env,
    true_P,
)
from qworld_envs.problems import FiniteProblem

# Guarded: re-importing (e.g. importlib.reload in a notebook) must not warn or fail.
registry.register_gym_envs()

__all__ = [
    "BATCHED_ENVS",
    "CONTINUOUS_ENVS",
    "CPU_ONLY_BATCHED",
    "FINITE_ENVS",
    "FOUR_ROOMS_ID",
    "FOUR_ROOMS_LAYOUT",
    "GOAL_TYPES",
    "MOUNTAIN_CAR_ID",
    "MUJOCO_REACHER_ID",
    "REACHER_ID",
    "VARIANTS",
    "BatchedContinuousEnv",
    "BatchedFiniteEnv",
    "BatchedGoalEnv",
    "ContinuousDynamics",
    "ContinuousGoalEnv",
    "ContinuousGoals",
    "ContinuousProblem",
    "FiniteMDP",
    "FiniteProblem",
    "FourRoomsGoalEnv",
    "GoalSet",
    "dense_goals",
    "four_rooms",
    "has_batched",
    "indicator_goals",
    "make_batched",
    "make_continuous_problem",
    "make_finite_problem",
    "make_goals",
    "resolve_finite_env",
    "resolve_kwargs",
    "true_P",
]
