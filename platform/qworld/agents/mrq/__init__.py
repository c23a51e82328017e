"""Goal-conditioned MR.Q (Fujimoto et al., ICLR 2025) on RLlib's new API stack.

``MRQConfig`` / ``MRQ`` (config, algorithm: RLlib's standard env runner, an RLlib
``EpisodeReplayBuffer`` in arrays: ``qworld.agents.replay_buffer``), ``MRQTorchLearner`` (unrolled model loss + per-goal n-step
Huber value loss), ``MRQTorchRLModule`` (encoders, linear model, two all-goals value
heads; the QFunction API), and the pure targets / losses in ``losses``.

For a registry of algorithms: ``"mrq": (MRQ, MRQConfig)``.
"""

from qworld.agents.mrq.learner import MRQTorchLearner, mrq_losses
from qworld.agents.mrq.module import MRQTorchRLModule
from qworld.agents.mrq.mrq import ALGORITHM_NAME, MRQ, MRQConfig

__all__ = ["ALGORITHM_NAME", "MRQ", "MRQConfig", "MRQTorchLearner", "MRQTorchRLModule", "mrq_losses"]
