"""Offline goal-conditioned IQ-Learn (Garg et al., NeurIPS 2021) on RLlib's new API stack.

``IQLearnConfig`` / ``IQLearn`` (config, algorithm: RLlib's offline data pipeline over
demonstrations of ``qworld.demonstrations``), ``IQLearnTorchLearner`` (the offline chi^2
IQ loss), ``IQLearnTorchRLModule`` (PQN's all-goals Q-network; the QFunction API) and the
pure loss in ``losses``.

For a registry of algorithms: ``"iqlearn": (IQLearn, IQLearnConfig)``.
"""

from qworld.agents.iqlearn.iqlearn import ALGORITHM_NAME, IQLearn, IQLearnConfig
from qworld.agents.iqlearn.learner import IQLearnTorchLearner, iq_learn_losses
from qworld.agents.iqlearn.module import IQLearnTorchRLModule

__all__ = ["ALGORITHM_NAME", "IQLearn", "IQLearnConfig", "IQLearnTorchLearner", "IQLearnTorchRLModule",
           "iq_learn_losses"]
