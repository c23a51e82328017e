"""Goal-conditioned PQN on RLlib's new API stack.

``PQNConfig`` / ``PQN`` (config, algorithm), ``PQNTorchLearner`` (Q(lambda) targets once
per rollout, epochs of minibatch MSE), ``PQNTorchRLModule`` (all-goals or goal-input
Q-network, ``compute_q_values``), ``BatchedEnvRunner`` (batched torch envs), and the pure
``q_lambda_targets``.
"""

from qworld.agents.pqn.fast_env_runner import BatchedEnvRunner
from qworld.agents.pqn.learner import PQNTorchLearner, build_train_rows, her_goals
from qworld.agents.pqn.module import EPSILON, GOAL, Q_ALL_GOALS, PQNTorchRLModule
from qworld.agents.pqn.pqn import PQN, PQNConfig
from qworld.agents.pqn.targets import q_lambda_targets

__all__ = [
    "EPSILON",
    "GOAL",
    "PQN",
    "Q_ALL_GOALS",
    "BatchedEnvRunner",
    "PQNConfig",
    "PQNTorchLearner",
    "PQNTorchRLModule",
    "build_train_rows",
    "her_goals",
    "q_lambda_targets",
]
